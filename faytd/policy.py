"""Who may do what: identity -> category -> rights.

Identity is what the Linux kernel vouches for: uid and gid from SO_PEERCRED,
and the executable from /proc/<pid>/exe.  Rules are tried in order; the first
that matches names the category.  A category is a set of rights: the portal
classes it may use, whether it may install notification handlers, whom it
may notify (target categories, "*", or "$uid": its own uid's contexts; checked
once, when the ring of a pair is made), which MMIO windows and chains it may
use (MMIO windows are read by a later part), and which shared names it may
create and attach.

Names (docs/names.md): a share-point's identifier lives in the namespace of
the uid that names it, so no uid can take a name another uid's server will
use.  A category's "shared_names" are patterns (a name, or a prefix and
'*') of names that live in one shared namespace instead, which it may create
and attach ({"create": [...], "attach": [...]}; a list: both).  A name is
shared when any category's pattern matches it, whoever asks: a category
that no pattern of its own allows gets EPERM for it, never a private name
of the same spelling.  The core (faytd/core/names.c) holds the patterns
and resolves every name; a connection carries its category's rights as one
bit per pattern (Policy.grant).

Every rights check of faytd is a method of Policy, called by the syscall
layer (syscalls/) before it performs a call, or by sched.py before it
applies a scheduling decision (the `scheduler` right, docs/scheduling.md):
no other module compares categories or rights bits.

The embedded default gives the user who runs faytd (and root) the `core`
category, which may do everything, and everyone else `server` (ANON and SHARE).
A policy file replaces rules and categories to tighten it.
"""
import errno
import fnmatch

from libportal._abi import lib

from .frames import KernelError
from .native import ffi as cffi, lib as clib

CLASS_BITS = {
    "SHARE": lib.FAYT_PORTAL_SHARE,
    "DIRECT": lib.FAYT_PORTAL_DIRECT,
    "ANON": lib.FAYT_PORTAL_ANON,
    "COW": lib.FAYT_PORTAL_COW,
    "SPECIAL": lib.FAYT_PORTAL_SPECIAL,
}
SHARE, ANON, DIRECT, COW = (lib.FAYT_PORTAL_SHARE, lib.FAYT_PORTAL_ANON, lib.FAYT_PORTAL_DIRECT,
                             lib.FAYT_PORTAL_COW)
CATEGORY_IDS = {"core": lib.FAYT_CATEGORY_CORE, "driver": lib.FAYT_CATEGORY_DRIVER,
                "server": lib.FAYT_CATEGORY_SERVER}


def class_names(bits):
    return "|".join(n for n, b in CLASS_BITS.items() if bits & b) or "none"


NOTIFY_ANY = "*"          # notify: any target
NOTIFY_SAME_UID = "$uid"  # notify: targets running as the sender's own uid


def _shared_pattern(cat, p):
    """p, checked to be a shared-name pattern: a name, or a prefix and '*'."""
    if not isinstance(p, str) or not p:
        raise ValueError("policy: category %s: shared_names: %r is not a name or a prefix "
                         "followed by '*'" % (cat, p))
    if "*" in p[:-1] or "?" in p or "[" in p:
        raise ValueError("policy: category %s: shared_names: %r: a pattern is a name, or a "
                         "prefix followed by one '*' at its end" % (cat, p))
    if p.startswith("uid:"):
        raise ValueError("policy: category %s: shared_names: %r: \"uid:\" starts a uid's "
                         "namespace, never a shared name" % (cat, p))
    if len(p.encode()) > lib.FAYT_NAME_MAX:
        raise ValueError("policy: category %s: shared_names: %r is longer than a name (%d "
                         "bytes)" % (cat, p, lib.FAYT_NAME_MAX))
    return p


