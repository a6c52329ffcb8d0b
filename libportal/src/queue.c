/* queue.c: the user->kernel queue (fayt/queue.h, docs/queue.md).
 *
 * Facts it relies on:
 * - One producer, one consumer: each position has one writer, so a store
 *   with release order publishes what was written before it, and a load
 *   with acquire order sees it; no compare-and-swap on the data path.
 * - The wake-up is a Dekker pair (queue.h): the producer stores head and
 *   loads sleeping, faytd stores sleeping and loads head, a full fence
 *   between each store and load; the space wait is the same pair over
 *   put_waiting and tail.  FUTEX_WAIT on tail compares it with the value
 *   the producer saw, so a tail moved in between is not slept through.
 * - The producer can write every byte: faytd reads a record's bytes once,
 *   into its own memory, validates the copy, and acts on the copy.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fayt/common/deadline.h"
#include "fayt/common/futex.h"
#include "fayt/queue.h"

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)

#define HDR_BYTES ((uint32_t)sizeof(struct fayt_queue_record))

_Static_assert(sizeof(struct fayt_queue_header) <= FAYT_QUEUE_DATA_OFFSET,
               "the queue header fits page 0");
_Static_assert(sizeof(struct fayt_queue_record) == 8, "a record header is 8 bytes");

static inline struct fayt_queue_header *qh(void *q) { return (struct fayt_queue_header *)q; }
static inline char *ring(void *q) { return (char *)q + FAYT_QUEUE_DATA_OFFSET; }
static inline uint32_t rec_bytes(uint32_t length) { return HDR_BYTES + ((length + 7) & ~7u); }

void fayt_queue_init(void *q, uint32_t size, uint32_t queue_id, uint32_t producer)
{
    struct fayt_queue_header *h = qh(q);
    h->size = size;
    h->queue_id = queue_id;
    h->producer = producer;
    h->sleeping = 1;            /* faytd starts asleep: the first record wakes it */
    STORE(&h->magic, FAYT_QUEUE_MAGIC);
}

/* ---- faytd's side ---- */

static int bad(struct fayt_queue_consumer *c, uint32_t at, const char *why, unsigned long v)
{
    c->bad_at = at;
    snprintf(c->why, sizeof c->why, why, v);
    fayt_queue_kill(c, FAYT_QUEUE_DROPPED);
    return EPROTO;
}

static uint32_t payload_length(uint16_t type)
{
    return type >= FAYT_QREC_SCHED_CPUS ? (uint32_t)sizeof(struct fayt_sched_decision) : 0;
}

static void space_freed(struct fayt_queue_header *h, uint32_t tail)
{
    STORE(&h->tail, tail);
    FENCE();        /* pairs with the producer's fence after put_waiting = 1 */
    if (LOAD(&h->put_waiting)) {
        STORE(&h->put_waiting, 0);
        fayt_futex_wake_n(&h->tail, INT_MAX);
    }
}

int fayt_queue_drain(struct fayt_queue_consumer *c, uint32_t budget,
                     struct fayt_queue_decision *out, uint32_t out_max, uint32_t *nout)
{
    struct fayt_queue_header *h = qh(c->q);
    const uint32_t size = c->size, mask = size - 1;
    uint32_t tail = c->tail, n = 0, taken = 0;
    int r = 0;

