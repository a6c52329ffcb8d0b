/* ring.c: notification rings, futex waits and the doorbell wait.
 *
 * Linux facts this relies on:
 * - Shared futexes key on the backing page, so a sender and a target that
 *   map the same ring object meet on its words (done, space).
 * - A real-time signal that is blocked stays pending; sigtimedwait(2) takes
 *   it synchronously, so a target asleep in fayt_notify_wait consumes its
 *   doorbell without running a signal handler at all (the fast path), while
 *   a target running Python code gets it through Python's handler.
 * - Dekker-style handshakes (entry published / target_waiting, rung) need
 *   sequentially consistent fences on both sides; each is marked below.
 * The layout and the state machine of an entry are in fayt/notification.h.
 *
 * Trust (DESIGN section 8): both sides map the ring read-write, so each
 * side validates what the other can write and bounds every loop over it.
 * The sender checks each sequence word against the position it holds
 * (a word no protocol step writes is EPROTO), never waits past its
 * deadline (NOWAIT: never), and never signals a pid read from the ring.
 * The target keeps its consumer position in process memory, reads each
 * entry's words once, takes the sender's id from faytd's record, and a
 * ring with an entry out of range is dropped (dispatcher.dropped).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>

#include "fayt/common/trace.h"
#include "fayt/common/deadline.h"
#include "fayt/common/futex.h"
#include "fayt/common/waits.h"
#include "fayt/context.h"
#include "fayt/notification.h"
#include "fayt/ring.h"

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)

static inline struct fayt_ring_header *hdr(void *ring) { return (struct fayt_ring_header *)ring; }
static inline struct fayt_ring_entry *entries(void *ring)
{
    return (struct fayt_ring_entry *)((char *)ring + FAYT_RING_HEADER_SIZE);
}

uint64_t fayt_ring_bytes(void)
{
    uint64_t n = FAYT_RING_HEADER_SIZE + (uint64_t)FAYT_RING_ENTRIES * sizeof(struct fayt_ring_entry);
    return (n + 4095) & ~(uint64_t)4095;
}

void fayt_ring_init(void *ring, uint32_t sender, uint32_t target, int32_t target_pid)
{
    struct fayt_ring_header *h = hdr(ring);
    struct fayt_ring_entry *e = entries(ring);
    h->size = FAYT_RING_ENTRIES;
    h->sender = sender;
    h->target = target;
    h->target_pid = target_pid;
    for (uint32_t i = 0; i < FAYT_RING_ENTRIES; i++)
        e[i].seq = i;
    STORE(&h->magic, FAYT_RING_MAGIC);
}


/* cffi's binding of fayt/common/futex.h's wake, for faytd's Python (C
 * calls fayt_futex_wake_n). */
int fayt_futex_wake(uint32_t *word, int n)
{
    return fayt_futex_wake_n(word, n);
}

int fayt_pidfd_signal(int pidfd, int signo)
{
    return syscall(SYS_pidfd_send_signal, pidfd, signo, NULL, 0) == 0 ? 0 : errno;
}

/* An entry was freed: wake senders asleep on space. */
static void space_freed(struct fayt_ring_header *h)
{
    FENCE();   /* pairs with the sender's fence between space_waiters++ and its re-check */
    if (LOAD(&h->space_waiters)) {
        __atomic_fetch_add(&h->space, 1, __ATOMIC_SEQ_CST);
        fayt_futex_wake_n(&h->space, INT_MAX);
    }
}

/* Ring the target's doorbell (one outstanding per ring).  Returns 0, or
 * FAYT_RING_POSTED_RING when this process may not signal the target (no
 * pidfd, or the kernel refused: another uid) and faytd must ring it.  The
 * pid in the header is never used: the target can write it. */
static int ring_doorbell(struct fayt_ring_header *h, int doorbell_fd, int signo)
{
    if (__atomic_exchange_n(&h->rung, 1, __ATOMIC_SEQ_CST))
        return 0;   /* one is outstanding: the target clears rung before it scans */
    if (doorbell_fd < 0)
        return FAYT_RING_POSTED_RING;
    int r = fayt_pidfd_signal(doorbell_fd, signo);
    if (r == 0)
        return 0;
    if (r == ESRCH) {   /* gone: faytd marks the ring; let a next post try again */
        STORE(&h->rung, 0);
        return 0;
    }
    return FAYT_RING_POSTED_RING;   /* EPERM (another uid), EAGAIN (queue full) */
}

