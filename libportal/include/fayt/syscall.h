/* fayt/syscall.h: the wire form of a system call to faytd.
 *
 * One SOCK_SEQPACKET message per request and per reply.  A request is a
 * fayt_req_hdr and a body; a reply is a fayt_rep_hdr and a body.  When err is
 * not 0 the reply body is a UTF-8 message naming the argument at fault.
 * File descriptors that a call grants travel with the reply as SCM_RIGHTS.
 *
 * FAYT_SYS_PORTAL body: struct portal_req byte for byte, then the paddr[]
 * entries its morphology names (morphology.length / FAYT_PAGE_SIZE of them for
 * DIRECT and COW, none otherwise), then a trailer of NUL-terminated strings.
 * Each pointer field holds 0 for NULL or 1 + the offset of its string in the
 * trailer, as a kernel would copy_from_user it.
 * Reply: struct fayt_portal_reply, then struct portal_req with its morphology
 * filled, then paddr[nframes]; one fd, the backing object.
 */
#ifndef FAYT_SYSCALL_H
#define FAYT_SYSCALL_H

#include <stdint.h>

#define FAYT_REQ_MAGIC 0x46415952  /* "FAYR" */
#define FAYT_REP_MAGIC 0x46415950  /* "FAYP" */
#define FAYT_MSG_MAX   65536        /* longest message either way */

/* The wire ABI: the version of what this file (and the layouts it names)
 * means on the socket.  Any change of a layout or of a call's meaning bumps
 * it; a number is never reused.  HELLO carries it both ways: faytd refuses
 * a client of another version (EPROTO, both versions named) and the client
 * refuses a faytd of another.  0 is the protocol before versions, whose
 * HELLO had no body and whose reply held 0 where wire_abi is now. */
#define FAYT_WIRE_ABI  7

/* Operations.  Never reuse a retired number. */
#define FAYT_SYS_HELLO          1   /* body fayt_hello_req: register the context;
                                       reply fayt_hello_reply + context page fd */
#define FAYT_SYS_PORTAL         2   /* portal(): see above */
#define FAYT_SYS_UNMAP          3   /* body fayt_handle_req: drop a mapping */
#define FAYT_SYS_SHARE_DESTROY  4   /* body fayt_handle_req: destroy the share-point mapped by handle */
#define FAYT_SYS_LIST_SHARE     5   /* body fayt_list_req (or none); reply: JSON list of share-points */
#define FAYT_SYS_LIST_CONTEXTS  6   /* body fayt_list_req (or none); reply: JSON {"contexts": [...], ...} */
#define FAYT_SYS_UNMAP_DESTROY  7   /* body fayt_handle_req: destroy, then drop the mapping */
/* Notifications (see notification.h).  Delivery itself makes no call. */
#define FAYT_SYS_NOTIFY_INSTALL 8   /* body fayt_notify_install: core only; writes actions[index] */
#define FAYT_SYS_NOTIFY_REMOVE  9   /* body fayt_notify_install (cookie ignored) */
#define FAYT_SYS_NOTIFY_OPEN    10  /* body fayt_notify_open; reply fayt_ring_reply + ring fd + the target's hint fd */
#define FAYT_SYS_NOTIFY_FETCH   11  /* body fayt_list_req (ring ids above); reply fayt_ring_reply[n] + n fds */
#define FAYT_SYS_NOTIFY_STACK_ALLOC 12  /* body fayt_stack_req; reply fayt_stack_reply + fd */
#define FAYT_SYS_NOTIFY_STACK_FREE  13  /* body fayt_handle_req (the stack's handle) */
#define FAYT_SYS_NOTIFY_PROVIDER    14  /* body fayt_notify_install: index or FAYT_NO_PROVIDER */
#define FAYT_SYS_NOTIFY_SUBSCRIBE   15  /* body fayt_notify_subscribe: faytd's own notifications */
#define FAYT_SYS_NOTIFY_CLOSE   16  /* body fayt_notify_open: drop this sender's ring into target */
#define FAYT_SYS_NOTIFY_HINT    17  /* no body; reply: the fd of this context's pending-hint object */
#define FAYT_SYS_NOTIFY_RING    18  /* body fayt_handle_req (target id): faytd rings its doorbell */
#define FAYT_SYS_NOTIFY_RELEASE 19  /* body fayt_handle_req (ring id): the target gives a ring back */
/* Chains and SPECIAL portals (see pager.h); 18..31 are left to notifications. */
#define FAYT_SYS_CHAIN_JOIN     32  /* body fayt_chain_join; reply fayt_chain_join_reply + channel fd + eventfd */
#define FAYT_SYS_CHAIN_LEAVE    33  /* body fayt_chain_leave */
#define FAYT_SYS_CHAIN_BACK     34  /* body fayt_chain_back; reply fayt_chain_back_reply */
#define FAYT_SYS_CHAIN_UNBACK   35  /* body fayt_chain_back (handle 0) */
/* faytd itself. */
#define FAYT_SYS_STATS          36  /* no body; reply: JSON counters (docs/cli.md) */
/* DMA grants (DIRECT over RAM, docs/portals.md). */
#define FAYT_SYS_GRANT          37  /* body fayt_grant_req; reply empty */
#define FAYT_SYS_COW_PADDR      38  /* body fayt_cow_paddr_req + uint32_t page[npages];
                                       reply uint64_t paddr[npages] */