    *nout = 0;
    uint32_t head = LOAD(&h->head);
    for (;;) {
        uint32_t avail = head - tail;
        if (avail > size)
            return bad(c, tail, "head: %lu bytes ahead of faytd, more than the ring", avail);
        if (avail & 7)
            return bad(c, tail, "head: %lu bytes ahead, not a multiple of 8", avail);
        if (avail == 0) {
            head = LOAD(&h->head);          /* records published meanwhile: this round's */
            if (head == tail)
                break;
            continue;
        }
        if (taken >= budget || n >= out_max) {
            r = 1;
            break;
        }
        uint32_t off = tail & mask;
        struct fayt_queue_record rec;
        memcpy(&rec, ring(c->q) + off, sizeof rec);     /* one read: the copy is checked */
        if (rec.type == FAYT_QREC_PAD) {
            if (rec.length != 0 || off == 0)
                return bad(c, tail, "PAD record at offset %lu: not at the end, or with a "
                           "length", off);
            if (size - off > avail)
                return bad(c, tail, "PAD record fills %lu bytes, past head", size - off);
            tail += size - off;
            continue;
        }
        if (rec.type > FAYT_QREC_TYPE_MAX)
            return bad(c, tail, "type: %lu is not a record type", rec.type);
        if (rec.length > FAYT_QUEUE_PAYLOAD_MAX)
            return bad(c, tail, "length: %lu, more than FAYT_QUEUE_PAYLOAD_MAX", rec.length);
        uint32_t want = payload_length(rec.type);
        if (want && rec.length != want)
            return bad(c, tail, "length: %lu, not the size of a decision", rec.length);
        uint32_t nb = rec_bytes(rec.length);
        if (nb > avail)
            return bad(c, tail, "record of %lu bytes runs past head", nb);
        if (off + nb > size)
            return bad(c, tail, "record of %lu bytes runs past the ring's end", nb);
        if (rec.type != FAYT_QREC_DATA) {
            struct fayt_queue_decision *o = &out[n];
            memcpy(&o->d, ring(c->q) + off + HDR_BYTES, sizeof o->d);
            o->type = rec.type;
            o->reserved = 0;
            o->seq = rec.seq;
            n++;
        }
        tail += nb;
        taken++;
        c->bytes += nb;
    }
    if (tail != c->tail) {
        c->tail = tail;
        c->records += taken;
        __atomic_store_n(&h->records, c->records, __ATOMIC_RELAXED);
        space_freed(h, tail);
    }
    *nout = n;
    return r;
}

int fayt_queue_sleep(struct fayt_queue_consumer *c)
{
    struct fayt_queue_header *h = qh(c->q);
    STORE(&h->sleeping, 1);
    FENCE();        /* pairs with the producer's fence after it publishes head */
    if (LOAD(&h->head) == c->tail)
        return 0;
    STORE(&h->sleeping, 0);
    return 1;
}

void fayt_queue_result(struct fayt_queue_consumer *c, uint32_t seq, int32_t err)
{
    struct fayt_queue_header *h = qh(c->q);
    struct fayt_queue_result *res = &h->results[seq % FAYT_QUEUE_RESULTS];
    res->err = err;
    STORE(&res->seq, seq);
    __atomic_fetch_add(&h->done, 1, __ATOMIC_SEQ_CST);
    fayt_futex_wake_n(&h->done, INT_MAX);
}

void fayt_queue_kill(struct fayt_queue_consumer *c, uint32_t state)
{
    struct fayt_queue_header *h = qh(c->q);
    STORE(&h->state, state);
    FENCE();
    __atomic_fetch_add(&h->tail, 0, __ATOMIC_SEQ_CST);
    fayt_futex_wake_n(&h->tail, INT_MAX);
    __atomic_fetch_add(&h->done, 0, __ATOMIC_SEQ_CST);
    fayt_futex_wake_n(&h->done, INT_MAX);
}

/* ---- the producer's side ---- */

static int state_error(struct fayt_queue_header *h)
{
    uint32_t st = LOAD(&h->state);
    if (st == FAYT_QUEUE_OPEN)
        return 0;
    return st == FAYT_QUEUE_CLOSED ? EPIPE : EPROTO;
}

static void wake_faytd(struct fayt_queue_header *h, int efd)
{
    FENCE();        /* pairs with faytd's fence after sleeping = 1 */
    if (LOAD(&h->sleeping) && __atomic_exchange_n(&h->sleeping, 0, __ATOMIC_SEQ_CST)) {
        uint64_t one = 1;
        ssize_t w = write(efd, &one, sizeof one);
        (void)w;    /* EAGAIN: the counter is full, faytd is woken anyway */
    }
}

/* Wait until at least `need` bytes are free (or the deadline).  Returns 0,
 * EAGAIN, ETIMEDOUT, EINTR, EPROTO, EPIPE. */
