"""INJECT_ADD, INJECT_REMOVE and INJECT_LIST: fault injection
(faytd/injection.py, docs/testing.md).

The rule travels as JSON (docs/wire-protocol.md): its fields depend on its
kind, and none of them is on a hot path.  Rights are the Injection's: a
core context names any context or chain, any other only its own uid's
contexts (EPERM)."""
import json

from .wire import handle_of


def sys_inject_add(k, ctx, tid, body, fds):
    rule = k.injection.add(ctx, body)
    return json.dumps({"rule": rule.id}).encode(), []


def sys_inject_remove(k, ctx, tid, body, fds):
    n = k.injection.remove(ctx, handle_of(body))
    return json.dumps({"removed": n}).encode(), []


def sys_inject_list(k, ctx, tid, body, fds):
    if body:
        from errno import EINVAL
        from ..frames import KernelError
        raise KernelError(EINVAL, "inject_list: takes no body, got %d bytes" % len(body))
    return json.dumps(k.injection.listing(ctx)).encode(), []
