/* fayt/notification.h: notification slots, rings, stacks and frames.
 *
 * A context has FAYT_NOTIFICATION_SLOTS NotificationAction slots in its
 * context page (context.h).  The handler field holds an opaque cookie that
 * the install system call wrote; the runtime in the process maps the cookie
 * to the callable it runs.  The handler's arguments are
 *   (void *frame, int index, int sender):
 *   frame  the notification's payload, on its notification stack, right after
 *          the struct fayt_notification_frame that the runtime wrote there;
 *   index  the slot (0..63) the notification names;
 *   sender the sender's context id (FAYT_SENDER_KERNEL: faytd itself), from
 *          faytd's record of the ring's owner (the FETCH reply), never from
 *          the entry's sender word, which the sender writes.
 *
 * A ring carries notifications from one sender to one target; faytd creates
 * it (a sealed memfd) once per (sender, target) pair, after the policy
 * check, and gives its fd to both.  Delivery needs faytd no more:
 * - the ring is a bounded MPSC queue (Vyukov): entry.seq == pos means free
 *   for the producer at pos, pos + 1 means full for the consumer at pos;
 * - a notification with FAYT_NOTIFY_RETURN keeps its entry until the sender
 *   has read the result: the handler's end writes result/status, sets done
 *   and wakes the futex on done; the sender then frees the entry;
 * - the doorbell is one real-time signal (SIGRTMIN + FAYT_DOORBELL_SIGRTMIN_OFFSET)
 *   sent to the target; `rung` keeps at most one outstanding per ring.
 *   It is sent for FAYT_NOTIFY_IMMEDIATE to a target that runs code;
 *   a target asleep in a libportal wait (target_waiting) is woken instead:
 *   1 = asleep in futex_waitv on the target_waiting words (the sender
 *   exchanges it to 0 and wakes it: no signal), 2 = asleep in sigtimedwait
 *   (the doorbell).  Otherwise the target takes the entry at its next
 *   dispatch point.  Only a target that has armed the ring (its
 *   runtime handles the signal) is rung: the signal's default action would
 *   kill it.  The payload is never in the signal.  A sender that may not
 *   signal the target (another uid) has faytd ring it (FAYT_SYS_NOTIFY_RING),
 *   and faytd goes by its own record of armed targets, not this word.
 * Both sides map the ring read-write: each validates what the other writes
 * and bounds its waits by its deadline (src/ring.c: "Trust").
 * Every field a futex waits on is an aligned uint32_t.
 *
 * The pending hint (struct fayt_notify_hint): one 4 KiB sealed memfd per
 * target context, made by faytd when the first ring into it is made or when
 * the target asks for it (FAYT_SYS_NOTIFY_HINT).  faytd gives its fd to
 * every sender with its ring (the second fd of the OPEN reply).  After an
 * entry is published, fayt_ring_post adds 1 to `posted`.  The target's
 * share-point fast path (src/fastpath.c) reads `posted` with one load and
 * compares it with the last value it saw: changed, it runs the runtime's
 * dispatch before the share-point call (so the lock, read, write, add and
 * `with` calls are dispatch points too).  The word is only a hint: dispatch
 * reads the rings, and the rings alone say what was posted.  A sender that
 * writes the word anything can only cause a dispatch that finds nothing
 * (spurious) or, by writing back the value the target last saw, put off the
 * hint of another sender's entry to the target's next dispatch point; it can
 * never lose, forge, reorder or read a notification, which live in rings it
 * has no access to.  The object holds nothing else.
 */
#ifndef FAYT_NOTIFICATION_H
#define FAYT_NOTIFICATION_H

#include <stdint.h>

#define FAYT_NOTIFICATION_SLOTS 64

struct NotificationAction {
    void (*handler)(void *, int, int);
} __attribute__((packed));

/* notify() flags (fayt_ring_entry.flags).  Numbers are ABI. */
#define FAYT_NOTIFY_IMMEDIATE 0x1   /* immediate reschedule: ring the doorbell now, yield */
#define FAYT_NOTIFY_RETURN    0x2   /* sleep until notification_ret, get its result */
#define FAYT_NOTIFY_NOWAIT    0x4   /* full ring: EAGAIN instead of waiting for space */
#define FAYT_NOTIFY_FLAGS     0x7

#define FAYT_NOTIFY_PAYLOAD_MAX 48
#define FAYT_RING_ENTRIES       256       /* a power of two */
#define FAYT_RING_MAGIC         0x46524e47 /* "FRNG" */
#define FAYT_DOORBELL_SIGRTMIN_OFFSET 2   /* the doorbell is SIGRTMIN + 2 */
#define FAYT_SENDER_KERNEL      0         /* sender id of faytd's own notifications */

/* fayt_ring_header.state */
#define FAYT_RING_LIVE        0
#define FAYT_RING_TARGET_DEAD 1   /* senders fail with ESRCH, waiters are woken */
#define FAYT_RING_SENDER_DEAD 2   /* the target drains what is left, then releases it */
#define FAYT_RING_DROPPED     3   /* the target found it corrupt: senders fail with EPROTO */

/* fayt_ring_entry.done */
#define FAYT_DONE_PENDING   0
#define FAYT_DONE_RETURNED  1     /* result and status are valid */
#define FAYT_DONE_DEAD      2     /* the target died before notification_ret */
#define FAYT_DONE_ABANDONED 3     /* the sender timed out; the target frees the entry */

