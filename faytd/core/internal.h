/* internal.h: what the core's .c files share with one another (not read by
 * cffi: faytd's Python sees core.h alone).  struct fayt_core_priv holds
 * every table of the core; nothing in faytd/core/ is a file-level global
 * but the keeper process's own copy of its few settings (keeper.c). */
#ifndef FAYT_CORE_INTERNAL_H
#define FAYT_CORE_INTERNAL_H

#include <pthread.h>
#include <stdint.h>
#include <sys/types.h>

#include "core.h"

struct epoll_event;
#include "fayt/portal.h"
#include "fayt/syscall.h"

#define FAST_MAX_FRAMES FAYT_FAST_MAX_FRAMES
#define RECYCLE_MAX 64            /* objects kept for their context's next create */
#define RO_HELD_MAX 64            /* read-only descriptors of sources held (direct.c) */
#define ZERO_AT_CREATE 16384      /* up to this, a recycled object is zeroed by the meta's write */
#define CORE_ABI 10               /* fayt_core_abi(); faytd/native.py checks it */

/* -- decode.c: strict UTF-8, as Python's decode("utf-8") takes it ------- */
int core_utf8_valid(const unsigned char *s, size_t n);

/* -- names.c ------------------------------------------------------------ */
struct sp;

struct name_ent {
    struct name_ent *next;
    uint64_t hash;
    uint32_t ns;                   /* its namespace: a uid, or FAYT_NS_SHARED */
    uint32_t len;
    struct sp *sp;                 /* NULL: a name Python holds (a SPECIAL|SHARE share) */
    char key[];
};

struct name_pattern {              /* a shared name of the policy */
    char *s;                       /* the name, or the prefix before its '*' */
    uint32_t len;
    int prefix;
};

uint64_t core_hash(struct fayt_core *k, uint32_t ns, const char *s, uint32_t n);
struct name_ent *core_name_find(struct fayt_core *k, uint32_t ns, const char *s, uint32_t n,
                                uint64_t h);
struct name_ent *core_name_insert(struct fayt_core *k, uint32_t ns, const char *s, uint32_t n,
                                  int *err);
void core_name_remove(struct fayt_core *k, struct name_ent *e);
void core_names_fini(struct fayt_core *k);
/* The "uid:<uid>/<name>" form: 0 and *at 0 (not that form) or the name's
 * offset and *uid; EINVAL (malformed) with a message naming field. */
int core_name_parse(const char *field, const char *s, uint32_t n, uint32_t *uid,
                    uint32_t *at, char *msg, size_t max);
/* A name as Python's %r of its str shows it: 'name'. */
const char *core_name_repr(const char *s, uint32_t n, char *out, size_t max);

/* -- table.c ------------------------------------------------------------ */
struct map;
struct idnode;

/* What one uid holds (its share-points, the RAM its contexts are charged),
 * whichever of its contexts made it: the limits per uid (config
 * max_sharepoints_per_uid, max_ram_per_uid) are checked against these.
 * Referenced by each context of the uid and each of its share-points. */
struct uid_acct {
    struct uid_acct *next;         /* in the by-uid table */
    uint32_t uid, refs;
    uint32_t nsharepoints;         /* in the table, made by the uid's contexts */
    uint32_t reserved;
    uint64_t ram;                  /* bytes charged to the uid's contexts */
    struct idnode *ids;            /* ids in the table named in its namespace (serve.c) */
};

/* A share-point: in the table from its create until its destroy (or its
 * owner's death with nobody mapping it), and a record until its last
 * mapping goes.  Its frames are referenced once by the table and once by
 * each mapping; its object(s) go with the last reference. */
