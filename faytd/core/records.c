/* records.c: what the C path made and still holds (core.h).
 *
 * A share-point or ANON portal the C path made is "resident" here, by
 * (context, handle) and oldest first, until faytd's Python takes it over
 * (fayt_fast_take_resident), which it does before it handles any event of
 * its own; so Python never runs while a share-point it does not know
 * exists.
 *
 * Recycling: a share-point made here that its creator destroys while it
 * is still resident was only ever granted to that one context (faytd sent
 * its fd to nobody else), so its object can serve that context's next
 * share-point of the same size: it is kept (open, at most RECYCLE_MAX in
 * all), zeroed, and handed out again instead of a new object, which saves
 * the memfd, its first page, the keeper's round trip and the close (tens
 * of microseconds of system calls off the reply path).  Never across
 * contexts: an fd grants its whole object, and faytd sent this one to no
 * other.  It trusts the client not to have kept the fd or passed it on:
 * libportal closes it in the C call that reads the reply, the GIL held (no
 * fork() of another thread inherits it), and maps portals MADV_DONTFORK
 * (no fork child keeps a view); a faytd serving clients that pass portal
 * fds on runs with recycle_objects false (k->recycle 0).  A destroy whose
 * journal record failed is not recycled.  A context's kept objects go when
 * it ends (fayt_fast_conn_gone).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "deadline.h"
#include "internal.h"


static void kept_remove(struct fayt_core_priv *p, uint32_t i)
{
    memmove(&p->kept[i], &p->kept[i + 1], (size_t)(p->nkept - i - 1) * sizeof p->kept[0]);
    p->nkept--;
}

static void kept_drop(struct fayt_core *k, uint32_t i)
{
    struct fayt_core_priv *p = k->priv;
    close(p->kept[i].fd);
    fayt_objpool_release(k, p->kept[i].name);
    if (p->kept[i].split) {
        close(p->kept[i].fd2);
        fayt_objpool_release(k, p->kept[i].name2);
    }
    kept_remove(p, i);
}

/* A kept object of conn for r (its length, split or not; the latest kept):
 * its fd (name into r->object; the rest's into r->fd2, r->object2), or -1. */
int core_kept_take(struct fayt_core *k, struct fayt_fast_conn *conn, struct resident *r)
{
    struct fayt_core_priv *p = k->priv;
    for (uint32_t i = p->nkept; i-- > 0;) {
        if (p->kept[i].conn == conn && p->kept[i].length == r->length && p->kept[i].split == r->split) {
            int fd = p->kept[i].fd;
            memcpy(r->object, p->kept[i].name, FAYT_OBJ_NAME_MAX);
            if (r->split) {
                r->fd2 = p->kept[i].fd2;
                memcpy(r->object2, p->kept[i].name2, FAYT_OBJ_NAME_MAX);
            }
            kept_remove(p, i);
            return fd;
        }
    }
    return -1;
}

/* Keep r's object(s) for its creator; 0, or an errno (then release them). */
static int kept_put(struct fayt_core *k, struct resident *r)
{
    struct fayt_core_priv *p = k->priv;
    if (r->fd < 0 || (r->split && r->fd2 < 0))
        return EBADF;
    if (r->length > ZERO_AT_CREATE) {   /* its pages go now; it reads as zeros again */
        if (r->split ? fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                                 FAYT_PAGE_SIZE) < 0
                       || fallocate(r->fd2, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                                    (off_t)(r->length - FAYT_PAGE_SIZE)) < 0
                     : fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                                 (off_t)r->length) < 0)
            return errno;
    }
    if (p->nkept == RECYCLE_MAX)
        kept_drop(k, 0);               /* the oldest */
    p->kept[p->nkept].conn = r->conn;
    p->kept[p->nkept].length = r->length;
    p->kept[p->nkept].fd = r->fd;
    memcpy(p->kept[p->nkept].name, r->object, FAYT_OBJ_NAME_MAX);
    p->kept[p->nkept].split = r->split;
    p->kept[p->nkept].fd2 = r->fd2;
    memcpy(p->kept[p->nkept].name2, r->object2, FAYT_OBJ_NAME_MAX);
    p->nkept++;
    r->fd = r->fd2 = -1;
    return 0;
}