/* fayt_ring_entry.status when the slot has no handler (the sender gets
 * ENOENT; a handler that raises an ENOENT error gives ENOENT itself). */
#define FAYT_STATUS_NO_HANDLER -2

struct fayt_ring_header {
    uint32_t magic;
    uint32_t size;             /* entries, FAYT_RING_ENTRIES */
    uint32_t sender;           /* context ids */
    uint32_t target;
    int32_t target_pid;
    uint32_t state;            /* FAYT_RING_* (faytd writes it) */
    uint32_t head;             /* producer position (sender) */
    uint32_t tail;             /* consumer position (target) */
    uint32_t space;            /* futex: bumped when an entry frees */
    uint32_t space_waiters;    /* senders asleep on space */
    uint32_t target_waiting;   /* futex: the target sleeps in a libportal wait (1, 2) */
    uint32_t rung;             /* a doorbell is outstanding */
    uint32_t armed;            /* the target handles the doorbell: senders may ring it */
    uint32_t reserved;
    uint64_t posted;           /* statistics: entries posted */
} __attribute__((packed));

struct fayt_ring_entry {
    uint32_t seq;              /* see above */
    uint16_t index;
    uint16_t flags;            /* FAYT_NOTIFY_* */
    uint32_t sender;
    uint32_t length;           /* payload bytes */
    uint32_t done;             /* futex: FAYT_DONE_* */
    int32_t status;            /* 0, the errno of a handler that raised, or
                                  FAYT_STATUS_NO_HANDLER */
    int64_t result;            /* notification_ret's value */
    uint8_t payload[48];       /* FAYT_NOTIFY_PAYLOAD_MAX */
} __attribute__((packed));

/* The pending hint of one target context (see above): the object is
 * FAYT_HINT_BYTES long, the struct at offset 0. */
#define FAYT_HINT_BYTES 4096

struct fayt_notify_hint {
    uint32_t posted;           /* bumped by every post into the target (any ring) */
    uint32_t reserved[15];
} __attribute__((packed));

/* Bytes of a ring's object: the header, then the entries. */
#define FAYT_RING_HEADER_SIZE 64

/* What dispatch writes at the base of a fresh notification stack. */
struct fayt_notification_frame {
    uint32_t index;
    uint32_t sender;
    uint32_t flags;
    uint32_t length;
    uint32_t ring_id;
    uint32_t pos;              /* the entry's ring position (notification_ret) */
    uint32_t depth;            /* 1 for a notification that interrupted no handler */
    uint32_t reserved;
    uint8_t payload[48];       /* FAYT_NOTIFY_PAYLOAD_MAX */
} __attribute__((packed));

/* faytd's own notifications (FAYT_SYS_NOTIFY_SUBSCRIBE events). */
#define FAYT_EVENT_PEER_DIED     1   /* arg: the context id watched (0: any) */
#define FAYT_EVENT_SP_DESTROYED  2   /* a share-point this context maps was destroyed */
#define FAYT_EVENT_OVERFLOW      3   /* notices for this slot were lost (ring full or
                                        corrupt); sp_id holds how many (see below) */
#define FAYT_EVENT_IRQ           4   /* a device window's interrupt (docs/devices.md):
                                        context_id holds the window's id */

/* A scheduler's events (FAYT_SYS_SCHED_SUBSCRIBE), payload fayt_sched_event. */
#define FAYT_EVENT_SCHED_CREATED 5   /* a context connected */
#define FAYT_EVENT_SCHED_DIED    6   /* a context is gone (died, or closed and forgotten) */
#define FAYT_EVENT_SCHED_BLOCKED 7   /* it sleeps in a libportal wait now */
#define FAYT_EVENT_SCHED_WOKE    8   /* it waited since the last event and runs now */

/* The payload of a faytd notification.  FAYT_EVENT_OVERFLOW (like inotify's
 * IN_Q_OVERFLOW) arrives at the slot whose notices were lost, before the
 * next notice that does arrive there: sp_id holds the count lost, the other
 * fields are 0. */
struct fayt_event_payload {
    uint32_t event;            /* FAYT_EVENT_* */
    uint32_t context_id;       /* PEER_DIED: who died */
    int32_t pid;
    uint32_t sp_id;            /* SP_DESTROYED: the table id */
    char identifier[32];       /* SP_DESTROYED: the name, cut to 31 bytes, NUL-terminated */
} __attribute__((packed));

/* The payload of a FAYT_EVENT_SCHED_* notification.  CREATED and DIED come
 * from faytd's records; blocks, wakes and waiting from the context's own
 * wait record (context.h), which faytd reads every FAYT_SCHED_EVENT_MS and
 * bounds, but which the context writes: it can only lie about itself. */
#define FAYT_SCHED_EVENT_MS 5

struct fayt_sched_event {
    uint32_t event;            /* FAYT_EVENT_SCHED_* */
    uint32_t context_id;
    int32_t pid;
    uint32_t uid;
    uint32_t blocks;           /* waits begun since the previous event about it */
    uint32_t wakes;            /* waits ended since then */
    uint32_t waiting;          /* its threads asleep in a wait now */
    uint32_t reserved;
    uint64_t seen_ns;          /* CLOCK_MONOTONIC when faytd read its record */
} __attribute__((packed));

#endif
