/* serve.c: faytd's request path in C (core.h).
 *
 * A share-point's life (create, attach, unmap, destroy) and an ANON
 * portal's cost faytd tens of microseconds each in Python.  Here, on one
 * connection's readable event, one recvmsg(2) reads the request; if it is
 *   PORTAL(SHARE|ANON), create or attach, or PORTAL(ANON), that the one
 *     decoder (decode.c) takes, from a thread faytd already checked, of a
 *     context whose rights (Python's policy, as conn flags) allow it, with
 *     no fds (an attach only when no other connection has an unanswered
 *     call queued: Python performs those first, see Server.catch_up), or
 *   UNMAP or UNMAP_DESTROY of a mapping the core holds (a destroy only by
 *     the owner or a core server, and only when no context that maps the
 *     share-point asked for destroy notices: Python sends those),
 * the core performs it (table.c: the same calls faytd's Python makes for
 * the requests it handles) and the reply goes from here, with SCM_RIGHTS.
 * A call the core refuses changes nothing and goes to Python, which makes
 * the same call and answers the refusal with its message.  Single-threaded:
 * faytd's loop thread is the only caller.
 *
 * Fairness (fayt_fast_poll, core.h): faytd cannot preempt a request, so
 * what it can bound is how many requests of others one waits behind.  Each
 * look at epoll is a round: core connections first, then one request per
 * uid, so that a uid's thousand connections weigh what its one would.
 * Connections are level-triggered in epoll: one left for a later round is
 * reported again (at the tail of epoll's ready list), nothing is lost.
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

#include "fayt/common/deadline.h"
#include "fayt/common/scm.h"
#include "internal.h"
#include "fault.h"
#include "fayt/lock.h"
#include "fayt/sharepoint.h"



static int send_reply(int fd, const void *msg, size_t n, int pass_fd, int pass_fd2)
{
    struct iovec iov = {(void *)msg, n};
    struct msghdr mh = {0};
    FAYT_SCM_BUFFER(cbuf, 2);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    int fds[2] = {pass_fd, pass_fd2};
    fayt_scm_put(&mh, cbuf.buf, fds, pass_fd < 0 ? 0 : pass_fd2 >= 0 ? 2 : 1);
    ssize_t r;
    do {
        r = sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? errno : 0;
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

/* -- PORTAL(SHARE|ANON) and PORTAL(ANON) --------------------------------------- */
/* Whether another connection has a call queued that was sent without
 * waiting for its reply (UNMAP, UNMAP_DESTROY): then a call whose answer
 * such a call could change (an attach: a destroy sent before it) goes to
 * Python, which performs those first (Server.catch_up, which performs
 * nothing else).  A queued call that waits for its reply cannot have been
 * sent before anything c's process was told (its sender waits), so a flood
 * of those keeps attaches here.  The look at each ready connection is a
 * MSG_PEEK of its next header.
 *
 * Which connections to look at: inside fayt_fast_poll, those of the round
 * being served.  c's request was queued when the round's epoll_wait
 * looked (c gives one request per round), so a call sent before it was
 * queued then too, and epoll (level-triggered) reported its connection in
 * the round, whether or not it was served since (its next call, if any,
 * is what the peek sees); a round that filled the event array counts as
 * waiting.  With one client, that is no system call at all.  Called
 * outside a round, it asks epoll again; that look takes the edge of a
 * chain member's edge-triggered eventfd, so the fault engine's events it
 * reports are served here, or a chain server's answer would wait for its
 * deadline. */
static int queued_noreply(int fd)
{
    struct fayt_req_hdr h;
    ssize_t r;
    do {
        r = recv(fd, &h, sizeof h, MSG_PEEK | MSG_DONTWAIT);
    } while (r < 0 && errno == EINTR);
    return r == (ssize_t)sizeof h && h.magic == FAYT_REQ_MAGIC && (h.flags & FAYT_REQ_NOREPLY);
}

