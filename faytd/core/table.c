/* table.c: the owner of every share-point and of the mappings the core
 * holds (core.h).
 *
 * One record per share-point, whichever path created it: its identifier
 * (the name index points at it), id, object(s) and frames, owner, prot and
 * the mappings of it; one record per mapping of a share-point or ANON
 * portal, by (context, handle), in its context's list and its
 * share-point's.  Each context's RAM charge and mapping count are counted
 * here as the records come and go, and so is each uid's (struct
 * uid_acct: its share-points, its RAM), for the limits per uid of contexts
 * that are not core and the core's reserve (docs/limits.md).  faytd's Python keeps what is not hot
 * (rights, chains, notices, lock recovery's decisions, journal replay) and
 * calls these functions; the C path (serve.c) calls the same ones.
 *
 * Frames: a share-point's are referenced once by the table and once by
 * each mapping (a chain's backing, Python's, may hold more); its object(s)
 * go with the last reference.  A share-point leaves the table at its
 * destroy, or when its owner is dead and nobody maps it; its record goes
 * with its last mapping.
 *
 * Recycling: an object whose share-point (or ANON portal) was only ever
 * granted to one context (faytd sent its fd to nobody else, and Python
 * never saw it) can serve that context's next portal of the same size when
 * its last reference goes: it is kept (open, at most RECYCLE_MAX in all),
 * zeroed, and handed out again instead of a new object, which saves the
 * memfd, its first page, the keeper's round trip and the close (tens of
 * microseconds of system calls).  Never across contexts: an fd grants its
 * whole object, and faytd sent this one to no other.  It trusts the client
 * not to have kept the fd or passed it on: libportal closes it in the C
 * call that reads the reply, the GIL held (no fork() of another thread
 * inherits it), and maps portals MADV_DONTFORK (no fork child keeps a
 * view); a faytd serving clients that pass portal fds on runs with
 * recycle_objects false (k->recycle 0).  A share-point whose D record could
 * not be written is not recycled.  A context's kept objects go when it
 * ends (fayt_fast_conn_gone).
 *
 * Single-threaded: faytd's loop thread is the only caller.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "fayt/sharepoint.h"

#define CONN_GONE 0x80000000u      /* fayt_fast_conn.flags: it ended (nothing is kept for it) */
#define ATTACHED 0x80000000u       /* idset entry: attached, not created */
#define PADDR_FIT ((FAYT_MSG_MAX - sizeof(struct fayt_rep_hdr) - sizeof(struct fayt_portal_reply) \
                    - sizeof(struct portal_req)) / 8)

int core_fail(char *msg, size_t max, int err, const char *fmt, ...)
{
    if (msg && max) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, max, fmt, ap);
        va_end(ap);
    }
    return err;
}

static const char *sp_repr(const struct sp *sp, char *out, size_t max)
{
    return sp->name ? core_name_repr(sp->name->key, sp->name->len, out, max) : "'(destroyed)'";
}

/* -- tables ---------------------------------------------------------------- */
/* Whether c's process made sp: its pid and its start time, so that a
 * process that was given a dead owner's pid is not taken for it. */
static int sp_owned_by(const struct sp *sp, const struct fayt_fast_conn *c)
{
    return sp->owner_pid == c->pid && sp->owner_start == c->start;
}

static uint64_t hash_handle(uint32_t ctx_id, uint64_t handle)
{
    uint64_t h = (handle * 0x9E3779B97F4A7C15ULL) ^ ((uint64_t)ctx_id * 0xC2B2AE3D27D4EB4FULL);
    return h ^ (h >> 31);
}

static uint32_t hash_id(uint32_t id)
{
    uint32_t h = id * 0x9E3779B1u;
    return h ^ (h >> 15);
}

struct sp *core_sp_find(struct fayt_core *k, uint32_t id)
{
    struct fayt_core_priv *p = k->priv;
    if (!p->ids_nb)
        return NULL;
    for (struct sp *s = p->by_id[hash_id(id) & (p->ids_nb - 1)]; s; s = s->id_next)
        if (s->id == id)
            return s;
    return NULL;
}

static int ids_insert(struct fayt_core *k, struct sp *sp)
{
    struct fayt_core_priv *p = k->priv;
    if (k->nrecords >= p->ids_nb) {
        uint32_t nb = p->ids_nb ? p->ids_nb * 2 : 1024;
        struct sp **b = calloc(nb, sizeof *b);
        if (!b)
            return ENOMEM;
        for (uint32_t i = 0; i < p->ids_nb; i++) {
            for (struct sp *s = p->by_id[i], *next; s; s = next) {
                next = s->id_next;
                s->id_next = b[hash_id(s->id) & (nb - 1)];
                b[hash_id(s->id) & (nb - 1)] = s;
            }
        }
        free(p->by_id);
        p->by_id = b;
        p->ids_nb = nb;
    }
    struct sp **head = &p->by_id[hash_id(sp->id) & (p->ids_nb - 1)];
    sp->id_next = *head;
    *head = sp;
    k->nrecords++;
    return 0;
}

static void ids_remove(struct fayt_core *k, struct sp *sp)
{
    struct fayt_core_priv *p = k->priv;
    struct sp **q = &p->by_id[hash_id(sp->id) & (p->ids_nb - 1)];
    while (*q && *q != sp)
        q = &(*q)->id_next;
    if (*q) {
        *q = sp->id_next;
        k->nrecords--;
    }
}

struct map *core_map_find(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t handle)
{
    struct fayt_core_priv *p = k->priv;
    if (!p->handles_nb)
        return NULL;
    for (struct map *m = p->by_handle[hash_handle(c->ctx_id, handle) & (p->handles_nb - 1)]; m;
         m = m->hnext)
        if (m->conn == c && m->handle == handle)
            return m;
    return NULL;
}

struct map *core_map_find_id(struct fayt_core *k, uint32_t ctx_id, uint64_t handle)
{
    struct fayt_core_priv *p = k->priv;
    if (!p->handles_nb)
        return NULL;
    for (struct map *m = p->by_handle[hash_handle(ctx_id, handle) & (p->handles_nb - 1)]; m;
         m = m->hnext)
        if (m->ctx_id == ctx_id && m->handle == handle)
            return m;
    return NULL;
}

static int handles_insert(struct fayt_core *k, struct map *m)
{
    struct fayt_core_priv *p = k->priv;
    if (p->handles_n >= p->handles_nb) {
        uint32_t nb = p->handles_nb ? p->handles_nb * 2 : 256;
        struct map **b = calloc(nb, sizeof *b);
        if (!b)
            return ENOMEM;
        for (uint32_t i = 0; i < p->handles_nb; i++) {
            for (struct map *x = p->by_handle[i], *next; x; x = next) {
                next = x->hnext;
                uint64_t h = hash_handle(x->ctx_id, x->handle) & (nb - 1);
                x->hnext = b[h];
                b[h] = x;
            }
        }
        free(p->by_handle);
        p->by_handle = b;
        p->handles_nb = nb;
    }
    uint64_t h = hash_handle(m->ctx_id, m->handle) & (p->handles_nb - 1);
    m->hnext = p->by_handle[h];
    p->by_handle[h] = m;
    p->handles_n++;
    return 0;
}

static void handles_remove(struct fayt_core *k, struct map *m)
{
    struct fayt_core_priv *p = k->priv;
    struct map **q = &p->by_handle[hash_handle(m->ctx_id, m->handle) & (p->handles_nb - 1)];
    while (*q && *q != m)
        q = &(*q)->hnext;
    if (*q) {
        *q = m->hnext;
        p->handles_n--;
    }
}

/* -- what a context ever mapped (its lock records may name only those) ------ */
static uint32_t *idset_slot(struct idset *s, uint32_t id)
{
    uint32_t i = hash_id(id) & (s->cap - 1);
    while (s->ids[i] && (s->ids[i] & ~ATTACHED) != id)
        i = (i + 1) & (s->cap - 1);
    return &s->ids[i];
}

static int idset_has(const struct idset *s, uint32_t id)
{
    return s->cap && *idset_slot((struct idset *)s, id) != 0;
}

/* Add id (a new entry: 1; already there: 0; no memory: -1).  When the set
 * grows, the ids of share-points that are gone (no record) are forgotten:
 * amortised, a constant per mapping. */
