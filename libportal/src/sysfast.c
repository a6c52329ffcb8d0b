/* sysfast.c: faytd's fast system calls (fayt/kernel.h).
 *
 * Creating a share-point and its creator destroying it again are the calls
 * a share-point's life costs; in Python they cost faytd tens of
 * microseconds each.  Here, on one connection's readable event, one
 * recvmsg(2) reads the request; if it is
 *   PORTAL(SHARE|ANON, create) of an identifier not in the table, valid,
 *     within every quota, from a thread already known, with no fds (one
 *     of more than one page is two objects, page 0 and the rest, both
 *     sent: FAYT_PORTAL_REPLY_SPLIT), or
 *   UNMAP_DESTROY of a share-point this path created and still holds, or
 *   PORTAL(ANON) and the UNMAP of an ANON portal this path made,
 * it is performed and answered here (frames, a pooled object, the
 * meta-structure, the journal record, the reply with SCM_RIGHTS), exactly
 * as faytd/syscall.py would.  Everything else, errors included, is handed
 * back unperformed: Python decides every refusal, with its messages.
 *
 * Recycling: a share-point made here that its creator destroys while it
 * is still resident was only ever granted to that one context (faytd sent
 * its fd to nobody else), so its object can serve that context's next
 * share-point of the same size: it is kept (open, at most RECYCLE_MAX in
 * all), zeroed, and handed out again instead of a new object, which saves
 * the memfd, its first page, the keeper's round trip and the close (tens
 * of microseconds of system calls off the reply path here).  Never across contexts: an fd grants its whole object, and faytd
 * sent this one to no other.  It trusts the client not to have kept the fd
 * or passed it on: libportal closes it in the C call that reads the reply,
 * the GIL held (no fork() of another thread inherits it), and maps portals
 * MADV_DONTFORK (no fork child keeps a view); a faytd serving clients that
 * pass portal fds on runs with recycle_objects false (k->recycle 0).  A
 * destroy whose journal record failed is not recycled.  A context's kept
 * objects go when it ends (fayt_fast_conn_gone).
 *
 * The share-points made here stay "resident" (C's) until faytd's Python
 * takes them over (fayt_fast_take_resident), which it does before it
 * handles any event of its own; so Python never runs while a share-point
 * it does not know exists.  Single-threaded: faytd's loop thread is the
 * only caller.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "deadline.h"
#include "fayt/kernel.h"
#include "fayt/lock.h"
#include "fayt/portal.h"
#include "fayt/sharepoint.h"
#include "fayt/syscall.h"

#define FAST_MAX_FRAMES FAYT_FAST_MAX_FRAMES
#define RECYCLE_MAX 64            /* objects kept for their context's next create */
#define RESIDENT_MAX 64           /* then creates go through Python, which takes them over */
#define ZERO_AT_CREATE 16384      /* up to this, a recycled object is zeroed by the meta's write */
#define JOURNAL_LINE_MAX (128 + 2 * FAYT_OBJ_NAME_MAX + FAST_MAX_FRAMES * 11 + 2 * FAYT_NAME_MAX)

/* -- tables ----------------------------------------------------------- */
struct resident;

struct name_ent {
    struct name_ent *next;
    uint64_t hash;
    uint32_t len;
    struct resident *res;          /* NULL once Python owns the share-point */
    char key[];
};

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

/* Objects kept for their context's next share-point (see above). */
struct kept {
    struct fayt_fast_conn *conn;
    uint64_t length;
    int fd;
    char name[FAYT_OBJ_NAME_MAX];
    int split;                     /* a share-point's pair: fd2, name2 the rest */
    int fd2;
    char name2[FAYT_OBJ_NAME_MAX];
};
static struct kept kept[RECYCLE_MAX];
static uint32_t nkept;
static uint32_t resident_fds;     /* residents holding their fd: at most RECYCLE_MAX */

/* kept[] is in the order the objects were kept, oldest first. */
static void kept_remove(uint32_t i)
{
    memmove(&kept[i], &kept[i + 1], (size_t)(nkept - i - 1) * sizeof kept[0]);
    nkept--;
}

static void kept_drop(uint32_t i)
{
    close(kept[i].fd);
    fayt_objpool_release(kept[i].name);
    if (kept[i].split) {
        close(kept[i].fd2);
        fayt_objpool_release(kept[i].name2);
    }
    kept_remove(i);
}

/* A kept object of conn for r (its length, split or not; the latest kept):
 * its fd (name into r->object; the rest's into r->fd2, r->object2), or -1. */
