/* fayt/queue.h: the user->kernel queue (docs/queue.md).
 *
 * One object per queue, made by faytd (QUEUE_OPEN), mapped read-write by
 * its one producer (a context) and by faytd, the one consumer.  Page 0 is
 * the header, the data ring starts at FAYT_QUEUE_DATA_OFFSET.  Positions
 * are free-running byte counts (mod 2^32); the ring's size is a power of
 * two, so a position's offset is pos & (size - 1).  A record is a
 * fayt_queue_record and `length` bytes of payload, padded to 8 bytes; it
 * never straddles the end of the ring: the producer fills the end with one
 * FAYT_QREC_PAD record and starts again at offset 0.
 *
 * Trust: the producer can write every byte of the object.  faytd keeps its
 * consumer position in its own memory (struct fayt_queue_consumer) and
 * only copies it into the header's `tail` for the producer to read; it
 * copies each record out before it validates it, and the first bad record
 * drops the queue (EPROTO to the producer).  A drain is bounded by a budget
 * of records per round.
 *
 * The wake-up: faytd drains until the ring is empty, then sets `sleeping`,
 * fences, and looks at `head` once more (a record published in between is
 * drained now).  The producer publishes `head`, fences, and writes the
 * queue's eventfd only if it takes `sleeping` from 1 to 0.  Each side
 * stores, fences, then loads the other's word, so at least one of them
 * sees the other: no record is left behind a sleeping faytd.
 */
#ifndef FAYT_QUEUE_H
#define FAYT_QUEUE_H

#include <stdint.h>

#define FAYT_QUEUE_MAGIC        0x46415951   /* "FAYQ" */
#define FAYT_QUEUE_DATA_OFFSET  4096         /* the ring starts at page 1 */
#define FAYT_QUEUE_SIZE_MIN     4096         /* ring bytes: a power of two in MIN..MAX */
#define FAYT_QUEUE_SIZE_MAX     16777216
#define FAYT_QUEUE_SIZE_DEFAULT 65536
#define FAYT_QUEUE_PAYLOAD_MAX  256          /* bytes of one record's payload */
#define FAYT_QUEUE_RESULTS      64           /* decision results kept (by seq % 64) */
#define FAYT_QUEUE_BUDGET       4096         /* records faytd drains from one queue a round */

/* fayt_queue_record.type */
#define FAYT_QREC_PAD           0   /* fills the ring's end; the next record is at offset 0 */
#define FAYT_QREC_DATA          1   /* opaque payload (0..PAYLOAD_MAX): faytd counts it */
#define FAYT_QREC_SCHED_CPUS    2   /* fayt_sched_decision: run the context on `cpus` */
#define FAYT_QREC_SCHED_NICE    3   /* fayt_sched_decision: its nice value is `value` */
#define FAYT_QREC_SCHED_PARK    4   /* fayt_sched_decision: park (stop) the context */
#define FAYT_QREC_SCHED_WAKE    5   /* fayt_sched_decision: wake a parked context */
#define FAYT_QREC_TYPE_MAX      5

/* fayt_queue_header.state (faytd writes it) */
#define FAYT_QUEUE_OPEN         0
#define FAYT_QUEUE_DROPPED      1   /* a bad record: the producer gets EPROTO */
#define FAYT_QUEUE_CLOSED       2   /* closed by its producer, or faytd went away: EPIPE */

struct fayt_queue_record {
    uint16_t type;         /* FAYT_QREC_* */
    uint16_t length;       /* payload bytes that follow (the record takes 8 + length
                              rounded up to 8) */
    uint32_t seq;          /* the producer's number; a decision's result names it */
} __attribute__((packed));

/* The payload of every FAYT_QREC_SCHED_* record. */
struct fayt_sched_decision {
    uint32_t context;      /* the target context's id */
    int32_t value;         /* SCHED_NICE: -20..19; otherwise 0 */
    uint64_t cpus;         /* SCHED_CPUS: a mask of CPUs 0..63, not 0; otherwise 0 */
} __attribute__((packed));

struct fayt_queue_result {
    uint32_t seq;          /* the decision's record seq */
    int32_t err;           /* 0: applied; else a positive errno */
} __attribute__((packed));