static int idset_add(struct fayt_core *k, struct idset *s, uint32_t id, int attached)
{
    if (s->cap && *idset_slot(s, id))
        return 0;
    if ((s->n + 1) * 2 > s->cap) {
        uint32_t keep = 0;
        for (uint32_t i = 0; i < s->cap; i++)
            keep += s->ids[i] && core_sp_find(k, s->ids[i] & ~ATTACHED);
        uint32_t cap = 64;
        while (cap < (keep + 1) * 4)
            cap *= 2;
        uint32_t *ids = calloc(cap, sizeof *ids);
        if (!ids)
            return -1;
        struct idset t = {ids, cap, 0};
        for (uint32_t i = 0; i < s->cap; i++) {
            if (s->ids[i] && core_sp_find(k, s->ids[i] & ~ATTACHED)) {
                *idset_slot(&t, s->ids[i] & ~ATTACHED) = s->ids[i];
                t.n++;
            }
        }
        free(s->ids);
        *s = t;
    }
    *idset_slot(s, id) = id | (attached ? ATTACHED : 0);
    s->n++;
    return 1;
}

/* -- what each uid holds ------------------------------------------------------ */
static struct uid_acct **acct_slot(struct fayt_core_priv *p, uint32_t uid)
{
    struct uid_acct **q = &p->accts[hash_id(uid) & (p->accts_nb - 1)];
    while (*q && (*q)->uid != uid)
        q = &(*q)->next;
    return q;
}

/* uid's account, referenced once more (made if new); NULL: no memory. */
static struct uid_acct *acct_get(struct fayt_core *k, uint32_t uid)
{
    struct fayt_core_priv *p = k->priv;
    if (p->accts_n >= p->accts_nb) {
        uint32_t nb = p->accts_nb ? p->accts_nb * 2 : 64;
        struct uid_acct **b = calloc(nb, sizeof *b);
        if (!b)
            return NULL;
        for (uint32_t i = 0; i < p->accts_nb; i++) {
            for (struct uid_acct *a = p->accts[i], *next; a; a = next) {
                next = a->next;
                a->next = b[hash_id(a->uid) & (nb - 1)];
                b[hash_id(a->uid) & (nb - 1)] = a;
            }
        }
        free(p->accts);
        p->accts = b;
        p->accts_nb = nb;
    }
    struct uid_acct **q = acct_slot(p, uid);
    if (!*q) {
        if (!(*q = calloc(1, sizeof **q)))
            return NULL;
        (*q)->uid = uid;
        p->accts_n++;
    }
    (*q)->refs++;
    return *q;
}

static void acct_put(struct fayt_core *k, struct uid_acct *a)
{
    struct fayt_core_priv *p = k->priv;
    if (!a || --a->refs)
        return;
    struct uid_acct **q = acct_slot(p, a->uid);
    *q = a->next;
    p->accts_n--;
    free(a);
}

struct idnode **core_ns_ids(struct fayt_core *k, uint32_t ns, int hold)
{
    struct fayt_core_priv *p = k->priv;
    if (ns == FAYT_NS_SHARED)
        return &p->shared_ids;
    if (hold > 0) {
        struct uid_acct *a = acct_get(k, ns);
        return a ? &a->ids : NULL;
    }
    struct uid_acct *a = p->accts_nb ? *acct_slot(p, ns) : NULL;
    if (a && hold < 0)
        acct_put(k, a);
    return a ? &a->ids : NULL;
}

void fayt_core_uid_usage(struct fayt_core *k, uint32_t uid, struct fayt_uid_usage *out)
{
    struct fayt_core_priv *p = k->priv;
    struct uid_acct *a = p->accts_nb ? *acct_slot(p, uid) : NULL;
    memset(out, 0, sizeof *out);
    if (a) {
        out->sharepoints = a->nsharepoints;
        out->ram = a->ram;
    }
}

static int conn_core(const struct fayt_fast_conn *c)
{
    return (c->flags & FAYT_FAST_CONN_CORE) != 0;
}

/* c's RAM charge changes by delta bytes, and with it its uid's and, for a
 * context that is not core, what such contexts hold of faytd's RAM. */
static void ram_add(struct fayt_core *k, struct fayt_fast_conn *c, int64_t delta)
{
    c->ram += (uint64_t)delta;
    if (c->cs->acct)
        c->cs->acct->ram += (uint64_t)delta;
    if (!conn_core(c))
        k->noncore_ram += (uint64_t)delta;
}

/* -- contexts ---------------------------------------------------------------- */
struct fayt_fast_conn *fayt_core_conn_new(struct fayt_core *k)
{
    (void)k;
    struct fayt_fast_conn *c = calloc(1, sizeof *c);
    struct fayt_core_cstate *cs = calloc(1, sizeof *cs);
    if (!c || !cs) {
        free(c);
        free(cs);
        return NULL;
    }
    c->fd = -1;
    c->next_handle = 1;
    c->refs = 1;
    c->cs = cs;
    c->category = FAYT_FAST_NO_CATEGORY;
    return c;
}

static void conn_unref(struct fayt_core *k, struct fayt_fast_conn *c)
{
    if (c && --c->refs == 0) {
        acct_put(k, c->cs->acct);
        free(c->cs->mapped.ids);
        free(c->cs);
        free(c);
    }
}

void fayt_core_conn_put(struct fayt_core *k, struct fayt_fast_conn *c)
{
    fayt_fast_conn_gone(k, c);
    fayt_core_conn_drop(k, c);
    conn_unref(k, c);
}

int fayt_core_conn_bind(struct fayt_core *k, struct fayt_fast_conn *c, uint32_t uid)
{
    struct uid_acct *a = acct_get(k, uid);
    if (!a)
        return ENOMEM;
    acct_put(k, c->cs->acct);
    c->cs->acct = a;
    c->uid = uid;
    return 0;
}

/* -- kept objects (recycling) ------------------------------------------------ */
static void kept_drop(struct fayt_core *k, uint32_t i)
{
    struct fayt_core_priv *p = k->priv;
    close(p->kept[i].fd);
    fayt_objpool_release(k, p->kept[i].name);
    if (p->kept[i].split) {
        close(p->kept[i].fd2);
        fayt_objpool_release(k, p->kept[i].name2);
    }
    memmove(&p->kept[i], &p->kept[i + 1], (size_t)(p->nkept - i - 1) * sizeof p->kept[0]);
    p->nkept--;
}

/* A kept object of c of this length (split or not; the latest kept): its fd
 * (name into name, the rest's into *fd2, name2), or -1. */
static int kept_take(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t length, int split,
                     char *name, int *fd2, char *name2)
{
    struct fayt_core_priv *p = k->priv;
    for (uint32_t i = p->nkept; i-- > 0;) {
        struct kept *e = &p->kept[i];
        if (e->conn == c && e->length == length && e->split == split) {
            int fd = e->fd;
            memcpy(name, e->name, FAYT_OBJ_NAME_MAX);
            if (split) {
                *fd2 = e->fd2;
                memcpy(name2, e->name2, FAYT_OBJ_NAME_MAX);
            }
            memmove(e, e + 1, (size_t)(p->nkept - i - 1) * sizeof *e);
            p->nkept--;
            return fd;
        }
    }
    return -1;
}

/* Keep an object (two for a split share-point) for c; 0, or an errno (then
 * the caller releases them). */
static int kept_put(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t length, int split,
                    int fd, const char *name, int fd2, const char *name2)
{
    struct fayt_core_priv *p = k->priv;
    if (!k->recycle || !c || (c->flags & CONN_GONE) || fd < 0 || (split && fd2 < 0))
        return EBADF;
    if (length > ZERO_AT_CREATE) {   /* its pages go now; it reads as zeros again */
        if (split ? fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                              FAYT_PAGE_SIZE) < 0
                    || fallocate(fd2, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                                 (off_t)(length - FAYT_PAGE_SIZE)) < 0
                  : fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                              (off_t)length) < 0)
            return errno;
    }
    if (p->nkept == RECYCLE_MAX)
        kept_drop(k, 0);               /* the oldest */
    struct kept *e = &p->kept[p->nkept++];
    e->conn = c;
    e->length = length;
    e->fd = fd;
    memcpy(e->name, name, FAYT_OBJ_NAME_MAX);
    e->split = split;
    e->fd2 = split ? fd2 : -1;
    if (split)
        memcpy(e->name2, name2, FAYT_OBJ_NAME_MAX);
    return 0;
}

