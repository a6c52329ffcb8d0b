/* serve.c: faytd's request path in C (core.h).
 *
 * Creating a share-point and its creator destroying it again are the calls
 * a share-point's life costs; in Python they cost faytd tens of
 * microseconds each.  Here, on one connection's readable event, one
 * recvmsg(2) reads the request; if it is
 *   PORTAL(SHARE|ANON, create) of an identifier not in the name index,
 *     valid, within every quota, from a thread already known, with no fds
 *     (one of more than one page is two objects, page 0 and the rest, both
 *     sent: FAYT_PORTAL_REPLY_SPLIT), or
 *   UNMAP_DESTROY of a share-point this path created and still holds, or
 *   PORTAL(ANON) and the UNMAP of an ANON portal this path made,
 * it is performed and answered here (frames, a pooled or recycled object,
 * the meta-structure, the journal record, the reply with SCM_RIGHTS),
 * exactly as faytd/syscall.py would.  Everything else, errors included, is
 * handed back unperformed: Python decides every refusal, with its messages.
 * Single-threaded: faytd's loop thread is the only caller.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "deadline.h"
#include "internal.h"
#include "fault.h"
#include "fayt/lock.h"
#include "fayt/sharepoint.h"

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
static int fast_anon(struct fayt_core *k, struct fayt_fast_conn *c,
                     const struct fayt_req_hdr *h, struct portal_req *req, int *err)
{
    uint32_t n = ((uint32_t)req->length + FAYT_PAGE_SIZE - 1) / FAYT_PAGE_SIZE;
    uint64_t bytes = (uint64_t)n * FAYT_PAGE_SIZE;
    if (!(c->flags & FAYT_FAST_CONN_ANON) || req->share.identifier || n > FAST_MAX_FRAMES
        || k->nresident >= RESIDENT_MAX
        || c->py_mappings + c->resident >= k->max_mappings
        || c->ram + bytes > k->max_ram_per_context
        || n > fayt_frames_free(&k->frames))
        return FAYT_FAST_PASS;          /* Python refuses it, with its message */
    struct resident *r = core_resident_new(k, c, h, req->prot, n, FAYT_PORTAL_ANON);
    if (!r)
        return FAYT_FAST_PASS;
    int ofd = core_kept_take(k, c, r);
    if (ofd >= 0 && bytes <= ZERO_AT_CREATE) {
        static const uint8_t zeros[ZERO_AT_CREATE];   /* a portal's memory starts as zeros */
        if (pwrite(ofd, zeros, bytes, 0) != (ssize_t)bytes) {
            close(ofd);
            fayt_objpool_release(k, r->object);
            ofd = -1;
        }
    }
    if (ofd < 0)
        ofd = fayt_objpool_take(k, bytes, NULL, r->object);
    if (ofd < 0 || core_resident_insert(k, r)) {
        core_resident_abandon(k, r, ofd);
        return FAYT_FAST_PASS;
    }
    k->frames.next_oid++;
    k->nresident++;
    k->anon_maps++;
    c->next_handle++;
    c->ram += bytes;
    c->resident++;
    int se = portal_reply(c, h, req, r, 0, 0, ofd);
    core_hold_fd(k, r, ofd);
    return served(se, err);
}

static int fast_unmap(struct fayt_core *k, struct fayt_fast_conn *c,
                      const struct fayt_req_hdr *h, const uint8_t *body, size_t blen, int *err)
{
    struct resident *r = core_resident_of(k, c, h, body, blen, FAYT_PORTAL_ANON);
    if (!r)
        return FAYT_FAST_PASS;
    core_resident_unlink(k, r);
    k->nresident--;
    k->anon_unmaps++;
    c->ram -= r->length;
    c->resident--;
    fayt_frames_put(&k->frames, r->frames, r->nframes);
    core_give_back(k, r, 1);
    free(r);
    return acknowledge(c, h, err);
}

