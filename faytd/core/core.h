/* core.h: faytd's C core (the faytd._core extension), as faytd's Python
 * sees it (faytd/_build.py hands this header to cffi).
 *
 * Not a client ABI: no client loads faytd._core, and nothing here is in
 * libportal.  Layouts shared with clients (portal_req, the replies, the
 * share-point meta-structure) come from libportal/include/fayt/, included
 * by the .c files.  Packed, every field at its natural offset, as the
 * headers there are.
 *
 * All of the core's state is in one struct fayt_core, passed to every
 * function (faytd makes one: faytd/native.py); the keeper process keeps
 * its own few variables (it is another process).  The pieces:
 * - frames.c: the frame allocator of the emulated RAM (one, for Python's
 *   calls and the C path alike);
 * - keeper.c: backing objects, sealed memfds held by a keeper process that
 *   survives faytd, and the pool thread (C, no GIL) that makes them ahead
 *   of need and has released ones closed;
 * - names.c: names and their namespaces (a uid's, or the policy's shared
 *   one), and the name index, every share-point's identifier (SipHash-keyed);
 * - table.c: the owner of every share-point (its record, object(s) and
 *   frames), of every share-point and ANON mapping (by context and handle),
 *   of each context's accounting (RAM, mappings) and of the objects kept
 *   for recycling; its calls perform PORTAL, UNMAP and the destroys for the
 *   C path and for faytd's Python alike;
 * - journal.c: the journal records the C path writes;
 * - decode.c: the one decoder of struct portal_req, for every path;
 * - timers.c: timerfds for faytd's deadlines;
 * - sigbus.c: the guard against shared objects a client truncates;
 * - fault.c: the fault engine of SPECIAL portals (its own header, fault.h);
 * - serve.c: the request path: fayt_fast_poll (faytd's epoll wait) and
 *   fayt_fast_serve, which read one request, and perform and answer it in
 *   C when it is one the C path takes; anything else goes back, unread
 *   by nothing but recvmsg, to faytd's Python.
 */
#ifndef FAYT_CORE_H
#define FAYT_CORE_H

#include <stdint.h>

/* -- frames (frames.c) ------------------------------------------------- */
/* The emulated RAM starts here (1 MiB, as on a PC; MMIO windows sit far
 * above): frame f's physical address is FAYT_RAM_BASE + f * 4096. */
#define FAYT_RAM_BASE 0x100000

struct fayt_frames {
    uint32_t nframes;
    uint32_t next;             /* frames below this were handed out once */
    uint32_t nfree;            /* entries in free_stack */
    uint32_t next_oid;         /* backing object ids, shared by Python and C */
    uint32_t *free_stack;      /* frames handed back (nframes entries of room) */
    uint32_t *refcount;        /* per frame */
    uint32_t *owner;           /* per frame: backing object id, 0 when free */
    uint32_t *offset;          /* per frame: page index in its object */
} __attribute__((packed));

/* Arrays for nframes frames; 0 or ENOMEM.  fini frees them. */
int fayt_frames_init(struct fayt_frames *f, uint32_t nframes);
void fayt_frames_fini(struct fayt_frames *f);
uint32_t fayt_frames_free(const struct fayt_frames *f);
/* n fresh frames for object oid into out[n], each referenced once; ENOMEM
 * (nothing taken) if fewer are free. */
int fayt_frames_alloc(struct fayt_frames *f, uint32_t n, uint32_t oid, uint32_t *out);
/* One reference more to each frame. */
void fayt_frames_get(struct fayt_frames *f, const uint32_t *frames, uint32_t n);
/* One reference less to each; a frame at zero is free again.  Returns how
 * many were freed. */
uint32_t fayt_frames_put(struct fayt_frames *f, const uint32_t *frames, uint32_t n);
/* A restart: object oid holds these frames (each referenced once); EINVAL
 * if one is out of range or taken.  After the last, fayt_frames_adopted()
 * makes the frames below the highest adopted one that nobody took free. */
int fayt_frames_adopt(struct fayt_frames *f, const uint32_t *frames, uint32_t n, uint32_t oid);
void fayt_frames_adopted(struct fayt_frames *f);

/* DIRECT and COW (faytd/direct.py): the frames of n physical addresses,
 * into frames[n], and the runs they make (consecutive pages of one object:
 * its id, its first page, how many, the index of its first entry), into
 * the run arrays (n entries of room), *nruns of them.  0; or why the entry
 * *bad is refused: FAYT_FRAMES_UNALIGNED, _UNBACKED (outside the RAM),
 * _FREE. */
