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
 * FAYT_NOTIFY_NOWAIT).  doorbell_fd: a pidfd of the target that this process
 * may signal, or -1 (it may not: the target runs as another uid).  *pos
 * receives the entry's position.  hint: the target's fayt_notify_hint.posted
 * (or NULL), bumped once the entry is published (notification.h: the pending
 * hint).  The ring is target-writable: its words are validated, every loop
 * over them is bounded by the deadline (NOWAIT: returns at once).
 * Returns 0, FAYT_RING_POSTED_RING (posted, and the doorbell must be rung by
 * faytd: doorbell_fd is -1 or the signal was refused), EAGAIN (full, NOWAIT),
 * ETIMEDOUT, EINTR (call again), ESRCH (the target is dead), EPROTO (the
 * ring is corrupt, or the target dropped it), EINVAL (bad index, flags or
 * length). */
#define FAYT_RING_POSTED_RING -1
int fayt_ring_post(void *ring, uint32_t index, uint32_t flags, uint32_t sender,
                   const void *payload, uint32_t length, int64_t timeout_ns,
                   int doorbell_fd, int signo, uint32_t *pos, uint32_t *hint);
/* fayt_ring_post with an injected doorbell fault (docs/testing.md):
 * doorbell FAYT_DOORBELL_RING is fayt_ring_post; FAYT_DOORBELL_DROP rings
 * neither the signal nor the futex wake; FAYT_DOORBELL_DELAY sleeps
 * delay_ns after publishing the entry, then rings as usual. */
#define FAYT_DOORBELL_RING  0
#define FAYT_DOORBELL_DROP  1
#define FAYT_DOORBELL_DELAY 2
int fayt_ring_post_fault(void *ring, uint32_t index, uint32_t flags, uint32_t sender,
                         const void *payload, uint32_t length, int64_t timeout_ns,
                         int doorbell_fd, int signo, uint32_t *pos, uint32_t *hint,
                         int doorbell, int64_t delay_ns);
/* Sender, after a post with FAYT_NOTIFY_RETURN: wait for notification_ret.
 * Returns 0 (*result and *status hold the handler's), ETIMEDOUT (the entry is
 * abandoned: the target frees it), EINTR (call again), ESRCH (target died),
 * EPROTO (the entry's done word holds what no target writes, or the target
 * dropped the ring).  Never waits past the deadline.  page: the sender's
 * context page (or NULL), whose wait record counts each sleep (context.h). */
int fayt_ring_wait_return(void *ring, uint32_t pos, int64_t timeout_ns,
                          int64_t *result, int32_t *status, struct fayt_context_page *page);

/* Target: whether an entry is ready at its own consumer position tail
 * (the target keeps it in process memory: the header's `tail` is only
 * statistics, a sender can write it). */
int fayt_ring_ready(void *ring, uint32_t tail);
/* Target: notification_ret for an entry taken with FAYT_NOTIFY_RETURN. */
void fayt_ring_return(void *ring, uint32_t pos, int64_t result, int32_t status);
/* Target: clear the outstanding-doorbell mark of a ring. */
void fayt_ring_clear_doorbell(void *ring);

struct fayt_context_page;

/* notification_dispatch's state in the target (process memory, never shared).
 * A refill takes up to `batch` consecutive entries of one ring (round robin
 * over the rings) into queue[] with one call, frees the ones without
 * FAYT_NOTIFY_RETURN and wakes a sender waiting for space once; each
 * notification then starts on a free notification stack (its frame copied
 * to the base, with saved[depth] written).  Every level of a nested
 * dispatch starts from the same queue, so notifications start in the order
 * they were posted.  Packed like the rest: the layout is the natural one.
 *
 * The rings are sender-writable, so the dispatcher trusts none of their
 * words: each ring's consumer position lives in tails[i] (process memory),
 * an entry's sender is senders[i] (faytd's record, from the FETCH reply),
 * never the entry's own sender word; an entry whose index, flags or length
 * is out of range makes the ring corrupt: nothing more is taken from it,
 * `dropped` names it (the runtime asks faytd to drop it: its sender gets
 * EPROTO) and the other rings go on. */
#define FAYT_DISPATCH_BATCH 32

struct fayt_dispatcher {
    struct fayt_context_page *page;
    void **rings;                  /* the rings into this context, n of them */
    const uint32_t *ring_ids;
    const uint32_t *senders;       /* faytd's record of each ring's sender */
    uint32_t **tails;              /* each ring's consumer position (process memory) */
    int32_t n;
    int32_t cursor;                /* the ring the next refill starts at */
    uint32_t generation;           /* rings_generation the table was made at */
    uint32_t head;                 /* queue[head] starts next */
    uint32_t count;                /* entries in queue[], from 0 */
    uint32_t batch;                /* most entries a refill takes (1..FAYT_DISPATCH_BATCH) */
    uint32_t dropped;              /* a ring found corrupt (its id), 0: none */
    uint32_t reserved;
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
 * set the table and generation, call again with stack_rec -1), -4 if the
 * queue is empty and d->dropped names a corrupt ring (drop it from the
 * table, clear d->dropped, call again with stack_rec -1). */
int fayt_dispatch_step(struct fayt_dispatcher *d, int stack_rec, int64_t result, int32_t status);
/* Target: whether a notification with FAYT_NOTIFY_IMMEDIATE waits (queued or
 * in a ring): only those interrupt a running handler. */
int fayt_dispatch_immediate_ready(struct fayt_dispatcher *d);
/* Target: notification_ret only (a handler left by an exception that is not
 * its own: the loop stops). */
void fayt_dispatch_end(struct fayt_dispatcher *d, int stack_rec, int64_t result, int32_t status);

/* faytd: a side died, or the target dropped the ring.  FAYT_RING_TARGET_DEAD
 * and FAYT_RING_DROPPED fail every waiting sender at once (ESRCH, EPROTO:
 * their entries' done becomes FAYT_DONE_DEAD).  Only writes: bounded. */
void fayt_ring_kill(void *ring, uint32_t state);

/* faytd: whether any entry of the ring looks posted and not yet freed (one
 * pass over the sequence words, reads only): a dead sender's ring that does
 * is kept for its target to drain. */
int fayt_ring_posted(void *ring);

/* Target: sleep until one of d's rings has an entry, *generation differs
 * from seen, the doorbell signal arrives, or the timeout passes (< 0: never).
 * The doorbell is consumed here (sigtimedwait) when it comes during the wait.
 * Returns 0 (something to do), EINTR (another signal), ETIMEDOUT. */
int fayt_notify_wait(struct fayt_dispatcher *d, const uint32_t *generation, uint32_t seen,
                     int signo, int64_t timeout_ns);

/* Target: arm d's rings for a wait on a readiness descriptor (an event
 * loop's): from now on every post rings the doorbell (target_waiting 2,
 * rung 0), until a post or a libportal wait clears it.  Returns 1 if a
 * notification already waits or *generation differs from seen (a new ring):
 * the caller must not sleep; else 0. */
int fayt_notify_arm_doorbell(struct fayt_dispatcher *d, const uint32_t *generation,
                             uint32_t seen);

/* Wake up to n sleepers of a shared futex word (faytd's Python, after it
 * changed a word a client may sleep on); returns how many, or -errno.
 * The binding of fayt/common/futex.h's fayt_futex_wake_n, which C calls. */
int fayt_futex_wake(uint32_t *word, int n);
/* pidfd_send_signal(2); returns 0 or errno. */
int fayt_pidfd_signal(int pidfd, int signo);

#endif