struct sp {
    struct sp *id_next;            /* in the by-id table */
    struct name_ent *name;         /* NULL once destroyed */
    uint32_t ns;                   /* its name's namespace (names.c) */
    struct map *maps;              /* its mappings (map.sp_next) */
    struct fayt_fast_conn *charged_to;  /* whose RAM quota carries it (the creator) */
    uint64_t charged;
    uint32_t id, oid, nframes, nmaps;
    uint32_t creator_ctx;          /* the context that created it (0: a restart's) */
    int32_t owner_pid;
    uint32_t owner_uid;
    uint64_t owner_start;
    int32_t prot;
    uint64_t length;               /* bytes of its object(s) */
    int destroyed, owner_alive;
    int shared;                    /* its object went to another context, or to Python:
                                      never recycled */
    int journal_ok;                /* its D record was written (else never recycled) */
    int fd, fd2;                   /* held descriptors (the creator's, for recycling); -1 */
    int rofd;                      /* a read-only descriptor of its object, held for
                                      DIRECT and COW (direct.c); -1 */
    int split;                     /* two objects: page 0 and the rest */
    int direct;                    /* SHARE|DIRECT: over another portal's object (one object
                                      of several pages: no read-only attach of another uid) */
    struct uid_acct *acct;         /* whose count it is in (its owner's uid) */
    int noncore;                   /* made by a context that is not core: counted
                                      against the core's reserve */
    char object[FAYT_OBJ_NAME_MAX];
    char object2[FAYT_OBJ_NAME_MAX];
    uint32_t frames[];
};

/* A mapping the core holds: of a share-point, or an ANON portal (its own
 * object and frames). */
struct map {
    struct map *hnext;             /* in the (context, handle) table */
    struct map *sp_next, *sp_prev; /* in its share-point's list */
    struct map *c_next, *c_prev;   /* in its context's list */
    struct fayt_fast_conn *conn;
    struct sp *sp;                 /* NULL: an ANON portal */
    uint32_t ctx_id, type;
    uint64_t handle;
    int32_t pid, tid, prot;
    uint64_t length, charged;
    /* ANON: its object */
    uint32_t oid, nframes;
    int fd;                        /* held for recycling; -1 */
    int rofd;                      /* ANON: a read-only descriptor of its object, held for
                                      DIRECT and COW (direct.c); -1 */
    int shared;                    /* exposed to Python (a chain's backing): never recycled */
    char object[FAYT_OBJ_NAME_MAX];
    struct dobjs *direct;          /* DIRECT: the objects it references (direct.c) */
    uint32_t frames[];             /* ANON: its object's; DIRECT: those it names */
};

/* A context's part of the core (fayt_fast_conn.cs). */
struct idset {
    uint32_t *ids;                 /* open addressing; 0 empty; high bit: attached */
    uint32_t cap, n;
};
struct fayt_core_cstate {
    struct map *maps;
    struct idset mapped;           /* share-points it was ever granted a mapping of */
    struct uid_acct *acct;         /* its uid's (fayt_core_conn_bind); NULL before */
    uint64_t waiting_since;        /* fairness: others' requests served when faytd first saw
                                      a request of it waiting (serve.c); 0: none waits */
};

/* Objects kept for their context's next portal of the same size. */
struct kept {
    struct fayt_fast_conn *conn;
    uint64_t length;
    int fd;
    char name[FAYT_OBJ_NAME_MAX];
    int split;                     /* a share-point's pair: fd2, name2 the rest */
    int fd2;
    char name2[FAYT_OBJ_NAME_MAX];
};

struct sp *core_sp_find(struct fayt_core *k, uint32_t id);
struct map *core_map_find(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t handle);
/* The mapping `handle` of the context whose id is ctx_id (direct.c's grants). */
struct map *core_map_find_id(struct fayt_core *k, uint32_t ctx_id, uint64_t handle);
/* A new mapping record of c (nframes frames, zeroed), and its entry into
 * the tables with the context's next handle (0 or ENOMEM). */
struct map *core_map_alloc(struct fayt_core *k, struct fayt_fast_conn *c, int32_t tid,
                           int32_t prot, uint32_t type, uint64_t length, uint32_t nframes);