static int others_waiting(struct fayt_core *k, struct fayt_fast_conn *c)
{
    struct fayt_core_priv *p = k->priv;
    struct epoll_event evs[FAYT_FAST_POLL_EVENTS];
    const struct epoll_event *ev = p->round;
    int n = p->round_n, others = p->round_full, look = ev == NULL;
    if (look) {
        if (p->epfd < 0)
            return 1;
        n = epoll_wait(p->epfd, evs, FAYT_FAST_POLL_EVENTS, 0);
        others = n < 0 || n == FAYT_FAST_POLL_EVENTS;
        ev = evs;
    }
    for (int i = 0; i < n; i++) {
        int fd = ev[i].data.fd;
        struct fayt_fast_conn *o = fd >= 0 && fd < p->nwatched ? p->watched[fd] : NULL;
        if (look && fayt_faults_owns(k, fd)) {
            fayt_faults_event(k, fd, ev[i].events);
            k->faults->c_events++;
        } else if (o && o != c && !others) {
            others = queued_noreply(fd);
        }
    }
    return others;
}

static int fast_portal(struct fayt_core *k, struct fayt_fast_conn *c,
                       const struct fayt_req_hdr *h, const uint8_t *body, size_t blen, int *err)
{
    struct fayt_portal_args a;
    /* One decoder for both paths: a request it refuses goes to Python,
     * which decodes it again with the same code and answers its message. */
    if (h->flags || blen > UINT32_MAX
        || fayt_portal_decode(k, body, (uint32_t)blen, &a, NULL, 0)
        || c->tid == 0 || h->tid != c->tid)
        return FAYT_FAST_PASS;
    if (a.type == FAYT_PORTAL_ANON) {
        if (!(c->flags & FAYT_FAST_CONN_ANON))
            return FAYT_FAST_PASS;
    } else if (a.type == (FAYT_PORTAL_SHARE | FAYT_PORTAL_ANON)) {
        if (!(c->flags & FAYT_FAST_CONN_SHARE) || (a.attach && others_waiting(k, c)))
            return FAYT_FAST_PASS;
    } else if (a.type == FAYT_PORTAL_DIRECT || a.type == FAYT_PORTAL_COW) {
        /* over granted RAM: direct.c */
        uint32_t may = a.type == FAYT_PORTAL_COW ? FAYT_FAST_CONN_COW : FAYT_FAST_CONN_DIRECT;
        return c->flags & may ? core_direct_serve(k, c, h, body, &a, err) : FAYT_FAST_PASS;
    } else {
        return FAYT_FAST_PASS;
    }
    uint8_t *rep = k->priv->reply;
    struct fayt_core_reply out;
    /* Refused (the name exists: Python catches up first; any error: Python
     * answers it, from the same call): nothing changed. */
    if (fayt_core_portal(k, c, h->tid, body, &a, rep + sizeof(struct fayt_rep_hdr), &out,
                         NULL, 0))
        return FAYT_FAST_PASS;
    k->calls_portal++;
    if (a.type == FAYT_PORTAL_ANON)
        k->anon_maps++;
    else if (a.attach)
        k->attaches++;
    else
        k->creates++;
    struct fayt_rep_hdr rh = {FAYT_REP_MAGIC, h->op, (uint16_t)out.nfds, h->seq, 0};
    memcpy(rep, &rh, sizeof rh);
    int se = send_reply(c->fd, rep, sizeof rh + out.len, out.fds[0],
                        out.nfds > 1 ? out.fds[1] : -1);
    for (int i = 0; i < out.nfds; i++)
        if (out.fds[i] >= 0 && !(out.borrowed & (1u << i)))
            close(out.fds[i]);
    return served(se, err);
}

