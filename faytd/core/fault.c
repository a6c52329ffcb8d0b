/* fault.c: faytd's fault engine (fault.h): SPECIAL faults, served in C.
 *
 * The objects (Python names them; the engine keeps what a fault needs):
 * - chain: its members in the order they joined, its flags and timeout;
 * - member: one server's place in a chain: its channel (pager.h), its
 *   slots (free, or holding the request posted there), its backlog (the
 *   requests waiting for a free slot) and its answer eventfd;
 * - region: one SPECIAL portal: the client's uffd, the range, the chain,
 *   the message, the backing it maps (if any) and its requests (one per
 *   page: a second fault on a page being fetched waits for the same
 *   answer); the regions of a SPECIAL|SHARE share one table of requests,
 *   and a request of one may have the others as waiters;
 * - request: a fault on one page, handed along the chain until a server
 *   supplies it or it fails.  Its state is explicit (enum req_state).
 *
 * A request lives while it is not DONE, and after that while the slot it
 * was posted in has not been reaped (the server may still write there).
 *
 * The channel is shared with the server, which may write anything into it
 * at any time: the engine never reads back what only it writes (its ring
 * positions, the stride, the slot count: its own copies), reads each field
 * the server writes once, and checks it: a slot number not in flight is a
 * protocol error (the member is dropped, EPROTO), a length is bounded by
 * the slot and the region and cut to whole pages, an unknown verdict fails
 * the page (EIO), MAPPED where the region does not map that server's
 * backing fails it (EPROTO).
 *
 * Failure poisons the page (the access gets SIGBUS, never zeros); a failed
 * write report lets the write go on.  Log lines, members to drop and
 * regions to close are queued for Python (fayt_faults_drain), which is told
 * by notify_fd.  Single-threaded: faytd's loop thread is the only caller.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "core.h"
#include "fault.h"
#include "fayt/common/deadline.h"
#include "fayt/common/futex.h"
#include "fayt/common/uffd_io.h"
#include "fayt/pager.h"
#include "fayt/portal.h"

#define PAGE 4096ULL
#define SLOTS FAYT_PAGER_SLOTS_MAX
#define EVENTS_MAX 256
#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)

/* Python's logging levels */
#define L_DEBUG 10
#define L_INFO 20
#define L_WARNING 30

_Static_assert(sizeof(struct fayt_pager_header) <= FAYT_PAGER_HEADER_SIZE, "pager header");
_Static_assert(sizeof(struct fayt_page_request) <= FAYT_PAGER_DESC_SIZE, "page request");

enum req_state {
    REQ_NEW,        /* made, not yet given to a member */
    REQ_HELD,       /* held back by an injected delay until its deadline, then dispatched */
    REQ_BACKLOG,    /* waiting for a free slot of `member` */
    REQ_POSTED,     /* in slot `slot` of `member` */
    REQ_DONE,       /* resolved, failed or cancelled; kept while its slot is unreaped */
};

struct region;
struct member;
struct chain;

struct req {
    uint64_t id;
    enum req_state state;
    struct region *region;      /* its owner (a share's: the one that faulted first) */
    uint64_t offset;
    uint32_t access;            /* FAYT_ACCESS_* */
    int present;                /* a write report on a page already there */
    uint32_t hop;
    struct member *member;      /* BACKLOG, POSTED */
    int32_t slot;               /* POSTED (and DONE until reaped): its slot, else -1 */
    int64_t deadline;           /* CLOCK_MONOTONIC ns */
    int heap_at;                /* index in the deadline heap, -1 */
    uint64_t batch;             /* the fault event that made it (in_one_call) */
    int injected;               /* an injection rule of its chain has seen it */
    struct req *pprev, *pnext;  /* in its table of pending requests (not DONE) */
    struct req *bnext;          /* in its member's backlog */
    struct region **waiters;    /* SPECIAL|SHARE: other regions faulting on the page */
    uint32_t nwaiters, capwaiters;
    int64_t t0;                 /* traced: when its fault was read (0: not traced) */
    int32_t err;                /* why it failed (fail()), for the trace */
};

struct ptable {                 /* pending requests: a region's, or a share's */
    struct req *head;
    uint32_t n;
    uint32_t refs;
    uint32_t share;             /* 0: a region's own */
    struct ptable *next;        /* in the engine's list of share tables */
};

struct chain {
    uint32_t id;
    char name[FAYT_NAME_MAX + 1];
    uint32_t flags, timeout_ms;
    struct member **members;
    uint32_t nmembers, cap;
    uint32_t nregions;
    int live;
    struct fayt_fault_inject inject;    /* faults injected into its page requests */
    uint64_t inject_events;             /* its page requests since the rule was set */
    struct chain *next;
};

struct member {
    int efd;
    int32_t pid;
    struct chain *chain;        /* NULL once dropped */
    void *ch;
    uint32_t nslots, run_max, stride;
    uint32_t req_head, ans_tail;        /* our copies: we alone write them */
    uint32_t free[SLOTS];
    uint32_t nfree;
    struct req *slot[SLOTS];    /* the request posted there (DONE ones until reaped) */
    uint32_t inflight;
    struct req *bhead, *btail;  /* backlog, oldest first */
    int dropped;
    int posted;                 /* in the engine's spin list */
    struct member *next_posted;
    struct member *next;
};

struct region {
    int uffd;
    uint32_t id;
    int32_t pid;
    uint64_t addr, length;
    struct chain *chain;
    char *message;
    uint32_t mlen;
    int wp;
    int closed;
    struct ptable *pending;
    struct member *backing_member;
    uint32_t backing_id;
    struct fayt_fault_counts n;
    struct region *next;
};

/* fd -> what it is, for routing */
#define FD_NONE 0
#define FD_REGION 1
#define FD_MEMBER 2
#define FD_TIMER 3
struct fdent {
    int kind;
    void *obj;
};

struct fayt_faults_priv {
    struct chain *chains;
    struct member *members;
    struct region *regions;
    struct ptable *shares;
    struct fdent *fds;
    int nfds;
    struct req **heap;
    uint32_t nheap, capheap;
    int64_t armed_for;          /* 0: disarmed */
    struct member *posted;      /* members given a request since the last spin */
    uint64_t next_req;
    uint64_t batch;             /* fault events handled so far */
    int in_fault;               /* handling a fault event: resolutions may count in_one_call */
    struct fayt_fault_event ev[EVENTS_MAX];
    uint32_t ev_head, ev_n;
    int rung;                   /* notify_fd written since the last drain */
};