void fayt_fast_conn_gone(struct fayt_core *k, struct fayt_fast_conn *c)
{
    struct fayt_core_priv *p = k->priv;
    c->flags |= CONN_GONE;
    for (uint32_t i = p->nkept; i-- > 0;)
        if (p->kept[i].conn == c)
            kept_drop(k, i);
}

/* -- objects ------------------------------------------------------------------ */
/* The error of an object that could not be made (err: positive errno). */
static int object_error(struct fayt_core *k, int err, char *msg, size_t max)
{
    if (err == EMFILE || err == ENFILE) {
        uint64_t nofile = fayt_keeper_nofile(k);
        char path[64], line[256];
        snprintf(path, sizeof path, "/proc/%d/limits", fayt_keeper_pid(k));
        FILE *f = fopen(path, "re");
        if (f) {
            while (fgets(line, sizeof line, f))
                if (strncmp(line, "Max open files", 14) == 0)
                    nofile = strtoull(line + 14, NULL, 10);
            fclose(f);
        }
        return core_fail(msg, max, ENFILE, "faytd cannot create a backing object: its keeper "
                         "(pid %d) holds one open file per live object and is at its "
                         "RLIMIT_NOFILE of %llu", fayt_keeper_pid(k),
                         (unsigned long long)nofile);
    }
    return core_fail(msg, max, ENOMEM, "faytd cannot create a backing object: %s",
                     strerror(err));
}

/* Hold fd in *slot if the budget allows (1), else leave it (0). */
static int hold(struct fayt_core *k, int *slot, int fd)
{
    if (k->priv->held_fds >= RECYCLE_MAX)
        return 0;
    *slot = fd;
    k->priv->held_fds++;
    return 1;
}

static void unhold(struct fayt_core *k, int *fd, int *fd2)
{
    if (*fd >= 0) {
        close(*fd);
        k->priv->held_fds--;
    }
    if (fd2 && *fd2 >= 0)
        close(*fd2);
    *fd = -1;
    if (fd2)
        *fd2 = -1;
}

/* A descriptor of an object for a reply: a dup of the held one, or opened
 * by name (readonly: O_RDONLY; the object is 0600 and faytd's, so another
 * uid cannot reopen it read-write). */