static int kept_take(struct fayt_fast_conn *conn, struct resident *r)
{
    for (uint32_t i = nkept; i-- > 0;) {
        if (kept[i].conn == conn && kept[i].length == r->length && kept[i].split == r->split) {
            int fd = kept[i].fd;
            memcpy(r->object, kept[i].name, FAYT_OBJ_NAME_MAX);
            if (r->split) {
                r->fd2 = kept[i].fd2;
                memcpy(r->object2, kept[i].name2, FAYT_OBJ_NAME_MAX);
            }
            kept_remove(i);
            return fd;
        }
    }
    return -1;
}

/* Keep r's object(s) for its creator; 0, or an errno (then release them). */
static int kept_put(struct resident *r)
{
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
    if (nkept == RECYCLE_MAX)
        kept_drop(0);               /* the oldest */
    kept[nkept].conn = r->conn;
    kept[nkept].length = r->length;
    kept[nkept].fd = r->fd;
    memcpy(kept[nkept].name, r->object, FAYT_OBJ_NAME_MAX);
    kept[nkept].split = r->split;
    kept[nkept].fd2 = r->fd2;
    memcpy(kept[nkept].name2, r->object2, FAYT_OBJ_NAME_MAX);
    nkept++;
    r->fd = r->fd2 = -1;
    return 0;
}

void fayt_fast_conn_gone(struct fayt_fast_kernel *k, struct fayt_fast_conn *c)
{
    (void)k;
    for (uint32_t i = nkept; i-- > 0;)
        if (kept[i].conn == c)
            kept_drop(i);
}

void fayt_fast_shutdown(struct fayt_fast_kernel *k)
{
    (void)k;
    while (nkept)
        kept_drop(nkept - 1);
}

static struct name_ent **names;
static uint32_t names_nb, names_n;
static struct resident **by_handle;
static uint32_t handles_nb, handles_n;
static struct resident *res_head, *res_tail;

/* Identifiers are chosen by clients: the table is keyed with SipHash-2-4
 * (Aumasson and Bernstein) under a key drawn at start, as Python's dict is,
 * so that no client can pick names that all fall into one bucket. */
static uint64_t sip_k0, sip_k1;
static int sip_keyed;

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                         \
    do {                                                                 \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);         \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                           \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                           \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);         \
    } while (0)