/* -- PORTAL(SHARE|ANON, create) ------------------------------------------ */
static int fast_create(struct fayt_core *k, struct fayt_fast_conn *c,
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
    size_t data_offset = FAYT_SP_DATA_OFFSET(n);
    /* A share-point of more than one page is two objects (page 0 and the
     * rest, FAYT_PORTAL_REPLY_SPLIT); one created without PROT_WRITE would
     * give its creator the rest read-only: Python makes that. */
    if (n > FAST_MAX_FRAMES || data_offset >= bytes
        || (n > 1 && !(req.prot & FAYT_PROT_WRITE))
        || k->nresident >= RESIDENT_MAX
        || c->py_mappings + c->resident >= k->max_mappings
        || c->ram + bytes > k->max_ram_per_context
        || k->nsharepoints >= k->max_sharepoints
        || n > fayt_frames_free(&k->frames)
        || core_name_find(k, ident, ilen, core_hash(k, ident, ilen)))
        return FAYT_FAST_PASS;          /* Python refuses, or catches up first */

    struct resident *r = core_resident_new(k, c, h, req.prot, n, FAYT_PORTAL_SHARE | FAYT_PORTAL_ANON);
    if (!r)
        return FAYT_FAST_PASS;
    int recycled = 1;
    int ofd = core_kept_take(k, c, r);
    if (ofd < 0) {
        recycled = 0;
        ofd = fayt_objpool_take(k, r->split ? FAYT_PAGE_SIZE : bytes, NULL, r->object);
        if (ofd >= 0 && r->split) {
            r->fd2 = fayt_objpool_take(k, bytes - FAYT_PAGE_SIZE, NULL, r->object2);
            if (r->fd2 < 0) {
                r->fd2 = -1;
                core_resident_abandon(k, r, ofd);
                return FAYT_FAST_PASS;
            }
        }
    }
    if (ofd < 0) {
        core_resident_abandon(k, r, -1);
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
        || !(ne = core_name_insert(k, ident, ilen, &e)) || core_resident_insert(k, r)) {
        if (ne)
            core_name_remove(k, ne);
        core_resident_abandon(k, r, ofd);
        return FAYT_FAST_PASS;
    }
    k->frames.next_oid++;
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
    fayt_frames_get(&k->frames, r->frames, n);   /* the mapping's; the table holds one */

    core_journal_sharepoint(k, r, ident, ilen);   /* as faytd/journal.py writes it */

    int se = portal_reply(c, h, &req, r, data_offset, FAYT_PORTAL_REPLY_CREATED, ofd);
    core_hold_fd(k, r, ofd);
    return served(se, err);
}

/* -- UNMAP_DESTROY of a resident share-point by its creator ----------------- */
static int fast_destroy(struct fayt_core *k, struct fayt_fast_conn *c,
                        const struct fayt_req_hdr *h, const uint8_t *body, size_t blen, int *err)
{
    struct resident *r = core_resident_of(k, c, h, body, blen, FAYT_PORTAL_SHARE | FAYT_PORTAL_ANON);
    if (!r || (c->flags & FAYT_FAST_CONN_NOTICES))
        return FAYT_FAST_PASS;
    /* A destroy the journal does not know must not lend its object to a new
     * share-point: a restart would take both back, on one object. */
    int keep = core_journal_destroyed(k, r->sp_id) == 0;
    core_resident_unlink(k, r);
    core_name_remove(k, r->name);
    k->nsharepoints--;
    k->nresident--;
    k->destroys++;
    c->ram -= r->length;
    c->resident--;
    /* The table's reference and the mapping's: the frames are free, and the
     * object goes (the client's mapping keeps its pages until it unmaps). */
    fayt_frames_put(&k->frames, r->frames, r->nframes);
    fayt_frames_put(&k->frames, r->frames, r->nframes);
    core_give_back(k, r, keep);
    free(r);
    return acknowledge(c, h, err);
}

/* -- the entry point ------------------------------------------------------ */
int fayt_fast_serve(struct fayt_core *k, struct fayt_fast_conn *c, uint8_t *buf,
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

/* -- faytd's wait ------------------------------------------------------- */
int fayt_fast_watch(struct fayt_core *k, struct fayt_fast_conn *c)
{
    struct fayt_core_priv *p = k->priv;
    if (c->fd < 0)
        return EBADF;
    if (c->fd >= p->nwatched) {
        int n = p->nwatched ? p->nwatched : 256;
        while (n <= c->fd)
            n *= 2;
        struct fayt_fast_conn **w = realloc(p->watched, (size_t)n * sizeof *w);
        if (!w)
            return ENOMEM;
        memset(w + p->nwatched, 0, (size_t)(n - p->nwatched) * sizeof *w);
        p->watched = w;
        p->nwatched = n;
    }
    p->watched[c->fd] = c;
    return 0;
}

void fayt_fast_unwatch(struct fayt_core *k, int fd)
{
    struct fayt_core_priv *p = k->priv;
    if (fd >= 0 && fd < p->nwatched)
        p->watched[fd] = NULL;
}

int fayt_fast_poll(struct fayt_core *k, int epfd, int64_t spin_ns, int timeout_ms,
                   struct fayt_fast_event *out, int max, uint8_t *buf, struct fayt_fast_io *io)
{
    struct fayt_core_priv *p = k->priv;
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
            if (fayt_faults_owns(k, fd)) {     /* a fault, an answer, a deadline */
                fayt_faults_event(k, fd, evs[i].events);
                k->faults->c_events++;
                served++;
                continue;
            }
            struct fayt_fast_conn *c = fd >= 0 && fd < p->nwatched ? p->watched[fd] : NULL;
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
        if (p->res_head) {
            /* Python takes over what has been resident a while when idle:
             * sleep no longer than until the oldest one is that old. */
            int64_t left = p->res_head->born + FAYT_FAST_RESIDENT_AGE_NS - fayt_now_ns();
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