/* Discovery by name (docs/discovery.md). */
#define FAYT_SYS_PUBLISH        39  /* body fayt_publish_req + the name (no NUL): publish this
                                       context under the name, or withdraw it; reply empty */
#define FAYT_SYS_LOOKUP         40  /* body: the name (no NUL); reply: JSON {"context", "pid",
                                       "uid", "category", "name", "namespace"} */
/* Connected channels (fayt/stream.h, docs/channels.md); 45..47 are left to them. */
#define FAYT_SYS_LISTEN         41  /* body fayt_listen_req + the name (no NUL); reply
                                       fayt_listen_reply + the listener's eventfd */
#define FAYT_SYS_CONNECT        42  /* body fayt_connect_req + the name (no NUL); reply
                                       fayt_chan_reply + its fds (see there) */
#define FAYT_SYS_ACCEPT         43  /* body fayt_handle_req (the listener); reply
                                       fayt_chan_reply + its fds; EAGAIN: none queued */
#define FAYT_SYS_CHAN_CLOSE     44  /* body fayt_handle_req (the channel): this end is done */
#define FAYT_SYS_CHAN_PASS      45  /* body fayt_chan_pass_req: hand a share-point this context
                                       maps to the channel's peer; reply fayt_chan_pass_reply */
#define FAYT_SYS_CHAN_TAKE      46  /* body fayt_chan_take_req: take what the peer passed;
                                       reply fayt_chan_take_reply + 1 or 2 fds */
/* The user->kernel queue (queue.h, docs/queue.md). */
#define FAYT_SYS_QUEUE_OPEN     48  /* body fayt_queue_open; reply fayt_queue_reply + the
                                       queue's fd + its eventfd */
#define FAYT_SYS_QUEUE_CLOSE    49  /* body fayt_handle_req (the queue id): faytd drains what
                                       is published, then drops the queue */
/* Scheduling events (docs/scheduling.md, "Events"). */
#define FAYT_SYS_SCHED_SUBSCRIBE 50 /* body fayt_sched_subscribe: this scheduler's events
                                       (FAYT_EVENT_SCHED_*) at a slot, or none; reply empty */
/* Tools (issue 18: 56-59).  One call, what it describes chosen by the body. */
#define FAYT_SYS_INFO           56  /* body fayt_info_req; reply: a JSON page of rings or
                                       chains (docs/cli.md, "fayt rings, fayt chains") */
#define FAYT_SYS_TRACE_START    57  /* no body; one fd (SCM_RIGHTS): a regular file open for
                                       writing, where faytd writes the timeline trace
                                       (docs/tracing.md); core only; reply empty */
#define FAYT_SYS_TRACE_STOP     58  /* no body: end the trace, complete the file; reply:
                                       JSON {"events", "dropped", "lost", "by"}; core only */
