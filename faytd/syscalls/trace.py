"""TRACE_START and TRACE_STOP: the timeline trace (faytd/trace.py,
docs/tracing.md).

Rights: core only (EPERM otherwise).  A trace shows every context's calls,
notifications and lock waits, whatever their uid, so it is the kernel's
view, not one uid's.  The file is the caller's: it opens it itself and
passes the descriptor (SCM_RIGHTS), so faytd never opens a path a client
names; faytd takes a duplicate and writes there until the stop.
"""
import errno
import json
import os

from ..frames import KernelError


def _core_only(ctx, what):
    if not ctx.is_core:
        raise KernelError(errno.EPERM, "%s: only a core context may trace (docs/tracing.md)"
                          % what)


def sys_trace_start(k, ctx, tid, body, fds):
    _core_only(ctx, "trace_start")
    if body:
        raise KernelError(errno.EINVAL, "trace_start: takes no body, got %d bytes" % len(body))
    if len(fds) != 1:
        raise KernelError(errno.EINVAL, "trace_start: takes one file descriptor (the trace "
                          "file), got %d" % len(fds))
    k.tracing.start(os.dup(fds[0]), "context %d (pid %d)" % (ctx.id, ctx.pid))
    return b"", []


def sys_trace_stop(k, ctx, tid, body, fds):
    _core_only(ctx, "trace_stop")
    if body:
        raise KernelError(errno.EINVAL, "trace_stop: takes no body, got %d bytes" % len(body))
    return json.dumps(k.tracing.stop()).encode(), []