#define FAYT_FRAMES_UNALIGNED 1
#define FAYT_FRAMES_UNBACKED 2
#define FAYT_FRAMES_FREE 3
int fayt_frames_resolve(const struct fayt_frames *f, const uint64_t *paddr, uint32_t n,
                        uint32_t *frames, uint32_t *run_oid, uint32_t *run_page,
                        uint32_t *run_pages, uint32_t *run_at, uint32_t *nruns, uint32_t *bad);

/* -- the core ----------------------------------------------------------- */
/* Larger portals (and share-points) go through Python. */
#define FAYT_FAST_MAX_FRAMES 1024

/* The core's state.  Python sets the limits from its config and reads the
 * counters; `priv` is C's alone (the tables, the keeper and the pool). */
struct fayt_core {
    struct fayt_frames frames;
    int32_t journal_fd;        /* -1: no journal */
    uint32_t next_sp_id;       /* the next share-point id: only the core changes it */
    uint64_t journal_lines;    /* lines written since the journal was (re)written */
    int64_t journal_live;      /* of them, records of what is still live */
    uint64_t max_portal_length;
    uint64_t max_ram_per_context;   /* UINT64_MAX: none */
    uint32_t max_sharepoints;
    uint32_t max_mappings;     /* per context */
    uint32_t nsharepoints;     /* in the table */
    uint32_t nrecords;         /* share-point records: in the table, or destroyed and mapped */
    uint32_t disabled;         /* 1: hand every request to Python */
    uint32_t recycle;          /* 1: keep a destroyed object for its context (table.c) */
    uint64_t creates;          /* share-points made by the C path */
    uint64_t destroys;         /* and destroyed */
    uint64_t anon_maps;        /* ANON portals it made */
    uint64_t anon_unmaps;      /* and unmapped */
    uint64_t attaches;         /* share-point attaches it served */
    uint64_t unmaps;           /* share-point unmaps it served */
    uint64_t calls_portal;     /* calls it served, by op (fayt stats) */
    uint64_t calls_unmap;
    uint64_t calls_unmap_destroy;
    uint64_t journal_errors;   /* journal writes that failed (Python logs them) */
    struct fayt_core_priv *priv;
    struct fayt_faults *faults;     /* the fault engine (fault.h), NULL until its init */
    /* Limits per uid, for contexts that are not core (docs/limits.md), and
     * the part of the table and of the RAM that only core contexts may
     * take (table.c).  0 / UINT64_MAX: none. */
    uint32_t max_sharepoints_per_uid;
    uint32_t reserved_sharepoints;
    uint64_t max_ram_per_uid;
    uint64_t reserved_ram;     /* bytes */
    uint32_t noncore_sharepoints;   /* in the table, made by contexts that are not core */
    uint32_t reserved2;
    uint64_t noncore_ram;      /* bytes charged to contexts that are not core */
    /* Fairness (serve.c): requests read of contexts that are not core (a
     * clock), of core ones, how many of the first a core request waited
     * behind (from the last look at epoll before faytd saw it: an upper
     * bound) in all and at most, and requests a uid's budget put off to
     * the next round. */
    uint64_t fair_others;
    uint64_t fair_core_requests;
    uint64_t fair_core_waited;
    uint64_t fair_core_waited_max;
    uint64_t fair_deferred;
} __attribute__((packed));

/* Set up a zeroed core (its tables, the pool's lock): 0 or ENOMEM.  fini
 * frees what init and the tables hold (not the keeper: see below). */
int fayt_core_init(struct fayt_core *k);
void fayt_core_fini(struct fayt_core *k);
/* Which build of this header the module is (faytd/native.py checks it). */
int fayt_core_abi(void);

/* Share-point ids (serve.c): a new one (1 .. 2^32-2, then 1 again), and,
 * at a restart, never one below `next` again (ids of share-points destroyed
 * before it may still be in lock records). */
uint32_t fayt_core_new_sp_id(struct fayt_core *k);
void fayt_core_skip_sp_ids(struct fayt_core *k, uint32_t next);

/* -- journal records (journal.c): the one writer of a share-point's lines -- */
/* The S record of a share-point into out[max] (faytd/journal.py gives the
 * format): its length, or -1 if it does not fit.  object: "<page 0>" or
 * "<page 0>+<the rest>". */
