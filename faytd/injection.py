"""Fault injection: rules that fail, delay or kill on purpose (docs/testing.md).

A rule names a kind, a target and when it fires.  Where it fires depends
on what the fault is:
- a system call (fail with an errno, or delay it): here, in faytd, before
  the call is performed.  A context that a rule of these kinds names has
  its requests sent to Python (FAYT_FAST_CONN_PYTHON): the C fast path
  (faytd/core/serve.c) would otherwise serve its PORTAL and UNMAP calls
  without Python seeing them;
- a chain's page request (fail: the client's access gets SIGBUS; slow:
  held before it goes to the server): in faytd's fault engine, in C
  (fayt_fault_chain_inject, faytd/core/fault.h);
- a lock take, a handler, the notifications a context handles, a doorbell:
  these never pass through faytd, so faytd writes the plan into the
  target's context page (struct fayt_inject_plan, fayt/context.h) and the
  target's libportal injects them (libportal/src/inject.c): it dies of
  SIGKILL holding the lock or at the handler's entry, or posts without
  ringing.  They work for libportal clients only.  libportal counts what
  it injected in its own part of the page; faytd reads it to log it (when
  the context dies, and when anyone lists the rules or the stats).

Determinism: every rule counts its events (the calls of its op by its
context, the page requests of its chain, the lock takes of its share-point,
...) from 0, and fires at event n if n >= after, fewer than `count` fired
(0: no bound), and splitmix64(seed + n) % 10**6 < probability * 10**6.  The
same seed and the same workload fire at the same events, whatever the
timing.

Rights: a core context may inject into any context and any chain; any
other only into the contexts of its own uid (EPERM otherwise), and chain
faults (which reach every client of the chain) are core only.  A rule goes
when its target context or chain goes, or when it is removed.
"""
import errno
import json
import logging
import time

from libportal._abi import lib

from .frames import KernelError
from .native import core as _core, ffi as _cffi, lib as _clib
from .stats import OP_NAMES

log = logging.getLogger("faytd")

PPM = lib.FAYT_INJECT_PPM
LOG_MAX = 256               # the last faults injected, kept for INJECT_LIST
RULES_MAX = 256             # rules at most in faytd (ended ones go first when it is full)
RULES_PER_UID = 32          # rules in force at most of a uid that is not core
DELAY_MAX_MS = 60000        # a delay at most (a call, a page request, a doorbell)
MASK64 = (1 << 64) - 1

# kind -> (where: "call", "page" (libportal's, in the context page) or "chain",
#          the FAYT_INJECT_* bit of a page kind)
KINDS = {
    "fail": ("call", 0),
    "delay": ("call", 0),
    "kill-lock": ("page", lib.FAYT_INJECT_LOCK_KILL),
    "kill-handler": ("page", lib.FAYT_INJECT_HANDLER_KILL),
    "kill-after": ("page", lib.FAYT_INJECT_NOTIFY_KILL),
    "drop-doorbell": ("page", lib.FAYT_INJECT_DOORBELL_DROP),
    "delay-doorbell": ("page", lib.FAYT_INJECT_DOORBELL_DELAY),
    "fail-page": ("chain", _clib.FAYT_FAULT_INJECT_FAIL),
    "slow-chain": ("chain", _clib.FAYT_FAULT_INJECT_SLOW),
}
_FIELDS = {"kind", "context", "pid", "name", "op", "errno", "delay_ms", "share", "slot",
           "notifications", "chain", "after", "count", "probability", "seed"}
OPS = {name: op for op, name in OP_NAMES.items()}