/* Emulated devices (docs/devices.md); 60..67 are theirs. */
#define FAYT_SYS_DEV_REGISTER   60  /* body fayt_dev_req + the window's name (no NUL): serve it;
                                       reply fayt_dev_reply + 7 fds (FAYT_DEV_FD_*) */
#define FAYT_SYS_DEV_ATTACH     61  /* body fayt_dev_req + the window's name: drive it;
                                       reply fayt_dev_reply + 5 fds (rings, state, eventfds) */
#define FAYT_SYS_DEV_IRQ        62  /* body fayt_dev_req (window): the model raises it */
#define FAYT_SYS_DEV_DETACH     63  /* body fayt_dev_req (window): stop serving or driving it */
/* Fault injection (docs/testing.md, docs/wire-protocol.md); 68..71 are its. */
#define FAYT_SYS_INJECT_ADD     68  /* body: a JSON rule (docs/wire-protocol.md); reply: JSON
                                       {"rule": id}: core, or the caller's own uid's contexts */
#define FAYT_SYS_INJECT_REMOVE  69  /* body fayt_handle_req (rule id; 0: every rule the caller
                                       may remove) */
#define FAYT_SYS_INJECT_LIST    70  /* no body; reply: JSON {"rules", "log", "counts"} of the
                                       rules the caller may see */

/* fayt_req_hdr.flags */
#define FAYT_REQ_NOREPLY 0x1        /* UNMAP, UNMAP_DESTROY: do not answer unless it fails */

struct fayt_req_hdr {
    uint32_t magic;
    uint16_t op;
    uint16_t flags;
    uint32_t seq;
    int32_t tid;           /* calling thread; checked against SO_PEERCRED's pid */
} __attribute__((packed));

struct fayt_rep_hdr {
    uint32_t magic;
    uint16_t op;
    uint16_t nfds;
    uint32_t seq;
    int32_t err;           /* 0 or a positive errno */
} __attribute__((packed));

struct fayt_hello_req {
    uint32_t wire_abi;     /* the client's FAYT_WIRE_ABI; faytd reads it first, whatever
                              the length of the body, so a longer HELLO of a later
                              version is refused by its version, not its length */
    uint32_t reserved;     /* 0 */
} __attribute__((packed));

struct fayt_hello_reply {
    uint32_t context_id;
    uint32_t category;     /* FAYT_CATEGORY_* */
    uint32_t rights;       /* portal classes this context may use */
    uint32_t wire_abi;     /* faytd's FAYT_WIRE_ABI (0: a faytd before versions) */
} __attribute__((packed));

#define FAYT_CATEGORY_CORE   1
#define FAYT_CATEGORY_DRIVER 2
#define FAYT_CATEGORY_SERVER 3

/* LIST_*: the entries whose id is above `after`, as many as fit in one
 * reply, in id order; page on with the last id seen until a page is empty. */
struct fayt_list_req {
    uint64_t after;
} __attribute__((packed));

struct fayt_handle_req {
    uint64_t handle;
} __attribute__((packed));

/* INFO: what = FAYT_INFO_*; the entries whose id is above `after`, paged as
 * LIST_* are.  A context that is not core sees only what involves its own
 * uid's contexts. */
#define FAYT_INFO_RINGS  1     /* notification rings: sender, target, depth, drops */
#define FAYT_INFO_CHAINS 2     /* chains: servers, regions, faults answered */

struct fayt_info_req {
    uint32_t what;
    uint32_t reserved;     /* 0 */
    uint64_t after;
} __attribute__((packed));

struct fayt_portal_reply {
    uint64_t handle;       /* names this mapping in UNMAP and SHARE_DESTROY */
    uint64_t map_length;   /* bytes to map from offset 0 of the fd */
    uint64_t data_offset;  /* share-points: where the data starts; else 0 */
    uint32_t sp_id;        /* share-points: the table id; else 0 */
    uint32_t nframes;      /* paddr[] entries that follow: every frame's, or the first
                              ones that fit FAYT_MSG_MAX (8177: a portal over 32 MiB) */
    int32_t prot;          /* protection granted */
    uint32_t flags;        /* FAYT_PORTAL_REPLY_* */
} __attribute__((packed));