int fayt_journal_sp_line(uint32_t sp_id, int32_t pid, uint64_t start, uint32_t uid,
                         int32_t prot, uint64_t length, const char *object,
                         const uint32_t *frames, uint32_t nframes, uint32_t ns,
                         const char *ident, uint32_t ilen, char *out, uint32_t max);
/* Append the D record of a share-point to the journal: 0, or -1 if the
 * write failed (counted in journal_errors). */
int fayt_journal_sp_destroyed(struct fayt_core *k, uint32_t sp_id);

/* -- timers (timers.c) --------------------------------------------------- */
/* timerfd(2) for faytd's deadlines: open (-errno on failure), arm ns from
 * now (<= 0: disarm), read off its expirations. */
int fayt_timerfd_open(void);
int fayt_timerfd_arm(int fd, int64_t ns);
void fayt_timerfd_drain(int fd);

/* -- the SIGBUS guard (sigbus.c) ------------------------------------------ */
/* Survive a client that truncates a shared object faytd maps (its
 * context page, a share-point, a chain's channel: ftruncate(2) on the fd it
 * was given).  faytd's next access to a page past the new end raises
 * SIGBUS (BUS_ADRERR); the handler puts a private zero page there and the
 * access goes on, reading zeros, which faytd already treats as any other
 * untrusted content.  Any other SIGBUS goes to the handler that was there
 * before (or the default action).  It covers every mapping of the process:
 * faytd maps only shared objects, and a write into one that tmpfs cannot
 * back any more (full) is mended the same way, and logged the same way. 
 * Returns 0 or an errno; fayt_sigbus_count() counts the pages replaced. */
int fayt_sigbus_guard(void);
uint64_t fayt_sigbus_count(void);

/* -- backing objects: the keeper and the pool (keeper.c) ------------------ */
#define FAYT_OBJ_NAME_MAX 96       /* bytes of an object name, NUL included */

/* Every object is a memfd, 0600, sealed F_SEAL_SHRINK|F_SEAL_GROW|
 * F_SEAL_SEAL at its size when taken, and held by the keeper process: its
 * name is /proc/<keeper pid>/fd/<n>, which faytd opens for a descriptor.
 * Start a keeper listening at path (NULL or "": not restartable): its pid,
 * or -errno. */
int fayt_keeper_start(struct fayt_core *k, const char *path);
/* Take over the keeper listening at path (a restarted faytd): its pid, or
 * -errno (ENOENT, ECONNREFUSED: none runs there; EPERM: another uid's). */
int fayt_keeper_connect(struct fayt_core *k, const char *path);
int fayt_keeper_pid(struct fayt_core *k);
/* The keeper's RLIMIT_NOFILE: what bounds the live objects. */
uint64_t fayt_keeper_nofile(struct fayt_core *k);
/* Have the keeper close these objects (their numbers there) now. */
void fayt_keeper_close(struct fayt_core *k, const int32_t *fds, uint32_t n);
/* A clean stop: the keeper exits (every object it holds goes). */
void fayt_keeper_quit(struct fayt_core *k);
/* Let go of the keeper; it keeps its objects for a restart. */
void fayt_keeper_detach(struct fayt_core *k);

/* Start the pool thread: `target` objects kept ready (one page each, the
 * page made, handed to the keeper).  0 or errno. */
int fayt_objpool_start(struct fayt_core *k, uint32_t target);
/* A new object of `length` bytes (a page multiple), sealed at that size:
 * its fd (>= 0; the caller owns it) and its name in name_out, or -errno
 * (EMFILE: the keeper is at its RLIMIT_NOFILE).  kind NULL: taken from the
 * pool, or made now if the pool is empty or stopped; else made now, its
 * memfd named "fayt.<kind>" (what it is for shows in /proc/<pid>/fd). */
int fayt_objpool_take(struct fayt_core *k, uint64_t length, const char *kind, char *name_out);
/* Have the keeper close the object `name` soon (in the pool thread; now if
 * it is stopped).  Mappings of it stay valid. */
void fayt_objpool_release(struct fayt_core *k, const char *name);
/* End the thread; every pooled object and queued release goes now. */
void fayt_objpool_stop(struct fayt_core *k);

