/* direct.c: DMA grants, and DIRECT portals over granted RAM in C (core.h).
 *
 * The grants (GRANT: a portal or share-point made DMA-able for a context or
 * a category, up to a prot) live here, the one table both paths read:
 * faytd's Python (faytd/direct.py) adds, takes back and asks through the
 * fayt_direct_* calls; the C path checks them.  A grant lasts while the
 * granting mapping does: it names that mapping by (context id, handle),
 * and a grant whose mapping is gone counts for nothing and is dropped when
 * seen.
 *
 * The C path takes the common DIRECT request (serve.c): every frame named
 * is allocated RAM, in at most FAYT_DIRECT_OBJECTS_MAX objects, each the
 * object of a live granted ANON portal or (single-object) share-point,
 * granted to this context with every prot bit asked (a core context: any
 * live grant of the object will do, for its name).  Anything else (a
 * device window, an unaligned or free frame, no grant, a split
 * share-point, a COW view's private frames, too many runs) goes to Python,
 * which makes the same checks and answers with the message; nothing has
 * changed by then.  The mapping it makes is a core mapping of type DIRECT
 * (struct map, table.c): one reference to each frame it names, and one to
 * a record of each object (struct dobj: its name and frames), so that
 * whoever drops the last allocated frame of an object releases it, as
 * faytd/direct.py does for the mappings Python makes.  Its UNMAP is the
 * core's (fayt_core_unmap), on either path.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fayt/common/scm.h"
#include "internal.h"

#define GRANT_BUCKETS 1024         /* by object id */
#define DOBJ_BUCKETS 256
#define PADDR_MAX (FAYT_MSG_MAX / 8)   /* paddr[] entries one request can hold */
#define RUNS_MAX ((FAYT_MSG_MAX - sizeof(struct fayt_rep_hdr) - sizeof(struct fayt_portal_reply) \
                   - sizeof(struct portal_req)) / sizeof(struct fayt_direct_run))

struct grant {
    struct grant *next;
    uint32_t oid;                  /* the granted object */
    uint32_t from_ctx;             /* the granting mapping: (context id, handle) */
    uint64_t handle;
    uint32_t kind, to;             /* FAYT_GRANT_CONTEXT (a context id) or _CATEGORY */
    int32_t prot;
};

/* An object a DIRECT mapping of the core references: its name, to release
 * it, and its frames, to see whether any is still allocated. */
struct dobj {
    struct dobj *next;
    uint32_t oid, refs, nframes;
    char name[FAYT_OBJ_NAME_MAX];
    uint32_t frames[];
};

/* The objects of one DIRECT mapping (struct map.direct). */
struct dobjs {
    uint32_t n;
    struct dobj *o[FAYT_DIRECT_OBJECTS_MAX];
};

struct direct_state {
    struct grant *grants[GRANT_BUCKETS];
    struct dobj *dobjs[DOBJ_BUCKETS];
    /* one request's scratch: paddr[], frames, runs */
    uint64_t paddr[PADDR_MAX];
    uint32_t frames[PADDR_MAX];
    uint32_t run_oid[PADDR_MAX], run_page[PADDR_MAX], run_pages[PADDR_MAX], run_at[PADDR_MAX];
};

static struct direct_state *state(struct fayt_core *k)
{
    struct fayt_core_priv *p = k->priv;
    if (!p->direct)
        p->direct = calloc(1, sizeof *p->direct);
    return p->direct;
}

static uint32_t bucket(uint32_t oid, uint32_t n)
{
    uint32_t h = oid * 0x9E3779B1u;
    return (h ^ (h >> 15)) & (n - 1);
}

/* -- grants ---------------------------------------------------------------- */
/* The granting mapping, if it still exists and still maps the object. */
static struct map *grant_source(struct fayt_core *k, const struct grant *g)
{
    struct map *m = core_map_find_id(k, g->from_ctx, g->handle);
    if (!m || core_map_frames_of_others(m) || (m->sp ? m->sp->oid : m->oid) != g->oid)
        return NULL;
    return m;
}

static int grant_covers(const struct grant *g, const struct fayt_fast_conn *c)
{
    if (g->kind == FAYT_GRANT_CONTEXT)
        return c->ctx_id == g->to;
    return c->category != FAYT_FAST_NO_CATEGORY && c->category == g->to;
}