/* -- UNMAP and UNMAP_DESTROY ---------------------------------------------------- */
static int fast_unmap(struct fayt_core *k, struct fayt_fast_conn *c,
                      const struct fayt_req_hdr *h, const uint8_t *body, size_t blen, int *err)
{
    struct fayt_handle_req hr;
    if (blen != sizeof hr || (h->flags & ~FAYT_REQ_NOREPLY))
        return FAYT_FAST_PASS;
    memcpy(&hr, body, sizeof hr);
    struct map *m = core_map_find(k, c, hr.handle);
    if (!m)
        return FAYT_FAST_PASS;          /* Python's own mapping, or none */
    struct sp *sp = m->sp;
    int anon = m->type == FAYT_PORTAL_ANON;
    int how = h->op == FAYT_SYS_UNMAP_DESTROY ? FAYT_CORE_UNMAP_DESTROY : FAYT_CORE_UNMAP;
    if (how == FAYT_CORE_UNMAP_DESTROY && sp && !sp->destroyed) {
        if (c->pid != sp->owner_pid && !(c->flags & FAYT_FAST_CONN_CORE))
            return FAYT_FAST_PASS;      /* Python answers EPERM */
        /* Someone subscribed to destroys maps it: Python sends the notices. */
        for (struct map *x = sp->maps; x; x = x->sp_next)
            if (x->conn->flags & FAYT_FAST_CONN_NOTICES)
                return FAYT_FAST_PASS;
    }
    uint32_t destroyed = 0;
    if (fayt_core_unmap(k, c, hr.handle, how, &destroyed, NULL, 0))
        return FAYT_FAST_PASS;
    if (how == FAYT_CORE_UNMAP_DESTROY)
        k->calls_unmap_destroy++;
    else
        k->calls_unmap++;
    if (destroyed)
        k->destroys++;
    if (sp)
        k->unmaps++;
    else if (anon)
        k->anon_unmaps++;
    return acknowledge(c, h, err);
}

/* -- fairness ------------------------------------------------------------ */
/* A request of c was read (by the loop, a catch-up or Python): the clock of
 * others' requests, or what a core one waited behind since faytd's last
 * look at epoll before it saw it (fayt_fast_poll marks it). */
static void count_request(struct fayt_core *k, struct fayt_fast_conn *c)
{
    c->requests++;
    if (!(c->flags & FAYT_FAST_CONN_PRIO)) {
        k->fair_others++;
        return;
    }
    k->fair_core_requests++;
    if (c->cs->waiting_since) {
        uint64_t w = k->fair_others - (c->cs->waiting_since - 1);
        k->fair_core_waited += w;
        if (w > k->fair_core_waited_max)
            k->fair_core_waited_max = w;
        c->cs->waiting_since = 0;
    }
}

/* -- the entry point ------------------------------------------------------ */
int fayt_fast_serve(struct fayt_core *k, struct fayt_fast_conn *c, uint8_t *buf,
                    struct fayt_fast_msg *msg, int *noreply_out, int *err)
{
    FAYT_SCM_BUFFER(cbuf, FAYT_FAST_MAX_FDS);
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
    count_request(k, c);
    msg->len = (int32_t)r;
    msg->mflags = mh.msg_flags;
    msg->nfds = fayt_scm_take(&mh, msg->fds, FAYT_FAST_MAX_FDS);
    struct fayt_req_hdr h;
    if (noreply_out)
        *noreply_out = 0;
    if ((size_t)r < sizeof h)
        return FAYT_FAST_PASS;
    memcpy(&h, buf, sizeof h);
    if (noreply_out)
        *noreply_out = (h.flags & FAYT_REQ_NOREPLY) != 0;
    if (k->disabled || (c->flags & FAYT_FAST_CONN_PYTHON) || h.magic != FAYT_REQ_MAGIC
        || msg->nfds
        || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)))
        return FAYT_FAST_PASS;
    const uint8_t *body = buf + sizeof h;
    size_t blen = (size_t)r - sizeof h;
    if (h.op == FAYT_SYS_PORTAL)
        return fast_portal(k, c, &h, body, blen, err);
    if (h.op == FAYT_SYS_UNMAP_DESTROY || h.op == FAYT_SYS_UNMAP)
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

/* Whether uid is among the first n of uids (a round's: at most max events). */
static int uid_seen(const uint32_t *uids, int n, uint32_t uid)
{
    for (int i = 0; i < n; i++)
        if (uids[i] == uid)
            return 1;
    return 0;
}