/* -- the portal_req decoder (decode.c) ----------------------------------- */
/* A decoded struct portal_req.  A string is at body[*_at], *_len bytes
 * (its NUL not counted), checked to end inside the message and to be
 * UTF-8; *_at is -1 for a NULL pointer. */
struct fayt_portal_args {
    int32_t type;
    int32_t prot;
    int32_t length;
    int32_t share_type;
    int32_t create;
    int32_t attach;            /* SHARE with share.create ATTACH */
    uint64_t ident_p;          /* the pointer fields as sent (0 or 1 + trailer offset) */
    uint64_t chain_p;
    uint64_t message_p;
    uint64_t addr;             /* morphology.addr */
    uint64_t mlen;             /* morphology.length */
    int32_t ident_at;
    int32_t ident_len;
    int32_t chain_at;
    int32_t chain_len;
    int32_t message_at;
    int32_t message_len;
} __attribute__((packed));

/* Decode and check the portal_req of a PORTAL request body (blen bytes):
 * 0, or an errno with a message naming the argument at fault in msg[max].
 * What it checks needs no state but k->max_portal_length; rights, quotas and
 * the share-point table are the caller's. */
int fayt_portal_decode(struct fayt_core *k, const uint8_t *body, uint32_t blen,
                       struct fayt_portal_args *a, char *msg, uint32_t max);

/* -- contexts, share-points and portals (table.c) ------------------------ */
/* One per connection (faytd's Context holds one, made by fayt_core_conn_new:
 * the core keeps it while its records name it).  Python keeps next_handle
 * and ram here too (the mappings it owns itself: SPECIAL portals,
 * notification stacks), so both count from the same numbers. */
struct fayt_fast_conn {
    int32_t fd;                /* the connection's socket; -1 */
    uint32_t ctx_id;
    int32_t pid;
    uint32_t uid;
    uint64_t start;            /* the process's start time (frames.start_time) */
    int32_t tid;               /* a thread already checked to be the pid's (0: none) */
    uint32_t flags;            /* FAYT_FAST_CONN_* */
    uint64_t next_handle;
    uint64_t ram;              /* bytes charged to the context's RAM quota */
    uint32_t py_mappings;      /* mappings faytd's Python holds for it */
    uint32_t nmaps;            /* share-point and ANON mappings the core holds for it */
    uint64_t mapped_bytes;     /* bytes those map */
    uint32_t refs;             /* the core's (its records) and Python's (1 until put) */
    uint32_t requests;         /* its requests read, wrapping (faytd/flood.py reads it) */
    struct fayt_core_cstate *cs;    /* the core's: its mappings, what it ever mapped */
    uint64_t names_create;     /* shared names it may create: bit i, the policy's pattern i */
    uint64_t names_attach;     /* and attach (names.c) */
    uint32_t category;         /* its category's id (grants to a category, direct.c);
                                  FAYT_FAST_NO_CATEGORY before HELLO */
} __attribute__((packed));
#define FAYT_FAST_NO_CATEGORY 0xffffffff
#define FAYT_FAST_CONN_SHARE   0x1  /* registered, and may use SHARE|ANON */
#define FAYT_FAST_CONN_NOTICES 0x2  /* subscribed to faytd's notices: destroys go to Python */
#define FAYT_FAST_CONN_ANON    0x4  /* registered, and may use ANON */
#define FAYT_FAST_CONN_CORE    0x8  /* a core server: may destroy any share-point, name
                                        any uid's namespace and every shared name */
#define FAYT_FAST_CONN_JOURNAL 0x10 /* its context page is journaled: its attaches are too */
#define FAYT_FAST_CONN_PRIO    0x20 /* core category (known at accept): served first in a
                                       round, with no budget per uid (serve.c) */
#define FAYT_FAST_CONN_PYTHON  0x40 /* a fault plan names its calls: every request goes to
                                      Python (faytd/injection.py) */
#define FAYT_FAST_CONN_DIRECT  0x80 /* registered, and may use DIRECT (direct.c) */
#define FAYT_FAST_CONN_COW     0x100 /* registered, and may use COW (direct.c) */

struct fayt_fast_conn *fayt_core_conn_new(struct fayt_core *k);
/* Python lets go of c (its Context is gone); the core frees it once no
 * record names it. */
void fayt_core_conn_put(struct fayt_core *k, struct fayt_fast_conn *c);
/* c is uid's: its charges and share-points count in uid's account.  0 or
 * ENOMEM; once, before c maps anything. */