/* Drop the grants of oid whose mapping is gone. */
static void grants_prune(struct fayt_core *k, struct direct_state *d, uint32_t oid)
{
    for (struct grant **q = &d->grants[bucket(oid, GRANT_BUCKETS)]; *q;) {
        struct grant *g = *q;
        if (g->oid == oid && !grant_source(k, g)) {
            *q = g->next;
            free(g);
        } else {
            q = &g->next;
        }
    }
}

int fayt_direct_grant(struct fayt_core *k, uint32_t oid, uint32_t from_ctx, uint64_t handle,
                      uint32_t kind, uint32_t to, int32_t prot, int revoke)
{
    struct direct_state *d = state(k);
    if (!d)
        return ENOMEM;
    grants_prune(k, d, oid);
    struct grant **head = &d->grants[bucket(oid, GRANT_BUCKETS)];
    for (struct grant **q = head; *q;) {
        struct grant *g = *q;
        if (g->oid == oid && g->from_ctx == from_ctx && g->handle == handle && g->kind == kind
            && g->to == to) {
            *q = g->next;
            free(g);
        } else {
            q = &g->next;
        }
    }
    if (revoke)
        return 0;
    struct grant *g = calloc(1, sizeof *g);
    if (!g)
        return ENOMEM;
    *g = (struct grant){*head, oid, from_ctx, handle, kind, to, prot};
    *head = g;
    return 0;
}

uint32_t fayt_direct_grants_by(struct fayt_core *k, uint32_t ctx_id)
{
    struct direct_state *d = state(k);
    uint32_t n = 0;
    for (uint32_t b = 0; d && b < GRANT_BUCKETS; b++)
        for (struct grant *g = d->grants[b]; g; g = g->next)
            n += g->from_ctx == ctx_id;
    return n;
}

/* The prot c's live grants of oid allow (0: none); *src: a live granting
 * mapping of oid, whoever it was granted to (NULL: none). */
static int32_t granted(struct fayt_core *k, struct direct_state *d,
                       const struct fayt_fast_conn *c, uint32_t oid, struct map **src)
{
    int32_t prot = 0;
    *src = NULL;
    for (struct grant **q = &d->grants[bucket(oid, GRANT_BUCKETS)]; *q;) {
        struct grant *g = *q;
        if (g->oid != oid) {
            q = &g->next;
            continue;
        }
        struct map *m = grant_source(k, g);
        if (!m) {
            *q = g->next;
            free(g);
            continue;
        }
        *src = m;
        if (grant_covers(g, c))
            prot |= g->prot;
        q = &g->next;
    }
    return prot;
}

int32_t fayt_direct_granted_prot(struct fayt_core *k, const struct fayt_fast_conn *c,
                                 uint32_t oid)
{
    struct direct_state *d = state(k);
    struct map *src;
    return d ? granted(k, d, c, oid, &src) : 0;
}

uint32_t fayt_direct_revoke_to(struct fayt_core *k, uint32_t from_ctx, uint32_t to)
{
    struct direct_state *d = state(k);
    uint32_t n = 0;
    for (uint32_t b = 0; d && b < GRANT_BUCKETS; b++) {
        for (struct grant **q = &d->grants[b]; *q;) {
            struct grant *g = *q;
            if (g->from_ctx == from_ctx && g->kind == FAYT_GRANT_CONTEXT && g->to == to) {
                *q = g->next;
                free(g);
                n++;
            } else {
                q = &g->next;
            }
        }
    }
    return n;
}

void fayt_direct_context_gone(struct fayt_core *k, uint32_t ctx_id)
{
    struct direct_state *d = state(k);
    for (uint32_t b = 0; d && b < GRANT_BUCKETS; b++) {
        for (struct grant **q = &d->grants[b]; *q;) {
            struct grant *g = *q;
            if (g->from_ctx == ctx_id) {
                *q = g->next;
                free(g);
            } else {
                q = &g->next;
            }
        }
    }
}

/* -- the objects DIRECT mappings of the core reference ---------------------- */
static struct dobj *dobj_find(struct direct_state *d, uint32_t oid)
{
    for (struct dobj *o = d->dobjs[bucket(oid, DOBJ_BUCKETS)]; o; o = o->next)
        if (o->oid == oid)
            return o;
    return NULL;
}