int fayt_fast_poll(struct fayt_core *k, int epfd, int64_t spin_ns, int timeout_ms,
                   struct fayt_fast_event *out, int max, uint8_t *buf, struct fayt_fast_io *io)
{
    struct fayt_core_priv *p = k->priv;
    struct epoll_event evs[FAYT_FAST_POLL_EVENTS];
    uint32_t uids[FAYT_FAST_POLL_EVENTS];
    p->epfd = epfd;
    int served = 0, block = 0;
    int64_t until = 0;
    io->passed_fd = -1;
    if (max > FAYT_FAST_POLL_EVENTS)
        max = FAYT_FAST_POLL_EVENTS;
    for (;;) {
        /* A core request first seen now came after the last look: it may
         * have waited behind every request of others read since. */
        uint64_t since = p->last_look + 1;
        p->last_look = k->fair_others;
        int n = epoll_wait(epfd, evs, max, block ? timeout_ms : 0);
        if (n < 0)
            return errno == EINTR ? 0 : -errno;
        if (block && n == 0)
            return 0;                   /* timed out */
        block = 0;
        int m = 0, nuids = 0;
        p->round = evs;
        p->round_n = n;
        p->round_full = n == max;
        /* Pass 0: the fault engine's fds, Python's, and core connections;
         * pass 1: the others, one request per uid. */
        for (int pass = 0; pass < 2; pass++) {
            for (int i = 0; i < n; i++) {
                int fd = evs[i].data.fd;
                struct fayt_fast_conn *c = fd >= 0 && fd < p->nwatched ? p->watched[fd] : NULL;
                int prio = c && (c->flags & FAYT_FAST_CONN_PRIO);
                if (pass == 0) {
                    if (!c) {
                        if (fayt_faults_owns(k, fd)) {  /* a fault, an answer, a deadline */
                            fayt_faults_event(k, fd, evs[i].events);
                            k->faults->c_events++;
                            served++;
                        } else {
                            out[m].fd = fd;
                            out[m].events = evs[i].events;
                            m++;
                        }
                        continue;
                    }
                    if (!prio)
                        continue;
                    if (!c->cs->waiting_since)
                        c->cs->waiting_since = since;
                } else if (!c || prio) {
                    continue;
                }
                if (io->passed_fd >= 0)
                    continue;           /* Python's turn: the next round sees it again */
                if (!prio) {
                    if (uid_seen(uids, nuids, c->uid)) {
                        k->fair_deferred++;
                        continue;
                    }
                    uids[nuids++] = c->uid;
                }
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
                out[m].fd = fd;
                out[m].events = evs[i].events;
                m++;
            }
        }
        p->round = NULL;
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
        block = 1;
        until = 0;
    }
}


/* -- share-point ids ------------------------------------------------------ */
uint32_t fayt_core_new_sp_id(struct fayt_core *k)
{
    uint32_t id = k->next_sp_id;
    k->next_sp_id = (id % 0xfffffffeU) + 1;
    return id;
}

void fayt_core_skip_sp_ids(struct fayt_core *k, uint32_t next)
{
    if (next > k->next_sp_id)
        k->next_sp_id = next;
}

/* -- the ids in the table, in order --------------------------------------- */
/* LIST_SHARE's pages ask for the ids after one, in order: a trie of 64-bit
 * masks over the 32 bits of an id (a root of 2 bits, then 5 levels of 6; a
 * leaf's mask is the ids themselves), so that the next id after any costs
 * a few loads at each of 6 levels, whatever the table holds, and a
 * destroyed id (a page's cursor may name one) needs no search.  Ids are
 * handed out in order, so the nodes are dense: about 9 bytes an id.  One
 * trie holds every id, and one per namespace its own (a context that is
 * not core lists its uid's namespace and the shared one): a uid's is in
 * its account (table.c, core_ns_ids), which each of those ids holds. */
#define IDS_LEVELS 6
struct idnode {
    uint64_t mask;                 /* bit d: child d holds an id (a leaf: id d is live) */
    struct idnode *child[];        /* 64 entries above the leaves; none in a leaf */
};

static int ids_shift(int level)
{
    return 30 - 6 * level;
}

static unsigned ids_digit(uint32_t id, int level)
{
    return (id >> ids_shift(level)) & 63;
}

static int ids_add_at(struct idnode **slot, int level, uint32_t id)
{
    if (!*slot) {
        size_t kids = level < IDS_LEVELS - 1 ? 64 : 0;
        if (!(*slot = calloc(1, sizeof **slot + kids * sizeof(struct idnode *))))
            return ENOMEM;
    }
    unsigned d = ids_digit(id, level);
    if (level < IDS_LEVELS - 1 && ids_add_at(&(*slot)->child[d], level + 1, id)) {
        if (!(*slot)->mask) {
            free(*slot);
            *slot = NULL;
        }
        return ENOMEM;
    }
    (*slot)->mask |= 1ULL << d;
    return 0;
}

