/* pager.c: a chain server's side of its pager channel (fayt/pager.h):
 * taking page requests from the channel's request ring and answering them
 * on its answer ring.  faytd's side is faytd/core/fault.c.
 *
 * Linux facts this relies on:
 * - The channel is shared memory (a sealed memfd) and each ring has one
 *   producer, so a slot number moves with a release store of the head and
 *   an acquire load on the other side; no lock.
 * - A shared futex on req_head lets the server sleep until faytd posts:
 *   server_waiting (set, then a full fence, then the head looked at again)
 *   tells faytd a FUTEX_WAKE is needed, so a post between the look and the
 *   sleep is never missed (FUTEX_WAIT returns at once on a changed word).
 * - faytd sleeps in its event loop, on an eventfd: the server writes it
 *   after an answer only when `rung` was clear, so at most one write is
 *   outstanding however many answers come.
 * - A request often follows another at once (a sequential read): spinning
 *   a little before the futex saves a wake-up, where there are CPUs for it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "fayt/common/deadline.h"
#include "fayt/common/futex.h"
#include "fayt/pager.h"

#define PAGE 4096ULL

_Static_assert(sizeof(struct fayt_pager_header) <= FAYT_PAGER_HEADER_SIZE, "pager header");
_Static_assert(sizeof(struct fayt_page_request) <= FAYT_PAGER_DESC_SIZE, "page request");
#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)

static inline struct fayt_pager_header *hdr(void *ch) { return (struct fayt_pager_header *)ch; }

struct fayt_page_request *fayt_pager_slot(void *ch, uint32_t slot)
{
    return (struct fayt_page_request *)((char *)ch + FAYT_PAGER_HEADER_SIZE +
                                        (uint64_t)slot * hdr(ch)->slot_stride);
}

void *fayt_pager_data(void *ch, uint32_t slot)
{
    return (char *)fayt_pager_slot(ch, slot) + FAYT_PAGER_DESC_SIZE;
}

int fayt_pager_take(void *ch, int64_t timeout_ns, int64_t spin_ns)
{
    struct fayt_pager_header *h = hdr(ch);
    struct timespec deadline, now, rel;
    fayt_deadline(timeout_ns, &deadline);
    int64_t spin_until = spin_ns > 0 ? fayt_now_ns() + spin_ns : 0;
    for (;;) {
        uint32_t tail = h->req_tail;
        uint32_t head = LOAD(&h->req_head);
        if (head == tail && fayt_now_ns() < spin_until) {
            fayt_spin_pause();
            continue;
        }
        if (head != tail) {
            uint32_t slot = LOAD(&h->req_ring[tail % FAYT_PAGER_SLOTS_MAX]);
            STORE(&h->req_tail, tail + 1);
            /* The channel is shared memory: a slot number past the slots
             * (the server scribbled on its own channel) is refused, never
             * turned into an address. */
            if (slot >= FAYT_PAGER_SLOTS_MAX || slot >= LOAD(&h->nslots))
                return -EPROTO;
            return (int)slot;
        }
        if (LOAD(&h->state) != FAYT_PAGER_LIVE)
            return -EPIPE;
        struct timespec *tsp = NULL;
        if (timeout_ns >= 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            rel.tv_sec = deadline.tv_sec - now.tv_sec;
            rel.tv_nsec = deadline.tv_nsec - now.tv_nsec;
            if (rel.tv_nsec < 0) {
                rel.tv_sec--;
                rel.tv_nsec += 1000000000;
            }
            if (rel.tv_sec < 0)
                return -ETIMEDOUT;
            tsp = &rel;
        }
        __atomic_store_n(&h->server_waiting, 1, __ATOMIC_SEQ_CST);
        FENCE();
        int r = 0;
        if (LOAD(&h->req_head) == head && LOAD(&h->state) == FAYT_PAGER_LIVE)
            r = fayt_futex_sleep(&h->req_head, head, tsp);
        __atomic_store_n(&h->server_waiting, 0, __ATOMIC_RELAXED);
        if (r == EINTR)
            return -EINTR;
        if (r == ETIMEDOUT && LOAD(&h->req_head) == head)
            return -ETIMEDOUT;
    }
}

int fayt_pager_answer(void *ch, uint32_t slot, uint32_t verdict, int32_t error,
                      uint32_t length, int eventfd)
{
    struct fayt_pager_header *h = hdr(ch);
    if (slot >= h->nslots || verdict < FAYT_PAGE_DATA || verdict > FAYT_PAGE_MAPPED ||
        length > h->run_max || length % PAGE)
        return EINVAL;
    struct fayt_page_request *r = fayt_pager_slot(ch, slot);
    r->error = error;
    r->answer_length = length;
    STORE(&r->verdict, verdict);
    uint32_t head = h->ans_head;
    STORE(&h->ans_ring[head % FAYT_PAGER_SLOTS_MAX], slot);
    __atomic_store_n(&h->ans_head, head + 1, __ATOMIC_SEQ_CST);
    if (!__atomic_exchange_n(&h->rung, 1, __ATOMIC_SEQ_CST)) {
        uint64_t one = 1;
        if (write(eventfd, &one, sizeof one) < 0)
            return errno;
    }
    return 0;
}