int fayt_core_conn_bind(struct fayt_core *k, struct fayt_fast_conn *c, uint32_t uid);
/* Python's own RAM charges (notification stacks, SPECIAL portals): charge
 * c `bytes` after the same checks as the core's (the context's quota, its
 * uid's limit and the core's reserve): 0, or ENOMEM and msg.  ram_set: c's
 * charge is `bytes` now (a release), its uid's following. */
int fayt_core_charge(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t bytes, char *msg,
                     uint32_t max);
void fayt_core_ram_set(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t bytes);
/* What uid holds: its share-points in the table and the RAM charged to it. */
struct fayt_uid_usage {
    uint32_t sharepoints;
    uint32_t reserved;
    uint64_t ram;
} __attribute__((packed));
void fayt_core_uid_usage(struct fayt_core *k, uint32_t uid, struct fayt_uid_usage *out);

/* What a performed call leaves for its reply: the body (after the reply
 * header) in the caller's buffer, and its descriptors: the caller closes
 * them once sent, but for those `borrowed` marks (bit i: fds[i]), which
 * the core holds (for the next attach or a recycle) and which the caller
 * only sends. */
struct fayt_core_reply {
    uint32_t len;
    int32_t nfds;
    int32_t fds[2];
    uint32_t borrowed;
} __attribute__((packed));

/* PORTAL of class SHARE|ANON (create or attach) or ANON, decoded (a), for
 * c's thread tid: performed, its reply body in body[FAYT_MSG_MAX] and out,
 * 0; or an errno and msg (nothing changed).  Rights (classes, the thread)
 * are the caller's; the identifier's namespace and the right to name it
 * the core checks (fayt_name_resolve, from c's uid and names bits). */
int fayt_core_portal(struct fayt_core *k, struct fayt_fast_conn *c, int32_t tid,
                     const uint8_t *req, const struct fayt_portal_args *a, uint8_t *body,
                     struct fayt_core_reply *out, char *msg, uint32_t max);
/* PORTAL of class SHARE|DIRECT, create, decoded (a): a share-point over the
 * n frames of an existing object (`object`, its frames in order: the caller
 * checked the grant and that they are the whole object).  The
 * meta-structure is written at its head; no RAM is charged (the frames are
 * the portal's, charged to its owner); the table and the mapping each
 * reference the frames, so they outlive the portal.  Otherwise as
 * fayt_core_portal. */
int fayt_core_sp_over(struct fayt_core *k, struct fayt_fast_conn *c, int32_t tid,
                      const uint8_t *req, const struct fayt_portal_args *a, const char *object,
                      const uint32_t *frames, uint32_t n, uint8_t *body,
                      struct fayt_core_reply *out, char *msg, uint32_t max);
/* c's mapping `handle`: how FAYT_CORE_UNMAP (drop it), _UNMAP_DESTROY
 * (destroy its share-point, then drop it) or _DESTROY (destroy, keep it).
 * 0; -1 if the core holds no such mapping (Python's own, or none); or an
 * errno and msg.  A destroy fills *destroyed with the share-point's id. */
#define FAYT_CORE_UNMAP 0
#define FAYT_CORE_UNMAP_DESTROY 1
#define FAYT_CORE_DESTROY 2
int fayt_core_unmap(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t handle, int how,
                    uint32_t *destroyed, char *msg, uint32_t max);
/* A mapping the core holds, as it describes it to Python; asking marks
 * its object as seen by Python (a chain's backing may hand it on): it is
 * never recycled.  0, or ENOENT. */
struct fayt_map_info {
    uint64_t handle;
    uint32_t type;
    uint32_t sp_id;            /* 0: an ANON portal */
    int32_t pid;
    int32_t tid;
    int32_t prot;
    uint32_t oid;
    uint64_t length;
    uint64_t charged;          /* bytes of the context's RAM quota it carries */
    uint32_t nframes;
    uint32_t reserved;
    char object[200];          /* its object's name (a share-point's "<page 0>+<the rest>") */
} __attribute__((packed));
int fayt_core_map_info(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t handle,
                       struct fayt_map_info *out, uint32_t *frames, uint32_t max);
/* The share-point or ANON portal whose object is oid (DIRECT over RAM: a
 * core context may name any frame), described as fayt_core_map_info does
 * (handle, pid, tid: its creator's mapping's, or 0 for a share-point);
 * asking marks it as seen by Python: never recycled.  0, or ENOENT.  A scan
 * of the table: O(share-points + mappings). */