#define FAYT_PORTAL_REPLY_CREATED 0x1   /* share-point: this call created it */
/* A share-point of more than one page is two objects: page 0 (the lock and
 * meta-structure, always mapped read-write) and the rest, whose descriptor
 * is read-only unless the call was granted PROT_WRITE.  The reply carries
 * both fds, in that order; the client maps the rest over page 0's mapping
 * from offset 4096 (MAP_FIXED). */
#define FAYT_PORTAL_REPLY_SPLIT 0x4
/* DIRECT: after paddr[] come nruns struct fayt_direct_run, and one fd per
 * object the runs name (at most FAYT_DIRECT_OBJECTS_MAX): the client maps
 * run i at map address + its `at`, from its object's `offset`. */
#define FAYT_PORTAL_REPLY_DIRECT 0x8
#define FAYT_DIRECT_OBJECTS_MAX 8
/* COW at least on write: the runs are mapped MAP_PRIVATE (the view's
 * writes make private pages; pages it has not written show the source). */
#define FAYT_PORTAL_REPLY_PRIVATE 0x10

/* COW: the mode, in portal_req.share.type (share.* means nothing else for a
 * class without SHARE); the source is the frames morphology.paddr[] names,
 * as for DIRECT. */
#define FAYT_COW_ON_WRITE 0    /* at least on write: a private mapping of the source */
#define FAYT_COW_SNAPSHOT 1    /* strict: a copy made during the call */

/* COW_PADDR: physical addresses for the pages a view at least on write has
 * written (private pages, which the client finds in /proc/self/pagemap):
 * each gets a frame of its own the first time, which a strict snapshot
 * copies from the view's process (process_vm_readv).  base: where the view
 * is mapped in the caller. */
struct fayt_cow_paddr_req {
    uint64_t handle;       /* the view */
    uint64_t base;
    uint32_t npages;       /* page indexes that follow */
    uint32_t reserved;     /* 0 */
} __attribute__((packed));

struct fayt_direct_run {
    uint32_t fd;           /* index of its object's fd in the reply */
    uint32_t pages;        /* 4 KiB pages in the run */
    uint64_t at;           /* bytes from the start of the mapping */
    uint64_t offset;       /* bytes into its object */
} __attribute__((packed));

/* GRANT: the portal or share-point this context maps as `handle` becomes
 * DMA-able (DIRECT may name its frames) for one context or one category,
 * up to `prot`; FAYT_GRANT_REVOKE takes such a grant back.  The grant
 * lasts while the granting mapping does. */
#define FAYT_GRANT_CONTEXT  1  /* to: a context id */
#define FAYT_GRANT_CATEGORY 2  /* to: a FAYT_CATEGORY_* */
#define FAYT_GRANT_REVOKE   0x1
struct fayt_grant_req {
    uint64_t handle;       /* a mapping of this context: an ANON portal, a share-point */
    uint32_t kind;         /* FAYT_GRANT_CONTEXT or FAYT_GRANT_CATEGORY */
    uint32_t to;
    int32_t prot;          /* at most the mapping's prot */
    uint32_t flags;        /* FAYT_GRANT_REVOKE */
} __attribute__((packed));

/* QUEUE_OPEN: a queue from this context to faytd, of `size` ring bytes (0:
 * FAYT_QUEUE_SIZE_DEFAULT; else a power of two in FAYT_QUEUE_SIZE_MIN..MAX). */
struct fayt_queue_open {
    uint32_t size;
    uint32_t flags;        /* 0 */
} __attribute__((packed));

struct fayt_queue_reply {
    uint32_t queue_id;
    uint32_t size;         /* ring bytes */
    uint64_t map_length;   /* bytes to map read-write from offset 0 of the fd */
} __attribute__((packed));

