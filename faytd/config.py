"""faytd's configuration: an embedded default, overridden by a JSON file.

The file has the same keys as DEFAULT; "policy" replaces the default policy
whole (tightening it means writing the rules you want), other keys replace
their value.  Sizes may be numbers of bytes or strings like "256MiB"; the RAM limits per
uid may also be a share of "ram" ("50%"), and the reserves a share of their
total.  docs/limits.md says what each limit bounds and why its default.
"""
import copy
import json
import re

DEFAULT = {
    "socket": None,              # None: libportal's default_socket_path()
    "socket_mode": "0600",       # the socket file; its directory is made 0700 if new
    "state_dir": None,           # None: the socket's directory
    "ram": "1GiB",               # emulated RAM
    "max_portal_length": "1GiB", # one portal at most (portal_req.length is an int)
    "max_sharepoints": 100000,
    "max_mappings_per_context": 65536,
    "max_ram_per_context": None, # None: no quota but faytd's RAM; else e.g. "64MiB"
    "pager_timeout": 10,         # seconds a chain server may take over a page (chains may set theirs)
    "pager_spin_us": None,       # faytd spins this long for a page answer before it goes back
                                 # to its loop; None: 50 with 2 CPUs or more, else 0
    "loop_spin_us": None,        # faytd looks this long for the next request (yielding the
                                 # CPU at each look) before it sleeps; None: 100 with 2 CPUs
                                 # or more, else 0
    "fast_syscalls": True,       # share-point create and destroy in C (faytd/core/serve.c);
                                 # false: every call goes through Python (same results)
    "recycle_objects": True,     # the fast path may give a context the object of a share-point
                                 # it alone held back for its next one (docs/design.md, "How
                                 # faytd answers fast": false if clients pass portal fds on)
    # Limits per uid and per process (docs/limits.md).  They bind contexts
    # whose category is not core; core contexts are bound by the totals
    # alone, and the reserved part of each total is theirs only.
    "max_connections": None,         # open connections in all; None: what faytd's
                                     # RLIMIT_NOFILE allows (2 descriptors each)
    "reserved_connections": 64,      # of max_connections, for core contexts only
    "max_connections_per_uid": 256,
    "max_connections_per_process": 64,
    "max_contexts_per_uid": 1024,    # registered contexts, connected or kept after their
                                     # connection closed (their lock records)
    "max_contexts_per_process": 256,
    "max_sharepoints_per_uid": 10000,
    "reserved_sharepoints": "5%",    # of max_sharepoints, for core contexts only
    "max_ram_per_uid": "50%",        # of ram
    "reserved_ram": "10%",           # of ram, for core contexts only
    "max_rings_per_uid": 1024,       # notification rings its contexts send on
    "max_stacks_per_uid": 1024,      # notification stacks its contexts hold
    "max_published_per_uid": 1024,   # names its contexts published (docs/discovery.md)
    "max_queues_per_uid": 64,        # user->kernel queues its contexts hold (docs/queue.md)
    "max_channels_per_uid": 1024,    # channels and listeners its contexts hold (docs/channels.md)
    "max_passes_per_uid": 256,       # untaken passes by reference its contexts made (channels.md)
    "flood_nice": 19,            # a non-core uid that floods faytd while core contexts call
                                 # runs at this nice until it stops (null: never; docs/limits.md)
    "flood_calls_per_s": 2000,   # what counts as a flood: a uid's requests a second
    "devices": [],               # device windows: {"name", "base", "size"} (docs/devices.md)
    "cow_snapshot_spare": "64MiB",  # one object made ahead for the next strict snapshot of the
                                    # last one's size, up to this (0: none; docs/limits.md)
    "policy": {
        "categories": {
            "core": {"classes": ["SHARE", "DIRECT", "ANON", "COW", "SPECIAL"],
                     "notify_handlers": True, "mmio": ["*"], "chains": ["*"], "notify": ["*"]},
            "driver": {"classes": ["SHARE", "DIRECT", "ANON"], "mmio": ["*"], "notify": ["$uid"]},
            "server": {"classes": ["SHARE", "ANON"], "notify": ["$uid"]},
        },
        "rules": [
            {"uid": 0, "category": "core"},
            {"uid": "$owner", "category": "core"},
        ],
        "default": "server",
    },
}

_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30}


def parse_size(v, what):
    if isinstance(v, int) and v > 0:
        return v
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(v))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError("config: %s: %r is not a size (e.g. 1048576 or \"256MiB\")" % (what, v))
    n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise ValueError("config: %s must be positive" % what)
    if n >= 1 << 64:
        raise ValueError("config: %s: %r is more than 2^64 bytes" % (what, v))
    return n


def _share(v, total, what, size):
    """v as a count (size: a size) or "N%" of total."""
    m = re.fullmatch(r"\s*(\d+)\s*%\s*", v) if isinstance(v, str) else None
    if m:
        if int(m.group(1)) > 100:
            raise ValueError("config: %s: %r is more than 100%%" % (what, v))
        return total * int(m.group(1)) // 100
    if size:
        return 0 if v == 0 else parse_size(v, what)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 32:
        raise ValueError("config: %s: %r is not a whole number from 0 to %d or a share "
                         "(\"5%%\")" % (what, v, (1 << 32) - 1))
    return v


def _count(cfg, key, least=1, none=False):
    v = cfg[key]
    if v is None and none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or not least <= v < 1 << 32:
        raise ValueError("config: %s: %r is not a whole number from %d to %d"
                         % (key, v, least, (1 << 32) - 1))