static int reply_fd(int held, const char *name, int readonly)
{
    if (held >= 0 && !readonly)
        return fcntl(held, F_DUPFD_CLOEXEC, 3);
    return open(name, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
}

/* -- share-points -------------------------------------------------------------- */
static struct sp *sp_alloc(uint32_t n)
{
    struct sp *sp = calloc(1, sizeof *sp + (size_t)n * sizeof(uint32_t));
    if (sp) {
        sp->fd = sp->fd2 = sp->rofd = -1;
        sp->nframes = n;
        sp->owner_alive = 1;
    }
    return sp;
}

/* sp's object(s) are no longer referenced: kept for c, or released. */
static void sp_objects_gone(struct fayt_core *k, struct sp *sp, struct fayt_fast_conn *c)
{
    core_direct_rofd_close(k, &sp->rofd);
    if (sp->fd >= 0 && !sp->shared && sp->journal_ok
        && kept_put(k, c, sp->length, sp->split, sp->fd, sp->object, sp->fd2, sp->object2) == 0) {
        k->priv->held_fds--;
        sp->fd = sp->fd2 = -1;
        return;
    }
    unhold(k, &sp->fd, &sp->fd2);
    fayt_objpool_release(k, sp->object);
    if (sp->split)
        fayt_objpool_release(k, sp->object2);
}

/* One reference less to sp's frames (c: who let go, for a recycle); the
 * objects go with the last. */
static void sp_put(struct fayt_core *k, struct sp *sp, struct fayt_fast_conn *c)
{
    if (fayt_frames_put(&k->frames, sp->frames, sp->nframes) == sp->nframes)
        sp_objects_gone(k, sp, c);
}

static void sp_free(struct fayt_core *k, struct sp *sp)
{
    ids_remove(k, sp);
    unhold(k, &sp->fd, &sp->fd2);
    core_direct_rofd_close(k, &sp->rofd);
    free(sp);
}

/* Out of the table (its destroy, or its owner dead and nobody mapping it):
 * the name goes, the D record is written, the creator's quota gets its
 * bytes back, the table's reference to the frames goes.  The record stays
 * while mappings remain. */
static void sp_destroy(struct fayt_core *k, struct sp *sp, struct fayt_fast_conn *by)
{
    if (sp->destroyed)
        return;
    sp->destroyed = 1;
    /* A destroy the journal does not know must not lend its object to a new
     * share-point: a restart would take both back, on one object. */
    sp->journal_ok = fayt_journal_sp_destroyed(k, sp->id) == 0;
    core_name_remove(k, sp->name);
    sp->name = NULL;
    k->nsharepoints--;
    core_ids_remove(k, sp->id, sp->ns);
    if (sp->acct)
        sp->acct->nsharepoints--;
    acct_put(k, sp->acct);
    sp->acct = NULL;
    if (sp->noncore)
        k->noncore_sharepoints--;
    if (sp->charged_to) {
        ram_add(k, sp->charged_to, -(int64_t)sp->charged);
        conn_unref(k, sp->charged_to);
        sp->charged_to = NULL;
    }
    sp_put(k, sp, by);
    if (!sp->maps)
        sp_free(k, sp);
}

uint32_t fayt_core_sp_lookup(struct fayt_core *k, uint32_t ns, const char *ident, uint32_t len)
{
    struct name_ent *e = core_name_find(k, ns, ident, len, core_hash(k, ns, ident, len));
    return e && e->sp ? e->sp->id : 0;
}

/* -- mappings ------------------------------------------------------------------- */
static struct map *map_new(struct fayt_core *k, struct fayt_fast_conn *c, int32_t tid,
                           int32_t prot, uint32_t type, uint64_t length, uint32_t nframes)
{
    (void)k;
    struct map *m = calloc(1, sizeof *m + (size_t)nframes * sizeof(uint32_t));
    if (!m)
        return NULL;
    m->conn = c;
    m->ctx_id = c->ctx_id;
    m->type = type;
    m->pid = c->pid;
    m->tid = tid;
    m->prot = prot;
    m->length = length;
    m->nframes = nframes;
    m->fd = m->rofd = -1;
    return m;
}

/* m (its handle the context's next) into the tables; 0 or ENOMEM. */
static int map_insert(struct fayt_core *k, struct map *m)
{
    struct fayt_fast_conn *c = m->conn;
    m->handle = c->next_handle;
    if (handles_insert(k, m))
        return ENOMEM;
    c->next_handle++;
    struct fayt_core_cstate *cs = c->cs;
    m->c_prev = NULL;
    m->c_next = cs->maps;
    if (cs->maps)
        cs->maps->c_prev = m;
    cs->maps = m;
    c->nmaps++;
    c->mapped_bytes += m->length;
    c->refs++;
    struct sp *sp = m->sp;
    if (sp) {
        m->sp_prev = NULL;
        m->sp_next = sp->maps;
        if (sp->maps)
            sp->maps->sp_prev = m;
        sp->maps = m;
        sp->nmaps++;
        /* Its creator's process gets it back at a restart from its S
         * record: no A record for it. */
        int created = sp_owned_by(sp, c);
        if (c->ctx_id != sp->creator_ctx)
            sp->shared = 1;         /* its object went to another context */
        if (idset_add(k, &c->cs->mapped, sp->id, !created) == 1 && !created
            && (c->flags & FAYT_FAST_CONN_JOURNAL))
            core_journal_attached(k, c, sp->id);
    }
    return 0;
}

/* m goes: the context's count and charge, the frames' reference; an
 * ownerless share-point that nobody maps any more leaves the table. */
static void map_remove(struct fayt_core *k, struct map *m)
{
    struct fayt_fast_conn *c = m->conn;
    handles_remove(k, m);
    if (m->c_prev)
        m->c_prev->c_next = m->c_next;
    else
        c->cs->maps = m->c_next;
    if (m->c_next)
        m->c_next->c_prev = m->c_prev;
    c->nmaps--;
    c->mapped_bytes -= m->length;
    ram_add(k, c, -(int64_t)m->charged);
    struct sp *sp = m->sp;
    if (sp) {
        if (m->sp_prev)
            m->sp_prev->sp_next = m->sp_next;
        else
            sp->maps = m->sp_next;
        if (m->sp_next)
            m->sp_next->sp_prev = m->sp_prev;
        sp->nmaps--;
        sp_put(k, sp, c);
        if (!sp->maps) {
            if (sp->destroyed)
                sp_free(k, sp);
            else if (!sp->owner_alive)
                sp_destroy(k, sp, c);
        }
    } else if (core_map_frames_of_others(m)) {
        core_direct_unmapped(k, m);
    } else {
        if (fayt_frames_put(&k->frames, m->frames, m->nframes) == m->nframes) {
            if (m->fd >= 0 && !m->shared
                && kept_put(k, c, m->length, 0, m->fd, m->object, -1, NULL) == 0) {
                k->priv->held_fds--;
                m->fd = -1;
            } else {
                unhold(k, &m->fd, NULL);
                fayt_objpool_release(k, m->object);
            }
        }
        unhold(k, &m->fd, NULL);
    }
    core_direct_rofd_close(k, &m->rofd);
    conn_unref(k, c);
    free(m);
}

struct map *core_map_alloc(struct fayt_core *k, struct fayt_fast_conn *c, int32_t tid,
                           int32_t prot, uint32_t type, uint64_t length, uint32_t nframes)
{
    return map_new(k, c, tid, prot, type, length, nframes);
}

int core_map_add(struct fayt_core *k, struct map *m)
{
    return map_insert(k, m);
}

/* -- the reply ------------------------------------------------------------------ */
static uint32_t reply_body(uint8_t *body, const uint8_t *req, uint64_t handle, uint64_t length,
                           uint64_t data_offset, uint32_t sp_id, int32_t prot, uint32_t flags,
                           const uint32_t *frames, uint32_t nframes)
{
    struct fayt_portal_reply pr = {0};
    struct portal_req r;
    uint32_t fit = nframes < PADDR_FIT ? nframes : (uint32_t)PADDR_FIT;
    pr.handle = handle;
    pr.map_length = length;
    pr.data_offset = data_offset;
    pr.sp_id = sp_id;
    pr.nframes = fit;
    pr.prot = prot;
    pr.flags = flags;
    memcpy(&r, req, sizeof r);
    r.morphology.length = length;       /* filled */
    size_t at = 0;
    memcpy(body + at, &pr, sizeof pr);
    at += sizeof pr;
    memcpy(body + at, &r, sizeof r);
    at += sizeof r;
    for (uint32_t i = 0; i < fit; i++) {
        uint64_t pa = FAYT_RAM_BASE + (uint64_t)frames[i] * FAYT_PAGE_SIZE;
        memcpy(body + at, &pa, 8);
        at += 8;
    }
    return (uint32_t)at;
}

static int quota_mappings(struct fayt_core *k, struct fayt_fast_conn *c, char *msg, size_t max)
{
    uint32_t n = c->py_mappings + c->nmaps;
    if (n >= k->max_mappings)
        return core_fail(msg, max, ENOMEM, "this context has %u mappings, the quota", n);
    return 0;
}

/* Whether c may be charged `bytes` more: its context's quota, then, for a
 * context that is not core, its uid's limit and the RAM reserved for core
 * servers (ENOMEM, as mmap(2) past RLIMIT_AS: the limit is on memory). */
static int charge(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t bytes, char *msg,
                  size_t max)
{
    if (c->ram + bytes > k->max_ram_per_context)
        return core_fail(msg, max, ENOMEM, "length: %llu bytes more would take this context "
                         "past its RAM quota (%llu of %llu bytes in use)",
                         (unsigned long long)bytes, (unsigned long long)c->ram,
                         (unsigned long long)k->max_ram_per_context);
    if (conn_core(c))
        return 0;
    struct uid_acct *a = c->cs->acct;
    if (a && a->ram + bytes > k->max_ram_per_uid)
        return core_fail(msg, max, ENOMEM, "length: %llu bytes more would take uid %u past its "
                         "RAM limit (%llu of %llu bytes in use; config max_ram_per_uid)",
                         (unsigned long long)bytes, c->uid, (unsigned long long)a->ram,
                         (unsigned long long)k->max_ram_per_uid);
    uint64_t ram = (uint64_t)k->frames.nframes * FAYT_PAGE_SIZE;
    uint64_t open = ram > k->reserved_ram ? ram - k->reserved_ram : 0;
    if (k->noncore_ram + bytes > open)
        return core_fail(msg, max, ENOMEM, "length: %llu bytes more would take servers that "
                         "are not core into the %llu bytes of RAM reserved for core servers "
                         "(they hold %llu of the %llu open to them; config reserved_ram)",
                         (unsigned long long)bytes, (unsigned long long)k->reserved_ram,
                         (unsigned long long)k->noncore_ram, (unsigned long long)open);
    return 0;
}

int fayt_core_charge(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t bytes, char *msg,
                     uint32_t max)
{
    int e = charge(k, c, bytes, msg, max);
    if (!e)
        ram_add(k, c, (int64_t)bytes);
    return e;
}

void fayt_core_ram_set(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t bytes)
{
    ram_add(k, c, (int64_t)(bytes - c->ram));
}

/* Whether a context that is not core may make one more share-point: its
 * uid's limit and the table's entries reserved for core servers (ENOSPC, as
 * shmget(2) past SHMMNI or inotify past max_user_watches: a table of kernel
 * objects has no room for this user). */
static int quota_sharepoints(struct fayt_core *k, struct fayt_fast_conn *c, char *msg,
                             size_t max)
{
    if (conn_core(c))
        return 0;
    struct uid_acct *a = c->cs->acct;
    if (a && a->nsharepoints >= k->max_sharepoints_per_uid)
        return core_fail(msg, max, ENOSPC, "uid %u has %u share-points, its limit (config "
                         "max_sharepoints_per_uid)", c->uid, a->nsharepoints);
    uint32_t open = k->max_sharepoints > k->reserved_sharepoints
                    ? k->max_sharepoints - k->reserved_sharepoints : 0;
    if (k->noncore_sharepoints >= open)
        return core_fail(msg, max, ENOSPC, "share-point table: servers that are not core hold "
                         "%u entries; the other %u of %u are reserved for core servers (config "
                         "reserved_sharepoints)", k->noncore_sharepoints, k->reserved_sharepoints,
                         k->max_sharepoints);
    return 0;
}

static int frames_check(struct fayt_core *k, uint32_t n, char *msg, size_t max)
{
    uint32_t left = fayt_frames_free(&k->frames);
    if (n > left)
        return core_fail(msg, max, ENOMEM, "length: %u frames asked, %u free in faytd's RAM",
                         n, left);
    return 0;
}

/* pwrite buf (n bytes) at the start of the object(s): page 0, the rest
 * into the second object of a split one.  0 or -1. */
static int write_objects(int fd, int fd2, int split, const uint8_t *buf, size_t n)
{
    size_t first = split && n > FAYT_PAGE_SIZE ? FAYT_PAGE_SIZE : n;
    if (pwrite(fd, buf, first, 0) != (ssize_t)first)
        return -1;
    if (first < n && pwrite(fd2, buf + first, n - first, 0) != (ssize_t)(n - first))
        return -1;
    return 0;
}

/* The checks of a new share-point named as nr says, of n frames: not
 * named yet, room in the table and in c's uid's part of it, room for data
 * after the meta-structure.  0, or an errno and msg. */
static int sp_new_checks(struct fayt_core *k, struct fayt_fast_conn *c,
                         const struct fayt_portal_args *a, const char *ident,
                         const struct fayt_name_ref *nr, uint32_t n, char *msg, size_t max)
{
    char rb[1100];
    int e;
    if (core_name_find(k, nr->ns, ident + nr->at, nr->len, core_hash(k, nr->ns, ident + nr->at,
                                                                   nr->len)))
        return core_fail(msg, max, EEXIST, "share.identifier: %s exists",
                         core_name_repr(ident, (uint32_t)a->ident_len, rb, sizeof rb));
    if (k->nsharepoints >= k->max_sharepoints)
        return core_fail(msg, max, ENOMEM, "share-point table is full (%u)", k->max_sharepoints);
    if ((e = quota_sharepoints(k, c, msg, max)))
        return e;
    if (FAYT_SP_DATA_OFFSET(n) >= (uint64_t)n * FAYT_PAGE_SIZE)
        return core_fail(msg, max, EINVAL, "length: %llu bytes leave no room for data after "
                         "the meta-structure", (unsigned long long)a->length);
    return 0;
}

/* The meta-structure of a share-point of frames[n] granting prot: lock
 * free, prot, data length, the morphology (sizeof meta + 8n bytes). */
static void sp_meta_fill(uint8_t *meta, int32_t prot, const uint32_t *frames, uint32_t n)
{
    struct fayt_sharepoint_meta mh = {0};
    uint64_t bytes = (uint64_t)n * FAYT_PAGE_SIZE;
    mh.prot = prot;
    mh.length = bytes - FAYT_SP_DATA_OFFSET(n);
    mh.morphology.length = bytes;
    memcpy(meta, &mh, sizeof mh);
    for (uint32_t i = 0; i < n; i++) {
        uint64_t pa = FAYT_RAM_BASE + (uint64_t)frames[i] * FAYT_PAGE_SIZE;
        memcpy(meta + sizeof mh + (size_t)i * 8, &pa, 8);
    }
}

/* sp (its frames and object(s) filled, its meta-structure written: werr
 * if that failed, errno saying why) into the name index and the id table
 * under nr: its entry, or NULL and *e (nothing entered). */
static struct name_ent *sp_enter(struct fayt_core *k, struct sp *sp, const char *ident,
                                 const struct fayt_name_ref *nr, int werr, int *e)
{
    if (werr) {
        *e = errno;
        return NULL;
    }
    struct name_ent *ne = core_name_insert(k, nr->ns, ident + nr->at, nr->len, e);
    sp->id = k->next_sp_id;             /* taken by sp_own, once nothing can fail */
    if (ne && !ids_insert(k, sp) && !core_ids_add(k, sp->id, nr->ns))
        return ne;
    if (ne && core_sp_find(k, sp->id) == sp)
        ids_remove(k, sp);
    if (ne) {
        *e = ENOMEM;
        core_name_remove(k, ne);
    }
    return NULL;
}

/* sp, entered as ne, is c's: its id, name, prot, owner, and the counts of
 * the table and of c's uid. */
static void sp_own(struct fayt_core *k, struct fayt_fast_conn *c, struct sp *sp,
                   struct name_ent *ne, const struct fayt_name_ref *nr, int32_t prot)
{
    ne->sp = sp;
    sp->name = ne;
    sp->ns = nr->ns;
    fayt_core_new_sp_id(k);
    sp->prot = prot;
    sp->length = (uint64_t)sp->nframes * FAYT_PAGE_SIZE;
    sp->owner_pid = c->pid;
    sp->owner_uid = c->uid;
    sp->owner_start = c->start;
    sp->creator_ctx = c->ctx_id;
    k->nsharepoints++;
    if ((sp->acct = c->cs->acct)) {
        sp->acct->refs++;
        sp->acct->nsharepoints++;
    }
    if ((sp->noncore = !conn_core(c)))
        k->noncore_sharepoints++;
}

/* m, the creator's mapping of sp, references its frames and goes into the
 * tables: 0; or ENOMEM, sp undone (its creator's descriptors are the
 * caller's to close). */
static int sp_first_map(struct fayt_core *k, struct sp *sp, struct map *m)
{
    fayt_frames_get(&k->frames, sp->frames, sp->nframes);
    m->sp = sp;
    if (!map_insert(k, m))
        return 0;
    /* never in practice (the handle table could not grow): undo it all */
    free(m);
    sp_destroy(k, sp, NULL);
    fayt_frames_put(&k->frames, sp->frames, sp->nframes);
    return ENOMEM;
}

static int sp_create(struct fayt_core *k, struct fayt_fast_conn *c, int32_t tid,
                     const uint8_t *req, const struct fayt_portal_args *a, uint8_t *body,
                     struct fayt_core_reply *out, char *msg, size_t max)
{
    char rb[1100];
    const char *ident = (const char *)req + a->ident_at;
    uint32_t ilen = (uint32_t)a->ident_len;
    uint32_t n = (uint32_t)(((uint64_t)a->length + FAYT_PAGE_SIZE - 1) / FAYT_PAGE_SIZE);
    uint64_t bytes = (uint64_t)n * FAYT_PAGE_SIZE;
    size_t data_offset = FAYT_SP_DATA_OFFSET(n);
    struct fayt_name_ref nr;
    int e;
    if ((e = fayt_name_resolve(k, c, "share.identifier", ident, ilen, FAYT_NAME_CREATE, &nr,
                               msg, (uint32_t)max)))
        return e;
    if ((e = charge(k, c, bytes, msg, max)) || (e = sp_new_checks(k, c, a, ident, &nr, n, msg, max)))
        return e;
    if ((e = frames_check(k, n, msg, max)))
        return e;
    struct sp *sp = sp_alloc(n);
    struct map *m = map_new(k, c, tid, a->prot, FAYT_PORTAL_SHARE | FAYT_PORTAL_ANON, bytes, 0);
    uint8_t stack[ZERO_AT_CREATE], *meta = NULL;
    size_t mlen = sizeof(struct fayt_sharepoint_meta) + (size_t)n * 8;
    size_t room = mlen > ZERO_AT_CREATE ? mlen : ZERO_AT_CREATE;
    if (sp && m)
        meta = room <= sizeof stack ? stack : malloc(room);
    if (!meta) {
        free(sp);
        free(m);
        return core_fail(msg, max, ENOMEM, "faytd: out of memory");
    }
    sp->split = n > 1;
    sp->oid = k->frames.next_oid;
    fayt_frames_alloc(&k->frames, n, sp->oid, sp->frames);
    int recycled = 1, fd2 = -1;
    int fd = kept_take(k, c, bytes, sp->split, sp->object, &fd2, sp->object2);
    if (fd < 0) {
        recycled = 0;
        fd = fayt_objpool_take(k, sp->split ? FAYT_PAGE_SIZE : bytes, NULL, sp->object);
        if (fd >= 0 && sp->split) {
            fd2 = fayt_objpool_take(k, bytes - FAYT_PAGE_SIZE, NULL, sp->object2);
            if (fd2 < 0) {
                e = -fd2;
                close(fd);
                fayt_objpool_release(k, sp->object);
                fd = -e;
            }
        }
    }
    if (fd < 0) {
        fayt_frames_put(&k->frames, sp->frames, n);
        free(sp);
        free(m);
        if (meta != stack)
            free(meta);
        return object_error(k, -fd, msg, max);
    }
    /* The meta-structure: lock free, prot, data length, the morphology; a
     * recycled small object is zeroed by the same write. */
    if (recycled && bytes <= ZERO_AT_CREATE)
        mlen = bytes;                   /* a recycled small object: zeroed by the same write */
    memset(meta + sizeof(struct fayt_sharepoint_meta) + (size_t)n * 8, 0,
           mlen - sizeof(struct fayt_sharepoint_meta) - (size_t)n * 8);
    sp_meta_fill(meta, a->prot, sp->frames, n);
    int werr = write_objects(fd, fd2, sp->split, meta, mlen);
    struct name_ent *ne = sp_enter(k, sp, ident, &nr, werr, &e);
    if (meta != stack)
        free(meta);
    if (!ne) {
        close(fd);
        fayt_objpool_release(k, sp->object);
        if (fd2 >= 0) {
            close(fd2);
            fayt_objpool_release(k, sp->object2);
        }
        fayt_frames_put(&k->frames, sp->frames, n);
        free(sp);
        free(m);
        return core_fail(msg, max, e == EEXIST ? EEXIST : ENOMEM, "share.identifier: %s: %s",
                         core_name_repr(ident, ilen, rb, sizeof rb), strerror(e));
    }
    k->frames.next_oid++;
    sp_own(k, c, sp, ne, &nr, a->prot);
    sp->charged_to = c;
    sp->charged = bytes;
    c->refs++;
    ram_add(k, c, (int64_t)bytes);
    if (sp_first_map(k, sp, m)) {         /* the table holds a reference already */
        close(fd);
        if (fd2 >= 0)
            close(fd2);
        return core_fail(msg, max, ENOMEM, "faytd: out of memory");
    }
    core_journal_sharepoint(k, sp);     /* as faytd/journal.py reads it */
    /* The reply's descriptors; the creator's are held for a recycle. */
    int rfd2 = -1;
    if (sp->split && !(a->prot & FAYT_PROT_WRITE)) {
        rfd2 = open(sp->object2, O_RDONLY | O_CLOEXEC);
        close(fd2);
        fd2 = -1;
    }
    int rfd = fd;
    out->borrowed = 0;
    if (hold(k, &sp->fd, fd)) {
        out->borrowed |= 1;             /* held: the caller sends it and leaves it open */
        if (fd2 >= 0) {
            sp->fd2 = fd2;
            rfd2 = fd2;
            out->borrowed |= 2;
        }
    } else if (fd2 >= 0) {
        rfd2 = fd2;
    }
    out->nfds = sp->split ? 2 : 1;
    out->fds[0] = rfd;
    out->fds[1] = rfd2;
    out->len = reply_body(body, req, m->handle, bytes, data_offset, sp->id, a->prot,
                          FAYT_PORTAL_REPLY_CREATED | (sp->split ? FAYT_PORTAL_REPLY_SPLIT : 0),
                          sp->frames, n);
    return 0;
}

int fayt_core_sp_over(struct fayt_core *k, struct fayt_fast_conn *c, int32_t tid,
                      const uint8_t *req, const struct fayt_portal_args *a, const char *object,
                      const uint32_t *frames, uint32_t n, uint8_t *body,
                      struct fayt_core_reply *out, char *msg, uint32_t max)
{
    char rb[1100];
    const char *ident = (const char *)req + a->ident_at;
    uint32_t ilen = (uint32_t)a->ident_len;
    uint64_t bytes = (uint64_t)n * FAYT_PAGE_SIZE;
    size_t data_offset = FAYT_SP_DATA_OFFSET(n);
    struct fayt_name_ref nr;
    int e;
    if ((e = quota_mappings(k, c, msg, max))
        || (e = fayt_name_resolve(k, c, "share.identifier", ident, ilen, FAYT_NAME_CREATE, &nr,
                                  msg, max))
        || (e = sp_new_checks(k, c, a, ident, &nr, n, msg, max)))
        return e;
    struct sp *sp = sp_alloc(n);
    struct map *m = map_new(k, c, tid, a->prot, FAYT_PORTAL_SHARE | FAYT_PORTAL_DIRECT, bytes, 0);
    size_t mlen = sizeof(struct fayt_sharepoint_meta) + (size_t)n * 8;
    uint8_t *meta = calloc(1, mlen);
    int fd = sp && m && meta ? open(object, O_RDWR | O_CLOEXEC) : -1;
    if (fd < 0) {
        e = errno;
        free(sp);
        free(m);
        free(meta);
        return core_fail(msg, max, ENOMEM, "faytd cannot open backing object %s: %s", object,
                         strerror(e));
    }
    memcpy(sp->frames, frames, (size_t)n * 4);
    snprintf(sp->object, sizeof sp->object, "%s", object);
    sp->oid = k->frames.owner[frames[0]];
    sp->direct = 1;
    sp->shared = 1;                     /* another portal's object: never recycled */
    sp_meta_fill(meta, a->prot, frames, n);
    int werr = pwrite(fd, meta, mlen, 0) != (ssize_t)mlen;
    struct name_ent *ne = sp_enter(k, sp, ident, &nr, werr, &e);
    free(meta);
    if (!ne) {
        close(fd);
        free(sp);
        free(m);
        return core_fail(msg, max, e == EEXIST ? EEXIST : ENOMEM, "share.identifier: %s: %s",
                         core_name_repr(ident, ilen, rb, sizeof rb), strerror(e));
    }
    sp_own(k, c, sp, ne, &nr, a->prot);
    fayt_frames_get(&k->frames, sp->frames, n);     /* the table's */
    if (sp_first_map(k, sp, m)) {
        close(fd);
        return core_fail(msg, max, ENOMEM, "faytd: out of memory");
    }
    core_journal_sharepoint(k, sp);
    out->borrowed = 0;
    out->nfds = 1;
    out->fds[0] = fd;
    out->fds[1] = -1;
    out->len = reply_body(body, req, m->handle, bytes, data_offset, sp->id, a->prot,
                          FAYT_PORTAL_REPLY_CREATED, sp->frames, n);
    return 0;
}

static int sp_attach(struct fayt_core *k, struct fayt_fast_conn *c, int32_t tid,
                     const uint8_t *req, const struct fayt_portal_args *a, uint8_t *body,
                     struct fayt_core_reply *out, char *msg, size_t max)
{
    char rb[1100];
    const char *ident = (const char *)req + a->ident_at;
    uint32_t ilen = (uint32_t)a->ident_len;
    struct fayt_name_ref nr;
    int e = fayt_name_resolve(k, c, "share.identifier", ident, ilen, FAYT_NAME_ATTACH, &nr, msg,
                              (uint32_t)max);
    if (e)
        return e;
    struct name_ent *ne = core_name_find(k, nr.ns, ident + nr.at, nr.len,
                                         core_hash(k, nr.ns, ident + nr.at, nr.len));
    struct sp *sp = ne ? ne->sp : NULL;
    if (!sp)
        return core_fail(msg, max, ENOENT, "share.identifier: no share-point %s",
                         core_name_repr(ident, ilen, rb, sizeof rb));
    if (a->prot & ~sp->prot)
        return core_fail(msg, max, EACCES, "prot: %#x asked, share-point %s grants %#x",
                         a->prot, core_name_repr(ident, ilen, rb, sizeof rb), sp->prot);
    if ((sp->direct || (!sp->split && sp->nframes > 1)) && !(a->prot & FAYT_PROT_WRITE)
        && c->uid != sp->owner_uid)
        return core_fail(msg, max, EACCES, "prot: %#x asked; share-point %s is one object "
                         "(SHARE|DIRECT), so a read-only attach from another uid could not be "
                         "kept from writing it: attach PROT_READ|PROT_WRITE, if granted",
                         a->prot, core_name_repr(ident, ilen, rb, sizeof rb));
    if (a->length != 0 && (uint64_t)a->length != sp->length)
        return core_fail(msg, max, EINVAL, "length: %d; share-point %s maps %llu bytes",
                         a->length, core_name_repr(ident, ilen, rb, sizeof rb),
                         (unsigned long long)sp->length);
    out->borrowed = sp->fd >= 0;         /* the held one, sent as it is */
    int rfd = sp->fd >= 0 ? sp->fd : reply_fd(-1, sp->object, 0), rfd2 = -1;
    if (rfd >= 0 && sp->split) {
        rfd2 = reply_fd(sp->fd2, sp->object2, !(a->prot & FAYT_PROT_WRITE));
        if (rfd2 < 0) {
            int err = errno;
            if (!(out->borrowed & 1))
                close(rfd);
            rfd = -1;
            out->borrowed = 0;
            errno = err;
        }
    }
    if (rfd < 0) {
        int err = errno;
        if (err == EMFILE || err == ENFILE)     /* faytd's own limit, not the keeper's */
            return core_fail(msg, max, ENFILE, "faytd cannot open backing object %s: faytd "
                             "is out of open files (%s)", sp->object, strerror(err));
        return core_fail(msg, max, ENOMEM, "faytd cannot open backing object %s: %s",
                         sp->object, strerror(err));
    }
    if (sp->fd < 0 && !sp->split && k->priv->held_fds < RECYCLE_MAX) {
        hold(k, &sp->fd, rfd);          /* kept for the next attaches: sent, not closed */
        out->borrowed = 1;
    }
    struct map *m = map_new(k, c, tid, a->prot, FAYT_PORTAL_SHARE | FAYT_PORTAL_ANON,
                            sp->length, 0);
    if (!m || (m->sp = sp, map_insert(k, m))) {
        free(m);
        if (!(out->borrowed & 1))
            close(rfd);
        if (rfd2 >= 0)
            close(rfd2);
        return core_fail(msg, max, ENOMEM, "faytd: out of memory");
    }
    fayt_frames_get(&k->frames, sp->frames, sp->nframes);
    out->nfds = sp->split ? 2 : 1;
    out->fds[0] = rfd;
    out->fds[1] = rfd2;
    out->len = reply_body(body, req, m->handle, sp->length, FAYT_SP_DATA_OFFSET(sp->nframes),
                          sp->id, a->prot, sp->split ? FAYT_PORTAL_REPLY_SPLIT : 0, sp->frames,
                          sp->nframes);
    return 0;
}

static int anon_map(struct fayt_core *k, struct fayt_fast_conn *c, int32_t tid,
                    const uint8_t *req, const struct fayt_portal_args *a, uint8_t *body,
                    struct fayt_core_reply *out, char *msg, size_t max)
{
    uint32_t n = (uint32_t)(((uint64_t)a->length + FAYT_PAGE_SIZE - 1) / FAYT_PAGE_SIZE);
    uint64_t bytes = (uint64_t)n * FAYT_PAGE_SIZE;
    int e;
    if (n > k->frames.nframes)
        return core_fail(msg, max, ENOMEM, "length: %d bytes is more than faytd's RAM",
                         a->length);
    if ((e = charge(k, c, bytes, msg, max)) || (e = frames_check(k, n, msg, max)))
        return e;
    struct map *m = map_new(k, c, tid, a->prot, FAYT_PORTAL_ANON, bytes, n);
    if (!m)
        return core_fail(msg, max, ENOMEM, "faytd: out of memory");
    m->oid = k->frames.next_oid;
    fayt_frames_alloc(&k->frames, n, m->oid, m->frames);
    int fd = kept_take(k, c, bytes, 0, m->object, NULL, NULL);
    if (fd >= 0 && bytes <= ZERO_AT_CREATE) {
        static const uint8_t zeros[ZERO_AT_CREATE];   /* a portal's memory starts as zeros */
        if (pwrite(fd, zeros, bytes, 0) != (ssize_t)bytes) {
            close(fd);
            fayt_objpool_release(k, m->object);
            fd = -1;
        }
    }
    if (fd < 0)
        fd = fayt_objpool_take(k, bytes, NULL, m->object);
    if (fd < 0 || map_insert(k, m)) {
        e = fd < 0 ? -fd : ENOMEM;
        if (fd >= 0) {
            close(fd);
            fayt_objpool_release(k, m->object);
        }
        fayt_frames_put(&k->frames, m->frames, n);
        free(m);
        return object_error(k, e, msg, max);
    }
    k->frames.next_oid++;
    m->charged = bytes;
    ram_add(k, c, (int64_t)bytes);
    out->borrowed = hold(k, &m->fd, fd);   /* held: sent, not closed */
    int rfd = fd;
    out->nfds = 1;
    out->fds[0] = rfd;
    out->fds[1] = -1;
    out->len = reply_body(body, req, m->handle, bytes, 0, 0, a->prot, 0, m->frames, n);
    return 0;
}

int fayt_core_portal(struct fayt_core *k, struct fayt_fast_conn *c, int32_t tid,
                     const uint8_t *req, const struct fayt_portal_args *a, uint8_t *body,
                     struct fayt_core_reply *out, char *msg, uint32_t max)
{
    int e = quota_mappings(k, c, msg, max);
    if (e)
        return e;
    if (a->type == FAYT_PORTAL_ANON)
        return anon_map(k, c, tid, req, a, body, out, msg, max);
    if (a->type != (FAYT_PORTAL_SHARE | FAYT_PORTAL_ANON))
        return core_fail(msg, max, EINVAL, "type: %d is not the core's to map", a->type);
    if (a->attach)
        return sp_attach(k, c, tid, req, a, body, out, msg, max);
    return sp_create(k, c, tid, req, a, body, out, msg, max);
}

int fayt_core_unmap(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t handle, int how,
                    uint32_t *destroyed, char *msg, uint32_t max)
{
    char rb[1100];
    struct map *m = core_map_find(k, c, handle);
    if (!m)
        return -1;
    if (how != FAYT_CORE_UNMAP && (m->sp || how == FAYT_CORE_DESTROY)) {
        struct sp *sp = m->sp;
        if (!sp)
            return core_fail(msg, max, EINVAL, "handle: %llu is not a share-point",
                             (unsigned long long)handle);
        if (how == FAYT_CORE_DESTROY || !sp->destroyed) {
            if (!sp_owned_by(sp, c) && !(c->flags & FAYT_FAST_CONN_CORE))
                return core_fail(msg, max, EPERM, "share-point %s: only its owner (pid %d) or "
                                 "a core server may destroy it", sp_repr(sp, rb, sizeof rb),
                                 sp->owner_pid);
            if (!sp->destroyed) {
                if (destroyed)
                    *destroyed = sp->id;
                sp_destroy(k, sp, c);
            }
        }
    }
    if (how != FAYT_CORE_DESTROY)
        map_remove(k, m);
    return 0;
}

int fayt_core_map_info(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t handle,
                       struct fayt_map_info *out, uint32_t *frames, uint32_t max)
{
    struct map *m = core_map_find(k, c, handle);
    if (!m)
        return ENOENT;
    memset(out, 0, sizeof *out);
    out->handle = m->handle;
    out->type = m->type;
    out->sp_id = m->sp ? m->sp->id : 0;
    out->pid = m->pid;
    out->tid = m->tid;
    out->prot = m->prot;
    out->length = m->length;
    out->charged = m->charged;
    if (core_map_frames_of_others(m)) {    /* DIRECT, COW: no object of its own */
        out->nframes = m->nframes;
        if (frames)
            memcpy(frames, m->frames, (size_t)(max < m->nframes ? max : m->nframes) * 4);
        return 0;
    }
    out->oid = m->sp ? m->sp->oid : m->oid;
    out->nframes = m->sp ? m->sp->nframes : m->nframes;
    if (m->sp)
        snprintf(out->object, sizeof out->object, "%s%s%s", m->sp->object,
                 m->sp->split ? "+" : "", m->sp->split ? m->sp->object2 : "");
    else
        snprintf(out->object, sizeof out->object, "%s", m->object);
    if (frames)
        memcpy(frames, m->sp ? m->sp->frames : m->frames,
               (size_t)(max < out->nframes ? max : out->nframes) * 4);
    if (m->sp)
        m->sp->shared = 1;
    else
        m->shared = 1;
    return 0;
}

int fayt_core_oid_info(struct fayt_core *k, uint32_t oid, struct fayt_map_info *out,
                       uint32_t *frames, uint32_t max)
{
    struct fayt_core_priv *p = k->priv;
    for (uint32_t i = 0; i < p->ids_nb; i++) {
        for (struct sp *s = p->by_id[i]; s; s = s->id_next) {
            if (s->oid != oid)
                continue;
            memset(out, 0, sizeof *out);
            out->type = FAYT_PORTAL_SHARE | FAYT_PORTAL_ANON;
            out->sp_id = s->id;
            out->pid = s->owner_pid;
            out->prot = s->prot;
            out->oid = s->oid;
            out->length = s->length;
            out->nframes = s->nframes;
            snprintf(out->object, sizeof out->object, "%s%s%s", s->object,
                     s->split ? "+" : "", s->split ? s->object2 : "");
            if (frames)
                memcpy(frames, s->frames, (size_t)(max < s->nframes ? max : s->nframes) * 4);
            s->shared = 1;
            return 0;
        }
    }
    for (uint32_t i = 0; i < p->handles_nb; i++)
        for (struct map *m = p->by_handle[i]; m; m = m->hnext)
            if (!m->sp && m->oid == oid)
                return fayt_core_map_info(k, m->conn, m->handle, out, frames, max);
    return ENOENT;
}

int64_t fayt_core_map_sp(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t handle)
{
    struct map *m = core_map_find(k, c, handle);
    return !m ? -1 : m->sp ? (int64_t)m->sp->id : 0;
}

int fayt_core_map_set_charged(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t handle,
                              uint64_t charged)
{
    struct map *m = core_map_find(k, c, handle);
    if (!m)
        return ENOENT;
    m->charged = charged;
    return 0;
}

void fayt_core_conn_drop(struct fayt_core *k, struct fayt_fast_conn *c)
{
    while (c->cs->maps)
        map_remove(k, c->cs->maps);
}

void fayt_core_owner_died(struct fayt_core *k, int32_t pid)
{
    struct fayt_core_priv *p = k->priv;
    for (uint32_t i = 0; i < p->ids_nb; i++) {
        for (struct sp *s = p->by_id[i], *next; s; s = next) {
            next = s->id_next;
            if (s->owner_pid == pid && s->owner_alive && !s->destroyed) {
                s->owner_alive = 0;
                if (!s->maps)
                    sp_destroy(k, s, NULL);
            }
        }
    }
}

int fayt_core_owns(struct fayt_core *k, int32_t pid)
{
    struct fayt_core_priv *p = k->priv;
    for (uint32_t i = 0; i < p->ids_nb; i++)
        for (struct sp *s = p->by_id[i]; s; s = s->id_next)
            if (s->owner_pid == pid && s->owner_alive && !s->destroyed)
                return 1;
    return 0;
}

/* -- what Python asks ------------------------------------------------------------- */
int fayt_core_sp_info(struct fayt_core *k, uint32_t id, struct fayt_sp_info *out,
                      uint32_t *frames, uint32_t max)
{
    struct sp *sp = core_sp_find(k, id);
    if (!sp)
        return ENOENT;
    memset(out, 0, sizeof *out);
    out->id = sp->id;
    out->owner_pid = sp->owner_pid;
    out->owner_uid = sp->owner_uid;
    out->prot = sp->prot;
    out->owner_start = sp->owner_start;
    out->length = sp->length;
    out->data_offset = FAYT_SP_DATA_OFFSET(sp->nframes);
    out->nframes = sp->nframes;
    out->nmaps = sp->nmaps;
    out->destroyed = sp->destroyed;
    out->owner_alive = sp->owner_alive;
    out->ns = sp->ns;
    snprintf(out->object, sizeof out->object, "%s%s%s", sp->object, sp->split ? "+" : "",
             sp->split ? sp->object2 : "");
    if (sp->name) {
        out->ident_len = sp->name->len;
        memcpy(out->identifier, sp->name->key, sp->name->len);
    }
    if (frames)
        memcpy(frames, sp->frames, (size_t)(max < sp->nframes ? max : sp->nframes) * 4);
    return 0;
}

void fayt_core_sp_expose(struct fayt_core *k, uint32_t id)
{
    struct sp *sp = core_sp_find(k, id);
    if (sp)
        sp->shared = 1;
}

uint32_t fayt_core_sp_mappers(struct fayt_core *k, uint32_t id, uint32_t *ctx_ids,
                              uint64_t *handles, int32_t *pids, int32_t *tids, uint32_t max)
{
    struct sp *sp = core_sp_find(k, id);
    uint32_t n = 0;
    for (struct map *m = sp ? sp->maps : NULL; m; m = m->sp_next, n++) {
        if (n < max) {
            ctx_ids[n] = m->ctx_id;
            handles[n] = m->handle;
            pids[n] = m->pid;
            tids[n] = m->tid;
        }
    }
    return n;
}

int fayt_core_conn_mapped(struct fayt_core *k, struct fayt_fast_conn *c, uint32_t id)
{
    (void)k;
    return idset_has(&c->cs->mapped, id);
}

uint32_t fayt_core_conn_attached(struct fayt_core *k, struct fayt_fast_conn *c, uint32_t *out,
                                 uint32_t max)
{
    (void)k;
    struct idset *s = &c->cs->mapped;
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->cap; i++) {
        if (s->ids[i] & ATTACHED) {
            if (n < max)
                out[n] = s->ids[i] & ~ATTACHED;
            n++;
        }
    }
    return n;
}