int fayt_core_oid_info(struct fayt_core *k, uint32_t oid, struct fayt_map_info *out,
                       uint32_t *frames, uint32_t max);
/* The share-point id of c's mapping `handle` (0: an ANON portal), or -1 if
 * the core holds no such mapping. */
int64_t fayt_core_map_sp(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t handle);
/* The RAM charge the mapping carries (a chain's backing takes it over). */
int fayt_core_map_set_charged(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t handle,
                              uint64_t charged);
/* Every mapping the core holds for c goes (its connection closed, or it died). */
void fayt_core_conn_drop(struct fayt_core *k, struct fayt_fast_conn *c);
/* pid died: its share-points lose their owner; those nobody maps go. */
void fayt_core_owner_died(struct fayt_core *k, int32_t pid);
/* Whether pid owns a share-point in the table. */
int fayt_core_owns(struct fayt_core *k, int32_t pid);
/* A clean stop: every share-point and mapping goes, and every kept object. */
void fayt_core_destroy_all(struct fayt_core *k);

/* -- DMA grants and DIRECT over granted RAM (direct.c) ------------------- */
/* A grant: the object oid of context from_ctx's mapping `handle` (an ANON
 * portal or a share-point the core holds) DMA-able for kind
 * (FAYT_GRANT_CONTEXT: context `to`; FAYT_GRANT_CATEGORY: category `to`)
 * up to prot, replacing the same (from_ctx, handle, kind, to) grant; with
 * revoke, that grant taken back.  Grants of oid whose mapping is gone are
 * dropped first.  0, or ENOMEM. */
int fayt_direct_grant(struct fayt_core *k, uint32_t oid, uint32_t from_ctx, uint64_t handle,
                      uint32_t kind, uint32_t to, int32_t prot, int revoke);
/* How many grants context ctx_id made (its quota). */
uint32_t fayt_direct_grants_by(struct fayt_core *k, uint32_t ctx_id);
/* The prot c's live grants of object oid allow (0: none). */
int32_t fayt_direct_granted_prot(struct fayt_core *k, const struct fayt_fast_conn *c,
                                 uint32_t oid);
/* Every grant from_ctx made to context `to` (not to a category) taken back:
 * how many.  DIRECT mappings already made stay. */
uint32_t fayt_direct_revoke_to(struct fayt_core *k, uint32_t from_ctx, uint32_t to);
/* Context ctx_id is gone: its grants go. */
void fayt_direct_context_gone(struct fayt_core *k, uint32_t ctx_id);
/* The core's DIRECT mappings and COW views (at least on write) made on the
 * C path are core mappings (fayt_core_map_info: type, frames; no object of
 * their own).  Object i (0..) of c's mapping `handle`: its id, name,
 * length and frames (as fayt_core_oid_info), or ENOENT past the last. */
int fayt_direct_map_object(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t handle,
                           uint32_t i, struct fayt_map_info *out, uint32_t *frames,
                           uint32_t max);
/* c's mapping `handle` (DIRECT or COW) leaves the core: its references to
 * its frames and its RAM charge become the caller's (Python's record of it
 * takes them, with the same handle).  0, or ENOENT. */
int fayt_direct_disown(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t handle);

/* A share-point, as the core describes it to Python. */
struct fayt_sp_info {
    uint32_t id;
    int32_t owner_pid;
    uint32_t owner_uid;
    int32_t prot;
    uint64_t owner_start;
    uint64_t length;           /* bytes of its object(s) */
    uint64_t data_offset;
    uint32_t nframes;
    uint32_t nmaps;            /* mappings of it */
    uint32_t destroyed;        /* out of the table; still mapped */
    uint32_t owner_alive;
    uint32_t ident_len;
    uint32_t ns;               /* the namespace of its identifier (names.c) */
    char object[200];          /* "<page 0>" or "<page 0>+<the rest>" */
    char identifier[256];      /* as it is in its namespace (no "uid:<uid>/") */
} __attribute__((packed));
/* Share-point `id` (in the table, or destroyed and still mapped): 0 and its
 * info and first `max` frames; ENOENT. */
int fayt_core_sp_info(struct fayt_core *k, uint32_t id, struct fayt_sp_info *out,
                      uint32_t *frames, uint32_t max);
