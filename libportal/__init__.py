"""libportal: what a FAYT server imports to make system calls to faytd.

    import libportal as lp
    sp = lp.share_create("jobs", 4096)        # SHARE|ANON, created
    sp.write(0, b"hello")                     # fused lock/copy/unlock
    with sp:                                  # the share-point lock
        sp.view()[0:5]
    anon = lp.portal(lp.ANON, lp.PROT_RW, 8192)
    lp.install_handler(3, lambda payload, index, sender: len(payload))   # core only
    lp.notify(target_context_id, 3, b"ping", wait_return=True)           # -> 4
"""
from .errors import (PortalError, PermissionDenied, AlreadyExists, NotFound,  # noqa: F401
                     InvalidArgument, OutOfMemory, OwnerDied, TimedOut, Deadlock,
                     Unmapped, NotImplementedClass, DaemonUnavailable, ProtocolError,
                     NoSuchContext, WouldBlock, HandlerFailed, ChannelReset,
                     ChannelClosed)
from .syscall import Connection, connection, default_socket_path, set_default  # noqa: F401
from .portal import (portal, share_create, share_attach, Portal, SharePoint,  # noqa: F401
                     SHARE, DIRECT, ANON, COW, SPECIAL,
                     PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC, PROT_RW, PAGE_SIZE)
from .notification import (install_handler, remove_handler, notify,  # noqa: F401
                           notification_channel, notification_ret, notification_dispatch,
                           notification_poll, notification_wait, notification_stack_alloc,
                           notification_fd, notification_ready, notification_wait_async,
                           notification_stack_free, set_stack_provider, subscribe, decode_event,
                           context_of, notification_depth, notification_stats,
                           current_notification, PEER_DIED, SP_DESTROYED, OVERFLOW, DOORBELL)

from .direct import grant, physical  # noqa: F401
from .discovery import publish, unpublish, lookup, Published  # noqa: F401
from .queue import queue_open, Queue  # noqa: F401
from .sched import Scheduler  # noqa: F401
from .stream import (listen, connect, Listener, End, Peer, Shared,  # noqa: F401
                     SHUT_RD, SHUT_WR, SHUT_RDWR)
from .device import register_device, attach_device, Device, DeviceModel  # noqa: F401
from ._abi import lib as _lib
CATEGORY_CORE = _lib.FAYT_CATEGORY_CORE
CATEGORY_DRIVER = _lib.FAYT_CATEGORY_DRIVER
CATEGORY_SERVER = _lib.FAYT_CATEGORY_SERVER
COW_ON_WRITE = _lib.FAYT_COW_ON_WRITE
COW_SNAPSHOT = _lib.FAYT_COW_SNAPSHOT
from .special import (chain_join, ChainServer, PageRequest, SpecialPortal,  # noqa: F401
                      open_userfaultfd)
from .special import READ as ACCESS_READ, WRITE as ACCESS_WRITE  # noqa: F401

__version__ = "0.1.0"
