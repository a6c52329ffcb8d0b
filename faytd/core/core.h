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
 * - names.c: the name index, every share-point's identifier (SipHash-keyed);
 * - records.c: the share-points and ANON portals the C path made and still
 *   holds, by (context, handle), and the objects kept for recycling;
 * - journal.c: the journal records the C path writes;
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

/* -- the core ----------------------------------------------------------- */
/* Larger portals (and share-points) go through Python. */
#define FAYT_FAST_MAX_FRAMES 1024

/* The core's state.  Python sets the limits from its config and reads the
 * counters; `priv` is C's alone (the tables, the keeper and the pool). */
struct fayt_core {
    struct fayt_frames frames;
    int32_t journal_fd;        /* -1: no journal */
    uint32_t next_sp_id;       /* share-point ids, shared by Python and C */
    uint64_t journal_lines;    /* lines written since the journal was (re)written */
    int64_t journal_live;      /* of them, records of what is still live */
    uint64_t max_portal_length;
    uint64_t max_ram_per_context;   /* UINT64_MAX: none */
    uint32_t max_sharepoints;
    uint32_t max_mappings;     /* per context */
    uint32_t nsharepoints;     /* in the table: Python's and resident ones */
    uint32_t nresident;
    uint32_t disabled;         /* 1: hand every request to Python */
    uint32_t recycle;          /* 1: keep a destroyed object for its context (records.c) */
    uint64_t creates;          /* share-points made by the C path */
    uint64_t destroys;         /* and destroyed */
    uint64_t anon_maps;        /* ANON portals it made */
    uint64_t anon_unmaps;      /* and unmapped */
    uint64_t journal_errors;   /* journal writes that failed (Python logs them) */
    struct fayt_core_priv *priv;
    struct fayt_faults *faults;     /* the fault engine (fault.h), NULL until its init */
} __attribute__((packed));

/* Set up a zeroed core (its tables, the pool's lock): 0 or ENOMEM.  fini
 * frees what init and the tables hold (not the keeper: see below). */
int fayt_core_init(struct fayt_core *k);
void fayt_core_fini(struct fayt_core *k);
/* Which build of this header the module is (faytd/native.py checks it). */
int fayt_core_abi(void);

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

/* -- the request path (serve.c) ------------------------------------------ */
/* One per connection (faytd's Context owns it).  Python keeps next_handle,
 * ram and py_mappings here, so both sides count from the same numbers. */
struct fayt_fast_conn {
    int32_t fd;                /* the connection's socket */
    uint32_t ctx_id;
    int32_t pid;
    uint32_t uid;
    uint64_t start;            /* the process's start time (frames.start_time) */
    int32_t tid;               /* a thread already checked to be the pid's (0: none) */
    uint32_t flags;            /* FAYT_FAST_CONN_* */
    uint64_t next_handle;
    uint64_t ram;              /* bytes charged to the context's RAM quota */
    uint32_t py_mappings;      /* mappings faytd's Python holds for it */
    uint32_t resident;         /* resident share-points it created */
} __attribute__((packed));
#define FAYT_FAST_CONN_SHARE   0x1  /* registered, and may use SHARE|ANON */
#define FAYT_FAST_CONN_NOTICES 0x2  /* subscribed to faytd's notices: destroys go to Python */
#define FAYT_FAST_CONN_ANON    0x4  /* registered, and may use ANON */

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
 * not served comes back in out[max] (the passed one among them); returns
 * how many (0 as well after FAYT_FAST_POLL_BATCH served requests, or a
 * signal), or -errno.  It looks for spin_ns (giving the CPU away between
 * looks) before it sleeps; timeout_ms -1 sleeps until an event, 0 never. */
#define FAYT_FAST_POLL_BATCH 64
int fayt_fast_poll(struct fayt_core *k, int epfd, int64_t spin_ns, int timeout_ms,
                   struct fayt_fast_event *out, int max, uint8_t *buf, struct fayt_fast_io *io);

/* The name index (names.c): every share-point's identifier.  add: 0,
 * EEXIST, ENOMEM; del: 0, ENOENT, EBUSY (the C path holds it). */
int fayt_fast_name_add(struct fayt_core *k, const char *ident, uint32_t len);
int fayt_fast_name_del(struct fayt_core *k, const char *ident, uint32_t len);

/* A context ended: the objects kept for its next share-points go. */
void fayt_fast_conn_gone(struct fayt_core *k, struct fayt_fast_conn *c);
/* A clean stop: every kept object goes. */
void fayt_fast_shutdown(struct fayt_core *k);

/* A resident share-point, as fayt_fast_take_resident hands it to Python:
 * its creator's mapping (handle) is its only one; its frames are referenced
 * twice (the table's reference and the mapping's), its journal record is
 * written, and its bytes are charged to the creator's conn->ram. */
struct fayt_fast_resident {
    uint32_t sp_id;
    uint32_t ctx_id;
    uint64_t handle;
    int32_t pid;
    int32_t tid;
    uint32_t uid;
    int32_t prot;
    uint64_t start;
    uint64_t length;           /* bytes of the backing object */
    uint32_t oid;
    uint32_t nframes;
    uint32_t ident_len;        /* 0 for an ANON portal */
    uint32_t type;             /* SHARE|ANON: a share-point; ANON: a portal */
    char object[96];           /* FAYT_OBJ_NAME_MAX */
    char identifier[256];      /* FAYT_NAME_MAX + 1 */
} __attribute__((packed));
/* When the oldest resident share-point was made (CLOCK_MONOTONIC ns; 0:
 * none).  At most 64 are resident (then creates go through Python, which
 * takes them all over); fayt_fast_poll returns when faytd is idle and the
 * oldest is FAYT_FAST_RESIDENT_AGE_NS old, so that Python takes them over
 * then rather than in some later call's time. */
#define FAYT_FAST_RESIDENT_AGE_NS 5000000
int64_t fayt_fast_oldest_resident(struct fayt_core *k);
/* Take one resident share-point over (its frames into frames[max]): 1, or 0
 * when none is left.  Python then owns it; its name stays in the index. */
int fayt_fast_take_resident(struct fayt_core *k, struct fayt_fast_resident *out,
                            uint32_t *frames, uint32_t max);

#endif