/* Device windows (docs/devices.md). */
struct fayt_dev_req {
    uint32_t flags;        /* 0 */
    int32_t index;         /* ATTACH: the notification slot of the interrupt; else 0 */
    uint64_t cookie;       /* ATTACH: the handler's cookie (as NOTIFY_INSTALL); else 0 */
    uint32_t window;       /* IRQ, DETACH: the window's id; else 0 */
    uint32_t reserved;     /* 0 */
} __attribute__((packed));

struct fayt_dev_reply {
    uint64_t base;         /* the window's physical base */
    uint64_t size;         /* its bytes: the register page, then the data area */
    uint32_t window;       /* its id (IRQ, DETACH, FAYT_EVENT_IRQ's context_id) */
    uint32_t generation;   /* registrations of a model so far */
} __attribute__((packed));

/* The descriptors of a DEV_REGISTER reply, in this order (ATTACH: from RINGS_DRIVER). */
#define FAYT_DEV_FD_REGS         0  /* model: read-write */
#define FAYT_DEV_FD_DATA         1  /* model: read-write */
#define FAYT_DEV_FD_RING_DRIVER  2  /* written by the driver only */
#define FAYT_DEV_FD_RING_MODEL   3  /* written by the model only */
#define FAYT_DEV_FD_STATE        4  /* written by faytd only */
#define FAYT_DEV_FD_EV_MODEL     5  /* eventfd: the model's doorbell */
#define FAYT_DEV_FD_EV_DRIVER    6  /* eventfd: the driver's doorbell */

/* The pages of the register protocol: 64-bit little-endian words. */
#define FAYT_DEV_RING_ENTRIES  252   /* entries of 16 bytes after a 64-byte head */
#define FAYT_DEV_OP_WRITE32    1
#define FAYT_DEV_OP_WRITE64    2
#define FAYT_DEV_OP_READ32     3
#define FAYT_DEV_OP_READ64     4
#define FAYT_DEV_STATE_SERVED  1
#define FAYT_DEV_STATE_DEAD    2

#define FAYT_PUBLISH_WITHDRAW 0x1
struct fayt_publish_req {
    uint32_t flags;        /* FAYT_PUBLISH_WITHDRAW: take the name back */
    uint32_t reserved;     /* 0 */
} __attribute__((packed));

/* LISTEN: listen on a name (the namespaces of share-point names) with an
 * accept queue of `backlog` connections (0: FAYT_BACKLOG_DEFAULT); with
 * FAYT_LISTEN_CLOSE, stop listening (its queued connections are reset). */
#define FAYT_LISTEN_CLOSE       0x1
#define FAYT_BACKLOG_DEFAULT    16
#define FAYT_BACKLOG_MAX        4096
struct fayt_listen_req {
    uint32_t flags;        /* FAYT_LISTEN_CLOSE */
    uint32_t backlog;
} __attribute__((packed));

struct fayt_listen_reply {
    uint64_t listener;     /* names it in ACCEPT and LISTEN's FAYT_LISTEN_CLOSE */
} __attribute__((packed));

struct fayt_connect_req {
    uint32_t ring_bytes;   /* each direction's ring: a power of two in
                              [FAYT_STREAM_RING_MIN, FAYT_STREAM_RING_MAX]; 0: the default */
    uint32_t reserved;     /* 0 */
} __attribute__((packed));

/* CONNECT's and ACCEPT's reply: the channel and the peer's credentials, as
 * faytd recorded them at its HELLO (SO_PEERCRED), then 4 or 5 fds in this
 * order: this end's object (read-write), the peer's (read-only), this end's
 * eventfd, the peer's eventfd, and (FAYT_CHAN_PIDFD) a pidfd of the peer. */
#define FAYT_CHAN_PIDFD 0x1
struct fayt_chan_reply {
    uint64_t channel;      /* names it in CHAN_CLOSE */
    uint64_t ring_bytes;   /* each ring's size: the one to trust, not the objects' */
    uint64_t map_length;   /* bytes to map of each object */
    uint32_t peer_context;
    int32_t peer_pid;
    uint32_t peer_uid;
    uint32_t peer_category;  /* FAYT_CATEGORY_*, 0: none of those */
    uint32_t flags;        /* FAYT_CHAN_PIDFD */
    uint32_t reserved;
} __attribute__((packed));