static uint64_t hash_bytes(const char *s, uint32_t n)
{
    if (!sip_keyed) {
        uint64_t k[2] = {0, 0};
        if (getrandom(k, sizeof k, GRND_NONBLOCK) != (ssize_t)sizeof k) {
            /* No entropy yet (early boot): what this run alone has. */
            struct timespec t;
            clock_gettime(CLOCK_MONOTONIC, &t);
            k[0] ^= (uint64_t)t.tv_nsec * 0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid() << 32;
            k[1] ^= (uint64_t)(uintptr_t)&sip_k0 ^ (uint64_t)t.tv_sec * 0xC2B2AE3D27D4EB4FULL;
        }
        sip_k0 = k[0];
        sip_k1 = k[1];
        sip_keyed = 1;
    }
    uint64_t v0 = sip_k0 ^ 0x736f6d6570736575ULL, v1 = sip_k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = sip_k0 ^ 0x6c7967656e657261ULL, v3 = sip_k1 ^ 0x7465646279746573ULL;
    const unsigned char *p = (const unsigned char *)s;
    uint32_t left = n;
    while (left >= 8) {
        uint64_t m;
        memcpy(&m, p, 8);               /* little-endian on the machines faytd runs on */
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
        p += 8;
        left -= 8;
    }
    uint64_t b = (uint64_t)n << 56;
    for (uint32_t i = 0; i < left; i++)
        b |= (uint64_t)p[i] << (8 * i);
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static uint64_t hash_handle(uint32_t ctx_id, uint64_t handle)
{
    uint64_t h = (handle * 0x9E3779B97F4A7C15ULL) ^ ((uint64_t)ctx_id * 0xC2B2AE3D27D4EB4FULL);
    return h ^ (h >> 31);
}

static int names_grow(void)
{
    uint32_t nb = names_nb ? names_nb * 2 : 1024;
    struct name_ent **b = calloc(nb, sizeof *b);
    if (!b)
        return ENOMEM;
    for (uint32_t i = 0; i < names_nb; i++) {
        struct name_ent *e = names[i];
        while (e) {
            struct name_ent *next = e->next;
            e->next = b[e->hash & (nb - 1)];
            b[e->hash & (nb - 1)] = e;
            e = next;
        }
    }
    free(names);
    names = b;
    names_nb = nb;
    return 0;
}

static struct name_ent *name_find(const char *s, uint32_t n, uint64_t h)
{
    if (!names_nb)
        return NULL;
    for (struct name_ent *e = names[h & (names_nb - 1)]; e; e = e->next)
        if (e->hash == h && e->len == n && memcmp(e->key, s, n) == 0)
            return e;
    return NULL;
}

static struct name_ent *name_insert(const char *s, uint32_t n, int *err)
{
    uint64_t h = hash_bytes(s, n);
    if (name_find(s, n, h)) {
        *err = EEXIST;
        return NULL;
    }
    if (names_n >= names_nb && names_grow()) {
        *err = ENOMEM;
        return NULL;
    }
    struct name_ent *e = malloc(sizeof *e + n);
    if (!e) {
        *err = ENOMEM;
        return NULL;
    }
    e->hash = h;
    e->len = n;
    e->res = NULL;
    memcpy(e->key, s, n);
    e->next = names[h & (names_nb - 1)];
    names[h & (names_nb - 1)] = e;
    names_n++;
    return e;
}

static void name_remove(struct name_ent *e)
{
    struct name_ent **p = &names[e->hash & (names_nb - 1)];
    while (*p && *p != e)
        p = &(*p)->next;
    if (*p) {
        *p = e->next;
        names_n--;
    }
    free(e);
}

int fayt_fast_name_add(struct fayt_fast_kernel *k, const char *ident, uint32_t len)
{
    int err = 0;
    if (!name_insert(ident, len, &err))
        return err;
    k->nsharepoints++;
    return 0;
}

int fayt_fast_name_del(struct fayt_fast_kernel *k, const char *ident, uint32_t len)
{
    struct name_ent *e = name_find(ident, len, hash_bytes(ident, len));
    if (!e)
        return ENOENT;
    if (e->res)                 /* Python never destroys what it has not taken over */
        return EBUSY;
    name_remove(e);
    k->nsharepoints--;
    return 0;
}

static int handles_grow(void)
{
    uint32_t nb = handles_nb ? handles_nb * 2 : 256;
    struct resident **b = calloc(nb, sizeof *b);
    if (!b)
        return ENOMEM;
    for (uint32_t i = 0; i < handles_nb; i++) {
        struct resident *r = by_handle[i];
        while (r) {
            struct resident *next = r->hnext;
            uint64_t h = hash_handle(r->ctx_id, r->handle) & (nb - 1);
            r->hnext = b[h];
            b[h] = r;
            r = next;
        }
    }
    free(by_handle);
    by_handle = b;
    handles_nb = nb;
    return 0;
}

static struct resident *resident_find(uint32_t ctx_id, uint64_t handle)
{
    if (!handles_nb)
        return NULL;
    for (struct resident *r = by_handle[hash_handle(ctx_id, handle) & (handles_nb - 1)]; r;
         r = r->hnext)
        if (r->ctx_id == ctx_id && r->handle == handle)
            return r;
    return NULL;
}

static int resident_insert(struct resident *r)
{
    if (handles_n >= handles_nb && handles_grow())
        return ENOMEM;
    uint64_t h = hash_handle(r->ctx_id, r->handle) & (handles_nb - 1);
    r->hnext = by_handle[h];
    by_handle[h] = r;
    handles_n++;
    r->next = NULL;
    r->prev = res_tail;
    if (res_tail)
        res_tail->next = r;
    else
        res_head = r;
    res_tail = r;
    return 0;
}

static void resident_unlink(struct resident *r)
{
    struct resident **p = &by_handle[hash_handle(r->ctx_id, r->handle) & (handles_nb - 1)];
    while (*p && *p != r)
        p = &(*p)->hnext;
    if (*p) {
        *p = r->hnext;
        handles_n--;
    }
    if (r->prev)
        r->prev->next = r->next;
    else
        res_head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        res_tail = r->prev;
}

/* -- checks ----------------------------------------------------------- */
/* Strict UTF-8, as Python's decode("utf-8") takes it: no overlong forms, no
 * surrogates, nothing above U+10FFFF. */
static int utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t k;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            k = 1;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 2;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (i + k >= n)
            return 0;
        for (size_t j = 1; j <= k; j++) {
            unsigned b = s[i + j];
            if ((b & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (b & 0x3F);
        }
        if (k == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF)))
            return 0;
        if (k == 3 && (cp < 0x10000 || cp > 0x10FFFF))
            return 0;
        i += k + 1;
    }
    return 1;
}

/* 0, or -1 if the record could not be written (counted for Python's log). */
static int journal_write(struct fayt_fast_kernel *k, const char *line, size_t n, int live)
{
    if (k->journal_fd < 0)
        return 0;
    k->journal_lines++;
    k->journal_live += live;
    ssize_t w = write(k->journal_fd, line, n);
    if (w != (ssize_t)n) {
        k->journal_errors++;
        return -1;
    }
    return 0;
}

