"""faytd's configuration: an embedded default, overridden by a JSON file.

The file has the same keys as DEFAULT; "policy" replaces the default policy
whole (tightening it means writing the rules you want), other keys replace
their value.  Sizes may be numbers of bytes or strings like "256MiB".
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
    if cfg["ram"] // 4096 >= 1 << 32:
        raise ValueError("config: ram: %d bytes is 2^32 frames or more" % cfg["ram"])
    cfg["max_portal_length"] = parse_size(cfg["max_portal_length"], "max_portal_length")
    if cfg["max_ram_per_context"] is not None:
        cfg["max_ram_per_context"] = parse_size(cfg["max_ram_per_context"], "max_ram_per_context")
    for key in ("fast_syscalls", "recycle_objects"):
        if not isinstance(cfg[key], bool):
            raise ValueError("config: %s must be true or false" % key)
    for key in ("max_sharepoints", "max_mappings_per_context"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 1 << 32:
            raise ValueError("config: %s: %r is not a whole number from 1 to %d"
                             % (key, v, (1 << 32) - 1))
    mode = cfg["socket_mode"]
    cfg["socket_mode"] = int(mode, 8) if isinstance(mode, str) else int(mode)
    return cfg