void fayt_core_conn_mark(struct fayt_core *k, struct fayt_fast_conn *c, uint32_t id,
                         int attached)
{
    idset_add(k, &c->cs->mapped, id, attached);
}

int fayt_core_sp_adopt(struct fayt_core *k, uint32_t id, uint32_t ns, const char *ident,
                       uint32_t ilen, int32_t prot, int32_t owner_pid, uint32_t owner_uid,
                       uint64_t start, uint64_t length, const char *object,
                       const uint32_t *frames, uint32_t nframes, char *msg, uint32_t max)
{
    if (core_sp_find(k, id) || core_name_find(k, ns, ident, ilen, core_hash(k, ns, ident, ilen)))
        return core_fail(msg, max, EEXIST, "journal: share-point %u named twice", id);
    if ((uint64_t)nframes * FAYT_PAGE_SIZE != length)
        return core_fail(msg, max, EINVAL, "journal: share-point %u: %u frames for %llu bytes",
                         id, nframes, (unsigned long long)length);
    struct sp *sp = sp_alloc(nframes);
    if (!sp)
        return core_fail(msg, max, ENOMEM, "faytd: out of memory");
    const char *plus = strchr(object, '+');
    sp->split = plus != NULL;
    snprintf(sp->object, sizeof sp->object, "%.*s", plus ? (int)(plus - object)
             : (int)strlen(object), object);
    if (plus)
        snprintf(sp->object2, sizeof sp->object2, "%s", plus + 1);
    memcpy(sp->frames, frames, (size_t)nframes * 4);
    sp->oid = k->frames.next_oid;
    if (fayt_frames_adopt(&k->frames, frames, nframes, sp->oid)) {
        free(sp);
        return core_fail(msg, max, EINVAL, "frames do not fit this RAM (%u frames) or are "
                         "taken twice", k->frames.nframes);
    }
    int e = 0;
    struct name_ent *ne = core_name_insert(k, ns, ident, ilen, &e);
    sp->id = id;
    sp->acct = acct_get(k, owner_uid);
    if (!ne || !sp->acct || ids_insert(k, sp) || core_ids_add(k, id, ns)) {
        if (ne && core_sp_find(k, id) == sp)
            ids_remove(k, sp);
        acct_put(k, sp->acct);
        if (ne)
            core_name_remove(k, ne);
        fayt_frames_put(&k->frames, frames, nframes);
        free(sp);
        return core_fail(msg, max, ENOMEM, "faytd: out of memory");
    }
    k->frames.next_oid++;
    ne->sp = sp;
    sp->name = ne;
    sp->ns = ns;
    sp->prot = prot;
    sp->length = length;
    sp->owner_pid = owner_pid;
    sp->owner_uid = owner_uid;
    sp->owner_start = start;
    sp->shared = 1;                 /* a restart does not know who holds its fd */
    sp->acct->nsharepoints++;       /* its owner's uid's (its category is not known: core) */
    k->nsharepoints++;
    fayt_core_skip_sp_ids(k, id % 0xfffffffeU + 1);
    return 0;
}

void fayt_core_destroy_all(struct fayt_core *k)
{
    struct fayt_core_priv *p = k->priv;
    /* Out of the table first (those nobody maps go at once), then every
     * mapping (a destroyed share-point goes with its last). */
    for (uint32_t i = 0; i < p->ids_nb; i++) {
        for (struct sp *s = p->by_id[i], *next; s; s = next) {
            next = s->id_next;
            sp_destroy(k, s, NULL);
        }
    }
    for (uint32_t i = 0; i < p->ids_nb; i++) {
        while (p->by_id[i]) {
            struct sp *s = p->by_id[i];
            if (s->maps)
                map_remove(k, s->maps);
            else
                sp_free(k, s);
        }
    }
    while (p->nkept)
        kept_drop(k, p->nkept - 1);
}

void core_table_fini(struct fayt_core *k)
{
    struct fayt_core_priv *p = k->priv;
    fayt_core_destroy_all(k);
    core_ids_fini(k);
    free(p->by_id);
    free(p->by_handle);
    free(p->accts);
    p->by_id = NULL;
    p->by_handle = NULL;
    p->accts = NULL;
    p->accts_nb = p->accts_n = 0;
    p->ids_nb = p->handles_nb = p->handles_n = 0;
}