/* A record of src's object (oid), with no reference yet; NULL: no memory. */
static struct dobj *dobj_of(struct direct_state *d, uint32_t oid, const struct map *src)
{
    struct dobj *o = dobj_find(d, oid);
    if (o)
        return o;
    const struct sp *sp = src->sp;
    uint32_t n = sp ? sp->nframes : src->nframes;
    if (!(o = calloc(1, sizeof *o + (size_t)n * sizeof(uint32_t))))
        return NULL;
    o->oid = oid;
    o->nframes = n;
    memcpy(o->frames, sp ? sp->frames : src->frames, (size_t)n * sizeof(uint32_t));
    snprintf(o->name, sizeof o->name, "%s", sp ? sp->object : src->object);
    uint32_t b = bucket(oid, DOBJ_BUCKETS);
    o->next = d->dobjs[b];
    d->dobjs[b] = o;
    return o;
}

static void dobj_unlink(struct direct_state *d, struct dobj *o)
{
    struct dobj **q = &d->dobjs[bucket(o->oid, DOBJ_BUCKETS)];
    while (*q && *q != o)
        q = &(*q)->next;
    if (*q)
        *q = o->next;
    free(o);
}

/* The records a refused request looked up that no mapping references. */
static void dobjs_unused(struct direct_state *d, struct dobjs *os)
{
    for (uint32_t i = 0; i < os->n; i++)
        if (!os->o[i]->refs)
            dobj_unlink(d, os->o[i]);
    os->n = 0;
}

static int dobj_alive(const struct fayt_frames *f, const struct dobj *o)
{
    for (uint32_t i = 0; i < o->nframes; i++)
        if (f->owner[o->frames[i]] == o->oid && f->refcount[o->frames[i]])
            return 1;
    return 0;
}

void core_direct_unmapped(struct fayt_core *k, struct map *m)
{
    struct direct_state *d = k->priv->direct;
    struct dobjs *os = m->direct;
    fayt_frames_put(&k->frames, m->frames, m->nframes);
    m->direct = NULL;
    if (!os || !d) {
        free(os);
        return;
    }
    for (uint32_t i = 0; i < os->n; i++) {
        struct dobj *o = os->o[i];
        int alive = dobj_alive(&k->frames, o);
        if (!alive)
            fayt_objpool_release(k, o->name);   /* the last allocated frame went */
        if (--o->refs == 0)
            dobj_unlink(d, o);
    }
    free(os);
}

void core_direct_fini(struct fayt_core *k)
{
    struct direct_state *d = k->priv->direct;
    if (!d)
        return;
    for (uint32_t b = 0; b < GRANT_BUCKETS; b++)
        for (struct grant *g = d->grants[b], *next; g; g = next) {
            next = g->next;
            free(g);
        }
    for (uint32_t b = 0; b < DOBJ_BUCKETS; b++)
        for (struct dobj *o = d->dobjs[b], *next; o; o = next) {
            next = o->next;
            free(o);
        }
    free(d);
    k->priv->direct = NULL;
}

int fayt_direct_map_object(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t handle,
                           uint32_t i, struct fayt_map_info *out, uint32_t *frames,
                           uint32_t max)
{
    struct map *m = core_map_find(k, c, handle);
    struct dobjs *os = m ? m->direct : NULL;
    if (!os || i >= os->n)
        return ENOENT;
    const struct dobj *o = os->o[i];
    memset(out, 0, sizeof *out);
    out->oid = o->oid;
    out->nframes = o->nframes;
    out->length = (uint64_t)o->nframes * FAYT_PAGE_SIZE;
    snprintf(out->object, sizeof out->object, "%s", o->name);
    if (frames)
        memcpy(frames, o->frames, (size_t)(max < o->nframes ? max : o->nframes) * 4);
    return 0;
}

int fayt_direct_disown(struct fayt_core *k, struct fayt_fast_conn *c, uint64_t handle)
{
    struct direct_state *d = k->priv->direct;
    struct map *m = core_map_find(k, c, handle);
    if (!m || !core_map_frames_of_others(m) || !d)
        return ENOENT;
    struct dobjs *os = m->direct;
    for (uint32_t i = 0; os && i < os->n; i++)
        if (--os->o[i]->refs == 0)
            dobj_unlink(d, os->o[i]);
    free(os);
    m->direct = NULL;
    m->nframes = 0;                     /* its references are the caller's now */
    m->charged = 0;                     /* and its charge */
    return fayt_core_unmap(k, c, handle, FAYT_CORE_UNMAP, NULL, NULL, 0);
}