/* A sender's view of the ring's state word (faytd writes it; the target
 * could, and only denies itself service so). */
static int state_error(struct fayt_ring_header *h)
{
    uint32_t st = LOAD(&h->state);
    if (st == FAYT_RING_LIVE)
        return 0;
    return st == FAYT_RING_TARGET_DEAD ? ESRCH : EPROTO;
}

int fayt_ring_post(void *ring, uint32_t index, uint32_t flags, uint32_t sender,
                   const void *payload, uint32_t length, int64_t timeout_ns,
                   int doorbell_fd, int signo, uint32_t *pos_out, uint32_t *hint)
{
    return fayt_ring_post_fault(ring, index, flags, sender, payload, length, timeout_ns,
                                doorbell_fd, signo, pos_out, hint, FAYT_DOORBELL_RING, 0);
}

int fayt_ring_post_fault(void *ring, uint32_t index, uint32_t flags, uint32_t sender,
                         const void *payload, uint32_t length, int64_t timeout_ns,
                         int doorbell_fd, int signo, uint32_t *pos_out, uint32_t *hint,
                         int doorbell, int64_t delay_ns)
{
    struct fayt_ring_header *h = hdr(ring);
    struct fayt_ring_entry *e = entries(ring);
    const uint32_t mask = FAYT_RING_ENTRIES - 1;
    struct timespec deadline, rel;
    int timed = 0, have_deadline = 0;
    uint32_t pos, spins = 0;

    if (index >= FAYT_NOTIFICATION_SLOTS || (flags & ~FAYT_NOTIFY_FLAGS) ||
        length > FAYT_NOTIFY_PAYLOAD_MAX)
        return EINVAL;
    for (;; spins++) {
        int bad = state_error(h);
        if (bad)
            return bad;
        if (spins && (spins & 63) == 0) {
            /* Many rounds without a free entry or a won CAS: other threads
             * of this process, or a target rewriting head.  Either way the
             * deadline bounds it. */
            if (flags & FAYT_NOTIFY_NOWAIT)
                return EAGAIN;
            if (!have_deadline) {
                timed = fayt_deadline(timeout_ns, &deadline);
                have_deadline = 1;
            }
            if (timed && !fayt_remaining(&deadline, &rel))
                return ETIMEDOUT;
            sched_yield();
        }
        pos = __atomic_load_n(&h->head, __ATOMIC_RELAXED);
        uint32_t seq = LOAD(&e[pos & mask].seq);
        int32_t diff = (int32_t)(seq - pos);
        /* What the protocol writes into the entry at pos's slot: pos - N
         * (free for the lap before, a slow thread of ours holds it), pos - N
         * + 1 (posted the lap before, not yet freed: full), pos (free), pos
         * + 1 and pos + N (another thread of ours took pos: head has moved
         * on).  Anything else, or a head that stays behind a taken entry, is
         * a scribbled ring. */
        if (diff < -(int32_t)FAYT_RING_ENTRIES || diff > (int32_t)FAYT_RING_ENTRIES ||
            ((uint32_t)diff & mask) > 1)
            return EPROTO;
        if (diff == 0) {
            if (__atomic_compare_exchange_n(&h->head, &pos, pos + 1, 0,
                                            __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                break;
            continue;
        }
        if (diff > 0) {
            /* The thread that took pos moved head before it published the
             * entry (and we read the entry with acquire): a head still at
             * pos was written back by someone else. */
            if (__atomic_load_n(&h->head, __ATOMIC_RELAXED) == pos)
                return EPROTO;
            continue;
        }
        /* Full at pos. */
        if (flags & FAYT_NOTIFY_NOWAIT)
            return EAGAIN;
        if (!have_deadline) {
            timed = fayt_deadline(timeout_ns, &deadline);
            have_deadline = 1;
        }
        uint32_t sp = LOAD(&h->space);
        __atomic_fetch_add(&h->space_waiters, 1, __ATOMIC_SEQ_CST);
        FENCE();
        int r = 0;
        if (LOAD(&e[pos & mask].seq) == pos || LOAD(&h->state) != FAYT_RING_LIVE) {
            r = 0;
        } else if (timed && !fayt_remaining(&deadline, &rel)) {
            r = ETIMEDOUT;
        } else {
            r = fayt_futex_sleep(&h->space, sp, timed ? &rel : NULL);
        }
        __atomic_fetch_sub(&h->space_waiters, 1, __ATOMIC_SEQ_CST);
        if (r == ETIMEDOUT || r == EINTR)
            return r;
        /* Woken (perhaps by a target that bumps space for nothing): look
         * again; the deadline check above bounds the rounds. */
    }
    struct fayt_ring_entry *x = &e[pos & mask];
    x->index = (uint16_t)index;
    x->flags = (uint16_t)flags;
    x->sender = sender;     /* informational: the target uses faytd's record */
    x->length = length;
    x->status = 0;
    x->result = 0;
    if (length)
        memcpy(x->payload, payload, length);
    __atomic_store_n(&x->done, FAYT_DONE_PENDING, __ATOMIC_RELAXED);
    STORE(&x->seq, pos + 1);
    __atomic_fetch_add(&h->posted, 1, __ATOMIC_RELAXED);
    *pos_out = pos;
    if (hint)   /* after the entry (release): a target that sees the bump sees the entry */
        __atomic_fetch_add(hint, 1, __ATOMIC_SEQ_CST);
    FENCE();    /* the entry is visible before we read target_waiting (pairs with the wait) */
    int rc = 0;
    if (doorbell == FAYT_DOORBELL_DELAY && delay_ns > 0) {
        /* An injected fault (docs/testing.md): the entry is there, its
         * doorbell comes late.  The sleep is the post's own. */
        struct timespec ts;
        fayt_ns_to_ts(delay_ns, &ts);
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
    }
    if (doorbell == FAYT_DOORBELL_DROP) {
        /* An injected fault: neither the signal nor the wake.  A target
         * asleep in a libportal wait finds the entry when its wait ends
         * (its deadline, another doorbell); a running one at its next
         * dispatch point.  target_waiting is left as the target set it. */
    } else if (LOAD(&h->armed)) {
        uint32_t w = __atomic_exchange_n(&h->target_waiting, 0, __ATOMIC_SEQ_CST);
        if (w == 1)
            fayt_futex_wake_n(&h->target_waiting, 1);     /* asleep in futex_waitv: no signal */
        else if (w == 2 || (flags & FAYT_NOTIFY_IMMEDIATE))
            rc = ring_doorbell(h, doorbell_fd, signo); /* in sigtimedwait, or running code */
        /* Immediate reschedule: give the CPU away.  With the return flag
         * the sender's futex sleep that follows is the yield. */
        if ((flags & FAYT_NOTIFY_IMMEDIATE) && !(flags & FAYT_NOTIFY_RETURN))
            sched_yield();
    }
    return rc;
}

int fayt_ring_wait_return(void *ring, uint32_t pos, int64_t timeout_ns,
                          int64_t *result, int32_t *status, struct fayt_context_page *page)
{
    struct fayt_ring_header *h = hdr(ring);
    struct fayt_ring_entry *x = &entries(ring)[pos & (FAYT_RING_ENTRIES - 1)];
    struct timespec deadline, rel;
    int timed = fayt_deadline(timeout_ns, &deadline);

    for (;;) {
        uint32_t d = LOAD(&x->done);
        if (d == FAYT_DONE_RETURNED) {
            *result = x->result;
            *status = x->status;
            STORE(&x->seq, pos + FAYT_RING_ENTRIES);   /* free for the next lap */
            space_freed(h);
            return 0;
        }
        if (d == FAYT_DONE_DEAD)
            return LOAD(&h->state) == FAYT_RING_DROPPED ? EPROTO : ESRCH;
        if (d != FAYT_DONE_PENDING)
            return EPROTO;      /* only this sender abandons an entry */
        FENCE();    /* pairs with fayt_ring_kill: state before done */
        int bad = state_error(h);
        if (bad)
            return bad;
        int r;
        if (timed && !fayt_remaining(&deadline, &rel))
            r = ETIMEDOUT;
        else {
            fayt_wait_begin(page);  /* the scheduler's events (context.h) */
            r = fayt_futex_sleep(&x->done, d, timed ? &rel : NULL);
            fayt_wait_end(page);
        }
        if (r == 0 && timed && !fayt_remaining(&deadline, &rel) &&
            LOAD(&x->done) == FAYT_DONE_PENDING)
            r = ETIMEDOUT;      /* woken for nothing at the deadline */
        if (r == ETIMEDOUT) {
            uint32_t pending = FAYT_DONE_PENDING;
            if (__atomic_compare_exchange_n(&x->done, &pending, FAYT_DONE_ABANDONED, 0,
                                            __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                return ETIMEDOUT;
            if (pending == FAYT_DONE_RETURNED || pending == FAYT_DONE_DEAD)
                continue;       /* it returned (or died) meanwhile: once more */
            return EPROTO;
        }
        if (r == EINTR)
            return EINTR;
    }
}

int fayt_ring_ready(void *ring, uint32_t tail)
{
    return LOAD(&entries(ring)[tail & (FAYT_RING_ENTRIES - 1)].seq) == tail + 1;
}

/* Whether an entry with FAYT_NOTIFY_IMMEDIATE is ready from tail on (at most
 * one lap: bounded whatever the sender wrote). */
static int immediate_ready(void *ring, uint32_t pos)
{
    struct fayt_ring_entry *e = entries(ring);
    for (uint32_t k = 0; k < FAYT_RING_ENTRIES; k++, pos++) {
        struct fayt_ring_entry *x = &e[pos & (FAYT_RING_ENTRIES - 1)];
        if (LOAD(&x->seq) != pos + 1)
            return 0;
        if (__atomic_load_n(&x->flags, __ATOMIC_RELAXED) & FAYT_NOTIFY_IMMEDIATE)
            return 1;
    }
    return 0;
}

/* Take the entry at *tail into f: 0 none, 1 taken (kept until
 * notification_ret: FAYT_NOTIFY_RETURN), 2 taken and freed (the caller
 * calls space_freed once for any number of these), -1 the entry is corrupt
 * (nothing taken).  Every word is read once, then checked: the sender may
 * change the entry meanwhile. */
static int take_entry(struct fayt_ring_header *h, struct fayt_ring_entry *e, uint32_t *tail,
                      struct fayt_notification_frame *f)
{
    uint32_t pos = *tail;
    struct fayt_ring_entry *x = &e[pos & (FAYT_RING_ENTRIES - 1)];
    if (LOAD(&x->seq) != pos + 1)
        return 0;
    uint32_t index = __atomic_load_n(&x->index, __ATOMIC_RELAXED);
    uint32_t flags = __atomic_load_n(&x->flags, __ATOMIC_RELAXED);
    uint32_t len = __atomic_load_n(&x->length, __ATOMIC_RELAXED);
    if (index >= FAYT_NOTIFICATION_SLOTS || (flags & ~FAYT_NOTIFY_FLAGS) ||
        len > FAYT_NOTIFY_PAYLOAD_MAX)
        return -1;
    f->index = index;
    f->flags = flags;
    f->length = len;
    f->pos = pos;
    memcpy(f->payload, x->payload, len);
    *tail = pos + 1;
    STORE(&h->tail, pos + 1);       /* statistics only: never read back */
    if (flags & FAYT_NOTIFY_RETURN)
        return 1;
    STORE(&x->seq, pos + FAYT_RING_ENTRIES);
    return 2;
}

void fayt_ring_return(void *ring, uint32_t pos, int64_t result, int32_t status)
{
    struct fayt_ring_header *h = hdr(ring);
    struct fayt_ring_entry *x = &entries(ring)[pos & (FAYT_RING_ENTRIES - 1)];
    x->result = result;
    x->status = status;
    uint32_t pending = FAYT_DONE_PENDING;
    if (__atomic_compare_exchange_n(&x->done, &pending, FAYT_DONE_RETURNED, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        fayt_futex_wake_n(&x->done, 1);
        return;
    }
    if (pending == FAYT_DONE_ABANDONED) {     /* the sender gave up: we free it */
        STORE(&x->seq, pos + FAYT_RING_ENTRIES);
        space_freed(h);
    }
}

void fayt_ring_clear_doorbell(void *ring)
{
    __atomic_store_n(&hdr(ring)->rung, 0, __ATOMIC_SEQ_CST);
}

void fayt_ring_kill(void *ring, uint32_t state)
{
    struct fayt_ring_header *h = hdr(ring);
    struct fayt_ring_entry *e = entries(ring);
    __atomic_store_n(&h->state, state, __ATOMIC_SEQ_CST);
    if (state == FAYT_RING_TARGET_DEAD || state == FAYT_RING_DROPPED) {
        for (uint32_t i = 0; i < FAYT_RING_ENTRIES; i++) {
            uint32_t pending = FAYT_DONE_PENDING;
            if (__atomic_compare_exchange_n(&e[i].done, &pending, FAYT_DONE_DEAD, 0,
                                            __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
                fayt_futex_wake_n(&e[i].done, INT_MAX);
        }
    }
    __atomic_fetch_add(&h->space, 1, __ATOMIC_SEQ_CST);
    fayt_futex_wake_n(&h->space, INT_MAX);
}

int fayt_ring_posted(void *ring)
{
    struct fayt_ring_entry *e = entries(ring);
    for (uint32_t i = 0; i < FAYT_RING_ENTRIES; i++)
        if ((LOAD(&e[i].seq) & (FAYT_RING_ENTRIES - 1)) == ((i + 1) & (FAYT_RING_ENTRIES - 1)))
            return 1;
    return 0;
}

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
#define FUTEX2_SIZE_U32_ 0x02
#define FUTEX_WAITV_MAX_ 128

struct futex_waitv_ {
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};

static int waitv_ok = 1;    /* futex_waitv(2) exists (Linux 5.16+) */

/* Whether one of d's rings has an entry at its consumer position (the ring
 * state is not looked at: a sender could write it; faytd bumps the
 * generation when a ring is added or reclaimed). */
static int any_ready(struct fayt_dispatcher *d)
{
    for (int i = 0; i < d->n; i++)
        if (d->ring_ids[i] != d->dropped && fayt_ring_ready(d->rings[i], *d->tails[i]))
            return 1;
    return 0;
}

/* target_waiting: 1 asleep in futex_waitv (a sender wakes the word), 2 asleep
 * in sigtimedwait (a sender rings the doorbell).  A sender exchanges it to 0. */
static int wait_futexes(struct fayt_dispatcher *d, const uint32_t *generation, uint32_t seen,
                        int64_t timeout_ns)
{
    struct futex_waitv_ w[FUTEX_WAITV_MAX_];
    int n = d->n;
    w[0].val = seen;
    w[0].uaddr = (uintptr_t)generation;
    w[0].flags = FUTEX2_SIZE_U32_;
    w[0].reserved = 0;
    for (int i = 0; i < n; i++) {
        struct fayt_ring_header *h = hdr(d->rings[i]);
        __atomic_store_n(&h->target_waiting, 1, __ATOMIC_SEQ_CST);
        w[i + 1].val = 1;
        w[i + 1].uaddr = (uintptr_t)&h->target_waiting;
        w[i + 1].flags = FUTEX2_SIZE_U32_;
        w[i + 1].reserved = 0;
    }
    FENCE();    /* target_waiting before the readiness check (pairs with post) */
    int ready = LOAD(generation) != seen || any_ready(d);
    int r = 0;
    if (!ready) {
        struct timespec abs, *tsp = NULL;
        if (timeout_ns >= 0) {
            fayt_deadline(timeout_ns, &abs);
            tsp = &abs;
        }
        fayt_wait_begin(d->page);   /* blocks: the scheduler's events (context.h) */
        long k = syscall(SYS_futex_waitv, w, n + 1, 0, tsp, CLOCK_MONOTONIC);
        if (k < 0)
            r = errno == EAGAIN ? 0 : errno;
        fayt_wait_end(d->page);
    }
    for (int i = 0; i < n; i++)
        __atomic_store_n(&hdr(d->rings[i])->target_waiting, 0, __ATOMIC_RELAXED);
    return r;
}

int fayt_notify_wait(struct fayt_dispatcher *d, const uint32_t *generation, uint32_t seen,
                     int signo, int64_t timeout_ns)
{
    int n = d->n;
    if (waitv_ok && n + 1 <= FUTEX_WAITV_MAX_) {
        int r = wait_futexes(d, generation, seen, timeout_ns);
        if (r != ENOSYS)
            return r;
        waitv_ok = 0;
    }
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, signo);
    pthread_sigmask(SIG_BLOCK, &set, &old);
    for (int i = 0; i < n; i++) {
        __atomic_store_n(&hdr(d->rings[i])->target_waiting, 2, __ATOMIC_SEQ_CST);
        __atomic_store_n(&hdr(d->rings[i])->rung, 0, __ATOMIC_SEQ_CST);
    }
    FENCE();    /* target_waiting before the readiness check (pairs with post) */
    int ready = (generation && LOAD(generation) != seen) || any_ready(d);
    int r = 0;
    if (!ready) {
        struct timespec rel, *tsp = NULL;
        if (timeout_ns >= 0) {
            fayt_ns_to_ts(timeout_ns, &rel);
            tsp = &rel;
        }
        fayt_wait_begin(d->page);
        int s = sigtimedwait(&set, NULL, tsp);
        if (s < 0)
            r = errno == EAGAIN ? ETIMEDOUT : errno;
        fayt_wait_end(d->page);
    }
    for (int i = 0; i < n; i++)
        __atomic_store_n(&hdr(d->rings[i])->target_waiting, 0, __ATOMIC_RELAXED);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return r;
}

int fayt_notify_arm_doorbell(struct fayt_dispatcher *d, const uint32_t *generation,
                             uint32_t seen)
{
    for (int i = 0; i < d->n; i++) {
        __atomic_store_n(&hdr(d->rings[i])->target_waiting, 2, __ATOMIC_SEQ_CST);
        __atomic_store_n(&hdr(d->rings[i])->rung, 0, __ATOMIC_SEQ_CST);
    }
    FENCE();    /* target_waiting before the readiness check (pairs with post) */
    return (generation && LOAD(generation) != seen) || any_ready(d);
}

static int free_stack(struct fayt_context_page *page)
{
    for (int i = 0; i < FAYT_STACKS_MAX; i++)
        if (page->stacks[i].state == FAYT_STACK_FREE && page->stacks[i].base)
            return i;
    return -1;
}

/* -- the batched dispatcher (fayt_dispatcher) ------------------------------ */

static void *ring_by_id(const struct fayt_dispatcher *d, uint32_t id)
{
    for (int i = 0; i < d->n; i++)
        if (d->ring_ids[i] == id)
            return d->rings[i];
    return NULL;
}

static void dispatch_end(struct fayt_dispatcher *d, int stack_rec, int64_t result, int32_t status)
{
    struct fayt_context_page *page = d->page;
    struct fayt_notification_stack *st = &page->stacks[stack_rec];
    struct fayt_notification_frame *f = (struct fayt_notification_frame *)(uintptr_t)st->base;
    if (f->flags & FAYT_NOTIFY_RETURN) {
        void *ring = ring_by_id(d, f->ring_id);
        if (ring)
            fayt_ring_return(ring, f->pos, result, status);
    }
    if (fayt_tracing(page))
        fayt_trace_put(page, FAYT_TRACE_NOTIFY_END, (uint16_t)f->index, f->ring_id, f->pos,
                       page->notify.depth, result, 0);
    page->notify.depth--;
    page->notify.delivered++;
    st->state = FAYT_STACK_FREE;
}

/* The queue is empty: take up to d->batch consecutive entries of the next
 * ring (round robin) that has any.  Returns how many.  A corrupt entry ends
 * the run before it and marks its ring dropped (skipped from then on). */
static uint32_t refill(struct fayt_dispatcher *d)
{
    uint32_t max = d->batch;
    if (max < 1)
        max = 1;
    if (max > FAYT_DISPATCH_BATCH)
        max = FAYT_DISPATCH_BATCH;
    d->head = d->count = 0;
    for (int k = 0; k < d->n; k++) {
        int i = (int)(((uint32_t)d->cursor + (uint32_t)k) % (uint32_t)d->n);
        if (d->dropped && d->ring_ids[i] == d->dropped)
            continue;
        struct fayt_ring_header *h = hdr(d->rings[i]);
        struct fayt_ring_entry *e = entries(d->rings[i]);
        uint32_t got = 0;
        int freed = 0;
        while (got < max) {
            int t = take_entry(h, e, d->tails[i], &d->queue[got]);
            if (t < 0 && !d->dropped)
                d->dropped = d->ring_ids[i];
            if (t <= 0)
                break;
            d->queue[got].ring_id = d->ring_ids[i];
            d->queue[got].sender = d->senders[i];
            freed |= t == 2;
            got++;
        }
        if (freed)
            space_freed(h);     /* once for the whole run */
        if (got) {
            d->count = got;
            d->cursor = (i + 1) % d->n;
            return got;
        }
    }
    return 0;
}

int fayt_dispatch_step(struct fayt_dispatcher *d, int stack_rec, int64_t result, int32_t status)
{
    struct fayt_context_page *page = d->page;
    if (stack_rec >= 0)
        dispatch_end(d, stack_rec, result, status);
    if (d->dropped && d->head >= d->count)
        return -4;
    if (LOAD(&page->notify.rings_generation) != d->generation)
        return -3;
    int s = -1;
    if (stack_rec >= 0 && page->stacks[stack_rec].state == FAYT_STACK_FREE &&
        page->stacks[stack_rec].base)
        s = stack_rec;      /* the same stack for the next one: no nesting happened */
    else
        s = free_stack(page);
    if (d->head >= d->count) {
        /* Clear the doorbells first: an entry posted after this either is
         * seen by the scan below or rings again. */
        for (int k = 0; k < d->n; k++)
            fayt_ring_clear_doorbell(d->rings[k]);
        FENCE();
        if (s < 0) {
            if (any_ready(d)) {
                page->notify.starved++;
                return -2;
            }
            return -1;
        }
        if (!refill(d))
            return d->dropped ? -4 : -1;
    } else if (s < 0) {
        page->notify.starved++;
        return -2;
    }
    struct fayt_notification_frame *q = &d->queue[d->head++];
    struct fayt_notification_stack *st = &page->stacks[s];
    struct fayt_notification_frame *f = (struct fayt_notification_frame *)(uintptr_t)st->base;
    memcpy(f, q, offsetof(struct fayt_notification_frame, payload) + q->length);
    st->state = FAYT_STACK_IN_USE;
    uint32_t depth = page->notify.depth + 1;
    f->depth = depth;
    if (depth <= FAYT_NEST_MAX) {
        struct fayt_saved_state *sv = &page->saved[depth - 1];
        sv->index = f->index;
        sv->sender = f->sender;
        sv->stack = (uint32_t)s;
        sv->ring_id = f->ring_id;
        sv->pos = f->pos;
        sv->interrupted_index = depth > 1 ? page->saved[depth - 2].index
                                          : FAYT_NOTIFICATION_SLOTS;
    }
    page->notify.depth = depth;
    if (fayt_tracing(page))
        fayt_trace_put(page, FAYT_TRACE_NOTIFY_BEGIN, (uint16_t)f->index, f->ring_id, f->pos,
                       depth | (f->flags << 16), 0, 0);
    return s;
}

void fayt_dispatch_end(struct fayt_dispatcher *d, int stack_rec, int64_t result, int32_t status)
{
    if (stack_rec >= 0)
        dispatch_end(d, stack_rec, result, status);
}

int fayt_dispatch_immediate_ready(struct fayt_dispatcher *d)
{
    for (uint32_t i = d->head; i < d->count; i++)
        if (d->queue[i].flags & FAYT_NOTIFY_IMMEDIATE)
            return 1;
    for (int k = 0; k < d->n; k++)
        if (d->ring_ids[k] != d->dropped && immediate_ready(d->rings[k], *d->tails[k]))
            return 1;
    return 0;
}
