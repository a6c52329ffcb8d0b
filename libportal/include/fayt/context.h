/* fayt/context.h: the context page, one per connected process, shared with faytd.
 *
 * It holds the robust list: the share-point locks this process holds or is
 * about to take.  A locker claims a slot (sp_id from 0 to its id), marks it
 * PENDING, takes the lock, marks it HELD; unlock marks it PENDING, releases
 * the lock and clears the slot.  A locker that must sleep (the contended
 * path) marks it WAITING just before each futex wait and PENDING again
 * before it next tries the lock, so WAITING always means "not holding".
 * When the process dies faytd walks the slots, for share-points this
 * context mapped (faytd's own record, never the slot's word alone): HELD
 * locks are released with the owner-died bit set; a PENDING lock the same
 * way only if the lock is held and no live context that mapped the
 * share-point records it HELD or PENDING; WAITING is never a holder
 * (faytd/kernel.py, recover_locks).
 * The notification part (see notification.h) holds the 64 notification
 * actions (faytd writes them at the install call), the rings faytd made into
 * this context (a new one bumps rings_generation: the runtime then fetches
 * its fd with FAYT_SYS_NOTIFY_FETCH), the notification stacks it owns, and
 * one saved-state record (the `ucontext`) per nesting level of dispatch.
 * The fault-injection part (docs/testing.md, faytd/injection.py): faytd
 * writes the plan (`inject`, a seqlock: `seq` odd while it writes), the
 * faults injected in the process itself (lock takes, handlers, doorbells:
 * they never pass through faytd); libportal writes only `injected`, its
 * own counts of the plan's events and faults, which faytd reads to log and
 * count them.  The process can scribble either and so only misleads itself.
 * The wait record (below) counts the libportal waits the context sleeps in.
 * All fields are naturally aligned; the struct is packed only so that cffi
 * and gcc agree byte for byte.
 */
#ifndef FAYT_CONTEXT_H
#define FAYT_CONTEXT_H

#include <stdint.h>

#include "notification.h"

#define FAYT_CONTEXT_MAGIC   0x46435458   /* "FCTX" */
#define FAYT_CONTEXT_VERSION 2
#define FAYT_HELD_LOCKS_MAX  64

#define FAYT_HELD_FREE    0
#define FAYT_HELD_PENDING 1
#define FAYT_HELD_HELD    2
#define FAYT_HELD_WAITING 3     /* asleep in the contended path: not holding */

struct fayt_held_lock {
    uint32_t sp_id;      /* 0: slot free */
    uint32_t state;      /* FAYT_HELD_* */
} __attribute__((packed));

#define FAYT_RINGS_MAX        128   /* rings into one context (senders) */
#define FAYT_STACKS_MAX       16    /* notification stacks of one context */
#define FAYT_NEST_MAX         16    /* nesting depth of dispatch */
#define FAYT_NO_PROVIDER      -1    /* notify.provider: no stack-provider action */

/* fayt_notification_stack.state */
#define FAYT_STACK_UNUSED 0         /* the record is free */
#define FAYT_STACK_FREE   1         /* allocated, no handler runs on it */
#define FAYT_STACK_IN_USE 2

struct fayt_ring_record {
    uint32_t ring_id;               /* 0: record free */
    uint32_t sender;                /* the sender's context id (0: faytd) */
} __attribute__((packed));

struct fayt_notification_stack {
    uint64_t base;                  /* where the process mapped it */
    uint32_t size;                  /* bytes */
    uint32_t state;                 /* FAYT_STACK_* */
    uint64_t handle;                /* faytd's handle (FAYT_SYS_NOTIFY_STACK_FREE) */
} __attribute__((packed));

/* The state dispatch saved when a notification interrupted the context. */
struct fayt_saved_state {
    uint32_t index;                 /* the notification now running at this depth */
    uint32_t sender;
    uint32_t stack;                 /* its stack record */
    uint32_t ring_id;
    uint32_t pos;
    uint32_t interrupted_index;     /* the one it interrupted (or FAYT_NOTIFICATION_SLOTS) */
} __attribute__((packed));

/* The wait record: how many libportal waits this context began and ended.
 * A thread bumps `blocks` just before it sleeps in a libportal wait
 * (notification_wait, a sender's wait for a return, the contended path of
 * a share-point lock) and `wakes`
 * when it is back: one atomic add each, no system call.  faytd reads the
 * two words on a timer to tell a subscribed scheduler that the context
 * blocked or woke (docs/scheduling.md, "Events"); it checks them on every
 * read (blocks - wakes is the number of threads asleep, at most
 * FAYT_WAITS_MAX) and believes nothing else of them: a context can only
 * lie about itself. */
#define FAYT_WAITS_MAX 4096

struct fayt_wait_record {
    uint32_t blocks;                /* waits begun (mod 2^32) */
    uint32_t wakes;                 /* waits ended (mod 2^32) */
} __attribute__((packed));

/* The trace area (docs/tracing.md, faytd/trace.py).  While a timeline
 * trace runs faytd sets `on`; libportal then records what never passes
 * through faytd (a notification posted, handled, returned; a contended
 * lock wait) into the records that follow this page in the same object
 * (at FAYT_PAGE_SIZE: FAYT_TRACE_RECORDS of them, a ring): a writer takes
 * a position with one atomic add on `head`, zeroes the record's seq,
 * fills it and stores seq = position + 1 last (release).  faytd keeps its
 * own read position, reads each record between two loads of seq, checks
 * every field against its own records and drops what does not fit: the
 * process can only mislead its own track.  With `on` 0 nothing is written
 * and the hot paths are unchanged (a contended lock wait loads `on` once
 * after its sleep; a post and a dispatch load it once).  The pages of the
 * area are touched only while tracing. */