static void fail(struct fayt_faults *e, struct req *q, int err);
static void dispatch(struct fayt_faults *e, struct req *q);
static void drop_member(struct fayt_faults *e, struct member *m, int err, const char *why);

/* -- events for Python ----------------------------------------------------- */
static void push_event(struct fayt_faults *e, uint32_t kind, int level, int fd, int err,
                       const char *text)
{
    struct fayt_faults_priv *p = e->priv;
    /* Log lines leave room for what Python must act on (drops, closes). */
    if (p->ev_n == EVENTS_MAX || ((kind == FAYT_FAULT_EV_LOG || kind == FAYT_FAULT_EV_TRACE)
                                  && p->ev_n >= EVENTS_MAX - 64)) {
        e->lost_events++;
        return;
    }
    struct fayt_fault_event *v = &p->ev[(p->ev_head + p->ev_n) % EVENTS_MAX];
    v->kind = kind;
    v->level = level;
    v->fd = fd;
    v->err = err;
    snprintf(v->text, sizeof v->text, "%s", text);
    p->ev_n++;
    e->nevents = p->ev_n;
    if (!p->rung) {
        uint64_t one = 1;
        if (write(e->notify_fd, &one, sizeof one) == sizeof one)
            p->rung = 1;
    }
}

static void logf_(struct fayt_faults *e, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void logf_(struct fayt_faults *e, int level, const char *fmt, ...)
{
    char buf[240];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    push_event(e, FAYT_FAULT_EV_LOG, level, -1, 0, buf);
}

/* The timeline trace: one server's answer ('A') or the request's end ('D'). */
static void trace_answer(struct fayt_faults *e, struct req *q, struct member *m,
                         uint32_t verdict, int32_t error)
{
    char buf[240];
    snprintf(buf, sizeof buf, "A %llu %u %d %d %u %d %u %lld %lld %llu",
             (unsigned long long)q->id, q->region->id, (int)q->region->pid, (int)m->pid,
             verdict, (int)error, q->hop, (long long)q->t0, (long long)fayt_now_ns(),
             (unsigned long long)q->offset);
    push_event(e, FAYT_FAULT_EV_TRACE, 0, -1, 0, buf);
}

static void trace_done(struct fayt_faults *e, struct req *q)
{
    char buf[240];
    snprintf(buf, sizeof buf, "D %llu %u %d %d %lld %lld %llu", (unsigned long long)q->id,
             q->region->id, (int)q->region->pid, (int)q->err, (long long)q->t0,
             (long long)fayt_now_ns(), (unsigned long long)q->offset);
    push_event(e, FAYT_FAULT_EV_TRACE, 0, -1, 0, buf);
    q->t0 = 0;
}

int fayt_faults_drain(struct fayt_core *k, struct fayt_fault_event *out, int max)
{
    struct fayt_faults *e = k->faults;
    struct fayt_faults_priv *p = e->priv;
    uint64_t v;
    if (p->rung) {
        while (read(e->notify_fd, &v, sizeof v) == sizeof v)
            ;
        p->rung = 0;
    }
    int n = 0;
    while (p->ev_n && n < max) {
        out[n++] = p->ev[p->ev_head];
        p->ev_head = (p->ev_head + 1) % EVENTS_MAX;
        p->ev_n--;
    }
    e->nevents = p->ev_n;
    if (p->ev_n) {              /* more than max: ring again */
        uint64_t one = 1;
        if (write(e->notify_fd, &one, sizeof one) == sizeof one)
            p->rung = 1;
    }
    return n;
}

/* -- fd routing -------------------------------------------------------------- */
static int fd_set_(struct fayt_faults_priv *p, int fd, int kind, void *obj)
{
    if (fd < 0)
        return EBADF;
    if (fd >= p->nfds) {
        int n = p->nfds ? p->nfds : 256;
        while (n <= fd)
            n *= 2;
        struct fdent *f = realloc(p->fds, (size_t)n * sizeof *f);
        if (!f)
            return ENOMEM;
        memset(f + p->nfds, 0, (size_t)(n - p->nfds) * sizeof *f);
        p->fds = f;
        p->nfds = n;
    }
    if (kind != FD_NONE && p->fds[fd].kind != FD_NONE)
        return EEXIST;
    p->fds[fd].kind = kind;
    p->fds[fd].obj = obj;
    return 0;
}

static struct fdent *fd_get(struct fayt_faults_priv *p, int fd)
{
    return fd >= 0 && fd < p->nfds && p->fds[fd].kind != FD_NONE ? &p->fds[fd] : NULL;
}

int fayt_faults_owns(struct fayt_core *k, int fd)
{
    return k->faults && fd_get(k->faults->priv, fd) != NULL;
}

/* -- the channel, faytd's side ------------------------------------------------ */
static inline struct fayt_pager_header *hdr(struct member *m)
{
    return (struct fayt_pager_header *)m->ch;
}

static inline struct fayt_page_request *desc(struct member *m, uint32_t slot)
{
    return (struct fayt_page_request *)((char *)m->ch + FAYT_PAGER_HEADER_SIZE +
                                        (uint64_t)slot * m->stride);
}

static inline void *slot_data(struct member *m, uint32_t slot)
{
    return (char *)desc(m, slot) + FAYT_PAGER_DESC_SIZE;
}

uint64_t fayt_pager_bytes(uint32_t nslots, uint32_t run_max)
{
    return FAYT_PAGER_HEADER_SIZE + (uint64_t)nslots * (FAYT_PAGER_DESC_SIZE + run_max);
}

static void channel_post(struct member *m, uint32_t slot)
{
    struct fayt_pager_header *h = hdr(m);
    uint32_t head = m->req_head++;
    STORE(&h->req_ring[head % SLOTS], slot);
    __atomic_store_n(&h->req_head, head + 1, __ATOMIC_SEQ_CST);
    FENCE();    /* head before server_waiting (pairs with fayt_pager_take) */
    if (LOAD(&h->server_waiting))
        fayt_futex_wake_n(&h->req_head, INT_MAX);
}

static void channel_close(struct member *m)
{
    struct fayt_pager_header *h = hdr(m);
    __atomic_store_n(&h->state, FAYT_PAGER_CLOSED, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&h->req_head, 0, __ATOMIC_SEQ_CST);
    fayt_futex_wake_n(&h->req_head, INT_MAX);
}

/* An answer waiting in m's ring?  Spin up to spin_ns for one (no eventfd
 * write meanwhile: rung says a look is under way). */
static int channel_await(struct member *m, int64_t spin_ns)
{
    struct fayt_pager_header *h = hdr(m);
    uint32_t tail = m->ans_tail;
    if (LOAD(&h->ans_head) != tail)
        return 1;
    if (spin_ns <= 0)
        return 0;
    if (__atomic_exchange_n(&h->rung, 1, __ATOMIC_SEQ_CST))
        return LOAD(&h->ans_head) != tail;     /* a write is on its way anyway */
    int64_t until = fayt_now_ns() + spin_ns;
    int got = 0;
    while (!(got = LOAD(&h->ans_head) != tail) && fayt_now_ns() < until)
        fayt_spin_pause();
    __atomic_store_n(&h->rung, 0, __ATOMIC_SEQ_CST);
    FENCE();    /* rung cleared before the last look (pairs with fayt_pager_answer) */
    return got || LOAD(&h->ans_head) != tail;
}

/* The next answered slot: >= 0, -1 for none, -2 for a slot number no slot
 * of this channel has. */
static int channel_reap(struct member *m)
{
    struct fayt_pager_header *h = hdr(m);
    uint32_t tail = m->ans_tail;
    if (LOAD(&h->ans_head) == tail)
        return -1;
    uint32_t slot = LOAD(&h->ans_ring[tail % SLOTS]);
    m->ans_tail = tail + 1;
    STORE(&h->ans_tail, tail + 1);
    return slot < m->nslots ? (int)slot : -2;
}

/* -- deadlines: a min-heap of requests, one timerfd ---------------------------- */
static void heap_swap(struct req **h, uint32_t a, uint32_t b)
{
    struct req *t = h[a];
    h[a] = h[b];
    h[b] = t;
    h[a]->heap_at = (int)a;
    h[b]->heap_at = (int)b;
}

static void heap_up(struct req **h, uint32_t i)
{
    while (i > 0) {
        uint32_t up = (i - 1) / 2;
        if (h[up]->deadline <= h[i]->deadline)
            break;
        heap_swap(h, i, up);
        i = up;
    }
}

static void heap_down(struct req **h, uint32_t n, uint32_t i)
{
    for (;;) {
        uint32_t l = 2 * i + 1, r = l + 1, s = i;
        if (l < n && h[l]->deadline < h[s]->deadline)
            s = l;
        if (r < n && h[r]->deadline < h[s]->deadline)
            s = r;
        if (s == i)
            return;
        heap_swap(h, i, s);
        i = s;
    }
}

static void heap_remove(struct fayt_faults_priv *p, struct req *q)
{
    if (q->heap_at < 0)
        return;
    uint32_t i = (uint32_t)q->heap_at, last = --p->nheap;
    q->heap_at = -1;
    if (i == last)
        return;
    p->heap[i] = p->heap[last];
    p->heap[i]->heap_at = (int)i;
    heap_up(p->heap, i);
    heap_down(p->heap, p->nheap, (uint32_t)p->heap[i]->heap_at);
}

static void arm(struct fayt_faults *e, int64_t when)
{
    struct fayt_faults_priv *p = e->priv;
    struct itimerspec t;
    memset(&t, 0, sizeof t);
    int64_t ns = when - fayt_now_ns();
    if (ns < 1)
        ns = 1;
    t.it_value.tv_sec = ns / 1000000000;
    t.it_value.tv_nsec = ns % 1000000000;
    timerfd_settime(e->timer_fd, 0, &t, NULL);
    p->armed_for = when;
}

/* 0, or ENOMEM (the request is failed by the caller). */
static int add_deadline(struct fayt_faults *e, struct req *q)
{
    struct fayt_faults_priv *p = e->priv;
    heap_remove(p, q);
    if (p->nheap == p->capheap) {
        uint32_t cap = p->capheap ? p->capheap * 2 : 64;
        struct req **h = realloc(p->heap, cap * sizeof *h);
        if (!h)
            return ENOMEM;
        p->heap = h;
        p->capheap = cap;
    }
    q->heap_at = (int)p->nheap;
    p->heap[p->nheap++] = q;
    heap_up(p->heap, (uint32_t)q->heap_at);
    if (p->armed_for == 0 || q->deadline < p->armed_for)
        arm(e, q->deadline);
    return 0;
}

/* -- requests ---------------------------------------------------------------------- */
static struct req *pending_find(struct ptable *t, uint64_t off)
{
    for (struct req *q = t->head; q; q = q->pnext)
        if (q->offset == off)
            return q;
    return NULL;
}

static void pending_add(struct ptable *t, struct req *q)
{
    q->pprev = NULL;
    q->pnext = t->head;
    if (t->head)
        t->head->pprev = q;
    t->head = q;
    t->n++;
}

static void pending_remove(struct ptable *t, struct req *q)
{
    if (q->pprev)
        q->pprev->pnext = q->pnext;
    else if (t->head == q)
        t->head = q->pnext;
    else
        return;                 /* not in it */
    if (q->pnext)
        q->pnext->pprev = q->pprev;
    q->pprev = q->pnext = NULL;
    t->n--;
}

static void req_free(struct req *q)
{
    free(q->waiters);
    free(q);
}

static void backlog_remove(struct member *m, struct req *q)
{
    struct req **pp = &m->bhead, *prev = NULL;
    for (; *pp; prev = *pp, pp = &(*pp)->bnext) {
        if (*pp == q) {
            *pp = q->bnext;
            if (m->btail == q)
                m->btail = prev;
            q->bnext = NULL;
            return;
        }
    }
}

/* q is done: out of the pending table, the deadlines, the backlog; a slot
 * it holds is marked cancelled when `cancel` (the server may skip it).
 * Freed now unless its slot is still to be reaped.  The caller does not
 * touch q afterwards. */
static void req_done(struct fayt_faults *e, struct req *q, int cancel)
{
    if (q->state == REQ_DONE)
        return;
    if (q->t0 && e->trace)
        trace_done(e, q);
    enum req_state was = q->state;
    q->state = REQ_DONE;
    pending_remove(q->region->pending, q);
    heap_remove(e->priv, q);
    struct member *m = q->member;
    if (was == REQ_BACKLOG && m) {
        backlog_remove(m, q);
        q->member = NULL;
    }
    if (was == REQ_POSTED && m && !m->dropped && q->slot >= 0) {
        if (cancel)
            __atomic_fetch_or(&desc(m, (uint32_t)q->slot)->flags, FAYT_PAGE_CANCELLED,
                              __ATOMIC_RELEASE);
        return;                 /* freed when its slot is reaped */
    }
    if (was == REQ_POSTED && m && q->slot >= 0 && m->slot[q->slot] == q)
        return;                 /* a dropped member's: freed with it */
    req_free(q);
}

static void wake_waiters(struct req *q)
{
    for (uint32_t i = 0; i < q->nwaiters; i++)
        if (!q->waiters[i]->closed)
            uffd_io_wake(q->waiters[i]->uffd, q->waiters[i]->addr + q->offset, PAGE);
}

/* Resolved: the page is in (the faulting thread was woken by the ioctl);
 * wake the owner too if `wake`, and the waiters of a share. */
static void finish(struct fayt_faults *e, struct req *q, int wake, int cancel)
{
    if (wake)
        uffd_io_wake(q->region->uffd, q->region->addr + q->offset, PAGE);
    wake_waiters(q);
    req_done(e, q, cancel);
}

static void fail(struct fayt_faults *e, struct req *q, int err)
{
    if (q->state == REQ_DONE)
        return;
    q->err = err;
    struct region *r = q->region;
    if (r->closed) {
        req_done(e, q, 1);
        return;
    }
    r->n.failed++;
    e->total.failed++;
    if (q->present) {
        logf_(e, L_WARNING, "region %u: a write report at 0x%llx failed (%s); a present page "
              "cannot be taken back, the write goes on", r->id,
              (unsigned long long)q->offset, strerror(err));
        uffd_io_writeprotect(r->uffd, r->addr + q->offset, PAGE, 0);
        req_done(e, q, 1);
        return;
    }
    logf_(e, L_INFO, "region %u (chain '%s'): page at 0x%llx failed: %s; the access gets SIGBUS",
          r->id, r->chain->name, (unsigned long long)q->offset, strerror(err));
    int pe = uffd_io_poison(r->uffd, r->addr + q->offset, PAGE);
    if (pe)
        logf_(e, L_WARNING, "region %u: UFFDIO_POISON: %s", r->id, strerror(pe));
    for (uint32_t i = 0; i < q->nwaiters; i++) {
        struct region *w = q->waiters[i];
        if (w->closed)
            continue;
        pe = uffd_io_poison(w->uffd, w->addr + q->offset, PAGE);
        if (pe)
            logf_(e, L_WARNING, "region %u: UFFDIO_POISON: %s", w->id, strerror(pe));
    }
    req_done(e, q, 1);
}

static void mark_posted(struct fayt_faults_priv *p, struct member *m)
{
    if (!m->posted) {
        m->posted = 1;
        m->next_posted = p->posted;
        p->posted = m;
    }
}

/* The id of m's backing if the region maps it (requests to m then carry
 * it and FAYT_PAGE_BACKED), else 0. */
static uint32_t backing_of(struct region *r, struct member *m)
{
    return r->backing_member == m ? r->backing_id : 0;
}

static void post(struct fayt_faults *e, struct member *m, struct req *q)
{
    uint32_t slot = m->free[--m->nfree];
    struct region *r = q->region;
    struct fayt_page_request *d = desc(m, slot);
    uint32_t backing = backing_of(r, m);
    uint64_t room = r->length - q->offset;
    /* The whole descriptor, strings padded: nothing of an earlier request stays. */
    memset(d, 0, sizeof *d);
    d->id = q->id;
    d->offset = q->offset;
    d->length = PAGE;
    d->run_max = q->present ? 0 : (m->run_max < room ? m->run_max : (uint32_t)room);
    d->access = q->access;
    d->flags = (q->present ? FAYT_PAGE_PRESENT : 0) | (backing ? FAYT_PAGE_BACKED : 0);
    d->hop = q->hop;
    d->chain_id = r->chain->id;
    d->region_id = r->id;
    d->client_pid = r->pid;
    d->region_length = r->length;
    d->verdict = FAYT_PAGE_PENDING;
    d->message_length = r->mlen;
    d->backing = backing;
    memcpy(d->chain, r->chain->name, sizeof d->chain);
    if (r->mlen)
        memcpy(d->message, r->message, r->mlen);
    q->state = REQ_POSTED;
    q->slot = (int32_t)slot;
    m->slot[slot] = q;
    m->inflight++;
    channel_post(m, slot);
    mark_posted(e->priv, m);
}

static uint64_t splitmix64(uint64_t x)
{
    uint64_t z = x + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* An injected fault (fayt_fault_chain_inject): whether the chain's rule
 * fires at this, its next page request (libportal's rule, inject.c). */
static int inject_fires(struct chain *c)
{
    struct fayt_fault_inject *r = &c->inject;
    if (!r->kind)
        return 0;
    uint64_t n = c->inject_events++;
    if (n < r->after || (r->count && r->fired >= r->count))
        return 0;
    if (r->ppm < 1000000 && splitmix64(r->seed + n) % 1000000 >= r->ppm)
        return 0;
    r->fired++;
    return 1;
}

static void dispatch(struct fayt_faults *e, struct req *q)
{
    struct chain *c = q->region->chain;
    if (!q->injected && q->hop == 0 && c->inject.kind) {
        q->injected = 1;
        if (inject_fires(c)) {
            if (c->inject.kind == FAYT_FAULT_INJECT_FAIL) {
                logf_(e, L_WARNING, "inject: chain '%s': page request at 0x%llx of region %u "
                      "failed with %s (injected fault %llu)", c->name,
                      (unsigned long long)q->offset, q->region->id, strerror(c->inject.err),
                      (unsigned long long)c->inject.fired);
                fail(e, q, c->inject.err);
                return;
            }
            logf_(e, L_WARNING, "inject: chain '%s': page request at 0x%llx of region %u "
                  "held %u ms before it goes to the server (injected fault %llu)", c->name,
                  (unsigned long long)q->offset, q->region->id, c->inject.delay_ms,
                  (unsigned long long)c->inject.fired);
            q->state = REQ_HELD;
            q->member = NULL;
            q->slot = -1;
            q->deadline = fayt_now_ns() + (int64_t)c->inject.delay_ms * 1000000;
            if (add_deadline(e, q)) {
                q->state = REQ_NEW;
                fail(e, q, ENOMEM);
            }
            return;
        }
    }
    if (q->hop >= c->nmembers) {
        fail(e, q, q->hop ? ENODATA : ENXIO);
        return;
    }
    struct member *m = c->members[q->hop];
    q->member = m;
    q->slot = -1;
    q->deadline = fayt_now_ns() + (int64_t)c->timeout_ms * 1000000;
    if (add_deadline(e, q)) {
        q->member = NULL;
        q->state = REQ_NEW;
        fail(e, q, ENOMEM);
        return;
    }
    if (!m->nfree) {
        q->state = REQ_BACKLOG;
        q->bnext = NULL;
        if (m->btail)
            m->btail->bnext = q;
        else
            m->bhead = q;
        m->btail = q;
        return;
    }
    post(e, m, q);
}

/* answer_length comes from the server: bound it by the slot and the
 * region, whole pages only. */
static uint64_t run_of(uint32_t n, struct member *m, struct region *r, uint64_t off)
{
    uint64_t x = n;
    if (x > m->run_max)
        x = m->run_max;
    if (x > r->length - off)
        x = r->length - off;
    return x - x % PAGE;
}

static const char *ioctl_name(uint32_t verdict)
{
    return verdict == FAYT_PAGE_MAPPED ? "UFFDIO_CONTINUE" : "UFFDIO_COPY";
}

/* A run of n bytes from off was answered and `count` bytes of it went in:
 * count them; the requests other faults made for the run's pages are done
 * too (a page that did not go in faults again). */
static void supplied(struct fayt_faults *e, struct req *q, uint64_t n, uint64_t count, int err,
                     uint32_t verdict)
{
    struct region *r = q->region;
    uint64_t off = q->offset;
    r->n.fetched += count / PAGE;
    e->total.fetched += count / PAGE;
    if (verdict == FAYT_PAGE_MAPPED) {
        r->n.mapped += count / PAGE;
        e->total.mapped += count / PAGE;
    }
    if (err)
        logf_(e, L_WARNING, "region %u: %s at 0x%llx stopped after %llu bytes: %s", r->id,
              ioctl_name(verdict), (unsigned long long)off, (unsigned long long)count,
              strerror(err));
    if (e->priv->in_fault && q->batch == e->priv->batch && q->hop == 0 && e->spin_ns > 0
        && !r->wp && r->pending->share == 0) {
        r->n.in_one_call++;
        e->total.in_one_call++;
    }
    struct ptable *t = r->pending;
    finish(e, q, 0, 0);                 /* (q is gone: its slot was reaped) */
    if (!t->n)
        return;
    struct req *o = t->head;
    while (o) {
        struct req *nx = o->pnext;
        if (o->offset > off && o->offset < off + n && !o->present)
            finish(e, o, o->region != r, 1);
        o = nx;
    }
}

static void supply(struct fayt_faults *e, struct req *q, struct member *m, uint32_t slot,
                   uint32_t n32)
{
    struct region *r = q->region;
    if (q->present) {
        /* A write report acknowledged: let the write go on. */
        r->n.write_reports++;
        e->total.write_reports++;
        uint64_t at = r->addr + q->offset;
        int fd = r->uffd;
        finish(e, q, 0, 0);
        uffd_io_writeprotect(fd, at, PAGE, 0);
        return;
    }
    uint64_t n = run_of(n32, m, r, q->offset);
    if (n < PAGE) {
        fail(e, q, ENODATA);
        return;
    }
    int wp = r->wp && q->access == FAYT_ACCESS_READ;
    uint64_t copied = 0;
    int err = uffd_io_copy(r->uffd, r->addr + q->offset, slot_data(m, slot), n, wp, &copied);
    if (err && copied == 0 && err != ENOENT && err != EAGAIN) {
        /* Not even the faulting page went in: fail it (SIGBUS), never
         * leave the faulting thread asleep.  (ENOENT, EAGAIN: the client's
         * address space changed under the copy; the range was woken and
         * the thread faults again if it still needs the page.) */
        logf_(e, L_WARNING, "region %u: UFFDIO_COPY at 0x%llx: %s", r->id,
              (unsigned long long)q->offset, strerror(err));
        fail(e, q, err);
        return;
    }
    int report = r->wp && q->access == FAYT_ACCESS_WRITE;
    supplied(e, q, n, copied, err, FAYT_PAGE_DATA);
    if (report) {
        r->n.write_reports++;
        e->total.write_reports++;
    }
}

static void map_(struct fayt_faults *e, struct req *q, struct member *m, uint32_t n32)
{
    struct region *r = q->region;
    if (!backing_of(r, m)) {            /* (a backed region has no write reports) */
        logf_(e, L_WARNING, "chain '%s': server pid %d answered MAPPED for region %u, which "
              "does not map its backing: a protocol error, request failed", r->chain->name,
              m->pid, r->id);
        fail(e, q, EPROTO);
        return;
    }
    uint64_t n = run_of(n32, m, r, q->offset);
    if (n < PAGE) {
        fail(e, q, ENODATA);
        return;
    }
    uint64_t mapped = 0;
    int err = uffd_io_continue(r->uffd, r->addr + q->offset, n, &mapped);
    if (err && mapped == 0 && err != EAGAIN) {
        /* The backing lacks even the faulting page: SIGBUS, never zeros.
         * (EAGAIN: woken, the thread faults again, as for a copy.) */
        logf_(e, L_WARNING, "region %u: UFFDIO_CONTINUE at 0x%llx: %s", r->id,
              (unsigned long long)q->offset, strerror(err));
        fail(e, q, err);
        return;
    }
    supplied(e, q, n, mapped, err, FAYT_PAGE_MAPPED);
}

/* q (not DONE) was answered in `slot`: read each field the server wrote
 * once, and act on it. */
static void answered(struct fayt_faults *e, struct member *m, struct req *q, uint32_t slot)
{
    struct fayt_page_request *d = desc(m, slot);
    uint32_t verdict = LOAD(&d->verdict);
    uint32_t n = __atomic_load_n(&d->answer_length, __ATOMIC_RELAXED);
    int32_t error = __atomic_load_n(&d->error, __ATOMIC_RELAXED);
    if (q->t0 && e->trace)
        trace_answer(e, q, m, verdict, error);
    switch (verdict) {
    case FAYT_PAGE_DATA:
        supply(e, q, m, slot, n);
        break;
    case FAYT_PAGE_MAPPED:
        map_(e, q, m, n);
        break;
    case FAYT_PAGE_FORWARD:
        q->hop++;
        q->member = NULL;
        q->slot = -1;
        q->state = REQ_NEW;
        dispatch(e, q);
        break;
    default:
        fail(e, q, verdict == FAYT_PAGE_FAIL && error > 0 ? error : EIO);
    }
}

static void reap(struct fayt_faults *e, struct member *m)
{
    while (!m->dropped) {
        int slot = channel_reap(m);
        if (slot == -1)
            break;
        struct req *q = slot >= 0 ? m->slot[slot] : NULL;
        if (!q) {
            logf_(e, L_WARNING, "chain '%s': server pid %d answered a slot it does not hold; "
                  "it leaves the chain", m->chain->name, m->pid);
            drop_member(e, m, EPROTO, "broke the channel protocol");
            push_event(e, FAYT_FAULT_EV_DROP, L_WARNING, m->efd, EPROTO,
                       "broke the channel protocol");
            return;
        }
        m->slot[slot] = NULL;
        m->inflight--;
        if (q->state == REQ_DONE) {
            req_free(q);
        } else {
            q->state = REQ_NEW;         /* reaped: being resolved or forwarded */
            q->slot = -1;
            q->member = NULL;
            answered(e, m, q, (uint32_t)slot);
        }
        m->free[m->nfree++] = (uint32_t)slot;
    }
    while (m->bhead && m->nfree && !m->dropped) {
        struct req *q = m->bhead;
        m->bhead = q->bnext;
        if (!m->bhead)
            m->btail = NULL;
        q->bnext = NULL;
        post(e, m, q);
    }
}

/* Wait a few microseconds for the answers of requests just posted: a
 * server that answers at once costs no trip through the loop. */
static void spin(struct fayt_faults *e)
{
    struct fayt_faults_priv *p = e->priv;
    while (p->posted) {
        struct member *m = p->posted;
        p->posted = m->next_posted;
        m->posted = 0;
        m->next_posted = NULL;
        if (!m->dropped && channel_await(m, e->spin_ns))
            reap(e, m);
    }
}

static void unpost(struct fayt_faults_priv *p, struct member *m)
{
    if (!m->posted)
        return;
    for (struct member **pp = &p->posted; *pp; pp = &(*pp)->next_posted) {
        if (*pp == m) {
            *pp = m->next_posted;
            break;
        }
    }
    m->posted = 0;
    m->next_posted = NULL;
}

static void chain_maybe_free(struct fayt_faults_priv *p, struct chain *c)
{
    if (c->live || c->nmembers || c->nregions)
        return;
    for (struct chain **pp = &p->chains; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    free(c->members);
    free(c);
}

/* m leaves its chain now: its requests fail with err, its channel closes.
 * The struct stays (its efd routed to nothing) until fayt_fault_member_del. */
static void drop_member(struct fayt_faults *e, struct member *m, int err, const char *why)
{
    struct fayt_faults_priv *p = e->priv;
    if (m->dropped)
        return;
    struct chain *c = m->chain;
    for (uint32_t i = 0; i < c->nmembers; i++) {
        if (c->members[i] == m) {
            memmove(c->members + i, c->members + i + 1,
                    (c->nmembers - i - 1) * sizeof *c->members);
            c->nmembers--;
            break;
        }
    }
    /* In flight (in slot order, then the backlog): each fails. */
    for (uint32_t s = 0; s < m->nslots; s++) {
        struct req *q = m->slot[s];
        if (q && q->state != REQ_DONE) {
            logf_(e, L_INFO, "chain '%s': server pid %d %s with a request in flight: failed",
                  c->name, m->pid, why);
            fail(e, q, err);
        }
    }
    while (m->bhead) {
        struct req *q = m->bhead;
        logf_(e, L_INFO, "chain '%s': server pid %d %s with a request in flight: failed",
              c->name, m->pid, why);
        fail(e, q, err);            /* (takes it off the backlog) */
    }
    m->dropped = 1;
    unpost(p, m);
    /* Slots of requests already done: nobody reaps them now. */
    for (uint32_t s = 0; s < m->nslots; s++) {
        if (m->slot[s]) {
            req_free(m->slot[s]);
            m->slot[s] = NULL;
        }
    }
    m->inflight = 0;
    channel_close(m);
    /* Regions that map its backing keep the mapping; their requests no
     * longer go to it. */
    for (struct region *r = p->regions; r; r = r->next)
        if (r->backing_member == m)
            r->backing_member = NULL;
    m->chain = NULL;
    chain_maybe_free(p, c);
}

/* -- events ------------------------------------------------------------------ */
#define UFFD_FLAG_WRITE 1       /* UFFD_PAGEFAULT_FLAG_WRITE */
#define UFFD_FLAG_WP 2          /* UFFD_PAGEFAULT_FLAG_WP */
/* (UFFD_PAGEFAULT_FLAG_MINOR is not looked at: a minor fault is a read fault here.) */

static int add_waiter(struct req *q, struct region *r)
{
    for (uint32_t i = 0; i < q->nwaiters; i++)
        if (q->waiters[i] == r)
            return 0;
    if (q->nwaiters == q->capwaiters) {
        uint32_t cap = q->capwaiters ? q->capwaiters * 2 : 4;
        struct region **w = realloc(q->waiters, cap * sizeof *w);
        if (!w)
            return ENOMEM;
        q->waiters = w;
        q->capwaiters = cap;
    }
    q->waiters[q->nwaiters++] = r;
    return 0;
}

static void remove_waiter(struct req *q, struct region *r)
{
    for (uint32_t i = 0; i < q->nwaiters; i++) {
        if (q->waiters[i] == r) {
            memmove(q->waiters + i, q->waiters + i + 1, (q->nwaiters - i - 1) * sizeof *q->waiters);
            q->nwaiters--;
            return;
        }
    }
}

static void on_faults(struct fayt_faults *e, struct region *r)
{
    struct fayt_faults_priv *p = e->priv;
    struct fayt_uffd_fault buf[32];
    p->batch++;
    p->in_fault = 1;
    for (;;) {
        int n = uffd_io_read(r->uffd, buf, 32);
        if (n < 0) {
            char why[200];
            snprintf(why, sizeof why, "region %u: reading its userfaultfd: %s", r->id,
                     strerror(-n));
            r->closed = 1;      /* Python closes it (the event below) */
            push_event(e, FAYT_FAULT_EV_LOG, L_WARNING, -1, 0, why);
            push_event(e, FAYT_FAULT_EV_CLOSE, L_WARNING, r->uffd, -n, why);
            break;
        }
        for (int i = 0; i < n; i++) {
            if (buf[i].address < r->addr)
                continue;
            uint64_t off = (buf[i].address - r->addr) & ~(PAGE - 1);
            if (off >= r->length)
                continue;
            r->n.faults++;
            e->total.faults++;
            struct req *same = pending_find(r->pending, off);
            if (same) {             /* the same page is on its way */
                if (same->region != r && add_waiter(same, r))
                    logf_(e, L_WARNING, "region %u: no memory to wait for page 0x%llx",
                          r->id, (unsigned long long)off);
                continue;
            }
            int wp_fault = (buf[i].flags & UFFD_FLAG_WP) != 0;
            int write = wp_fault || (r->wp && (buf[i].flags & UFFD_FLAG_WRITE));
            struct req *q = calloc(1, sizeof *q);
            if (!q) {
                logf_(e, L_WARNING, "region %u: no memory for a request at 0x%llx: the access "
                      "gets SIGBUS", r->id, (unsigned long long)off);
                uffd_io_poison(r->uffd, r->addr + off, PAGE);
                continue;
            }
            q->id = p->next_req++;
            e->requests++;
            q->region = r;
            q->offset = off;
            q->access = write ? FAYT_ACCESS_WRITE : FAYT_ACCESS_READ;
            q->present = wp_fault;
            q->slot = -1;
            q->heap_at = -1;
            q->batch = p->batch;
            q->state = REQ_NEW;
            q->t0 = e->trace ? fayt_now_ns() : 0;
            pending_add(r->pending, q);
            dispatch(e, q);
        }
        if (n < 32 || r->closed)
            break;
    }
    spin(e);
    p->in_fault = 0;
}

static void on_answers(struct fayt_faults *e, struct member *m)
{
    if (m->dropped)
        return;
    /* Edge-triggered: every eventfd write is an edge, so its counter need
     * not be read back. */
    __atomic_store_n(&hdr(m)->rung, 0, __ATOMIC_SEQ_CST);
    reap(e, m);
    spin(e);
}

static void on_timer(struct fayt_faults *e)
{
    struct fayt_faults_priv *p = e->priv;
    uint64_t v;
    while (read(e->timer_fd, &v, sizeof v) == sizeof v)
        ;
    p->armed_for = 0;
    int64_t now = fayt_now_ns();
    while (p->nheap && p->heap[0]->deadline <= now) {
        struct req *q = p->heap[0];
        heap_remove(p, q);
        if (q->state == REQ_HELD) {     /* an injected delay is over: on to the server */
            q->state = REQ_NEW;
            dispatch(e, q);
            continue;
        }
        struct member *m = q->member;
        struct region *r = q->region;
        if (m)
            logf_(e, L_INFO, "chain '%s': server pid %d silent for %u ms: request failed",
                  r->chain->name, m->pid, r->chain->timeout_ms);
        else
            logf_(e, L_INFO, "chain '%s': server pid ? silent for %u ms: request failed",
                  r->chain->name, r->chain->timeout_ms);
        fail(e, q, ETIMEDOUT);
    }
    if (p->nheap)
        arm(e, p->heap[0]->deadline);
    spin(e);
}

int fayt_faults_event(struct fayt_core *k, int fd, uint32_t events)
{
    (void)events;
    struct fayt_faults *e = k->faults;
    if (!e)
        return 0;
    struct fdent *f = fd_get(e->priv, fd);
    if (!f)
        return 0;
    switch (f->kind) {
    case FD_REGION: {
        struct region *r = f->obj;
        if (!r->closed)
            on_faults(e, r);
        break;
    }
    case FD_MEMBER:
        on_answers(e, f->obj);
        break;
    case FD_TIMER:
        on_timer(e);
        break;
    }
    return 1;
}

/* -- configuration (Python) ------------------------------------------------------ */
int fayt_faults_init(struct fayt_core *k, int64_t spin_ns)
{
    if (k->faults)
        return EEXIST;
    struct fayt_faults *e = calloc(1, sizeof *e);
    struct fayt_faults_priv *p = calloc(1, sizeof *p);
    if (!e || !p) {
        free(e);
        free(p);
        return ENOMEM;
    }
    e->priv = p;
    e->spin_ns = spin_ns;
    p->next_req = 1;
    e->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    e->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    int err = e->notify_fd < 0 || e->timer_fd < 0 ? errno : 0;
    if (!err)
        err = fd_set_(p, e->timer_fd, FD_TIMER, NULL);
    if (err) {
        if (e->notify_fd >= 0)
            close(e->notify_fd);
        if (e->timer_fd >= 0)
            close(e->timer_fd);
        free(p->fds);
        free(p);
        free(e);
        return err;
    }
    k->faults = e;
    return 0;
}

static struct chain *chain_find(struct fayt_faults_priv *p, uint32_t id)
{
    for (struct chain *c = p->chains; c; c = c->next)
        if (c->id == id && c->live)
            return c;
    return NULL;
}

int fayt_fault_chain_add(struct fayt_core *k, uint32_t chain_id, const char *name,
                         uint32_t flags, uint32_t timeout_ms)
{
    struct fayt_faults_priv *p = k->faults->priv;
    if (chain_find(p, chain_id))
        return EEXIST;
    struct chain *c = calloc(1, sizeof *c);
    if (!c)
        return ENOMEM;
    c->id = chain_id;
    snprintf(c->name, sizeof c->name, "%s", name);
    c->flags = flags;
    c->timeout_ms = timeout_ms;
    c->live = 1;
    c->next = p->chains;
    p->chains = c;
    return 0;
}

int fayt_fault_chain_inject(struct fayt_core *k, uint32_t chain_id,
                            const struct fayt_fault_inject *rule)
{
    struct chain *c = chain_find(k->faults->priv, chain_id);
    if (!c)
        return ENOENT;
    if (rule->kind > FAYT_FAULT_INJECT_SLOW || (rule->kind == FAYT_FAULT_INJECT_FAIL
                                               && (rule->err <= 0 || rule->err > 4095)))
        return EINVAL;
    c->inject = *rule;
    c->inject.fired = 0;
    c->inject_events = 0;
    return 0;
}

int fayt_fault_chain_injected(struct fayt_core *k, uint32_t chain_id, uint64_t *events,
                              uint64_t *fired)
{
    struct chain *c = chain_find(k->faults->priv, chain_id);
    if (!c)
        return ENOENT;
    *events = c->inject_events;
    *fired = c->inject.fired;
    return 0;
}

void fayt_fault_chain_del(struct fayt_core *k, uint32_t chain_id)
{
    struct fayt_faults_priv *p = k->faults->priv;
    struct chain *c = chain_find(p, chain_id);
    if (!c)
        return;
    c->live = 0;
    chain_maybe_free(p, c);
}

int fayt_fault_member_add(struct fayt_core *k, uint32_t chain_id, void *ch, uint32_t nslots,
                          uint32_t run_max, int efd, int32_t pid)
{
    struct fayt_faults_priv *p = k->faults->priv;
    struct chain *c = chain_find(p, chain_id);
    if (!c)
        return ENOENT;
    if (nslots < 1 || nslots > SLOTS || run_max % PAGE || run_max > FAYT_PAGER_RUN_MAX)
        return EINVAL;
    if (fd_get(p, efd))
        return EEXIST;
    struct member *m = calloc(1, sizeof *m);
    if (!m)
        return ENOMEM;
    if (c->nmembers == c->cap) {
        uint32_t cap = c->cap ? c->cap * 2 : 4;
        struct member **a = realloc(c->members, cap * sizeof *a);
        if (!a) {
            free(m);
            return ENOMEM;
        }
        c->members = a;
        c->cap = cap;
    }
    int err = fd_set_(p, efd, FD_MEMBER, m);
    if (err) {
        free(m);
        return err;
    }
    m->efd = efd;
    m->pid = pid;
    m->chain = c;
    m->ch = ch;
    m->nslots = nslots;
    m->run_max = run_max;
    m->stride = FAYT_PAGER_DESC_SIZE + run_max;
    for (uint32_t i = 0; i < nslots; i++)           /* slot 0 is taken first */
        m->free[i] = nslots - 1 - i;
    m->nfree = nslots;
    struct fayt_pager_header *h = hdr(m);
    h->nslots = nslots;
    h->run_max = run_max;
    h->slot_stride = m->stride;
    h->chain_id = c->id;
    h->position = c->nmembers;
    STORE(&h->magic, FAYT_PAGER_MAGIC);
    c->members[c->nmembers++] = m;
    m->next = p->members;
    p->members = m;
    return 0;
}

void fayt_fault_member_del(struct fayt_core *k, int efd, int err, const char *why)
{
    struct fayt_faults *e = k->faults;
    struct fayt_faults_priv *p = e->priv;
    struct fdent *f = fd_get(p, efd);
    if (!f || f->kind != FD_MEMBER)
        return;
    struct member *m = f->obj;
    drop_member(e, m, err, why);
    fd_set_(p, efd, FD_NONE, NULL);
    for (struct member **pp = &p->members; *pp; pp = &(*pp)->next) {
        if (*pp == m) {
            *pp = m->next;
            break;
        }
    }
    free(m);
}

int fayt_fault_region_add(struct fayt_core *k, int uffd, uint32_t region_id, uint64_t addr,
                          uint64_t length, uint32_t chain_id, const char *message,
                          uint32_t message_length, int wp, uint32_t share, int32_t pid,
                          int backing_efd, uint32_t backing_id)
{
    struct fayt_faults_priv *p = k->faults->priv;
    struct chain *c = chain_find(p, chain_id);
    if (!c)
        return ENOENT;
    if (message_length > FAYT_MESSAGE_MAX || length == 0 || length % PAGE || addr % PAGE)
        return EINVAL;
    if (fd_get(p, uffd))
        return EEXIST;
    struct member *bm = NULL;
    if (backing_id) {
        struct fdent *f = fd_get(p, backing_efd);
        if (!f || f->kind != FD_MEMBER || ((struct member *)f->obj)->dropped)
            return ENOENT;
        bm = f->obj;
    }
    struct region *r = calloc(1, sizeof *r);
    char *msg = malloc(message_length + 1);
    if (!r || !msg) {
        free(r);
        free(msg);
        return ENOMEM;
    }
    memcpy(msg, message, message_length);
    msg[message_length] = 0;
    struct ptable *t = NULL;
    if (share)
        for (t = p->shares; t && t->share != share; t = t->next)
            ;
    if (!t) {
        t = calloc(1, sizeof *t);
        if (!t) {
            free(r);
            free(msg);
            return ENOMEM;
        }
        t->share = share;
        if (share) {
            t->next = p->shares;
            p->shares = t;
        }
    }
    int err = fd_set_(p, uffd, FD_REGION, r);
    if (err) {
        if (!t->refs) {
            if (share)
                p->shares = t->next;
            free(t);
        }
        free(r);
        free(msg);
        return err;
    }
    t->refs++;
    r->uffd = uffd;
    r->id = region_id;
    r->pid = pid;
    r->addr = addr;
    r->length = length;
    r->chain = c;
    r->message = msg;
    r->mlen = message_length;
    r->wp = wp;
    r->pending = t;
    r->backing_member = bm;
    r->backing_id = bm ? backing_id : 0;
    c->nregions++;
    r->next = p->regions;
    p->regions = r;
    return 0;
}

static struct region *region_of(struct fayt_faults_priv *p, int uffd)
{
    struct fdent *f = fd_get(p, uffd);
    return f && f->kind == FD_REGION ? f->obj : NULL;
}

int fayt_fault_region_counts(struct fayt_core *k, int uffd, struct fayt_fault_counts *out)
{
    struct region *r = k->faults ? region_of(k->faults->priv, uffd) : NULL;
    if (!r)
        return ENOENT;
    *out = r->n;
    return 0;
}

void fayt_fault_region_del(struct fayt_core *k, int uffd)
{
    struct fayt_faults *e = k->faults;
    struct fayt_faults_priv *p = e->priv;
    struct region *r = region_of(p, uffd);
    if (!r)
        return;
    r->closed = 1;
    struct ptable *t = r->pending;
    struct req *q = t->head;
    while (q) {
        struct req *nx = q->pnext;
        remove_waiter(q, r);
        if (q->region == r) {
            if (q->nwaiters) {          /* another process waits for it: keep it */
                q->region = q->waiters[0];
                remove_waiter(q, q->region);
            } else {
                req_done(e, q, 1);
            }
        }
        q = nx;
    }
    if (--t->refs == 0) {
        if (t->share) {
            for (struct ptable **pp = &p->shares; *pp; pp = &(*pp)->next) {
                if (*pp == t) {
                    *pp = t->next;
                    break;
                }
            }
        }
        free(t);
    }
    fd_set_(p, uffd, FD_NONE, NULL);
    for (struct region **pp = &p->regions; *pp; pp = &(*pp)->next) {
        if (*pp == r) {
            *pp = r->next;
            break;
        }
    }
    struct chain *c = r->chain;
    c->nregions--;
    chain_maybe_free(p, c);
    free(r->message);
    free(r);
}

void fayt_faults_fini(struct fayt_core *k)
{
    struct fayt_faults *e = k->faults;
    if (!e)
        return;
    struct fayt_faults_priv *p = e->priv;
    while (p->regions)
        fayt_fault_region_del(k, p->regions->uffd);
    while (p->members)
        fayt_fault_member_del(k, p->members->efd, EPIPE, "shut down");
    while (p->chains) {
        struct chain *c = p->chains;
        p->chains = c->next;
        free(c->members);
        free(c);
    }
    close(e->notify_fd);
    close(e->timer_fd);
    free(p->heap);
    free(p->fds);
    free(p);
    free(e);
    k->faults = NULL;
}