void fayt_fast_conn_gone(struct fayt_core *k, struct fayt_fast_conn *c)
{
    struct fayt_core_priv *p = k->priv;
    for (uint32_t i = p->nkept; i-- > 0;)
        if (p->kept[i].conn == c)
            kept_drop(k, i);
}

void fayt_fast_shutdown(struct fayt_core *k)
{
    struct fayt_core_priv *p = k->priv;
    while (p->nkept)
        kept_drop(k, p->nkept - 1);
}
static uint64_t hash_handle(uint32_t ctx_id, uint64_t handle)
{
    uint64_t h = (handle * 0x9E3779B97F4A7C15ULL) ^ ((uint64_t)ctx_id * 0xC2B2AE3D27D4EB4FULL);
    return h ^ (h >> 31);
}
static int handles_grow(struct fayt_core_priv *p)
{
    uint32_t nb = p->handles_nb ? p->handles_nb * 2 : 256;
    struct resident **b = calloc(nb, sizeof *b);
    if (!b)
        return ENOMEM;
    for (uint32_t i = 0; i < p->handles_nb; i++) {
        struct resident *r = p->by_handle[i];
        while (r) {
            struct resident *next = r->hnext;
            uint64_t h = hash_handle(r->ctx_id, r->handle) & (nb - 1);
            r->hnext = b[h];
            b[h] = r;
            r = next;
        }
    }
    free(p->by_handle);
    p->by_handle = b;
    p->handles_nb = nb;
    return 0;
}

struct resident *core_resident_find(struct fayt_core *k, uint32_t ctx_id, uint64_t handle)
{
    struct fayt_core_priv *p = k->priv;
    if (!p->handles_nb)
        return NULL;
    for (struct resident *r = p->by_handle[hash_handle(ctx_id, handle) & (p->handles_nb - 1)]; r;
         r = r->hnext)
        if (r->ctx_id == ctx_id && r->handle == handle)
            return r;
    return NULL;
}

int core_resident_insert(struct fayt_core *k, struct resident *r)
{
    struct fayt_core_priv *p = k->priv;
    if (p->handles_n >= p->handles_nb && handles_grow(p))
        return ENOMEM;
    uint64_t h = hash_handle(r->ctx_id, r->handle) & (p->handles_nb - 1);
    r->hnext = p->by_handle[h];
    p->by_handle[h] = r;
    p->handles_n++;
    r->next = NULL;
    r->prev = p->res_tail;
    if (p->res_tail)
        p->res_tail->next = r;
    else
        p->res_head = r;
    p->res_tail = r;
    return 0;
}

void core_resident_unlink(struct fayt_core *k, struct resident *r)
{
    struct fayt_core_priv *pv = k->priv;
    struct resident **p = &pv->by_handle[hash_handle(r->ctx_id, r->handle) & (pv->handles_nb - 1)];
    while (*p && *p != r)
        p = &(*p)->hnext;
    if (*p) {
        *p = r->hnext;
        pv->handles_n--;
    }
    if (r->prev)
        r->prev->next = r->next;
    else
        pv->res_head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        pv->res_tail = r->prev;
}

/* The object's fd kept in r for a recycle (at most RECYCLE_MAX), else closed. */
void core_hold_fd(struct fayt_core *k, struct resident *r, int ofd)
{
    struct fayt_core_priv *p = k->priv;
    if (p->resident_fds < RECYCLE_MAX) {
        r->fd = ofd;
        p->resident_fds++;
    } else {
        r->fd = -1;
        close(ofd);
        if (r->fd2 >= 0)
            close(r->fd2);
        r->fd2 = -1;
    }
}

/* An object r gave back: kept for its context's next portal of its size,
 * or released. */
void core_give_back(struct fayt_core *k, struct resident *r, int keep)
{
    struct fayt_core_priv *p = k->priv;
    if (r->fd >= 0)
        p->resident_fds--;
    if (!keep || !k->recycle || kept_put(k, r)) {
        if (r->fd >= 0)
            close(r->fd);
        if (r->fd2 >= 0)
            close(r->fd2);
        fayt_objpool_release(k, r->object);
        if (r->split)
            fayt_objpool_release(k, r->object2);
    }
}

/* A new resident record for c's portal of n frames: the frames (object
 * oid) taken, the record not yet in the tables.  NULL: no memory or frames. */