static int send_reply(int fd, const void *msg, size_t n, int pass_fd, int pass_fd2)
{
    struct iovec iov = {(void *)msg, n};
    struct msghdr mh = {0};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(2 * sizeof(int))];
    } cbuf;
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (pass_fd >= 0) {
        int fds[2] = {pass_fd, pass_fd2}, nf = pass_fd2 >= 0 ? 2 : 1;
        memset(&cbuf, 0, sizeof cbuf);
        mh.msg_control = cbuf.buf;
        mh.msg_controllen = CMSG_SPACE(nf * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(nf * sizeof(int));
        memcpy(CMSG_DATA(c), fds, nf * sizeof(int));
    }
    ssize_t r;
    do {
        r = sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? errno : 0;
}

/* r's frames' physical addresses, 8 bytes each, at dst (unaligned). */
static void write_paddrs(uint8_t *dst, const struct resident *r)
{
    for (uint32_t i = 0; i < r->nframes; i++) {
        uint64_t pa = FAYT_RAM_BASE + (uint64_t)r->frames[i] * FAYT_PAGE_SIZE;
        memcpy(dst + (size_t)i * 8, &pa, 8);
    }
}

/* Reply to a portal call: fayt_portal_reply, the request's portal_req with
 * its morphology filled, paddr[] (the frames'); the object's fd with it. */
static int portal_reply(struct fayt_fast_conn *c, const struct fayt_req_hdr *h,
                        struct portal_req *req, const struct resident *r, uint64_t data_offset,
                        uint32_t flags, int ofd)
{
    uint8_t rep[sizeof(struct fayt_rep_hdr) + sizeof(struct fayt_portal_reply)
                + sizeof(struct portal_req) + FAST_MAX_FRAMES * 8];
    struct fayt_rep_hdr rh = {FAYT_REP_MAGIC, h->op, r->split ? 2 : 1, h->seq, 0};
    struct fayt_portal_reply pr = {0};
    pr.handle = r->handle;
    pr.map_length = r->length;
    pr.data_offset = data_offset;
    pr.sp_id = r->type & FAYT_PORTAL_SHARE ? r->sp_id : 0;
    pr.nframes = r->nframes;
    pr.prot = req->prot;
    pr.flags = flags | (r->split ? FAYT_PORTAL_REPLY_SPLIT : 0);
    req->morphology.length = r->length;
    size_t at = 0;
    memcpy(rep + at, &rh, sizeof rh);
    at += sizeof rh;
    memcpy(rep + at, &pr, sizeof pr);
    at += sizeof pr;
    memcpy(rep + at, req, sizeof *req);
    at += sizeof *req;
    write_paddrs(rep + at, r);
    at += (size_t)r->nframes * 8;
    return send_reply(c->fd, rep, at, ofd, r->split ? r->fd2 : -1);
}

/* The object's fd kept in r for a recycle (at most RECYCLE_MAX), else closed. */
static void hold_fd(struct resident *r, int ofd)
{
    if (resident_fds < RECYCLE_MAX) {
        r->fd = ofd;
        resident_fds++;
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
static void give_back(struct fayt_fast_kernel *k, struct resident *r, int keep)
{
    if (r->fd >= 0)
        resident_fds--;
    if (!keep || !k->recycle || kept_put(r)) {
        if (r->fd >= 0)
            close(r->fd);
        if (r->fd2 >= 0)
            close(r->fd2);
        fayt_objpool_release(r->object);
        if (r->split)
            fayt_objpool_release(r->object2);
    }
}

/* A new resident record for c's portal of n frames: the frames (object
 * oid) taken, the record not yet in the tables.  NULL: no memory or frames. */
static struct resident *resident_new(struct fayt_fast_kernel *k, struct fayt_fast_conn *c,
                                     const struct fayt_req_hdr *h, int prot, uint32_t n,
                                     uint32_t type)
{
    struct resident *r = calloc(1, sizeof *r + n * sizeof(uint32_t));
    if (!r)
        return NULL;
    uint32_t oid = k->frames->next_oid;
    if (fayt_frames_alloc(k->frames, n, oid, r->frames)) {
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
static void resident_abandon(struct fayt_fast_kernel *k, struct resident *r, int ofd)
{
    if (ofd >= 0) {
        close(ofd);
        fayt_objpool_release(r->object);
    }
    if (r->fd2 >= 0) {
        close(r->fd2);
        fayt_objpool_release(r->object2);
    }
    fayt_frames_put(k->frames, r->frames, r->nframes);
    free(r);
}

/* The resident record of c's mapping named by an UNMAP or UNMAP_DESTROY
 * body, if it is of `type`; else NULL (Python performs the call). */
static struct resident *resident_of(struct fayt_fast_conn *c, const struct fayt_req_hdr *h,
                                    const uint8_t *body, size_t blen, uint32_t type)
{
    struct fayt_handle_req hr;
    if (blen != sizeof hr || (h->flags & ~FAYT_REQ_NOREPLY))
        return NULL;
    memcpy(&hr, body, sizeof hr);
    struct resident *r = resident_find(c->ctx_id, hr.handle);
    return r && r->conn == c && r->type == type ? r : NULL;
}

/* The end of a performed call: its reply's fate (se: send_reply's errno). */
static int served(int se, int *err)
{
    if (se) {
        *err = se;
        return FAYT_FAST_UNSENT;
    }
    return FAYT_FAST_SERVED;
}

/* The empty answer of an UNMAP or UNMAP_DESTROY, unless it was NOREPLY. */
static int acknowledge(struct fayt_fast_conn *c, const struct fayt_req_hdr *h, int *err)
{
    if (h->flags & FAYT_REQ_NOREPLY)
        return FAYT_FAST_SERVED;
    struct fayt_rep_hdr rh = {FAYT_REP_MAGIC, h->op, 0, h->seq, 0};
    return served(send_reply(c->fd, &rh, sizeof rh, -1, -1), err);
}

/* pwrite the first n bytes of r's object(s) (past page 0 of a split
 * share-point, into the rest's object): 0 or -1. */
static int write_object(const struct resident *r, int ofd, const uint8_t *buf, size_t n)
{
    size_t first = r->split && n > FAYT_PAGE_SIZE ? FAYT_PAGE_SIZE : n;
    if (pwrite(ofd, buf, first, 0) != (ssize_t)first)
        return -1;
    if (first < n && pwrite(r->fd2, buf + first, n - first, 0) != (ssize_t)(n - first))
        return -1;
    return 0;
}

/* -- PORTAL(ANON) and its UNMAP ------------------------------------------- */
static int fast_anon(struct fayt_fast_kernel *k, struct fayt_fast_conn *c,
                     const struct fayt_req_hdr *h, struct portal_req *req, int *err)
{
    uint32_t n = ((uint32_t)req->length + FAYT_PAGE_SIZE - 1) / FAYT_PAGE_SIZE;
    uint64_t bytes = (uint64_t)n * FAYT_PAGE_SIZE;
    if (!(c->flags & FAYT_FAST_CONN_ANON) || req->share.identifier || n > FAST_MAX_FRAMES
        || k->nresident >= RESIDENT_MAX
        || c->py_mappings + c->resident >= k->max_mappings
        || c->ram + bytes > k->max_ram_per_context
        || n > fayt_frames_free(k->frames))
        return FAYT_FAST_PASS;          /* Python refuses it, with its message */
    struct resident *r = resident_new(k, c, h, req->prot, n, FAYT_PORTAL_ANON);
    if (!r)
        return FAYT_FAST_PASS;
    int ofd = kept_take(c, r);
    if (ofd >= 0 && bytes <= ZERO_AT_CREATE) {
        static const uint8_t zeros[ZERO_AT_CREATE];   /* a portal's memory starts as zeros */
        if (pwrite(ofd, zeros, bytes, 0) != (ssize_t)bytes) {
            close(ofd);
            fayt_objpool_release(r->object);
            ofd = -1;
        }
    }
    if (ofd < 0)
        ofd = fayt_objpool_take(bytes, NULL, r->object);
    if (ofd < 0 || resident_insert(r)) {
        resident_abandon(k, r, ofd);
        return FAYT_FAST_PASS;
    }
    k->frames->next_oid++;
    k->nresident++;
    k->anon_maps++;
    c->next_handle++;
    c->ram += bytes;
    c->resident++;
    int se = portal_reply(c, h, req, r, 0, 0, ofd);
    hold_fd(r, ofd);
    return served(se, err);
}

static int fast_unmap(struct fayt_fast_kernel *k, struct fayt_fast_conn *c,
                      const struct fayt_req_hdr *h, const uint8_t *body, size_t blen, int *err)
{
    struct resident *r = resident_of(c, h, body, blen, FAYT_PORTAL_ANON);
    if (!r)
        return FAYT_FAST_PASS;
    resident_unlink(r);
    k->nresident--;
    k->anon_unmaps++;
    c->ram -= r->length;
    c->resident--;
    fayt_frames_put(k->frames, r->frames, r->nframes);
    give_back(k, r, 1);
    free(r);
    return acknowledge(c, h, err);
}

/* -- PORTAL(SHARE|ANON, create) ------------------------------------------ */
static int fast_create(struct fayt_fast_kernel *k, struct fayt_fast_conn *c,
                       const struct fayt_req_hdr *h, const uint8_t *body, size_t blen, int *err)
{
    struct portal_req req;
    if (blen < sizeof req || h->flags)
        return FAYT_FAST_PASS;
    memcpy(&req, body, sizeof req);
    if ((req.prot & ~FAYT_PROT_ALL) || req.morphology.addr % FAYT_PAGE_SIZE
        || req.sp_req_chain.name || req.sp_req_chain.message || req.length <= 0
        || (uint64_t)req.length > k->max_portal_length
        || (req.morphology.length != 0 && req.morphology.length != (size_t)req.length)
        || c->tid == 0 || h->tid != c->tid)
        return FAYT_FAST_PASS;
    if (req.type == FAYT_PORTAL_ANON)
        return fast_anon(k, c, h, &req, err);
    if (req.type != (FAYT_PORTAL_SHARE | FAYT_PORTAL_ANON) || req.share.create != FAYT_SHARE_CREATE
        || req.share.type != FAYT_SHARE_TRIVIAL || !(c->flags & FAYT_FAST_CONN_SHARE))
        return FAYT_FAST_PASS;
    /* share.identifier: 1 + its offset in the trailer, NUL-terminated there. */
    uintptr_t ip = (uintptr_t)req.share.identifier;
    if (ip == 0 || ip - 1 >= blen - sizeof req)
        return FAYT_FAST_PASS;
    const char *ident = (const char *)body + sizeof req + (ip - 1);
    size_t room = blen - sizeof req - (ip - 1);
    const char *nul = memchr(ident, 0, room < FAYT_NAME_MAX + 1 ? room : FAYT_NAME_MAX + 1);
    if (!nul || nul == ident || !utf8_valid((const unsigned char *)ident, nul - ident))
        return FAYT_FAST_PASS;
    uint32_t ilen = (uint32_t)(nul - ident);

    uint32_t n = ((uint32_t)req.length + FAYT_PAGE_SIZE - 1) / FAYT_PAGE_SIZE;
    uint64_t bytes = (uint64_t)n * FAYT_PAGE_SIZE;
    size_t data_offset = fayt_sp_data_offset(n);
    /* A share-point of more than one page is two objects (page 0 and the
     * rest, FAYT_PORTAL_REPLY_SPLIT); one created without PROT_WRITE would
     * give its creator the rest read-only: Python makes that. */
    if (n > FAST_MAX_FRAMES || data_offset >= bytes
        || (n > 1 && !(req.prot & FAYT_PROT_WRITE))
        || k->nresident >= RESIDENT_MAX
        || c->py_mappings + c->resident >= k->max_mappings
        || c->ram + bytes > k->max_ram_per_context
        || k->nsharepoints >= k->max_sharepoints
        || n > fayt_frames_free(k->frames)
        || name_find(ident, ilen, hash_bytes(ident, ilen)))
        return FAYT_FAST_PASS;          /* Python refuses, or catches up first */

    struct resident *r = resident_new(k, c, h, req.prot, n, FAYT_PORTAL_SHARE | FAYT_PORTAL_ANON);
    if (!r)
        return FAYT_FAST_PASS;
    int recycled = 1;
    int ofd = kept_take(c, r);
    if (ofd < 0) {
        recycled = 0;
        ofd = fayt_objpool_take(r->split ? FAYT_PAGE_SIZE : bytes, NULL, r->object);
        if (ofd >= 0 && r->split) {
            r->fd2 = fayt_objpool_take(bytes - FAYT_PAGE_SIZE, NULL, r->object2);
            if (r->fd2 < 0) {
                r->fd2 = -1;
                resident_abandon(k, r, ofd);
                return FAYT_FAST_PASS;
            }
        }
    }
    if (ofd < 0) {
        resident_abandon(k, r, -1);
        return FAYT_FAST_PASS;          /* Python tries again and reports why */
    }

    /* The meta-structure: lock free, prot, data length, the morphology; a
     * recycled small object is zeroed by the same write. */
    uint8_t meta[ZERO_AT_CREATE > sizeof(struct fayt_sharepoint_meta) + FAST_MAX_FRAMES * 8
                 ? ZERO_AT_CREATE : sizeof(struct fayt_sharepoint_meta) + FAST_MAX_FRAMES * 8];
    struct fayt_sharepoint_meta m = {0};
    m.prot = req.prot;
    m.length = bytes - data_offset;
    m.morphology.length = bytes;
    memcpy(meta, &m, sizeof m);
    write_paddrs(meta + sizeof m, r);
    size_t mlen = sizeof m + (size_t)n * 8;
    if (recycled && bytes <= ZERO_AT_CREATE) {
        memset(meta + mlen, 0, bytes - mlen);
        mlen = bytes;
    }
    uint32_t sp_id = k->next_sp_id;
    int e = 0;
    struct name_ent *ne = NULL;
    if (write_object(r, ofd, meta, mlen)
        || !(ne = name_insert(ident, ilen, &e)) || resident_insert(r)) {
        if (ne)
            name_remove(ne);
        resident_abandon(k, r, ofd);
        return FAYT_FAST_PASS;
    }
    k->frames->next_oid++;
    r->name = ne;
    r->sp_id = sp_id;
    ne->res = r;
    k->next_sp_id = (sp_id % 0xfffffffeU) + 1;
    k->nsharepoints++;
    k->nresident++;
    k->creates++;
    c->next_handle++;
    c->ram += bytes;
    c->resident++;
    fayt_frames_get(k->frames, r->frames, n);   /* the mapping's; the table holds one */

    /* The journal record, as faytd/journal.py writes it. */
    char line[JOURNAL_LINE_MAX];
    int pos = snprintf(line, sizeof line, "S %u %d %llu %u %d %llu %s%s%s ", sp_id, c->pid,
                       (unsigned long long)c->start, c->uid, req.prot,
                       (unsigned long long)bytes, r->object, r->split ? "+" : "",
                       r->split ? r->object2 : "");
    for (uint32_t i = 0; i < n; i++)
        pos += snprintf(line + pos, sizeof line - pos, i ? ",%u" : "%u", r->frames[i]);
    line[pos++] = ' ';
    for (uint32_t i = 0; i < ilen; i++)
        pos += snprintf(line + pos, sizeof line - pos, "%02x", (unsigned char)ident[i]);
    line[pos++] = '\n';
    journal_write(k, line, pos, 1);

    int se = portal_reply(c, h, &req, r, data_offset, FAYT_PORTAL_REPLY_CREATED, ofd);
    hold_fd(r, ofd);
    return served(se, err);
}

/* -- UNMAP_DESTROY of a resident share-point by its creator ----------------- */
static int fast_destroy(struct fayt_fast_kernel *k, struct fayt_fast_conn *c,
                        const struct fayt_req_hdr *h, const uint8_t *body, size_t blen, int *err)
{
    struct resident *r = resident_of(c, h, body, blen, FAYT_PORTAL_SHARE | FAYT_PORTAL_ANON);
    if (!r || (c->flags & FAYT_FAST_CONN_NOTICES))
        return FAYT_FAST_PASS;
    char line[32];
    int pos = snprintf(line, sizeof line, "D %u\n", r->sp_id);
    /* A destroy the journal does not know must not lend its object to a new
     * share-point: a restart would take both back, on one object. */
    int keep = journal_write(k, line, pos, -1) == 0;
    resident_unlink(r);
    name_remove(r->name);
    k->nsharepoints--;
    k->nresident--;
    k->destroys++;
    c->ram -= r->length;
    c->resident--;
    /* The table's reference and the mapping's: the frames are free, and the
     * object goes (the client's mapping keeps its pages until it unmaps). */
    fayt_frames_put(k->frames, r->frames, r->nframes);
    fayt_frames_put(k->frames, r->frames, r->nframes);
    give_back(k, r, keep);
    free(r);
    return acknowledge(c, h, err);
}

/* -- the entry point ------------------------------------------------------ */
int fayt_fast_serve(struct fayt_fast_kernel *k, struct fayt_fast_conn *c, uint8_t *buf,
                    struct fayt_fast_msg *msg, int *noreply_out, int *err)
{
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int) * FAYT_FAST_MAX_FDS)];
    } cbuf;
    struct iovec iov = {buf, FAYT_MSG_MAX};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.buf;
    mh.msg_controllen = sizeof cbuf.buf;
    ssize_t r;
    do {
        r = recvmsg(c->fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        return errno == EAGAIN ? FAYT_FAST_AGAIN : -errno;
    msg->len = (int32_t)r;
    msg->mflags = mh.msg_flags;
    msg->nfds = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t nf = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < nf; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
            if (msg->nfds < FAYT_FAST_MAX_FDS)
                msg->fds[msg->nfds++] = fd;
            else
                close(fd);
        }
    }
    struct fayt_req_hdr h;
    if (noreply_out)
        *noreply_out = 0;
    if ((size_t)r < sizeof h)
        return FAYT_FAST_PASS;
    memcpy(&h, buf, sizeof h);
    if (noreply_out)
        *noreply_out = (h.flags & FAYT_REQ_NOREPLY) != 0;
    if (k->disabled || h.magic != FAYT_REQ_MAGIC || msg->nfds
        || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)))
        return FAYT_FAST_PASS;
    const uint8_t *body = buf + sizeof h;
    size_t blen = (size_t)r - sizeof h;
    if (h.op == FAYT_SYS_PORTAL)
        return fast_create(k, c, &h, body, blen, err);
    if (h.op == FAYT_SYS_UNMAP_DESTROY)
        return fast_destroy(k, c, &h, body, blen, err);
    if (h.op == FAYT_SYS_UNMAP)
        return fast_unmap(k, c, &h, body, blen, err);
    return FAYT_FAST_PASS;
}