struct fayt_queue_header {
    /* Written once by faytd at QUEUE_OPEN. */
    uint32_t magic;        /* FAYT_QUEUE_MAGIC */
    uint32_t size;         /* ring bytes */
    uint32_t queue_id;
    uint32_t producer;     /* the producer's context id */
    uint8_t reserved0[48];
    /* The producer's line. */
    uint32_t head;         /* bytes published */
    uint32_t put_waiting;  /* 1: the producer sleeps on `tail` for space */
    uint8_t reserved1[56];
    /* faytd's line: copies of faytd's own state, for the producer to read. */
    uint32_t tail;         /* bytes consumed (a futex word: space was freed) */
    uint32_t sleeping;     /* 1: faytd sleeps; the producer that clears it writes the eventfd */
    uint32_t state;        /* FAYT_QUEUE_OPEN, _DROPPED, _CLOSED */
    uint32_t done;         /* results written so far (a futex word) */
    uint64_t records;      /* records drained, PAD records not counted */
    uint8_t reserved2[40];
    struct fayt_queue_result results[64];   /* FAYT_QUEUE_RESULTS, by seq % 64 */
} __attribute__((packed));

/* faytd's private state of one queue (process memory, never shared). */
struct fayt_queue_consumer {
    void *q;               /* the mapped object */
    uint32_t size;         /* ring bytes, from QUEUE_OPEN (never read from the header) */
    uint32_t tail;         /* the true consumer position */
    uint64_t records;      /* records drained */
    uint64_t bytes;        /* record bytes drained */
    uint32_t bad_at;       /* EPROTO: the position of the bad record */
    uint32_t reserved;
    char why[96];          /* EPROTO: what was wrong, NUL-terminated */
} __attribute__((packed));

/* A decision as a drain hands it to faytd's Python. */
struct fayt_queue_decision {
    uint16_t type;
    uint16_t reserved;
    uint32_t seq;
    struct fayt_sched_decision d;
} __attribute__((packed));

/* faytd: lay out a fresh (zeroed) queue object of `size` ring bytes. */
void fayt_queue_init(void *q, uint32_t size, uint32_t queue_id, uint32_t producer);

/* faytd: drain up to `budget` records.  Data records are counted; each
 * decision is copied to out[] (at most out_max; the drain stops when out
 * is full).  Returns 0 (the ring is empty), 1 (the budget or out[] ran out:
 * records are left), or EPROTO (c->why and c->bad_at say what; the state is
 * FAYT_QUEUE_DROPPED and a waiting producer is woken).  *nout: decisions
 * copied.  A waiting producer is woken when space was freed. */
int fayt_queue_drain(struct fayt_queue_consumer *c, uint32_t budget,
                     struct fayt_queue_decision *out, uint32_t out_max, uint32_t *nout);

/* faytd, after a drain returned 0: set `sleeping`, fence, look again.
 * Returns 0 (faytd may sleep: a later record writes the eventfd) or 1 (a
 * record came: drain again; `sleeping` is cleared). */
int fayt_queue_sleep(struct fayt_queue_consumer *c);

/* faytd: write a decision's result and wake a producer waiting for it. */
void fayt_queue_result(struct fayt_queue_consumer *c, uint32_t seq, int32_t err);

/* faytd: the state becomes `state` (DROPPED or CLOSED); every waiting
 * producer is woken. */
void fayt_queue_kill(struct fayt_queue_consumer *c, uint32_t state);

/* Producer: put n records of one type, each `length` payload bytes taken
 * one after another from `payloads`, numbered first_seq, first_seq + 1...
 * Records are published as they are written; the eventfd `efd` is written
 * once faytd sleeps.  timeout_ns: 0 never waits for space, < 0 waits for
 * ever, else at most that long.  *put: records put (some may be put before
 * an error).  Returns 0, EAGAIN (full, timeout 0), ETIMEDOUT, EINTR (call
 * again for the rest), EPROTO (faytd dropped the queue, or the header holds
 * what faytd never writes), EPIPE (closed), EINVAL (type or length). */
int fayt_queue_put(void *q, uint16_t type, const void *payloads, uint32_t length, uint32_t n,
                   uint32_t first_seq, int64_t timeout_ns, int efd, uint32_t *put);

/* Producer: wait until the result of decision `seq` is written (results
 * may come out of order: a park waits for its context to leave its lock).  Returns 0 (*err holds it), ETIMEDOUT, EINTR, EPROTO, EPIPE,
 * ENOENT (the result was overwritten: more than FAYT_QUEUE_RESULTS
 * decisions were outstanding). */
int fayt_queue_wait_result(void *q, uint32_t seq, int64_t timeout_ns, int32_t *err);

#endif