/* -- the C path ------------------------------------------------------------- */
static int send_fds(int fd, const void *msg, size_t n, const int *fds, int nfds)
{
    struct iovec iov = {(void *)msg, n};
    struct msghdr mh = {0};
    FAYT_SCM_BUFFER(cbuf, FAYT_DIRECT_OBJECTS_MAX);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    fayt_scm_put(&mh, cbuf.buf, fds, nfds);
    ssize_t r;
    do {
        r = sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? errno : 0;
}

void core_direct_rofd_close(struct fayt_core *k, int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        k->priv->held_ro--;
        *fd = -1;
    }
}

/* A descriptor of src's object for c, sent as it is when *borrowed (not
 * closed), else opened here: read-write, the one src holds for recycling;
 * read-only (without PROT_WRITE, and for every view), the read-only one
 * src holds, opened by name the first time (at most RO_HELD_MAX are held,
 * each until its source's record or objects go). */
static int object_fd(struct fayt_core *k, struct map *src, const struct dobj *o, int writable,
                     int *borrowed)
{
    int held = src->sp ? src->sp->fd : src->fd;
    int *ro = src->sp ? &src->sp->rofd : &src->rofd;
    *borrowed = writable ? held >= 0 : *ro >= 0;
    if (*borrowed)
        return writable ? held : *ro;
    int fd = open(o->name, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd >= 0 && !writable && k->priv->held_ro < RO_HELD_MAX) {
        k->priv->held_ro++;
        *ro = fd;
        *borrowed = 1;
    }
    return fd;
}