int64_t fayt_fast_oldest_resident(struct fayt_fast_kernel *k)
{
    (void)k;
    return res_head ? res_head->born : 0;
}

int fayt_fast_take_resident(struct fayt_fast_kernel *k, struct fayt_fast_resident *out,
                            uint32_t *frames, uint32_t max)
{
    struct resident *r = res_head;
    if (!r)
        return 0;
    if (r->nframes > max)
        return -ENOSPC;
    resident_unlink(r);
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
        resident_fds--;
    }
    free(r);
    return 1;
}

/* -- faytd's wait ------------------------------------------------------- */
static struct fayt_fast_conn **watched;    /* by fd */
static int nwatched;

int fayt_fast_watch(struct fayt_fast_kernel *k, struct fayt_fast_conn *c)
{
    (void)k;
    if (c->fd < 0)
        return EBADF;
    if (c->fd >= nwatched) {
        int n = nwatched ? nwatched : 256;
        while (n <= c->fd)
            n *= 2;
        struct fayt_fast_conn **w = realloc(watched, (size_t)n * sizeof *w);
        if (!w)
            return ENOMEM;
        memset(w + nwatched, 0, (size_t)(n - nwatched) * sizeof *w);
        watched = w;
        nwatched = n;
    }
    watched[c->fd] = c;
    return 0;
}

