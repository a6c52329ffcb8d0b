/* fayt/ring.h: the notification ring and the waits, in C.
 * Implemented in libportal/src/ring.c; libportal and faytd call them through
 * cffi, which releases the GIL for the call, so a sleeping wait never holds
 * up another thread.  Every wait returns EINTR when a signal arrives, so that
 * Python can run its handlers (the doorbell's among them) and call again.
 */
#ifndef FAYT_RING_H
#define FAYT_RING_H

#include <stdint.h>

struct fayt_ring_header;
struct fayt_notification_frame;

/* faytd: lay out a fresh (zeroed) ring. */
void fayt_ring_init(void *ring, uint32_t sender, uint32_t target, int32_t target_pid);
/* Bytes a ring object needs. */
uint64_t fayt_ring_bytes(void);

/* Sender: put one entry.  timeout_ns < 0 waits for ever for space (unless
 * FAYT_NOTIFY_NOWAIT).  doorbell_fd: a pidfd of the target (or -1: kill the
 * pid in the header).  *pos receives the entry's position.  hint: the
 * target's fayt_notify_hint.posted (or NULL), bumped once the entry is
 * published (notification.h: the pending hint).
 * Returns 0, EAGAIN (full, NOWAIT), ETIMEDOUT, EINTR (call again), ESRCH (the
 * target is dead), EINVAL (bad index, flags or length). */
int fayt_ring_post(void *ring, uint32_t index, uint32_t flags, uint32_t sender,
                   const void *payload, uint32_t length, int64_t timeout_ns,
                   int doorbell_fd, int signo, uint32_t *pos, uint32_t *hint);
/* Sender, after a post with FAYT_NOTIFY_RETURN: wait for notification_ret.
 * Returns 0 (*result and *status hold the handler's), ETIMEDOUT (the entry is
 * abandoned: the target frees it), EINTR (call again), ESRCH (target died). */
int fayt_ring_wait_return(void *ring, uint32_t pos, int64_t timeout_ns,
                          int64_t *result, int32_t *status);

/* Target: whether an entry is ready. */
int fayt_ring_ready(void *ring);
/* Target: whether an entry with FAYT_NOTIFY_IMMEDIATE is ready (only those
 * interrupt a running handler; deferred ones wait for the outer dispatch). */
int fayt_ring_immediate_ready(void *ring);
/* Target: take the next entry into frame (a fresh notification stack).
 * Returns 1 if taken, 0 if the ring is empty.  An entry without
 * FAYT_NOTIFY_RETURN is freed at once. */
int fayt_ring_take(void *ring, struct fayt_notification_frame *frame);
/* Target: notification_ret for an entry taken with FAYT_NOTIFY_RETURN. */
void fayt_ring_return(void *ring, uint32_t pos, int64_t result, int32_t status);
/* Target: clear the outstanding-doorbell mark of a ring. */
void fayt_ring_clear_doorbell(void *ring);

struct fayt_context_page;

/* Target: notification_dispatch's first half.  Round robin over the n rings
 * from *cursor: take the next entry onto a FREE stack whose base is set
 * (state IN_USE, the frame at its base), write saved[depth] and depth + 1.
 * The doorbells are cleared first.  Returns the ring's place in rings[]
 * (*stack_rec: the stack record), -1 if no ring has an entry, -2 if one
 * has but no stack is free (notify.starved counted; the entry stays). */
int fayt_dispatch_take(struct fayt_context_page *page, void **rings, const uint32_t *ring_ids,
                       int n, int *cursor, int *stack_rec);
/* Target: notification_ret: the result into the ring entry (RETURN), the
 * stack FREE again, depth - 1, notify.delivered + 1. */
void fayt_dispatch_done(struct fayt_context_page *page, void *ring, int stack_rec,
                        int64_t result, int32_t status);

/* notification_dispatch's state in the target (process memory, never shared).
 * A refill takes up to `batch` consecutive entries of one ring (round robin
 * over the rings) into queue[] with one call, frees the ones without
 * FAYT_NOTIFY_RETURN and wakes a sender waiting for space once; each
 * notification then starts on a free notification stack (its frame copied
 * to the base, as fayt_dispatch_take does).  Every level of a nested
 * dispatch starts from the same queue, so notifications start in the order
 * they were posted.  Packed like the rest: the layout is the natural one. */
#define FAYT_DISPATCH_BATCH 32

struct fayt_dispatcher {
    struct fayt_context_page *page;
    void **rings;                  /* the rings into this context, n of them */
    const uint32_t *ring_ids;
    int32_t n;
    int32_t cursor;                /* the ring the next refill starts at */
    uint32_t generation;           /* rings_generation the table was made at */
    uint32_t head;                 /* queue[head] starts next */
    uint32_t count;                /* entries in queue[], from 0 */
    uint32_t batch;                /* most entries a refill takes (1..FAYT_DISPATCH_BATCH) */
    struct fayt_notification_frame queue[32];   /* FAYT_DISPATCH_BATCH */
} __attribute__((packed));

/* Target: notification_ret of the handler on stack_rec (if >= 0; result and
 * status into its ring entry for FAYT_NOTIFY_RETURN, the stack FREE, depth - 1,
 * notify.delivered + 1), then notification_dispatch's first half for the next
 * one: from the queue (refilled when empty) onto a free stack (stack_rec's
 * own first: one stack serves a run of notifications), saved[depth] and
 * depth + 1 written.  Returns its stack record, -1 if nothing waits, -2 if
 * something waits but no stack is free (notify.starved counted; it stays
 * queued or in its ring), -3 if rings_generation is not d->generation (fetch,
 * set the table and generation, call again with stack_rec -1). */
int fayt_dispatch_step(struct fayt_dispatcher *d, int stack_rec, int64_t result, int32_t status);
/* Target: whether a notification with FAYT_NOTIFY_IMMEDIATE waits (queued or
 * in a ring): only those interrupt a running handler. */
int fayt_dispatch_immediate_ready(struct fayt_dispatcher *d);
/* Target: notification_ret only (a handler left by an exception that is not
 * its own: the loop stops). */
void fayt_dispatch_end(struct fayt_dispatcher *d, int stack_rec, int64_t result, int32_t status);

/* faytd: a side died.  FAYT_RING_TARGET_DEAD fails every waiting sender at
 * once with ESRCH (their entries' done becomes FAYT_DONE_DEAD). */
void fayt_ring_kill(void *ring, uint32_t state);

/* Target: sleep until one of the n rings has an entry, *generation differs
 * from seen, the doorbell signal arrives, or the timeout passes (< 0: never).
 * The doorbell is consumed here (sigtimedwait) when it comes during the wait.
 * Returns 0 (something to do), EINTR (another signal), ETIMEDOUT. */
int fayt_notify_wait(void **rings, int n, const uint32_t *generation, uint32_t seen,
                     int signo, int64_t timeout_ns);

/* Futex on a shared 32-bit word: wait while *word == expect. */
int fayt_futex_wait(uint32_t *word, uint32_t expect, int64_t timeout_ns);
int fayt_futex_wake(uint32_t *word, int n);
/* pidfd_send_signal(2); returns 0 or errno. */
int fayt_pidfd_signal(int pidfd, int signo);

#endif
