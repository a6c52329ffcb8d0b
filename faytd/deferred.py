"""Replies that wait for work done off faytd's event loop.

faytd answers one request at a time in one thread; a call whose work is
long and needs no table of faytd's (a strict COW snapshot copies up to a
gibibyte) must not stall everyone else.  Its handler returns a Deferred
instead of a reply: `work()` runs in a thread of its own (the copy is
a memmove through ctypes, which drops the GIL), then signals an
eventfd the loop watches, and `finish()` runs in the loop and makes the
reply, which is sent then.  If the caller's context ended meanwhile,
`abandon()` runs instead and nothing is sent.  The client waits for its
reply as for any other (one call in flight per connection).
"""
import errno
import logging
import os
import threading

from .frames import KernelError

log = logging.getLogger("faytd")


class Deferred:
    def __init__(self, work, finish, abandon):
        self.work, self.finish, self.abandon = work, finish, abandon
        self.error = None
        self.efd = -1

    def start(self, server, ctx, op, seq):
        """Called by the server in place of a reply."""
        self.server, self.ctx, self.op, self.seq = server, ctx, op, seq
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        server.watch_fd(self.efd, self._done)
        threading.Thread(target=self._run, name="faytd-deferred", daemon=True).start()

    def _run(self):
        try:
            self.work()
        except BaseException as e:      # reported in the loop
            self.error = e
        os.eventfd_write(self.efd, 1)

    def _done(self, fd, events):
        server, ctx = self.server, self.ctx
        server.unwatch_fd(fd)
        os.close(fd)
        if server.k.contexts.get(ctx.id) is not ctx or not ctx.connected:
            self.abandon()
            return
        fds = []
        try:
            if self.error is not None:
                raise self.error
            body, fds = self.finish()
        except KernelError as e:
            body, fds = e, []
        except Exception:
            log.error("context %d: deferred op %d failed", ctx.id, self.op, exc_info=True)
            self.abandon()
            body, fds = KernelError(errno.EIO, "faytd: internal error (logged)"), []
        try:
            server._reply(ctx, self.op, self.seq, body, fds)
        finally:
            for x in fds:
                os.close(x)