/* The id of the share-point named ident in namespace ns, or 0. */
uint32_t fayt_core_sp_lookup(struct fayt_core *k, uint32_t ns, const char *ident, uint32_t len);
/* Ids above `after` of the share-points in the table, in order: how many
 * (at most max) into out.  O(max), whatever the table holds (serve.c). */
uint32_t fayt_core_sp_ids(struct fayt_core *k, uint32_t after, uint32_t *out, uint32_t max);
/* The same, of those named in namespace ns. */
uint32_t fayt_core_sp_ids_ns(struct fayt_core *k, uint32_t ns, uint32_t after, uint32_t *out,
                             uint32_t max);
/* Python maps share-point id's object itself (lock recovery): it is never
 * recycled. */
void fayt_core_sp_expose(struct fayt_core *k, uint32_t id);
/* Its mappings: how many (all of them, whatever max is); the first max
 * into the arrays. */
uint32_t fayt_core_sp_mappers(struct fayt_core *k, uint32_t id, uint32_t *ctx_ids,
                              uint64_t *handles, int32_t *pids, int32_t *tids, uint32_t max);
/* Whether c was ever granted a mapping of share-point id (its lock records
 * may name only those). */
int fayt_core_conn_mapped(struct fayt_core *k, struct fayt_fast_conn *c, uint32_t id);
/* Ids of share-points c attached (mapped, not created): how many; the
 * first max into out (the journal's A records). */
uint32_t fayt_core_conn_attached(struct fayt_core *k, struct fayt_fast_conn *c, uint32_t *out,
                                 uint32_t max);
/* A restart: c mapped share-point id before it (the journal says). */
void fayt_core_conn_mark(struct fayt_core *k, struct fayt_fast_conn *c, uint32_t id,
                         int attached);
/* A restart: a share-point of the journal, its object(s) checked by the
 * caller; its frames are adopted (fayt_frames_adopted after the last).  0,
 * or an errno and msg. */
int fayt_core_sp_adopt(struct fayt_core *k, uint32_t id, uint32_t ns, const char *ident,
                       uint32_t ilen,
                       int32_t prot, int32_t owner_pid, uint32_t owner_uid, uint64_t start,
                       uint64_t length, const char *object, const uint32_t *frames,
                       uint32_t nframes, char *msg, uint32_t max);

/* -- the request path (serve.c) ------------------------------------------ */
/* One request read by fayt_fast_serve and not performed: for Python. */
#define FAYT_FAST_MAX_FDS 4
struct fayt_fast_msg {
    int32_t len;               /* bytes in the caller's buffer; 0: end of file */
    int32_t mflags;            /* recvmsg's msg_flags (MSG_TRUNC, MSG_CTRUNC) */
    int32_t nfds;
    int32_t fds[4];            /* received descriptors, close-on-exec; Python closes them */
} __attribute__((packed));

/* fayt_fast_serve results */
#define FAYT_FAST_SERVED  1    /* performed and answered (or NOREPLY) */
#define FAYT_FAST_PASS    2    /* read, not performed: msg and buf are Python's to handle */
#define FAYT_FAST_AGAIN   3    /* nothing to read */
#define FAYT_FAST_UNSENT  4    /* performed, but the reply could not be sent: *err says
                                  why (EAGAIN: the client does not read its replies) */

/* Read one request of c's socket into buf (FAYT_MSG_MAX bytes).  noreply_out
 * (may be NULL) gets whether it was sent with FAYT_REQ_NOREPLY.  Returns
 * FAYT_FAST_*, or -errno if recvmsg failed. */
int fayt_fast_serve(struct fayt_core *k, struct fayt_fast_conn *c, uint8_t *buf,
                    struct fayt_fast_msg *msg, int *noreply_out, int *err);

/* faytd's loop (faytd/server.py) waits here: epoll, with the requests of
 * watched connections that the C path takes served in C, and every fd of
 * the fault engine (fault.h) handed to it, so that such a request, or a
 * fault a chain server answers, costs no Python at all. */
struct fayt_fast_event {
    int32_t fd;
    uint32_t events;           /* EPOLL* */
} __attribute__((packed));

struct fayt_fast_io {
    struct fayt_fast_msg msg;  /* the request poll read and passed, if any */
    int32_t noreply;           /* it was sent with FAYT_REQ_NOREPLY */
    int32_t err;               /* FAYT_FAST_UNSENT: why */
    int32_t passed_fd;         /* -1, or the connection whose request poll read */
    int32_t passed;            /* fayt_fast_serve's result for it */
    uint32_t passed_ctx;       /* that connection's context: its fd may be another's by
                                  the time Python gets to it (closed, accepted again) */
} __attribute__((packed));