static int wait_space(struct fayt_queue_header *h, uint32_t size, uint32_t head, uint32_t need,
                      int64_t timeout_ns, struct timespec *deadline, int *have_deadline,
                      int *timed, int efd)
{
    for (;;) {
        int e = state_error(h);
        if (e)
            return e;
        uint32_t tail = LOAD(&h->tail);
        uint32_t used = head - tail;
        if (used > size)
            return EPROTO;      /* tail is not one faytd wrote */
        if (size - used >= need)
            return 0;
        if (timeout_ns == 0)
            return EAGAIN;
        if (!*have_deadline) {
            *timed = fayt_deadline(timeout_ns, deadline);
            *have_deadline = 1;
        }
        struct timespec rel;
        if (*timed && !fayt_remaining(deadline, &rel))
            return ETIMEDOUT;
        STORE(&h->put_waiting, 1);
        FENCE();        /* pairs with faytd's fence after it stores tail */
        if (LOAD(&h->tail) != tail || state_error(h))
            continue;
        wake_faytd(h, efd);     /* records are there: faytd must not sleep on them */
        int r = fayt_futex_sleep(&h->tail, tail, *timed ? &rel : NULL);
        if (r == EINTR)
            return EINTR;
    }
}

int fayt_queue_put(void *q, uint16_t type, const void *payloads, uint32_t length, uint32_t n,
                   uint32_t first_seq, int64_t timeout_ns, int efd, uint32_t *put)
{
    struct fayt_queue_header *h = qh(q);
    struct timespec deadline;
    int have_deadline = 0, timed = 0, r = 0;

    *put = 0;
    if (type == FAYT_QREC_PAD || type > FAYT_QREC_TYPE_MAX || length > FAYT_QUEUE_PAYLOAD_MAX)
        return EINVAL;
    if (payload_length(type) && length != payload_length(type))
        return EINVAL;
    if (LOAD(&h->magic) != FAYT_QUEUE_MAGIC)
        return EPROTO;
    const uint32_t size = h->size, mask = size - 1;
    if (size < FAYT_QUEUE_SIZE_MIN || size > FAYT_QUEUE_SIZE_MAX || (size & mask))
        return EPROTO;
    if ((r = state_error(h)))
        return r;
    const uint32_t nb = rec_bytes(length);
    const char *src = payloads;
    uint32_t head = h->head;    /* the producer's own word */
    uint32_t published = head;
    uint32_t i = 0;
    while (i < n) {
        uint32_t off = head & mask;
        uint32_t need = off + nb > size ? (size - off) + nb : nb;
        uint32_t tail = LOAD(&h->tail);
        if (head - tail > size) {
            r = EPROTO;
            break;
        }
        if (size - (head - tail) < need) {
            if (head != published) {        /* let faytd drain what is written */
                STORE(&h->head, head);
                published = head;
                *put = i;
                wake_faytd(h, efd);
            }
            r = wait_space(h, size, head, need, timeout_ns, &deadline, &have_deadline, &timed,
                           efd);
            if (r)
                break;
        }
        if (off + nb > size) {              /* fill the end, start at 0 */
            struct fayt_queue_record pad = {FAYT_QREC_PAD, 0, 0};
            memcpy(ring(q) + off, &pad, sizeof pad);
            head += size - off;
            off = 0;
        }
        struct fayt_queue_record rec = {type, (uint16_t)length, first_seq + i};
        char *dst = ring(q) + off;
        memcpy(dst, &rec, sizeof rec);
        memcpy(dst + HDR_BYTES, src + (size_t)i * length, length);
        head += nb;
        i++;
    }
    if (head != published) {
        STORE(&h->head, head);
        *put = i;
        wake_faytd(h, efd);
    }
    return r;
}

int fayt_queue_wait_result(void *q, uint32_t seq, int64_t timeout_ns, int32_t *err)
{
    struct fayt_queue_header *h = qh(q);
    struct fayt_queue_result *res = &h->results[seq % FAYT_QUEUE_RESULTS];
    struct timespec deadline, rel;
    int timed = fayt_deadline(timeout_ns, &deadline);
    for (;;) {
        uint32_t done = LOAD(&h->done);
        uint32_t at = LOAD(&res->seq);
        if (at == seq) {
            *err = res->err;
            return 0;
        }
        if ((int32_t)(at - seq) > 0)
            return ENOENT;      /* a later decision's result took the slot */
        int e = state_error(h);
        if (e)
            return e;
        if (timed && !fayt_remaining(&deadline, &rel))
            return ETIMEDOUT;
        int r = fayt_futex_sleep(&h->done, done, timed ? &rel : NULL);
        if (r == EINTR)
            return EINTR;
    }
}
