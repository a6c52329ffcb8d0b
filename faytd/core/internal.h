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
#include "fayt/portal.h"
#include "fayt/syscall.h"

#define FAST_MAX_FRAMES FAYT_FAST_MAX_FRAMES
#define RECYCLE_MAX 64            /* objects kept for their context's next create */
#define RESIDENT_MAX 64           /* then creates go through Python, which takes them over */
#define ZERO_AT_CREATE 16384      /* up to this, a recycled object is zeroed by the meta's write */
#define CORE_ABI 2                /* fayt_core_abi(); faytd/native.py checks it */

/* -- names.c ------------------------------------------------------------ */
struct resident;

struct name_ent {
    struct name_ent *next;
    uint64_t hash;
    uint32_t len;
    struct resident *res;          /* NULL once Python owns the share-point */
    char key[];
};

uint64_t core_hash(struct fayt_core *k, const char *s, uint32_t n);
struct name_ent *core_name_find(struct fayt_core *k, const char *s, uint32_t n, uint64_t h);
struct name_ent *core_name_insert(struct fayt_core *k, const char *s, uint32_t n, int *err);
void core_name_remove(struct fayt_core *k, struct name_ent *e);
void core_names_fini(struct fayt_core *k);

/* -- records.c ---------------------------------------------------------- */
struct resident {
    struct resident *hnext;        /* in the (context, handle) table */
    struct resident *prev, *next;  /* every resident one, oldest first */
    struct name_ent *name;
    struct fayt_fast_conn *conn;
    uint32_t sp_id, ctx_id;
    uint64_t handle;
    int32_t pid, tid;
    uint32_t uid;
    int32_t prot;
    uint64_t start, length;
    int64_t born;                  /* CLOCK_MONOTONIC ns */
    uint32_t oid, nframes;
    uint32_t type;                 /* SHARE|ANON, or ANON (a portal: no name) */
    int fd;                        /* the object's, kept while a recycle may want it; -1 */
    char object[FAYT_OBJ_NAME_MAX];
    /* A share-point of more than one page is two objects (page 0, the
     * rest: FAYT_PORTAL_REPLY_SPLIT); the rest's, if any: */
    int split;
    int fd2;                       /* open while fd is (or until the reply is sent); -1 */
    char object2[FAYT_OBJ_NAME_MAX];
    uint32_t frames[];
};

/* Objects kept for their context's next share-point (records.c). */
struct kept {
    struct fayt_fast_conn *conn;
    uint64_t length;
    int fd;
    char name[FAYT_OBJ_NAME_MAX];
    int split;                     /* a share-point's pair: fd2, name2 the rest */
    int fd2;
    char name2[FAYT_OBJ_NAME_MAX];
};

int core_kept_take(struct fayt_core *k, struct fayt_fast_conn *conn, struct resident *r);
struct resident *core_resident_find(struct fayt_core *k, uint32_t ctx_id, uint64_t handle);
int core_resident_insert(struct fayt_core *k, struct resident *r);
void core_resident_unlink(struct fayt_core *k, struct resident *r);
struct resident *core_resident_new(struct fayt_core *k, struct fayt_fast_conn *c,
                                   const struct fayt_req_hdr *h, int prot, uint32_t n,
                                   uint32_t type);
void core_resident_abandon(struct fayt_core *k, struct resident *r, int ofd);
struct resident *core_resident_of(struct fayt_core *k, struct fayt_fast_conn *c,
                                  const struct fayt_req_hdr *h, const uint8_t *body,
                                  size_t blen, uint32_t type);
void core_hold_fd(struct fayt_core *k, struct resident *r, int ofd);
void core_give_back(struct fayt_core *k, struct resident *r, int keep);
void core_records_fini(struct fayt_core *k);

/* -- journal.c ---------------------------------------------------------- */
int core_journal_write(struct fayt_core *k, const char *line, size_t n, int live);
/* The S record of a share-point r made (identifier ident, ilen bytes). */
int core_journal_sharepoint(struct fayt_core *k, const struct resident *r,
                            const char *ident, uint32_t ilen);
int core_journal_destroyed(struct fayt_core *k, uint32_t sp_id);

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
    /* records.c: resident records by (context, handle), oldest first */
    struct resident **by_handle;
    uint32_t handles_nb, handles_n;
    struct resident *res_head, *res_tail;
    struct kept kept[RECYCLE_MAX]; /* in the order they were kept, oldest first */
    uint32_t nkept;
    uint32_t resident_fds;         /* residents holding their fd: at most RECYCLE_MAX */
    /* serve.c: watched connections by fd */
    struct fayt_fast_conn **watched;
    int nwatched;
    /* keeper.c */
    struct keeper_state keeper;
    struct pool_state pool;
};

#endif