int core_direct_serve(struct fayt_core *k, struct fayt_fast_conn *c,
                      const struct fayt_req_hdr *h, const uint8_t *body,
                      const struct fayt_portal_args *a, int *err)
{
    struct direct_state *d = state(k);
    int cow = a->type == FAYT_PORTAL_COW;
    if (!d || a->length <= 0 || a->length % FAYT_PAGE_SIZE
        || (cow && (a->share_type != FAYT_COW_ON_WRITE || a->ident_at >= 0)))
        return FAYT_FAST_PASS;          /* a source by share-point name: Python's */
    /* DIRECT maps with the prot asked; a COW view reads its source. */
    int32_t need = cow ? FAYT_PROT_READ : a->prot;
    uint32_t n = (uint32_t)a->length / FAYT_PAGE_SIZE;
    if ((a->mlen + FAYT_PAGE_SIZE - 1) / FAYT_PAGE_SIZE != n || n > PADDR_MAX
        || c->py_mappings + c->nmaps >= k->max_mappings)
        return FAYT_FAST_PASS;
    memcpy(d->paddr, body + sizeof(struct portal_req), (size_t)n * 8);
    uint32_t nruns, bad;
    if (fayt_frames_resolve(&k->frames, d->paddr, n, d->frames, d->run_oid, d->run_page,
                            d->run_pages, d->run_at, &nruns, &bad)
        || nruns > RUNS_MAX)
        return FAYT_FAST_PASS;          /* Python names the entry at fault */
    /* The objects, in the order the runs first name them: each granted. */
    struct map *src[FAYT_DIRECT_OBJECTS_MAX];
    struct dobjs os = {0};
    int core_ctx = (c->flags & FAYT_FAST_CONN_CORE) != 0;
    for (uint32_t r = 0; r < nruns; r++) {
        uint32_t oid = d->run_oid[r], i = 0;
        while (i < os.n && os.o[i]->oid != oid)
            i++;
        if (i < os.n)
            continue;
        struct map *m = NULL;
        int32_t allowed = os.n < FAYT_DIRECT_OBJECTS_MAX ? granted(k, d, c, oid, &m) : 0;
        struct dobj *o = NULL;
        if (!m || (m->sp && m->sp->split)
            || (!core_ctx && (!allowed || (need & ~allowed)))
            || !(o = dobj_of(d, oid, m))) {
            dobjs_unused(d, &os);       /* EPERM, too many objects, or Python's objects */
            return FAYT_FAST_PASS;
        }
        src[os.n] = m;
        os.o[os.n++] = o;
    }
    /* The descriptors, then the mapping: nothing is changed until both exist. */
    int fds[FAYT_DIRECT_OBJECTS_MAX], borrowed[FAYT_DIRECT_OBJECTS_MAX];
    int writable = !cow && (a->prot & FAYT_PROT_WRITE);    /* a view's fds are read-only */
    uint64_t bytes = (uint64_t)n * FAYT_PAGE_SIZE;
    /* A writable view's possible private pages are charged at creation. */
    uint64_t charged = cow && (a->prot & FAYT_PROT_WRITE) ? bytes : 0;
    if (charged && fayt_core_charge(k, c, charged, NULL, 0)) {
        dobjs_unused(d, &os);
        return FAYT_FAST_PASS;          /* Python answers ENOMEM */
    }
    uint32_t nfds = 0;
    struct dobjs *mine = malloc(sizeof *mine);
    struct map *m = mine ? core_map_alloc(k, c, h->tid, a->prot, (uint32_t)a->type, bytes, n)
                         : NULL;
    for (; m && nfds < os.n; nfds++)
        if ((fds[nfds] = object_fd(k, src[nfds], os.o[nfds], writable, &borrowed[nfds])) < 0)
            break;
    if (!m || nfds < os.n || core_map_add(k, m)) {
        while (nfds--)
            if (!borrowed[nfds])
                close(fds[nfds]);
        free(m);
        free(mine);
        dobjs_unused(d, &os);
        if (charged)
            fayt_core_ram_set(k, c, c->ram - charged);
        return FAYT_FAST_PASS;
    }
    m->charged = charged;
    memcpy(m->frames, d->frames, (size_t)n * 4);
    fayt_frames_get(&k->frames, m->frames, n);
    *mine = os;
    m->direct = mine;
    for (uint32_t i = 0; i < os.n; i++) {
        os.o[i]->refs++;
        if (src[i]->conn != c) {        /* its object went to another context: */
            if (src[i]->sp)             /* never recycled */
                src[i]->sp->shared = 1;
            else
                src[i]->shared = 1;
        }
    }
    /* The reply: fayt_portal_reply, the request's portal_req as decoded
     * (morphology.length filled), no frames, the runs; one fd per object. */
    uint8_t *rep = k->priv->reply;
    struct fayt_rep_hdr rh = {FAYT_REP_MAGIC, h->op, (uint16_t)nfds, h->seq, 0};
    struct fayt_portal_reply pr = {0};
    struct portal_req q;
    pr.handle = m->handle;
    pr.map_length = (uint64_t)n * FAYT_PAGE_SIZE;
    pr.prot = a->prot;
    pr.flags = FAYT_PORTAL_REPLY_DIRECT | (cow ? FAYT_PORTAL_REPLY_PRIVATE : 0);
    memset(&q, 0, sizeof q);
    q.type = a->type;
    q.prot = a->prot;
    q.length = a->length;
    q.share.identifier = (const char *)(uintptr_t)a->ident_p;
    q.share.type = a->share_type;
    q.share.create = a->create;
    q.sp_req_chain.name = (const char *)(uintptr_t)a->chain_p;
    q.sp_req_chain.message = (const char *)(uintptr_t)a->message_p;
    q.morphology.addr = a->addr;
    q.morphology.length = (size_t)a->length;
    size_t at = 0;
    memcpy(rep + at, &rh, sizeof rh);
    at += sizeof rh;
    memcpy(rep + at, &pr, sizeof pr);
    at += sizeof pr;
    memcpy(rep + at, &q, sizeof q);
    at += sizeof q;
    for (uint32_t r = 0; r < nruns; r++) {
        uint32_t i = 0;
        while (os.o[i]->oid != d->run_oid[r])
            i++;
        struct fayt_direct_run run = {i, d->run_pages[r],
                                      (uint64_t)d->run_at[r] * FAYT_PAGE_SIZE,
                                      (uint64_t)d->run_page[r] * FAYT_PAGE_SIZE};
        memcpy(rep + at, &run, sizeof run);
        at += sizeof run;
    }
    k->calls_portal++;
    int se = send_fds(c->fd, rep, at, fds, (int)nfds);
    for (uint32_t i = 0; i < nfds; i++)
        if (!borrowed[i])
            close(fds[i]);
    if (se) {
        *err = se;
        return FAYT_FAST_UNSENT;
    }
    return FAYT_FAST_SERVED;
}