def load(path=None, overrides=None):
    cfg = copy.deepcopy(DEFAULT)
    if path:
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError("config: %s: %s" % (path, e)) from None
        unknown = set(data) - set(DEFAULT)
        if unknown:
            raise ValueError("config: %s: unknown keys %s" % (path, sorted(unknown)))
        cfg.update(data)
    for k, v in (overrides or {}).items():
        if v is not None:
            cfg[k] = v
    cfg["ram"] = parse_size(cfg["ram"], "ram")
    if cfg["ram"] < 4096:
        raise ValueError("config: ram: %d bytes is less than one 4096-byte frame" % cfg["ram"])
    if cfg["ram"] // 4096 >= 1 << 32:
        raise ValueError("config: ram: %d bytes is 2^32 frames or more" % cfg["ram"])
    cfg["max_portal_length"] = parse_size(cfg["max_portal_length"], "max_portal_length")
    spare = cfg["cow_snapshot_spare"]
    cfg["cow_snapshot_spare"] = 0 if spare in (0, "0") else parse_size(spare, "cow_snapshot_spare")
    if cfg["max_ram_per_context"] is not None:
        cfg["max_ram_per_context"] = parse_size(cfg["max_ram_per_context"], "max_ram_per_context")
    for key in ("fast_syscalls", "recycle_objects"):
        if not isinstance(cfg[key], bool):
            raise ValueError("config: %s must be true or false" % key)
    for key in ("max_sharepoints", "max_mappings_per_context", "max_connections_per_uid",
                "max_connections_per_process", "max_contexts_per_uid",
                "max_contexts_per_process", "max_sharepoints_per_uid", "max_rings_per_uid",
                "max_stacks_per_uid", "max_published_per_uid",
                "max_queues_per_uid", "max_channels_per_uid", "max_passes_per_uid"):
        _count(cfg, key)
    _count(cfg, "max_connections", none=True)
    _count(cfg, "flood_calls_per_s")
    v = cfg["flood_nice"]
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 19):
        raise ValueError("config: flood_nice: %r is not a nice value from 1 to 19 (or null)"
                         % (v,))
    _count(cfg, "reserved_connections", least=0)
    if cfg["max_connections"] is not None and \
            cfg["reserved_connections"] >= cfg["max_connections"]:
        raise ValueError("config: reserved_connections (%d) must be less than max_connections "
                         "(%d)" % (cfg["reserved_connections"], cfg["max_connections"]))
    cfg["reserved_sharepoints"] = _share(cfg["reserved_sharepoints"], cfg["max_sharepoints"],
                                         "reserved_sharepoints", False)
    cfg["max_ram_per_uid"] = _share(cfg["max_ram_per_uid"], cfg["ram"], "max_ram_per_uid", True)
    cfg["reserved_ram"] = _share(cfg["reserved_ram"], cfg["ram"], "reserved_ram", True)
    cfg["devices"] = _devices(cfg["devices"], cfg["ram"])
    mode = cfg["socket_mode"]
    cfg["socket_mode"] = int(mode, 8) if isinstance(mode, str) else int(mode)
    return cfg


RAM_BASE = 0x100000         # FAYT_RAM_BASE (faytd/core/core.h): frame 0's address
_DEVICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,31}")


def _devices(v, ram):
    """The device windows, checked: [{"name", "base", "size"}] with numbers,
    each outside RAM's frames and overlapping no other (docs/devices.md)."""
    if not isinstance(v, list):
        raise ValueError("config: devices must be a list of windows")
    out, names = [], set()
    for i, w in enumerate(v):
        what = "devices[%d]" % i
        if not isinstance(w, dict):
            raise ValueError("config: %s must be an object {\"name\", \"base\", \"size\"}" % what)
        unknown = set(w) - {"name", "base", "size"}
        if unknown:
            raise ValueError("config: %s: unknown keys %s" % (what, sorted(unknown)))
        name = w.get("name")
        if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
            raise ValueError("config: %s.name: %r is not 1 to 31 characters of A-Za-z0-9_.-"
                             % (what, name))
        if name in names:
            raise ValueError("config: %s.name: %r names another window too" % (what, name))
        names.add(name)
        base = w.get("base")
        try:
            base = base if isinstance(base, int) and not isinstance(base, bool) \
                else int(str(base), 0)
        except ValueError:
            raise ValueError("config: %s.base: %r is not an address" % (what, base)) from None
        if base < 0 or base % 4096:
            raise ValueError("config: %s.base: %#x is not a 4 KiB aligned address"
                             % (what, base))
        size = parse_size(w.get("size"), what + ".size")
        if size % 4096:
            raise ValueError("config: %s.size: %d is not a multiple of 4096" % (what, size))
        if base + size > 1 << 64:
            raise ValueError("config: %s: %#x + %d ends past 2^64" % (what, base, size))
        if base < RAM_BASE + ram and RAM_BASE < base + size:
            raise ValueError("config: %s: %#x..%#x overlaps RAM's frames (%#x..%#x)"
                             % (what, base, base + size, RAM_BASE, RAM_BASE + ram))
        for o in out:
            if base < o["base"] + o["size"] and o["base"] < base + size:
                raise ValueError("config: %s: %#x..%#x overlaps window %s" % (
                    what, base, base + size, o["name"]))
        out.append({"name": name, "base": base, "size": size})
    return out