class Category:
    __slots__ = ("name", "id", "classes", "notify_handlers", "mmio", "chains", "notify",
                 "scheduler", "shared_create", "shared_attach", "names_create", "names_attach")

    KEYS = {"classes": list, "notify_handlers": bool, "mmio": list, "chains": list,
            "notify": list, "scheduler": list, "shared_names": (list, dict)}

    def __init__(self, name, spec):
        self.name = name
        self.id = CATEGORY_IDS.get(name, 0)
        if not isinstance(spec, dict):
            raise ValueError("policy: category %s must be an object" % name)
        unknown = set(spec) - set(self.KEYS)
        if unknown:
            raise ValueError("policy: category %s: unknown keys %s" % (name, sorted(unknown)))
        for k, t in self.KEYS.items():
            if k in spec and not isinstance(spec[k], t):
                raise ValueError("policy: category %s: %s must be a %s" % (
                    name, k, " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))))
        bits = 0
        for c in spec.get("classes", []):
            if c not in CLASS_BITS:
                raise ValueError("policy: category %s: unknown portal class %r" % (name, c))
            bits |= CLASS_BITS[c]
        self.classes = bits
        self.notify_handlers = bool(spec.get("notify_handlers", False))
        self.mmio = list(spec.get("mmio", []))
        self.chains = list(spec.get("chains", []))
        # Whom it may notify: target categories, "*" (anyone) or "$uid" (its
        # own uid's contexts).  Absent: what faytd did before the right
        # existed (core anyone, the others their own uid).
        notify = spec.get("notify")
        if notify is None:
            notify = [NOTIFY_ANY] if self.id == lib.FAYT_CATEGORY_CORE else [NOTIFY_SAME_UID]
        for t in notify:
            if not isinstance(t, str):
                raise ValueError("policy: category %s: notify: %r is not a category name, "
                                 "\"*\" or \"$uid\"" % (name, t))
        self.notify = frozenset(notify)
        # The scheduler right: whose contexts its decisions may act on
        # (target categories, "*", "$uid"; docs/scheduling.md).  Absent:
        # core anyone, the others no one (they may not schedule).
        sched = spec.get("scheduler")
        if sched is None:
            sched = [NOTIFY_ANY] if self.id == lib.FAYT_CATEGORY_CORE else []
        for t in sched:
            if not isinstance(t, str):
                raise ValueError("policy: category %s: scheduler: %r is not a category name, "
                                 "\"*\" or \"$uid\"" % (name, t))
        self.scheduler = frozenset(sched)
        # The shared names it may create, and attach (creating implies attaching).
        shared = spec.get("shared_names", [])
        if isinstance(shared, dict):
            unknown = set(shared) - {"create", "attach"}
            if unknown:
                raise ValueError("policy: category %s: shared_names: unknown keys %s (create, "
                                 "attach)" % (name, sorted(unknown)))
            create, attach = shared.get("create", []), shared.get("attach", [])
        else:
            create = attach = shared
        for what, v in (("create", create), ("attach", attach)):
            if not isinstance(v, list):
                raise ValueError("policy: category %s: shared_names: %s must be a list"
                                 % (name, what))
        self.shared_create = [_shared_pattern(name, p) for p in create]
        self.shared_attach = list(dict.fromkeys(
            self.shared_create + [_shared_pattern(name, p) for p in attach]))
        self.names_create = self.names_attach = 0      # bits: Policy compiles them


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


class Rule:
    __slots__ = ("uid", "gid", "exe", "category")

    def __init__(self, spec, categories):
        unknown = set(spec) - {"uid", "gid", "exe", "category"}
        if unknown:
            raise ValueError("policy: rule %r: unknown keys %s" % (spec, sorted(unknown)))
        self.uid = spec.get("uid")
        self.gid = spec.get("gid")
        self.exe = spec.get("exe")
        self.category = spec.get("category")
        if self.uid is not None and self.uid != "$owner" and not _is_int(self.uid):
            raise ValueError("policy: rule %r: uid must be a number or \"$owner\"" % (spec,))
        if self.gid is not None and not _is_int(self.gid):
            raise ValueError("policy: rule %r: gid must be a number" % (spec,))
        if self.exe is not None and not isinstance(self.exe, str):
            raise ValueError("policy: rule %r: exe must be a glob string" % (spec,))
        if self.category not in categories:
            raise ValueError("policy: rule %r names no known category" % (spec,))

    def matches(self, uid, gid, exe, owner_uid):
        if self.uid is not None:
            want = owner_uid if self.uid == "$owner" else self.uid
            if uid != want:
                return False
        if self.gid is not None and gid != self.gid:
            return False
        if self.exe is not None and not fnmatch.fnmatchcase(exe or "", self.exe):
            return False
        return True


class Policy:
    def __init__(self, spec, owner_uid):
        self.owner_uid = owner_uid
        if not isinstance(spec, dict):
            raise ValueError("policy: must be an object")
        unknown = set(spec) - {"categories", "rules", "default"}
        if unknown:
            raise ValueError("policy: unknown keys %s" % sorted(unknown))
        if not isinstance(spec.get("rules", []), list):
            raise ValueError("policy: rules must be a list")
        cats = spec.get("categories") or {}
        if not cats:
            raise ValueError("policy: no categories")
        self.categories = {name: Category(name, c) for name, c in cats.items()}
        for r in spec.get("rules", []):
            if not isinstance(r, dict):
                raise ValueError("policy: rule %r must be an object" % (r,))
        self.rules = [Rule(r, self.categories) for r in spec.get("rules", [])]
        self.default = spec.get("default")
        if self.default is not None and self.default not in self.categories:
            raise ValueError("policy: default category %r is not defined" % self.default)
        for c in self.categories.values():
            unknown = c.notify - set(self.categories) - {NOTIFY_ANY, NOTIFY_SAME_UID}
            if unknown:
                raise ValueError("policy: category %s: notify names no known category: %s"
                                 % (c.name, ", ".join(sorted(unknown))))
        # Every category's shared-name patterns, numbered: bit i of a
        # connection's names_create / names_attach is pattern i.
        self.shared_names = list(dict.fromkeys(
            p for c in self.categories.values() for p in c.shared_attach))
        if len(self.shared_names) > clib.FAYT_NAMES_SHARED_MAX:
            raise ValueError("policy: %d shared_names patterns; at most %d"
                             % (len(self.shared_names), clib.FAYT_NAMES_SHARED_MAX))
        bit = {p: 1 << i for i, p in enumerate(self.shared_names)}
        for c in self.categories.values():
            c.names_create = sum(bit[p] for p in c.shared_create)
            c.names_attach = sum(bit[p] for p in c.shared_attach)

    def install_names(self, fast):
        """Give the core (`fast`) the shared-name patterns it resolves names
        with (before anything is named: the journal's share-points too)."""
        pats = [cffi.new("char[]", p.encode()) for p in self.shared_names]
        err = clib.fayt_names_set_shared(fast, pats if pats else cffi.NULL, len(pats))
        if err:
            raise MemoryError("faytd: the shared-name patterns")

    def classify(self, uid, gid, exe):
        """The category for this identity, or None (refused: no rule matches)."""
        for r in self.rules:
            if r.matches(uid, gid, exe, self.owner_uid):
                return self.categories[r.category]
        return self.categories.get(self.default) if self.default else None

    # -- the checks the syscall layer makes -------------------------------------
    @staticmethod
    def check_admitted(ctx):
        """HELLO: some rule (or the default) gave ctx a category."""
        if ctx.category is None:
            raise KernelError(errno.EPERM, "hello: no policy rule admits uid %d gid %d exe %s"
                              % (ctx.uid, ctx.gid, ctx.exe))

    @staticmethod
    def grant(fast, category):
        """HELLO: give the core's connection `fast` its category's rights:
        what the C path may create without asking Python, and the shared
        names it may create and attach (names.c checks them for every path)."""
        fast.flags |= Policy.fast_flags(category)
        fast.category = category.id             # grants to a category (direct.c)
        fast.names_create = category.names_create
        fast.names_attach = category.names_attach

    @staticmethod
    def fast_flags(category):
        """The FAYT_FAST_CONN_* bits of what faytd's C fast path may create
        for a context of this category without asking Python."""
        flags = 0
        if category.classes & (SHARE | ANON) == SHARE | ANON:
            flags |= clib.FAYT_FAST_CONN_SHARE
        if category.classes & ANON:
            flags |= clib.FAYT_FAST_CONN_ANON
        if category.classes & DIRECT:
            flags |= clib.FAYT_FAST_CONN_DIRECT    # DIRECT over granted RAM (direct.c)
        if category.classes & COW:
            flags |= clib.FAYT_FAST_CONN_COW       # COW views at least on write (direct.c)
        if category.id == lib.FAYT_CATEGORY_CORE:
            flags |= clib.FAYT_FAST_CONN_CORE      # check_destroy's exception, any namespace
        return flags

    @staticmethod
    def check_classes(category, type_bits):
        """PORTAL: the category may use every class of the type."""
        missing = type_bits & ~category.classes
        if missing:
            raise KernelError(errno.EPERM, "type: category %s may not use %s"
                              % (category.name, class_names(missing)))

    @staticmethod
    def check_prot(asked, granted, what):
        """Attaching to a share-point (`what` names it): prot no wider than
        it grants."""
        if asked & ~granted:
            raise KernelError(errno.EACCES, "prot: %#x asked, %s grants %#x"
                              % (asked, what, granted))

    @staticmethod
    def check_destroy(ctx, sp):
        """SHARE_DESTROY, UNMAP_DESTROY: its owner (the process that made
        it: its pid and start time, so a process given a dead owner's pid
        is not taken for it) or a core server."""
        owner = ctx.pid == sp.owner_pid and (ctx.start or 0) == (sp.owner_start or 0)
        if not owner and ctx.category.id != lib.FAYT_CATEGORY_CORE:
            raise KernelError(errno.EPERM, "share-point %r: only its owner (pid %d) or a core "
                              "server may destroy it" % (sp.identifier.decode(), sp.owner_pid))

    @staticmethod
    def check_grant(ctx, m, sp, prot):
        """GRANT: an ANON portal by the context that maps it; a share-point
        by its owner or a core server; prot no wider than the mapping's."""
        if sp is not None:
            owner = ctx.pid == sp.owner_pid and (ctx.start or 0) == (sp.owner_start or 0)
            if not owner and ctx.category.id != lib.FAYT_CATEGORY_CORE:
                raise KernelError(errno.EPERM, "handle: share-point %r: only its owner (pid %d) "
                                  "or a core server may grant it for DMA"
                                  % (sp.identifier.decode(), sp.owner_pid))
        if prot & ~m.prot:
            raise KernelError(errno.EACCES, "prot: %#x asked, the mapping has %#x"
                              % (prot, m.prot))

    @staticmethod
    def may_list(ctx, sp):
        """LIST_SHARE: a core server sees every share-point; another
        context those named in its uid's namespace and the shared one
        (another uid's names are not its business)."""
        return (ctx.category.id == lib.FAYT_CATEGORY_CORE
                or sp.namespace in (ctx.uid, clib.FAYT_NS_SHARED))

    @staticmethod
    def check_handlers(ctx, what):
        """NOTIFY_INSTALL, REMOVE, PROVIDER, SUBSCRIBE: the notify_handlers right."""
        if not ctx.category.notify_handlers:
            raise KernelError(errno.EPERM, "%s: category %s may not install notification "
                              "handlers" % (what, ctx.category.name))

    @staticmethod
    def check_serve_chain(ctx, name):
        """CHAIN_JOIN: the category's chains globs name the chain."""
        cat = ctx.category
        if not any(fnmatch.fnmatchcase(name, g) for g in cat.chains):
            raise KernelError(errno.EPERM, "chain %r: category %s may not serve it"
                              % (name, cat.name))

    @staticmethod
    def check_schedule(sched):
        """A decision through a queue: the category has the scheduler right."""
        if not sched.category.scheduler:
            raise KernelError(errno.EPERM, "decision: category %s has no scheduler right"
                              % sched.category.name)

    @staticmethod
    def check_schedule_target(sched, target):
        """...and its scheduler right names the target's category, "*", or
        "$uid" with the same uid."""
        _check_target(sched, target, sched.category.scheduler, "context", "schedule",
                      "scheduler")

    @staticmethod
    def check_mmio(ctx, window, what):
        """DIRECT over a device window, DEV_ATTACH, DEV_REGISTER: the
        category's mmio globs name the window (docs/devices.md)."""
        cat = ctx.category
        if not any(fnmatch.fnmatchcase(window.name, g) for g in cat.mmio):
            raise KernelError(errno.EPERM, "%s: category %s may not reach device window %s "
                              "(its mmio globs: %s)" % (what, cat.name, window.name,
                                                        ", ".join(cat.mmio) or "none"))

    @staticmethod
    def check_device_model(ctx, window):
        """DEV_REGISTER: a driver or core context whose mmio globs name the window."""
        if ctx.category.id not in (lib.FAYT_CATEGORY_CORE, lib.FAYT_CATEGORY_DRIVER):
            raise KernelError(errno.EPERM, "name: category %s may not serve a device window "
                              "(driver and core only)" % ctx.category.name)
        Policy.check_mmio(ctx, window, "name")

    @staticmethod
    def check_notify(sender, target):
        """sender may get a ring into target (contexts): its category's notify
        right names the target's category, "*", or "$uid" with the same uid."""
        _check_target(sender, target, sender.category.notify, "target", "notify", "notify")


def _check_target(src, target, allowed, field, verb, right):
    """EPERM unless `allowed` (a right's list) names the target's category,
    "*", or "$uid" with src's uid."""
    if (NOTIFY_ANY in allowed or target.category.name in allowed
            or (NOTIFY_SAME_UID in allowed and src.uid == target.uid)):
        return
    raise KernelError(errno.EPERM, "%s: category %s may not %s context %d (category %s, uid "
                      "%d); its %s right allows %s"
                      % (field, src.category.name, verb, target.id, target.category.name,
                         target.uid, right, ", ".join(sorted(allowed)) or "no one"))