def splitmix64(x):
    """The hash rules draw from (libportal/src/inject.c, faytd/core/fault.c)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def fires(n, after, count, fired, ppm, seed):
    """Whether a rule fires at its event n (0-based), `fired` faults so far."""
    if n < after or (count and fired >= count):
        return False
    return ppm >= PPM or splitmix64((seed + n) & MASK64) % PPM < ppm


def _int(spec, field, lo, hi, default=None):
    v = spec.get(field, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise KernelError(errno.EINVAL, "%s: %r is not an integer" % (field, v))
    if not lo <= v <= hi:
        raise KernelError(errno.EINVAL, "%s: %d is outside %d..%d" % (field, v, lo, hi))
    return v


def _errno_of(v):
    if isinstance(v, str):
        code = getattr(errno, v.upper(), None)
        if not isinstance(code, int):
            raise KernelError(errno.EINVAL, "errno: %r is no errno name" % v)
        return code
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4095:
        raise KernelError(errno.EINVAL, "errno: %r is not an errno (1..4095 or a "
                          "name such as \"EIO\")" % (v,))
    return v


class Rule:
    """One rule: its spec as checked, its target, its counts."""

    def __init__(self, rid, owner, spec):
        self.id = rid
        self.owner_uid = owner.uid
        self.owner = owner.id
        self.spec = spec
        self.kind = spec["kind"]
        self.where, self.bit = KINDS[self.kind]
        self.target = None          # the Context (call and page kinds)
        self.chain = None           # the Chain (chain kinds)
        self.op = None
        self.events = 0
        self.fired = 0
        self.active = False         # page kinds: in its target's plan
        self.base_events = 0        # page kinds: events and faults before the plan now
        self.base_fired = 0         # in the page (_write_plan)
        self.ended = None           # why it ended (its target went), or None

    def describe(self):
        d = dict(self.spec)
        d.update(id=self.id, owner=self.owner, owner_uid=self.owner_uid, events=self.events,
                 fired=self.fired, active=self.ended is None)
        if self.target is not None:
            d.update(context=self.target.id, pid=self.target.pid)
        if self.chain is not None:
            d.update(chain=self.chain.name)
        if self.ended:
            d["ended"] = self.ended
        return d


class Injection:
    """faytd's rules, by id; what they injected (log, counts)."""

    def __init__(self, kernel):
        self.k = kernel
        self.rules = {}
        self._next = 1
        self.log = []               # the last LOG_MAX faults: dicts
        self.total = 0              # faults injected (all kinds)
        self.by_kind = dict.fromkeys(KINDS, 0)
        self._calls = {}            # context id -> [call rules naming it]

    # -- adding and removing ------------------------------------------------
    def add(self, caller, body):
        try:
            spec = json.loads(bytes(body).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise KernelError(errno.EINVAL, "the body is not a JSON object (%s)"
                              % e) from None
        if not isinstance(spec, dict):
            raise KernelError(errno.EINVAL, "the body is not a JSON object")
        unknown = sorted(set(spec) - _FIELDS)
        if unknown:
            raise KernelError(errno.EINVAL, "unknown field %r" % unknown[0])
        kind = spec.get("kind")
        if kind not in KINDS:
            raise KernelError(errno.EINVAL, "kind: %r is not one of %s"
                              % (kind, ", ".join(KINDS)))
        if len(self.rules) >= RULES_MAX:        # ended rules make room, oldest first
            for rid in [r.id for r in self.rules.values() if r.ended is not None]:
                del self.rules[rid]
                if len(self.rules) < RULES_MAX:
                    break
        if len(self.rules) >= RULES_MAX:
            raise KernelError(errno.ENOSPC, "%d rules already (the most faytd keeps)"
                              % RULES_MAX)
        if not self._core(caller) and sum(1 for r in self.rules.values() if r.ended is None
                                          and r.owner_uid == caller.uid) >= RULES_PER_UID:
            raise KernelError(errno.ENOSPC, "uid %d has %d rules in force (the most a uid "
                              "that is not core may have)" % (caller.uid, RULES_PER_UID))
        where, bit = KINDS[kind]
        clean = {"kind": kind,
                 "after": _int(spec, "after", 0, 0xffffffff, 0),
                 "count": _int(spec, "count", 0, 0xffffffff,
                               1 if kind.startswith("kill") else 0),
                 "seed": _int(spec, "seed", 0, MASK64, 0)}
        p = spec.get("probability", 1.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise KernelError(errno.EINVAL, "probability: %r is not a number from 0 "
                              "to 1" % (p,))
        clean["probability"] = p
        ppm = min(PPM, int(round(p * PPM)))
        rule = Rule(0, caller, clean)
        if where == "chain":
            self._chain_rule(caller, rule, spec)
        else:
            rule.target = self._target(caller, spec)
            if where == "call":
                self._call_rule(rule, spec)
            else:
                self._page_args(rule, spec)
        rule.id = self._next
        self._next += 1
        rule.ppm = ppm
        if where == "chain":
            self._arm_chain(rule)
            self.rules[rule.id] = rule
        elif where == "call":
            self.rules[rule.id] = rule
            self._calls.setdefault(rule.target.id, []).append(rule)
            rule.target.fast.flags |= _clib.FAYT_FAST_CONN_PYTHON
        else:
            for other in self.rules.values():
                if other.ended is None and other.target is rule.target and \
                        other.bit == rule.bit:
                    raise KernelError(errno.EBUSY, "context %d has a %s rule already "
                                      "(rule %d): remove it first"
                                      % (rule.target.id, kind, other.id))
            self.rules[rule.id] = rule
            self._arm_page(rule)
        log.info("inject: rule %d added by context %d (uid %d): %s", rule.id, caller.id,
                 caller.uid, json.dumps(rule.describe(), sort_keys=True))
        return rule

    def remove(self, caller, rid):
        """Remove rule rid (0: every rule the caller may remove); how many."""
        if rid:
            rule = self.rules.get(rid)
            if rule is None or not self._may_see(caller, rule):
                raise KernelError(errno.ENOENT, "rule %d: no such rule" % rid)
            if not self._may_change(caller, rule):
                raise KernelError(errno.EPERM, "rule %d was added by uid %d; only core "
                                  "removes another uid's rules" % (rid, rule.owner_uid))
            rules = [rule]
        else:
            rules = [r for r in self.rules.values() if self._may_change(caller, r)]
        for r in rules:
            self._end(r, None)
            del self.rules[r.id]
        return len(rules)

    # -- the target ------------------------------------------------------------
    def _core(self, ctx):
        return ctx.category is not None and ctx.category.id == lib.FAYT_CATEGORY_CORE

    def _may_see(self, caller, rule):
        return self._core(caller) or rule.owner_uid == caller.uid or (
            rule.target is not None and rule.target.uid == caller.uid)

    def _may_change(self, caller, rule):
        return self._core(caller) or rule.owner_uid == caller.uid

    def _target(self, caller, spec):
        given = [f for f in ("context", "pid", "name") if f in spec]
        if len(given) != 1:
            raise KernelError(errno.EINVAL, "give exactly one of context, pid and name "
                              "(the target), not %s" % (", ".join(given) or "none"))
        how = given[0]
        if how == "name":
            name = spec["name"]
            if not isinstance(name, str) or not name:
                raise KernelError(errno.EINVAL, "name: %r is not a published name"
                                  % (name,))
            ctx, _ = self.k.published.lookup(caller, name.encode())
        else:
            v = _int(spec, how, 1, 0x7fffffff)
            live = [c for c in self.k.contexts.values() if c.alive and c.connected
                    and (c.id if how == "context" else c.pid) == v]
            if not live:
                raise KernelError(errno.ESRCH, "pid: no connected context with pid %d" % v
                                  if how == "pid" else
                                  "context: no connected context %d" % v)
            if len(live) > 1:
                raise KernelError(errno.EINVAL, "pid: %d has %d contexts (connections); "
                                  "name one by its context id" % (v, len(live)))
            ctx = live[0]
        if not self._core(caller) and ctx.uid != caller.uid:
            raise KernelError(errno.EPERM, "%s: context %d belongs to uid %d; only a "
                              "core context injects faults into another uid's contexts"
                              % (how, ctx.id, ctx.uid))
        return ctx

    def _call_rule(self, rule, spec):
        op = spec.get("op")
        if isinstance(op, str):
            code = OPS.get(op.lower())
            if code is None:
                raise KernelError(errno.EINVAL, "op: %r is no system call's name (fayt "
                                  "stats lists them)" % op)
        else:
            code = _int(spec, "op", 1, 0xffff)
        if code in (lib.FAYT_SYS_HELLO,):
            raise KernelError(errno.EINVAL, "op: hello cannot be injected (the "
                              "context exists once it said hello)")
        rule.op = code
        rule.spec["op"] = OP_NAMES.get(code, code)
        if rule.kind == "fail":
            rule.err = _errno_of(spec.get("errno", "EIO"))
            rule.spec["errno"] = errno.errorcode.get(rule.err, rule.err)
        else:
            if code in (lib.FAYT_SYS_UNMAP, lib.FAYT_SYS_UNMAP_DESTROY):
                raise KernelError(errno.EINVAL, "op: %s may be sent without waiting "
                                  "for a reply: it can be failed, not delayed"
                                  % rule.spec["op"])
            rule.delay = _int(spec, "delay_ms", 0, DELAY_MAX_MS) / 1000.0
            rule.spec["delay_ms"] = spec["delay_ms"]

    def _page_args(self, rule, spec):
        if not rule.target.registered or rule.target.page_struct is None:
            raise KernelError(errno.ESRCH, "context %d has no context page"
                              % rule.target.id)
        rule.arg = 0
        if rule.kind == "kill-lock":
            share = spec.get("share")
            if not isinstance(share, str) or not share:
                raise KernelError(errno.EINVAL, "share: %r is not a share-point's "
                                  "identifier" % (share,))
            sp = self.k.sharepoints
            name = sp.resolve(rule.target, share.encode(), False, field=b"share")
            rule.arg = sp.lookup(name)
            if not rule.arg:
                raise KernelError(errno.ENOENT, "share: no share-point %r (as context "
                                  "%d names it)" % (share, rule.target.id))
            rule.spec.update(share=share, sp_id=rule.arg)
        elif rule.kind == "kill-handler":
            rule.arg = _int(spec, "slot", 0, lib.FAYT_NOTIFICATION_SLOTS - 1)
            rule.spec["slot"] = rule.arg
        elif rule.kind == "kill-after":
            n = _int(spec, "notifications", 0, 0xffffffff)
            rule.spec.update(notifications=n, after=min(0xffffffff, n + rule.spec["after"]))
        elif rule.kind == "delay-doorbell":
            rule.arg = _int(spec, "delay_ms", 0, DELAY_MAX_MS) * 1000
            rule.spec["delay_ms"] = spec["delay_ms"]

    def _chain_rule(self, caller, rule, spec):
        if not self._core(caller):
            raise KernelError(errno.EPERM, "chain faults reach every client of the "
                              "chain: only a core context injects them")
        name = spec.get("chain")
        chain = self.k.pager.chains.by_name.get(name) if isinstance(name, str) else None
        if chain is None:
            raise KernelError(errno.ENOENT, "chain: no server serves chain %r"
                              % (name,))
        rule.chain = chain
        if rule.kind == "fail-page":
            rule.err = _errno_of(spec.get("errno", "EIO"))
            rule.spec["errno"] = errno.errorcode.get(rule.err, rule.err)
            rule.delay_ms = 0
        else:
            rule.err = 0
            rule.delay_ms = _int(spec, "delay_ms", 0, DELAY_MAX_MS)
            rule.spec["delay_ms"] = rule.delay_ms
        for other in self.rules.values():
            if other.ended is None and other.chain is chain:
                raise KernelError(errno.EBUSY, "chain %r has a rule already (rule %d): "
                                  "remove it first" % (name, other.id))

    # -- arming ----------------------------------------------------------------
    def _arm_chain(self, rule):
        r = _cffi.new("struct fayt_fault_inject *")
        r.kind = rule.bit
        r.err = rule.err
        r.delay_ms = rule.delay_ms
        r.after, r.count, r.ppm, r.seed = (rule.spec["after"], rule.spec["count"], rule.ppm,
                                           rule.spec["seed"])
        err = _clib.fayt_fault_chain_inject(_core, rule.chain.id, r)
        if err:
            raise KernelError(err, "chain %r: %s" % (rule.chain.name, _strerror(err)))

    def _arm_page(self, rule):
        """Put rule into its target's plan (the plan is written again whole)."""
        self._sync_page(rule.target)
        rule.active = True
        self._write_plan(rule.target)

    def _disarm_page(self, rule):
        if rule.target.page_struct is None:
            return
        self._sync_page(rule.target)
        rule.active = False
        self._write_plan(rule.target)

    def _write_plan(self, ctx):
        """Write ctx's plan from its active page rules, under the seqlock
        (seq odd while written, then a new even seq: libportal's counts
        restart from 0).  So that a rewrite changes nothing a rule decides,
        each rule goes in as what remains of it: `after` less the events
        seen, `count` less the faults injected, the seed moved on by the
        events seen (so that seed + n names the same draws).  Called after
        _sync_page(ctx), which took the counts of the old plan."""
        plan = ctx.page_struct.inject
        plan.seq |= 1
        kinds = 0
        for rule in self.rules.values():
            if rule.target is not ctx or rule.where != "page" or not rule.active:
                continue
            rule.base_events, rule.base_fired = rule.events, rule.fired
            left = rule.spec["count"] - rule.fired if rule.spec["count"] else 0
            if rule.spec["count"] and left <= 0:
                continue                    # used up
            r = plan.rule[rule.bit.bit_length() - 1]
            r.arg = rule.arg
            r.after = max(0, rule.spec["after"] - rule.events)
            r.count = left
            r.ppm = rule.ppm
            r.seed = (rule.spec["seed"] + rule.events) & MASK64
            kinds |= rule.bit
        plan.kinds = kinds
        plan.seq = (plan.seq + 1) & 0xffffffff     # even again: a new plan

    def _end(self, rule, why):
        if rule.ended is not None:
            return
        if rule.where == "call":
            rules = self._calls.get(rule.target.id, [])
            if rule in rules:
                rules.remove(rule)
            if not rules:
                self._calls.pop(rule.target.id, None)
                rule.target.fast.flags &= ~_clib.FAYT_FAST_CONN_PYTHON
        elif rule.where == "page":
            self._disarm_page(rule)
        elif rule.where == "chain":
            self._sync_chain(rule)
            if self.k.pager.chains.by_name.get(rule.chain.name) is rule.chain:
                _clib.fayt_fault_chain_inject(_core, rule.chain.id,
                                              _cffi.new("struct fayt_fault_inject *"))
        rule.ended = why or "removed"

    # -- firing ------------------------------------------------------------------
    def on_call(self, ctx, op):
        """Before Python performs ctx's call op: None, a KernelError to answer
        instead, or seconds to delay it by (the server defers the call)."""
        rules = self._calls.get(ctx.id)
        if not rules:
            return None
        delay = None
        for rule in rules:
            if rule.op != op:
                continue
            n = rule.events
            rule.events += 1
            if not fires(n, rule.spec["after"], rule.spec["count"], rule.fired, rule.ppm,
                         rule.spec["seed"]):
                continue
            rule.fired += 1
            name = OP_NAMES.get(op, "op %d" % op)
            if rule.kind == "fail":
                self._record(rule, ctx, "%s failed with %s" % (name, errno.errorcode.get(
                    rule.err, rule.err)), event=n)
                return KernelError(rule.err, "%s: %s (a fault injected by rule %d)"
                                   % (name, _strerror(rule.err), rule.id))
            self._record(rule, ctx, "%s delayed %g ms" % (name, rule.delay * 1000), event=n)
            delay = max(delay or 0.0, rule.delay)
        return delay

    def _record(self, rule, ctx, what, event=None, n=1):
        """n faults of rule: counted, the last LOG_MAX of them kept, one log
        line (n may come from a context page: O(LOG_MAX) whatever it is)."""
        self.total += n - min(n, LOG_MAX)
        self.by_kind[rule.kind] += n - min(n, LOG_MAX)
        for _ in range(min(n, LOG_MAX)):
            self.total += 1
            self.by_kind[rule.kind] += 1
            entry = {"seq": self.total, "rule": rule.id, "kind": rule.kind, "what": what,
                     "time": time.time()}
            if ctx is not None:
                entry.update(context=ctx.id, pid=ctx.pid)
            if event is not None:
                entry["event"] = event
            self.log.append(entry)
        del self.log[:-LOG_MAX]
        who = "context %d (pid %d)" % (ctx.id, ctx.pid) if ctx is not None else \
            "chain %r" % rule.chain.name
        log.warning("inject: rule %d: %s: %s%s", rule.id, who, what,
                    "" if n == 1 else " (%d faults)" % n)
        self.k.tracing.injected(rule, ctx, what, n)

    _WHAT = {"kill-lock": "killed holding share-point %(sp_id)s's lock",
             "kill-handler": "killed at the entry of its handler of slot %(slot)s",
             "kill-after": "killed after %(notifications)s notifications",
             "drop-doorbell": "a doorbell dropped",
             "delay-doorbell": "a doorbell delayed %(delay_ms)s ms"}

    def _sync_page(self, ctx):
        """Log and count what ctx's libportal injected since the last look:
        its counts in the context page, of the plan now there (its own
        words: bounded by the rule, never trusted beyond it)."""
        p = ctx.page_struct
        if p is None:
            return
        plan, st = p.inject, p.injected
        same = st.seq == plan.seq
        for rule in self.rules.values():
            if rule.target is not ctx or rule.where != "page" or not rule.active:
                continue
            i = rule.bit.bit_length() - 1
            events = int(st.events[i]) if same else 0
            fired = min(int(st.fired[i]) if same else 0, events)
            if rule.spec["count"]:
                fired = min(fired, rule.spec["count"] - rule.base_fired)
            rule.events = max(rule.events, rule.base_events + events)
            total = rule.base_fired + fired
            if total > rule.fired:
                new = total - rule.fired
                rule.fired = total
                self._record(rule, ctx, self._WHAT[rule.kind] % rule.spec, n=new)

    def _sync_chain(self, rule):
        ev = _cffi.new("uint64_t *")
        fi = _cffi.new("uint64_t *")
        if _clib.fayt_fault_chain_injected(_core, rule.chain.id, ev, fi):
            return
        rule.events = int(ev[0])
        if fi[0] > rule.fired:
            n = int(fi[0]) - rule.fired
            rule.fired = int(fi[0])
            # the fault engine logged each one; counted here
            self.total += n
            self.by_kind[rule.kind] += n
            for _ in range(min(n, LOG_MAX)):
                self.log.append({"seq": self.total, "rule": rule.id, "kind": rule.kind,
                                 "what": "page request %s" % ("failed" if rule.kind ==
                                                              "fail-page" else "held"),
                                 "chain": rule.chain.name, "time": time.time()})
            del self.log[:-LOG_MAX]

    def sync(self):
        """Bring the counts up to date (the libportal and fault engine ones)."""
        seen = set()
        for rule in list(self.rules.values()):
            if rule.ended is not None:
                continue
            if rule.where == "page" and rule.target.id not in seen and rule.active:
                seen.add(rule.target.id)
                self._sync_page(rule.target)
            elif rule.where == "chain":
                if self.k.pager.chains.by_name.get(rule.chain.name) is not rule.chain:
                    self._sync_chain(rule)
                    rule.ended = "its chain is gone"
                else:
                    self._sync_chain(rule)

    def context_gone(self, ctx):
        """ctx died or went: what its libportal injected is logged; its rules end."""
        rules = [r for r in self.rules.values() if r.target is ctx and r.ended is None]
        if not rules:
            return
        self._sync_page(ctx)
        for r in rules:
            if r.where == "call":
                self._end(r, "its context is gone")
            else:
                r.active = False
                r.ended = "its context is gone"

    # -- what the tools see -----------------------------------------------------
    def listing(self, caller):
        self.sync()
        rules = [r.describe() for r in self.rules.values() if self._may_see(caller, r)]
        ids = {r["id"] for r in rules}
        return {"rules": rules, "log": [e for e in self.log if e["rule"] in ids],
                "counts": self.counts()}

    def counts(self):
        return {"total": self.total, "by_kind": dict(self.by_kind),
                "rules": sum(1 for r in self.rules.values() if r.ended is None)}


def _strerror(err):
    import os
    return os.strerror(err)