/* CHAN_PASS: a message by reference (docs/channels.md).  share: the id of
 * a share-point this context maps now (fayt_portal_reply.sp_id); with
 * FAYT_PASS_PORTAL, the handle of an ANON portal this context maps
 * (fayt_portal_reply.handle); with FAYT_PASS_CANCEL, the ticket of a pass
 * of this end the peer has not taken.  At most FAYT_PASS_PENDING_MAX
 * untaken passes per direction. */
#define FAYT_PASS_COPY   0x1   /* hand over an immutable copy (sealed against writes) */
#define FAYT_PASS_WRITE  0x2   /* the peer may map it read-write (not with COPY) */
#define FAYT_PASS_CANCEL 0x4   /* withdraw the untaken pass `share` names */
#define FAYT_PASS_ACCEPTOR 0x10 /* the caller's end is the acceptor's (else the connector's) */
#define FAYT_PASS_PORTAL 0x20  /* `share` is an ANON portal's handle, not a share-point id */
#define FAYT_PASS_PENDING_MAX 16
struct fayt_chan_pass_req {
    uint64_t channel;
    uint64_t share;
    uint32_t flags;        /* FAYT_PASS_* */
    uint32_t reserved;     /* 0 */
} __attribute__((packed));

struct fayt_chan_pass_reply {
    uint64_t ticket;       /* what the frame names (struct fayt_stream_ref) */
    uint64_t length;       /* bytes of data handed over */
} __attribute__((packed));

struct fayt_chan_take_req {
    uint64_t channel;
    uint64_t ticket;       /* as the peer's frame named it: checked by faytd */
} __attribute__((packed));

/* CHAN_TAKE's reply, then the object's fd (FAYT_TAKE_SPLIT: page 0's, then
 * the rest's, to map at map_length's page 1): the data is `length` bytes
 * at data_offset of the mapping.  Read-only fds unless FAYT_PASS_WRITE. */
#define FAYT_TAKE_SPLIT 0x8
struct fayt_chan_take_reply {
    uint64_t length;
    uint64_t data_offset;
    uint64_t map_length;
    uint32_t flags;        /* FAYT_PASS_COPY, FAYT_PASS_WRITE, FAYT_PASS_PORTAL,
                              FAYT_TAKE_SPLIT */
    uint32_t reserved;
} __attribute__((packed));

struct fayt_notify_install {
    int32_t index;         /* 0..63 (PROVIDER: or FAYT_NO_PROVIDER) */
    uint32_t reserved;
    uint64_t cookie;       /* INSTALL: what actions[index].handler holds; not 0 */
} __attribute__((packed));

struct fayt_notify_open {
    uint32_t target;       /* the target's context id */
    uint32_t reserved;
} __attribute__((packed));

struct fayt_ring_reply {
    uint32_t ring_id;
    uint32_t sender;
    uint32_t target;
    int32_t target_pid;
    uint64_t map_length;   /* bytes to map from offset 0 of the fd */
} __attribute__((packed));

struct fayt_stack_req {
    uint32_t size;         /* bytes, a multiple of FAYT_PAGE_SIZE (0: one page) */
    uint32_t reserved;
} __attribute__((packed));

struct fayt_stack_reply {
    uint64_t handle;
    uint32_t size;
    uint32_t record;       /* its index in the context page's stacks[] */
} __attribute__((packed));

/* SCHED_SUBSCRIBE: faytd posts struct fayt_sched_event notices at slot
 * `index` (-1: unsubscribe) about every context the scheduler right names. */
struct fayt_sched_subscribe {
    int32_t index;
    uint32_t flags;        /* 0 */
} __attribute__((packed));

struct fayt_notify_subscribe {
    uint32_t event;        /* FAYT_EVENT_* */
    int32_t index;         /* the slot faytd's notification names; -1: unsubscribe */
    uint32_t arg;          /* PEER_DIED: the context id watched, 0 any */
    uint32_t reserved;
} __attribute__((packed));

#endif