int core_map_add(struct fayt_core *k, struct map *m);
/* A DIRECT mapping or a COW view: frames of others' objects, none its own. */
static inline int core_map_frames_of_others(const struct map *m)
{
    return m->type == FAYT_PORTAL_DIRECT || m->type == FAYT_PORTAL_COW;
}
int core_fail(char *msg, size_t max, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void core_table_fini(struct fayt_core *k);
/* The live ids in order (serve.c): add (0 or ENOMEM), remove, free all. */
int core_ids_add(struct fayt_core *k, uint32_t id, uint32_t ns);
void core_ids_remove(struct fayt_core *k, uint32_t id, uint32_t ns);
void core_ids_fini(struct fayt_core *k);
/* Namespace ns's trie of ids (table.c): hold 1 takes a reference to its
 * uid's account (made if new; NULL: no memory), -1 lets one go, 0 only
 * looks (NULL: that uid has none). */
struct idnode **core_ns_ids(struct fayt_core *k, uint32_t ns, int hold);

/* -- direct.c ----------------------------------------------------------- */
struct dobjs;
struct direct_state;
/* PORTAL(DIRECT) on the C path (serve.c): FAYT_FAST_SERVED, _UNSENT (*err)
 * or _PASS (nothing changed: Python answers). */
int core_direct_serve(struct fayt_core *k, struct fayt_fast_conn *c,
                      const struct fayt_req_hdr *h, const uint8_t *body,
                      const struct fayt_portal_args *a, int *err);
/* A DIRECT mapping goes (map_remove): its frames' references, and each of
 * its objects that has no allocated frame left is released. */
void core_direct_unmapped(struct fayt_core *k, struct map *m);
void core_direct_fini(struct fayt_core *k);
/* A source's read-only descriptor (*fd) goes with its record or its objects. */
void core_direct_rofd_close(struct fayt_core *k, int *fd);

/* -- journal.c ---------------------------------------------------------- */
int core_journal_write(struct fayt_core *k, const char *line, size_t n, int live);
/* The S record of sp (0, or -1: not written), and the A record of c's
 * first mapping of share-point id. */
int core_journal_sharepoint(struct fayt_core *k, const struct sp *sp);
int core_journal_attached(struct fayt_core *k, const struct fayt_fast_conn *c, uint32_t id);

/* -- keeper.c ----------------------------------------------------------- */
#define KEEPER_BATCH 32            /* objects handed to the keeper in one message */
#define CTX_TARGET 8               /* context pages kept ready */

struct pooled {
    int fd;
    int32_t kept;                  /* its number in the keeper */
};

struct keeper_state {
    pthread_mutex_t mu;            /* keeper I/O */
    int fd;                        /* our connection to it; -1 */
    int pid;
    uint64_t nofile;
};

struct pool_state {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    int running, stopping, sleeping, deep;
    uint32_t target;
    struct pooled *ready;
    uint32_t nready;
    /* Context pages (kind "ctx") too are made ahead of need: every HELLO
     * takes one, and a keeper round trip there would cost a connection
     * ~100 us. */
    struct pooled ready_ctx[CTX_TARGET];
    uint32_t nready_ctx;
    int32_t *queue;
    uint32_t nqueued, cap_queue;
};

/* -- the core's tables -------------------------------------------------- */
struct fayt_core_priv {
    /* names.c: the name index, keyed with SipHash under a key drawn at start */
    struct name_ent **names;
    uint32_t names_nb, names_n;
    uint64_t sip_k0, sip_k1;
    int sip_keyed;
    struct name_pattern shared[FAYT_NAMES_SHARED_MAX];   /* the policy's shared names */
    uint32_t nshared;
    /* table.c: share-points by id, mappings by (context, handle) */
    struct sp **by_id;
    uint32_t ids_nb;
    struct map **by_handle;
    uint32_t handles_nb, handles_n;
    struct idnode *live_ids;       /* serve.c: ids in the table, in order (the list's pages) */
    struct idnode *shared_ids;     /* ... named in the shared namespace (a uid's: its acct) */
    struct uid_acct **accts;       /* by uid: what each uid holds */
    uint32_t accts_nb, accts_n;
    struct kept kept[RECYCLE_MAX]; /* in the order they were kept, oldest first */
    uint32_t nkept;
    uint32_t held_fds;             /* descriptors held by records: at most RECYCLE_MAX */
    /* serve.c: watched connections by fd, and faytd's epoll (for a catch-up check) */
    struct fayt_fast_conn **watched;
    int nwatched;
    int epfd;                      /* -1 until fayt_fast_poll ran */
    uint64_t last_look;            /* fair_others at fayt_fast_poll's last epoll_wait */
    const struct epoll_event *round; /* the round being served (serve.c); NULL outside it */
    int round_n, round_full;
    uint8_t *reply;                /* a reply's bytes: header and FAYT_MSG_MAX of body */
    struct direct_state *direct;   /* direct.c: the grants, DIRECT's objects; NULL until used */
    uint32_t held_ro;              /* read-only descriptors sources hold: RO_HELD_MAX at most */
    /* keeper.c */
    struct keeper_state keeper;
    struct pool_state pool;
};

#endif