/* Watch connection c (by c->fd) in fayt_fast_poll: 0 or ENOMEM. */
int fayt_fast_watch(struct fayt_core *k, struct fayt_fast_conn *c);
void fayt_fast_unwatch(struct fayt_core *k, int fd);
/* Wait on epfd.  A watched connection's request is read and, when the C
 * path performs it, served here; at most one other request is read and
 * passed (io->passed_fd), and then the loop stops serving.  Every event
 * not served comes back in out[max] (the passed one among them; a
 * connection's events are not: they are level-triggered, and the next
 * round sees them again); returns how many (0 as well after
 * FAYT_FAST_POLL_BATCH served requests, or a signal), or -errno.  It looks
 * for spin_ns (giving the CPU away between looks) before it sleeps;
 * timeout_ms -1 sleeps until an event, 0 never.
 *
 * Fairness: each look at epoll (up to max events) is a round.  In a round,
 * connections with FAYT_FAST_CONN_PRIO (core) are read first, one request
 * each; then one request per uid among the others (one connection of it:
 * epoll's order rotates through them), the rest left for a later round
 * (fair_deferred).  So a core request waits behind at most one request
 * per other uid that has one ready (the round it arrived in), however many
 * connections or processes that uid floods faytd from. */
#define FAYT_FAST_POLL_BATCH 64
#define FAYT_FAST_POLL_EVENTS 256  /* max at most */
int fayt_fast_poll(struct fayt_core *k, int epfd, int64_t spin_ns, int timeout_ms,
                   struct fayt_fast_event *out, int max, uint8_t *buf, struct fayt_fast_io *io);

/* -- names and namespaces (names.c) -------------------------------------- */
/* A name a client chooses lives in a namespace: the uid of the process
 * that names it, or the shared one for the names the policy shares
 * (patterns: a name, or a prefix and '*').  "uid:<uid>/<name>" names uid's
 * namespace explicitly (a core server any uid's, others their own).  The
 * index is keyed by (namespace, name): every share-point's identifier is
 * there; Python may add names of its own (a SPECIAL|SHARE share's), which
 * no share-point can then take.  add: 0, EEXIST, ENOMEM; del: 0, ENOENT,
 * EBUSY (a share-point's name: not Python's to remove). */
#define FAYT_NS_SHARED 0xffffffff       /* no uid is (uid_t)-1 */
#define FAYT_NAMES_SHARED_MAX 64
int fayt_fast_name_add(struct fayt_core *k, uint32_t ns, const char *ident, uint32_t len);
int fayt_fast_name_del(struct fayt_core *k, uint32_t ns, const char *ident, uint32_t len);

/* The policy's shared names (Python checked each pattern): 0 or ENOMEM.
 * A name's namespace follows the patterns of the moment it is named. */
int fayt_names_set_shared(struct fayt_core *k, const char *const *patterns, uint32_t n);
/* Bit i set: name matches shared pattern i (0: a uid's name). */
uint64_t fayt_names_shared(struct fayt_core *k, const char *name, uint32_t len);

/* Where a name sent by c resolves to. */
struct fayt_name_ref {
    uint32_t ns;               /* a uid, or FAYT_NS_SHARED */
    uint32_t at;               /* the name in it: ident[at .. at + len) */
    uint32_t len;
    uint32_t explicit_uid;     /* 1: it was sent as "uid:<uid>/<name>" */
} __attribute__((packed));
#define FAYT_NAME_ATTACH 0
#define FAYT_NAME_CREATE 1
/* Resolve ident (len bytes, UTF-8) for c, to create or attach (how) what
 * it names: 0, or EINVAL (a malformed "uid:" form), EPERM (another uid's
 * namespace, or a shared name c's category may not create or attach) with
 * a message naming `field` in msg[max]. */
int fayt_name_resolve(struct fayt_core *k, const struct fayt_fast_conn *c, const char *field,
                      const char *ident, uint32_t len, int how, struct fayt_name_ref *out,
                      char *msg, uint32_t max);

/* A context ended: the objects kept for its next share-points go. */
void fayt_fast_conn_gone(struct fayt_core *k, struct fayt_fast_conn *c);

#endif
