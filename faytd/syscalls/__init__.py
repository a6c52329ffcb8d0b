"""The syscall layer: decode a request, check rights, perform, reply.

One module per noun: portal (PORTAL, UNMAP), sharepoint (SHARE_DESTROY,
UNMAP_DESTROY, LIST_SHARE), notify (the NOTIFY_* calls), chain (the CHAIN_*
calls and the SPECIAL branch of PORTAL), context (HELLO, LIST_CONTEXTS),
discovery (PUBLISH, LOOKUP), devices (the DEV_* calls), stream (LISTEN,
CONNECT, ACCEPT, CHAN_CLOSE), queue (QUEUE_OPEN, QUEUE_CLOSE), sched
(SCHED_SUBSCRIBE), info (INFO: rings and chains, for the tools), inject
(INJECT_ADD, INJECT_REMOVE, INJECT_LIST: fault injection), trace (TRACE_START,
TRACE_STOP: the timeline trace);
wire holds the decoding they share.

Each handler takes (kernel, context, tid, body, fds) and returns (reply
body, fds to grant); the server closes those fds once sent.  It raises
KernelError(errno, message) to fail.  A handler decodes its body, asks
Policy (policy.py) whether the context may, makes one call of an object
(the Kernel, its Pager's chains or regions, its Notifications) and packs
the reply: the objects never see the wire format, a socket or a right
(PORTAL of ANON or SHARE still performs in its handler: portal.py says why).
"""
from libportal._abi import lib

from .. import stats
from . import (chain, context, devices, direct, discovery, info, inject, notify, portal,
               queue, sched, sharepoint, stream, trace)

HANDLERS = {
    lib.FAYT_SYS_HELLO: context.sys_hello,
    lib.FAYT_SYS_LIST_CONTEXTS: context.sys_list_contexts,
    lib.FAYT_SYS_PORTAL: portal.sys_portal,
    lib.FAYT_SYS_UNMAP: portal.sys_unmap,
    lib.FAYT_SYS_SHARE_DESTROY: sharepoint.sys_share_destroy,
    lib.FAYT_SYS_UNMAP_DESTROY: sharepoint.sys_unmap_destroy,
    lib.FAYT_SYS_LIST_SHARE: sharepoint.sys_list_share,
    lib.FAYT_SYS_NOTIFY_INSTALL: notify.sys_notify_install,
    lib.FAYT_SYS_NOTIFY_REMOVE: notify.sys_notify_remove,
    lib.FAYT_SYS_NOTIFY_OPEN: notify.sys_notify_open,
    lib.FAYT_SYS_NOTIFY_FETCH: notify.sys_notify_fetch,
    lib.FAYT_SYS_NOTIFY_STACK_ALLOC: notify.sys_notify_stack_alloc,
    lib.FAYT_SYS_NOTIFY_STACK_FREE: notify.sys_notify_stack_free,
    lib.FAYT_SYS_NOTIFY_PROVIDER: notify.sys_notify_provider,
    lib.FAYT_SYS_NOTIFY_SUBSCRIBE: notify.sys_notify_subscribe,
    lib.FAYT_SYS_NOTIFY_CLOSE: notify.sys_notify_close,
    lib.FAYT_SYS_NOTIFY_HINT: notify.sys_notify_hint,
    lib.FAYT_SYS_NOTIFY_RING: notify.sys_notify_ring,
    lib.FAYT_SYS_NOTIFY_RELEASE: notify.sys_notify_release,
    lib.FAYT_SYS_CHAIN_JOIN: chain.sys_chain_join,
    lib.FAYT_SYS_CHAIN_LEAVE: chain.sys_chain_leave,
    lib.FAYT_SYS_CHAIN_BACK: chain.sys_chain_back,
    lib.FAYT_SYS_CHAIN_UNBACK: chain.sys_chain_unback,
    lib.FAYT_SYS_STATS: stats.sys_stats,
    lib.FAYT_SYS_GRANT: direct.sys_grant,
    lib.FAYT_SYS_COW_PADDR: direct.sys_cow_paddr,
    lib.FAYT_SYS_PUBLISH: discovery.sys_publish,
    lib.FAYT_SYS_LOOKUP: discovery.sys_lookup,
    lib.FAYT_SYS_LISTEN: stream.sys_listen,
    lib.FAYT_SYS_CONNECT: stream.sys_connect,
    lib.FAYT_SYS_ACCEPT: stream.sys_accept,
    lib.FAYT_SYS_CHAN_CLOSE: stream.sys_chan_close,
    lib.FAYT_SYS_CHAN_PASS: stream.sys_chan_pass,
    lib.FAYT_SYS_CHAN_TAKE: stream.sys_chan_take,
    lib.FAYT_SYS_INFO: info.sys_info,
    lib.FAYT_SYS_TRACE_START: trace.sys_trace_start,
    lib.FAYT_SYS_TRACE_STOP: trace.sys_trace_stop,
    lib.FAYT_SYS_QUEUE_OPEN: queue.sys_queue_open,
    lib.FAYT_SYS_QUEUE_CLOSE: queue.sys_queue_close,
    lib.FAYT_SYS_SCHED_SUBSCRIBE: sched.sys_sched_subscribe,
    lib.FAYT_SYS_DEV_REGISTER: devices.sys_dev_register,
    lib.FAYT_SYS_DEV_ATTACH: devices.sys_dev_attach,
    lib.FAYT_SYS_DEV_IRQ: devices.sys_dev_irq,
    lib.FAYT_SYS_DEV_DETACH: devices.sys_dev_detach,
    lib.FAYT_SYS_INJECT_ADD: inject.sys_inject_add,
    lib.FAYT_SYS_INJECT_REMOVE: inject.sys_inject_remove,
    lib.FAYT_SYS_INJECT_LIST: inject.sys_inject_list,
}
# Every call but HELLO needs a context the policy admitted.
NEED_NO_HELLO = frozenset({lib.FAYT_SYS_HELLO})
# Calls whose request may carry file descriptors (SCM_RIGHTS): the handler
# gets them in `fds` and must dup what it keeps, the server closes them after.
TAKES_FDS = frozenset({lib.FAYT_SYS_PORTAL,      # SPECIAL: the client's userfaultfd
                       lib.FAYT_SYS_TRACE_START})  # the trace file
