"""Discovery by name: the contexts servers published under names.

A server publishes its context under a name (PUBLISH); a client finds it
(LOOKUP) without knowing its pid, and finds a restarted server again under
the same name.  Names live in the namespaces of share-point names
(docs/names.md, names.c's fayt_name_resolve, the same call): a bare name
is the caller's uid's, unless the policy shares it; a shared name may be
published only by a category the policy lets create it, and found only by
one it lets attach it.  A name names one live, connected context: it goes
when that context withdraws it, disconnects or dies; a live holder's name
is EEXIST to everyone else.  Nothing of it is journaled: after a faytd
restart, servers publish again (as they install their handlers again).
"""
import errno

from .context import uncount
from .frames import KernelError
from .native import lib as clib
from .sharepoint import SharePoints


class Published:
    def __init__(self, kernel):
        self.k = kernel
        self.by_name = {}           # Name -> context id
        self.by_ctx = {}            # context id -> set of Names
        self.per_uid = {}           # uid -> how many names its contexts hold

    def publish(self, ctx, name):
        n = SharePoints.resolve(ctx, name, True, field=b"name")
        holder = self.by_name.get(n)
        if holder == ctx.id:
            return                                  # already its own: nothing changes
        if holder is not None:
            other = self.k.contexts.get(holder)
            raise KernelError(errno.EEXIST, "name: %s is published by context %d (pid %s)"
                              % (_show(name), holder, other.pid if other else "?"))
        held = self.per_uid.get(ctx.uid, 0)
        limit = self.k.cfg["max_published_per_uid"]
        if not ctx.is_core and held >= limit:
            raise KernelError(errno.ENOSPC, "uid %d has published %d names, its limit (config "
                              "max_published_per_uid)" % (ctx.uid, held))
        self.by_name[n] = ctx.id
        self.by_ctx.setdefault(ctx.id, set()).add(n)
        self.per_uid[ctx.uid] = held + 1
        self.k.tracing.named(ctx)       # its track's label

    def withdraw(self, ctx, name):
        n = SharePoints.resolve(ctx, name, True, field=b"name")
        if self.by_name.get(n) != ctx.id:
            raise KernelError(errno.ENOENT, "name: %s is not published by this context"
                              % _show(name))
        self._drop(ctx, n)

    def lookup(self, ctx, name):
        """(the holder's context, the Name) of a published name; ENOENT."""
        n = SharePoints.resolve(ctx, name, False, field=b"name")
        holder = self.by_name.get(n)
        c = self.k.contexts.get(holder) if holder is not None else None
        if c is None:
            raise KernelError(errno.ENOENT, "name: nothing is published as %s" % _show(name))
        return c, n

    def _drop(self, ctx, n):
        del self.by_name[n]
        names = self.by_ctx.get(ctx.id)
        if names is not None:
            names.discard(n)
            if not names:
                del self.by_ctx[ctx.id]
        uncount(self.per_uid, ctx.uid)

    def context_gone(self, ctx):
        """Its connection closed or it died: its names are free."""
        for n in list(self.by_ctx.get(ctx.id, ())):
            self._drop(ctx, n)

    def count(self):
        return len(self.by_name)


def _show(name):
    return repr(name.decode("utf-8", "replace"))


def namespace_of(n):
    """How LOOKUP's reply names a Name's namespace: "uid:<uid>" or "shared"."""
    return "shared" if n.ns == clib.FAYT_NS_SHARED else "uid:%d" % n.ns