#define FAYT_TRACE_RECORDS      8192
#define FAYT_TRACE_NOTIFY_SEND   1  /* id: target context, pos, slot, aux: flags */
#define FAYT_TRACE_NOTIFY_BEGIN  2  /* id: ring id, pos, slot, aux: nesting depth
                                       | the entry's FAYT_NOTIFY_* flags << 16 */
#define FAYT_TRACE_NOTIFY_END    3  /* id: ring id, pos, slot, aux: depth, value: result */
#define FAYT_TRACE_NOTIFY_RETURN 4  /* id: target context, pos, value: result, aux: status */
#define FAYT_TRACE_LOCK_WAIT     5  /* id: share-point, ts: wait began, value: ns waited,
                                       aux: 0, EOWNERDEAD or the errno it ended with */
#define FAYT_TRACE_KINDS         5

struct fayt_trace_state {
    uint32_t on;                    /* faytd: 1 while a trace runs */
    uint32_t head;                  /* libportal: records taken (mod 2^32) */
} __attribute__((packed));

struct fayt_trace_record {
    uint32_t seq;                   /* its position + 1, stored last */
    uint16_t kind;                  /* FAYT_TRACE_* */
    uint16_t slot;                  /* notification slot */
    int32_t tid;                    /* the thread (gettid) */
    uint32_t id;                    /* see the kinds */
    uint64_t ts;                    /* CLOCK_MONOTONIC ns */
    uint32_t pos;                   /* the entry's ring position */
    uint32_t aux;
    int64_t value;
} __attribute__((packed));

struct fayt_notify_state {
    uint32_t rings_generation;      /* bumped by faytd when a ring is added or dies */
    uint32_t depth;                 /* handlers running (nesting level) */
    int32_t provider;               /* stack-provider slot, or FAYT_NO_PROVIDER */
    uint32_t nstacks;               /* stack records in use */
    uint64_t delivered;             /* statistics: handlers run */
    uint64_t starved;               /* times a notification waited for a stack */
} __attribute__((packed));

/* Fault kinds injected by libportal (bit i: plan.rule[i], injected.*[i]). */
#define FAYT_INJECT_LOCK_KILL      0x01  /* arg: a share-point id: killed holding its lock */
#define FAYT_INJECT_HANDLER_KILL   0x02  /* arg: a slot: killed inside its handler */
#define FAYT_INJECT_NOTIFY_KILL    0x04  /* killed after the handlers it lets pass */
#define FAYT_INJECT_DOORBELL_DROP  0x08  /* a post's doorbell (signal or wake) not rung */
#define FAYT_INJECT_DOORBELL_DELAY 0x10  /* arg: microseconds before a post rings it */
#define FAYT_INJECT_KINDS          5
#define FAYT_INJECT_PPM            1000000  /* rule.ppm of a fault at every event */

/* When a rule fires: at event n (0, 1, ... of its kind, since the plan's
 * seq changed), if n >= after, fewer than count faults so far (count 0: no
 * bound), and splitmix64(seed + n) % 1000000 < ppm. */
struct fayt_inject_rule {
    uint32_t arg;
    uint32_t after;
    uint32_t count;
    uint32_t ppm;
    uint64_t seed;
} __attribute__((packed));

struct fayt_inject_plan {
    uint32_t seq;                   /* faytd: odd while it writes, bumped by 2 a change */
    uint32_t kinds;                 /* FAYT_INJECT_* armed: the one word hot paths load */
    struct fayt_inject_rule rule[5];                  /* FAYT_INJECT_KINDS */
} __attribute__((packed));

struct fayt_inject_state {
    uint32_t seq;                   /* the plan's seq these counts are of */
    uint32_t reserved;
    uint64_t events[5];             /* events of each kind seen */
    uint64_t fired[5];              /* faults of each kind injected */
} __attribute__((packed));

struct fayt_context_page {
    uint32_t magic;
    uint32_t version;
    int32_t pid;
    uint32_t context_id;
    struct fayt_held_lock held[64];  /* FAYT_HELD_LOCKS_MAX */
    struct NotificationAction actions[64];            /* FAYT_NOTIFICATION_SLOTS */
    struct fayt_notify_state notify;
    struct fayt_ring_record rings[128];               /* FAYT_RINGS_MAX */
    struct fayt_notification_stack stacks[16];        /* FAYT_STACKS_MAX */
    struct fayt_saved_state saved[16];                /* FAYT_NEST_MAX */
    struct fayt_inject_plan inject;                   /* faytd writes it */
    struct fayt_inject_state injected;                /* libportal writes it */
    struct fayt_wait_record waits;                    /* libportal writes it */
    struct fayt_trace_state trace;                    /* the trace area's words */
    uint8_t reserved[1000];                           /* to 4096 */
} __attribute__((packed));

/* The context page object: this page, then the trace area (its records). */
#define FAYT_CONTEXT_BYTES    331776 /* FAYT_PAGE_SIZE + FAYT_TRACE_RECORDS * 40 */

#endif