struct resident *core_resident_new(struct fayt_core *k, struct fayt_fast_conn *c,
                                   const struct fayt_req_hdr *h, int prot, uint32_t n,
                                   uint32_t type)
{
    struct resident *r = calloc(1, sizeof *r + n * sizeof(uint32_t));
    if (!r)
        return NULL;
    uint32_t oid = k->frames.next_oid;
    if (fayt_frames_alloc(&k->frames, n, oid, r->frames)) {
        free(r);
        return NULL;
    }
    r->fd = r->fd2 = -1;
    r->split = (type & FAYT_PORTAL_SHARE) && n > 1;
    r->conn = c;
    r->ctx_id = c->ctx_id;
    r->handle = c->next_handle;
    r->pid = c->pid;
    r->tid = h->tid;
    r->uid = c->uid;
    r->prot = prot;
    r->start = c->start;
    r->length = (uint64_t)n * FAYT_PAGE_SIZE;
    r->oid = oid;
    r->nframes = n;
    r->type = type;
    r->born = fayt_now_ns();
    return r;
}

/* Undo resident_new, and the object r took (its fd ofd, or -1). */
void core_resident_abandon(struct fayt_core *k, struct resident *r, int ofd)
{
    if (ofd >= 0) {
        close(ofd);
        fayt_objpool_release(k, r->object);
    }
    if (r->fd2 >= 0) {
        close(r->fd2);
        fayt_objpool_release(k, r->object2);
    }
    fayt_frames_put(&k->frames, r->frames, r->nframes);
    free(r);
}

/* The resident record of c's mapping named by an UNMAP or UNMAP_DESTROY
 * body, if it is of `type`; else NULL (Python performs the call). */
struct resident *core_resident_of(struct fayt_core *k, struct fayt_fast_conn *c,
                                  const struct fayt_req_hdr *h, const uint8_t *body,
                                  size_t blen, uint32_t type)
{
    struct fayt_handle_req hr;
    if (blen != sizeof hr || (h->flags & ~FAYT_REQ_NOREPLY))
        return NULL;
    memcpy(&hr, body, sizeof hr);
    struct resident *r = core_resident_find(k, c->ctx_id, hr.handle);
    return r && r->conn == c && r->type == type ? r : NULL;
}

/* The end of a performed call: its reply's fate (se: send_reply's errno). */
int64_t fayt_fast_oldest_resident(struct fayt_core *k)
{
    struct fayt_core_priv *p = k->priv;
    return p->res_head ? p->res_head->born : 0;
}

int fayt_fast_take_resident(struct fayt_core *k, struct fayt_fast_resident *out,
                            uint32_t *frames, uint32_t max)
{
    struct fayt_core_priv *p = k->priv;
    struct resident *r = p->res_head;
    if (!r)
        return 0;
    if (r->nframes > max)
        return -ENOSPC;
    core_resident_unlink(k, r);
    if (r->name)
        r->name->res = NULL;
    k->nresident--;
    r->conn->resident--;
    out->sp_id = r->sp_id;
    out->ctx_id = r->ctx_id;
    out->handle = r->handle;
    out->pid = r->pid;
    out->tid = r->tid;
    out->uid = r->uid;
    out->prot = r->prot;
    out->start = r->start;
    out->length = r->length;
    out->oid = r->oid;
    out->nframes = r->nframes;
    out->type = r->type;
    out->ident_len = r->name ? r->name->len : 0;
    if (r->split)                       /* "<page 0>+<the rest>", as the journal has it */
        snprintf(out->object, sizeof out->object, "%s+%s", r->object, r->object2);
    else
        memcpy(out->object, r->object, sizeof out->object);
    if (r->name)
        memcpy(out->identifier, r->name->key, r->name->len);
    out->identifier[out->ident_len] = 0;
    memcpy(frames, r->frames, (size_t)r->nframes * sizeof(uint32_t));
    if (r->fd2 >= 0)
        close(r->fd2);
    if (r->fd >= 0) {                   /* Python keeps names, not descriptors */
        close(r->fd);
        p->resident_fds--;
    }
    free(r);
    return 1;
}


void core_records_fini(struct fayt_core *k)
{
    struct fayt_core_priv *p = k->priv;
    while (p->res_head) {
        struct resident *r = p->res_head;
        core_resident_unlink(k, r);
        free(r);
    }
    free(p->by_handle);
    p->by_handle = NULL;
    p->handles_nb = p->handles_n = 0;
}
