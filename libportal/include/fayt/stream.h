/* fayt/stream.h: connected channels (share.type 1, the advanced share-point;
 * docs/channels.md).  Implemented in libportal/src/stream.c.
 *
 * A channel joins two ends.  Each end OWNS one object that faytd made for
 * it (a sealed memfd: it cannot grow or shrink): the end maps its own object
 * read-write and the peer's read-only.  An object holds
 *   - the end's transmit ring: frames it writes, the peer reads;
 *   - the end's receive position in the PEER's ring (rx_tail);
 *   - the end's state bits and its "asleep" marks.
 * So every word has one writer (faytd only ever writes FAYT_STREAM_RESET
 * into the object of an end whose process is gone), and each side reads the
 * other's words as untrusted input: every position and length it reads from
 * the peer's object is copied once and checked before it is used, and a
 * word that breaks the rules makes the call return EPROTO.
 *
 * A frame is a uint32_t length, a uint32_t kind (0: bytes, FAYT_STREAM_FRAME_REF)
 * and the length's bytes, padded to 8; it may wrap
 * round the ring's end.  tx_head counts the bytes ever written (a multiple of
 * 8); the writer publishes a frame by storing tx_head after the frame's bytes
 * (release), so a reader never sees part of a message.
 *
 * Wake-ups are eventfds faytd made, one per end (the end's readiness
 * descriptor, usable with poll/selectors/asyncio): a side about to sleep sets
 * its rx_asleep (or tx_asleep) mark, looks again (a full fence between), and
 * sleeps in poll(2) on its eventfd, the peer's pidfd and its faytd socket,
 * bounded by its deadline; the other side, after publishing (or consuming),
 * looks at the mark and writes the sleeper's eventfd if it is set.
 */
#ifndef FAYT_STREAM_H
#define FAYT_STREAM_H

#include <stdint.h>

#define FAYT_STREAM_MAGIC        0x4d525453  /* "STRM" */
#define FAYT_STREAM_HEADER_SIZE  4096        /* the ring starts one page in */
#define FAYT_STREAM_RING_MIN     4096        /* ring bytes: a power of two in [MIN, MAX] */
#define FAYT_STREAM_RING_MAX     16777216
#define FAYT_STREAM_RING_DEFAULT 65536
#define FAYT_STREAM_FRAME_HEADER 8           /* the length word and 4 bytes of padding */
/* The frame header's high 32 bits: the frame's kind.  0: bytes; REF: a
 * message by reference, its body a struct fayt_stream_ref.  Any other
 * value is a protocol break (EPROTO). */
#define FAYT_STREAM_FRAME_REF    1

/* The body of a REF frame: what CHAN_PASS answered.  Untrusted like every
 * word of the peer's: faytd checks the ticket at CHAN_TAKE (EPERM unless
 * the peer passed it to this end). */
struct fayt_stream_ref {
    uint64_t ticket;
    uint64_t length;
    uint32_t flags;        /* FAYT_PASS_COPY, _WRITE, _PORTAL (informational) */
    uint32_t reserved;
} __attribute__((packed));

/* fayt_stream_end.state: bits an end sets in its own object (faytd: RESET). */
#define FAYT_STREAM_WR_SHUT 0x1   /* it sends no more: after its frames, EOF */
#define FAYT_STREAM_RD_SHUT 0x2   /* it reads no more: the peer's send is EPIPE */
#define FAYT_STREAM_RESET   0x4   /* it died or broke the protocol: ECONNRESET */

/* The header page of an end's object; the ring follows at
 * FAYT_STREAM_HEADER_SIZE.  Positions and marks on their own cache lines. */
struct fayt_stream_end {
    uint32_t magic;        /* faytd writes it; nobody needs to trust it */
    uint32_t reserved0;
    uint64_t ring_bytes;   /* faytd writes it; readers use faytd's reply, not this */
    uint8_t pad0[48];
    uint64_t tx_head;      /* bytes this end ever wrote into its ring */
    uint8_t pad1[56];
    uint64_t rx_tail;      /* bytes this end ever consumed of the peer's ring */
    uint8_t pad2[56];
    uint32_t state;        /* FAYT_STREAM_* bits */
    uint32_t rx_asleep;    /* 1: asleep for data: the peer writes this end's eventfd */
    uint32_t tx_asleep;    /* 1: asleep for room: the peer writes this end's eventfd */
    uint32_t reserved1;
    uint64_t sent;         /* messages sent (statistics) */
    uint64_t received;     /* messages received (statistics) */
} __attribute__((packed));

/* fayt_stream_send/recv: what else they return besides 0 and an errno. */
#define FAYT_STREAM_WAKE  -1   /* done, and the peer sleeps: write its eventfd */

/* Send one message of len bytes (1 <= len <= ring_bytes - 8).  mine: this
 * end's object (read-write), peer: the peer's (read-only), ring_bytes:
 * faytd's record of both rings' size.  Returns 0 or FAYT_STREAM_WAKE (sent),
 * EAGAIN (no room now: the whole frame or nothing), EPIPE (this end shut its
 * writing, or the peer shut its reading, closed or was reset), EPROTO (the
 * peer's rx_tail is not within this end's written bytes), EMSGSIZE.
 * spin_ns > 0: with no room, look again for up to spin_ns (giving the CPU
 * away between looks, never sleeping) before answering EAGAIN. */
int fayt_stream_send(void *mine, const void *peer, uint64_t ring_bytes,
                     const char *data, uint32_t len, uint32_t kind, int64_t spin_ns);

/* Take the next message into buf (cap bytes).  Returns 0 (*len: its
 * length) or FAYT_STREAM_WAKE (the same, and the peer sleeps for room),
 * EAGAIN (nothing yet), EMSGSIZE (*len: the length it needs; nothing taken),
 * ENOMSG (the next frame is a REF frame and refs is 0; nothing taken),
 * ESHUTDOWN (nothing left and the peer shut its writing: end of stream),
 * ECONNRESET (nothing left and the peer was reset), EPROTO (the peer's
 * tx_head or a frame's length breaks the rules).  spin_ns > 0: with nothing
 * there, look again for up to spin_ns (as send) before answering EAGAIN. */
int fayt_stream_recv(void *mine, const void *peer, uint64_t ring_bytes,
                     char *buf, uint32_t cap, uint32_t *len, uint32_t *kind, int refs,
                     int64_t spin_ns);

/* Before sleeping: set this end's rx_asleep (for == 0) or tx_asleep (for ==
 * 1), full fence, and look again.  Returns 1 if there is something to do
 * (the mark is cleared again), 0 if the caller may sleep.  len: the frame
 * size a sender waits room for. */
int fayt_stream_arm(void *mine, const void *peer, uint64_t ring_bytes, int for_, uint32_t len);
/* After sleeping: clear both marks. */
void fayt_stream_disarm(void *mine);
/* Set state bits in this end's own object (release), then fence; returns
 * whether the peer sleeps (either mark): write its eventfd. */
int fayt_stream_set_state(void *mine, const void *peer, uint32_t bits);

#endif