static void ids_remove_at(struct idnode **slot, int level, uint32_t id);

int core_ids_add(struct fayt_core *k, uint32_t id, uint32_t ns)
{
    struct idnode **t = core_ns_ids(k, ns, 1);
    if (!t)
        return ENOMEM;
    if (ids_add_at(&k->priv->live_ids, 0, id)) {
        core_ns_ids(k, ns, -1);
        return ENOMEM;
    }
    if (ids_add_at(t, 0, id)) {
        ids_remove_at(&k->priv->live_ids, 0, id);
        core_ns_ids(k, ns, -1);
        return ENOMEM;
    }
    return 0;
}

static void ids_remove_at(struct idnode **slot, int level, uint32_t id)
{
    struct idnode *n = *slot;
    unsigned d = ids_digit(id, level);
    if (!n || !(n->mask >> d & 1))
        return;
    if (level < IDS_LEVELS - 1) {
        ids_remove_at(&n->child[d], level + 1, id);
        if (n->child[d])
            return;
    }
    n->mask &= ~(1ULL << d);
    if (!n->mask) {
        free(n);
        *slot = NULL;
    }
}

void core_ids_remove(struct fayt_core *k, uint32_t id, uint32_t ns)
{
    struct idnode **t = core_ns_ids(k, ns, 0);
    ids_remove_at(&k->priv->live_ids, 0, id);
    if (t) {
        ids_remove_at(t, 0, id);
        core_ns_ids(k, ns, -1);
    }
}

/* The least id under n (level), whose digits above are those of base. */
static uint32_t ids_least(const struct idnode *n, int level, uint32_t base)
{
    for (;; level++) {
        unsigned d = (unsigned)__builtin_ctzll(n->mask);
        base |= (uint32_t)d << ids_shift(level);
        if (level == IDS_LEVELS - 1)
            return base;
        n = n->child[d];
    }
}

/* The least id >= x under n (level), n's digits above being x's; 0: none
 * (id 0 is never one). */
static uint32_t ids_ceil(const struct idnode *n, int level, uint32_t x)
{
    unsigned d = ids_digit(x, level);
    if (n->mask >> d & 1) {
        if (level == IDS_LEVELS - 1)
            return x;
        uint32_t r = ids_ceil(n->child[d], level + 1, x);
        if (r)
            return r;
    }
    uint64_t above = d == 63 ? 0 : n->mask & (~0ULL << (d + 1));
    if (!above)
        return 0;
    unsigned e = (unsigned)__builtin_ctzll(above);
    int sh = ids_shift(level);
    uint32_t base = (uint32_t)(x & ~((1ULL << (sh + 6)) - 1)) | ((uint32_t)e << sh);
    return level == IDS_LEVELS - 1 ? base : ids_least(n->child[e], level + 1, base);
}

static uint32_t ids_after(const struct idnode *root, uint32_t after, uint32_t *out,
                          uint32_t max)
{
    uint32_t n = 0;
    while (root && n < max && after != UINT32_MAX) {
        uint32_t id = ids_ceil(root, 0, after + 1);
        if (!id)
            break;
        out[n++] = after = id;
    }
    return n;
}

uint32_t fayt_core_sp_ids(struct fayt_core *k, uint32_t after, uint32_t *out, uint32_t max)
{
    return ids_after(k->priv->live_ids, after, out, max);
}

uint32_t fayt_core_sp_ids_ns(struct fayt_core *k, uint32_t ns, uint32_t after, uint32_t *out,
                             uint32_t max)
{
    struct idnode **t = core_ns_ids(k, ns, 0);
    return t ? ids_after(*t, after, out, max) : 0;
}

static void ids_free(struct idnode *n, int level)
{
    if (!n)
        return;
    if (level < IDS_LEVELS - 1)
        for (int d = 0; d < 64; d++)
            if (n->mask >> d & 1)
                ids_free(n->child[d], level + 1);
    free(n);
}

void core_ids_fini(struct fayt_core *k)
{
    struct fayt_core_priv *p = k->priv;
    ids_free(p->live_ids, 0);
    ids_free(p->shared_ids, 0);
    p->live_ids = p->shared_ids = NULL;
}