void fayt_fast_unwatch(struct fayt_fast_kernel *k, int fd)
{
    (void)k;
    if (fd >= 0 && fd < nwatched)
        watched[fd] = NULL;
}

int fayt_fast_poll(struct fayt_fast_kernel *k, int epfd, int64_t spin_ns, int timeout_ms,
                   struct fayt_fast_event *out, int max, uint8_t *buf, struct fayt_fast_io *io)
{
    struct epoll_event evs[64];
    int served = 0, block = 0;
    int64_t until = 0;
    io->passed_fd = -1;
    if (max > 64)
        max = 64;
    for (;;) {
        int n = epoll_wait(epfd, evs, max, block ? timeout_ms : 0);
        if (n < 0)
            return errno == EINTR ? 0 : -errno;
        if (block && n == 0)
            return 0;                   /* timed out */
        block = 0;
        int m = 0;
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            struct fayt_fast_conn *c = fd >= 0 && fd < nwatched ? watched[fd] : NULL;
            if (c && io->passed_fd < 0) {
                int err = 0, noreply = 0;
                int r = fayt_fast_serve(k, c, buf, &io->msg, &noreply, &err);
                if (r == FAYT_FAST_SERVED || r == FAYT_FAST_AGAIN) {
                    served += r == FAYT_FAST_SERVED;
                    continue;
                }
                io->passed_fd = fd;
                io->passed_ctx = c->ctx_id;
                io->passed = r;
                io->noreply = noreply;
                io->err = err;
            }
            out[m].fd = fd;
            out[m].events = evs[i].events;
            m++;
        }
        if (m)
            return m;
        if (n) {                        /* all served: look again at once */
            until = 0;
            if (served >= FAYT_FAST_POLL_BATCH)
                return 0;
            continue;
        }
        if (timeout_ms == 0 && spin_ns <= 0)
            return 0;
        if (spin_ns > 0) {
            int64_t now = fayt_now_ns();
            if (until == 0)
                until = now + spin_ns;
            if (now < until) {
                sched_yield();
                continue;
            }
        }
        if (timeout_ms == 0)
            return 0;
        if (res_head) {
            /* Python takes over what has been resident a while when idle:
             * sleep no longer than until the oldest one is that old. */
            int64_t left = res_head->born + FAYT_FAST_RESIDENT_AGE_NS - fayt_now_ns();
            if (left <= 0)
                return 0;
            int ms = (int)(left / 1000000) + 1;
            if (timeout_ms < 0 || ms < timeout_ms)
                timeout_ms = ms;
        }
        block = 1;
        until = 0;
    }
}
