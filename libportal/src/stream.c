/* stream.c: the rings of a connected channel (fayt/stream.h).
 *
 * - Each word has one writer; the peer's object is mapped read-only here,
 *   and its words are untrusted: each is loaded once (an acquire load into
 *   a local), checked, and only the local is used.  A frame's length is
 *   read once, checked against the bytes the peer published, then the
 *   payload is copied; the peer may scribble the bytes while we copy, which
 *   can only garble its own message, never move us out of the ring.
 * - Publishing is a release store of tx_head (rx_tail for room) after the
 *   bytes; the asleep marks need a full fence on both sides (Dekker): the
 *   sleeper stores its mark then loads the position, the other stores the
 *   position then loads the mark, so one of them sees the other.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fayt/common/deadline.h"
#include "fayt/stream.h"

#define LOAD(p)      __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v)  __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FENCE()      __atomic_thread_fence(__ATOMIC_SEQ_CST)

static inline struct fayt_stream_end *hdr(void *o) { return (struct fayt_stream_end *)o; }
static inline const struct fayt_stream_end *chdr(const void *o)
{
    return (const struct fayt_stream_end *)o;
}
static inline uint8_t *ring(void *o) { return (uint8_t *)o + FAYT_STREAM_HEADER_SIZE; }
static inline const uint8_t *cring(const void *o)
{
    return (const uint8_t *)o + FAYT_STREAM_HEADER_SIZE;
}

static inline uint64_t frame_bytes(uint32_t len)
{
    return ((uint64_t)len + FAYT_STREAM_FRAME_HEADER + 7) & ~(uint64_t)7;
}

/* Copy n bytes at ring position pos (wrapping). */
static void ring_in(uint8_t *r, uint64_t size, uint64_t pos, const void *src, uint64_t n)
{
    uint64_t at = pos & (size - 1), first = size - at < n ? size - at : n;
    memcpy(r + at, src, first);
    if (n > first)
        memcpy(r, (const uint8_t *)src + first, n - first);
}

static void ring_out(const uint8_t *r, uint64_t size, uint64_t pos, void *dst, uint64_t n)
{
    uint64_t at = pos & (size - 1), first = size - at < n ? size - at : n;
    memcpy(dst, r + at, first);
    if (n > first)
        memcpy((uint8_t *)dst + first, r, n - first);
}

static int send_once(void *mine, const void *peer, uint64_t size, const char *data, uint32_t len,
                     uint32_t kind)
{
    struct fayt_stream_end *m = hdr(mine);
    const struct fayt_stream_end *p = chdr(peer);
    uint64_t need = frame_bytes(len);
    if (len == 0 || need > size)
        return EMSGSIZE;
    if (m->state & FAYT_STREAM_WR_SHUT)
        return EPIPE;
    if (LOAD(&p->state) & (FAYT_STREAM_RD_SHUT | FAYT_STREAM_RESET))
        return EPIPE;
    uint64_t head = m->tx_head;                 /* our own word */
    uint64_t tail = LOAD(&p->rx_tail);          /* the peer's: checked */
    if (tail > head || head - tail > size || (tail & 7))
        return EPROTO;
    if (size - (head - tail) < need)
        return EAGAIN;
    uint64_t word = len | ((uint64_t)kind << 32);
    ring_in(ring(mine), size, head, &word, FAYT_STREAM_FRAME_HEADER);
    ring_in(ring(mine), size, head + FAYT_STREAM_FRAME_HEADER, data, len);
    STORE(&m->tx_head, head + need);
    m->sent++;
    FENCE();
    return LOAD(&p->rx_asleep) ? FAYT_STREAM_WAKE : 0;
}

static int recv_once(void *mine, const void *peer, uint64_t size, char *buf, uint32_t cap,
                     uint32_t *len, uint32_t *kind, int refs)
{
    struct fayt_stream_end *m = hdr(mine);
    const struct fayt_stream_end *p = chdr(peer);
    *kind = 0;
    uint64_t tail = m->rx_tail;                 /* our own word */
    uint64_t head = LOAD(&p->tx_head);          /* the peer's: checked */
    if (head < tail || head - tail > size || (head & 7))
        return EPROTO;
    if (head == tail) {
        uint32_t st = LOAD(&p->state);
        if (st & FAYT_STREAM_RESET)
            return ECONNRESET;
        if (st & FAYT_STREAM_WR_SHUT)
            return ESHUTDOWN;
        return EAGAIN;
    }
    uint64_t word;
    ring_out(cring(peer), size, tail, &word, FAYT_STREAM_FRAME_HEADER);
    uint32_t n = (uint32_t)word, k = (uint32_t)(word >> 32);  /* copied once */
    if (k > FAYT_STREAM_FRAME_REF || n == 0 || frame_bytes(n) > head - tail
        || (k == FAYT_STREAM_FRAME_REF && n != sizeof(struct fayt_stream_ref)))
        return EPROTO;
    if (k && !refs)
        return ENOMSG;
    *kind = k;
    if (n > cap) {
        *len = n;
        return EMSGSIZE;
    }
    ring_out(cring(peer), size, tail + FAYT_STREAM_FRAME_HEADER, buf, n);
    STORE(&m->rx_tail, tail + frame_bytes(n));
    m->received++;
    *len = n;
    FENCE();
    return LOAD(&p->tx_asleep) ? FAYT_STREAM_WAKE : 0;
}

/* Whether the peer's words say there may be something to do: a frame (or a
 * state change) for a reader, room for need bytes (or a broken word, or a
 * state change) for a writer.  Each word loaded once; the call that follows
 * checks them properly. */
static inline int may_go(const struct fayt_stream_end *m, const struct fayt_stream_end *p,
                         uint64_t size, int for_, uint64_t need)
{
    if (for_ == 0)
        return LOAD(&p->tx_head) != m->rx_tail
               || (LOAD(&p->state) & (FAYT_STREAM_WR_SHUT | FAYT_STREAM_RESET));
    uint64_t tail = LOAD(&p->rx_tail), head = m->tx_head;
    return tail > head || head - tail > size || size - (head - tail) >= need
           || (LOAD(&p->state) & (FAYT_STREAM_RD_SHUT | FAYT_STREAM_RESET));
}

/* The spin: look at the peer's words until they say go or spin_ns passed.
 * Each turn gives the CPU away (fayt_spin_pause), so a peer waiting for this
 * CPU runs at once; the caller bounds spin_ns by its deadline. */
static int spin_for(const void *mine, const void *peer, uint64_t size, int for_, uint64_t need,
                    int64_t spin_ns)
{
    const struct fayt_stream_end *m = chdr(mine), *p = chdr(peer);
    int64_t until = fayt_now_ns() + spin_ns;
    do {
        fayt_spin_pause();
        if (may_go(m, p, size, for_, need))
            return 1;
    } while (fayt_now_ns() < until);
    return 0;
}

int fayt_stream_send(void *mine, const void *peer, uint64_t size, const char *data, uint32_t len,
                     uint32_t kind, int64_t spin_ns)
{
    if (kind > FAYT_STREAM_FRAME_REF)
        return EINVAL;
    int r = send_once(mine, peer, size, data, len, kind);
    if (r == EAGAIN && spin_ns > 0 && spin_for(mine, peer, size, 1, frame_bytes(len), spin_ns))
        r = send_once(mine, peer, size, data, len, kind);
    return r;
}

int fayt_stream_recv(void *mine, const void *peer, uint64_t size, char *buf, uint32_t cap,
                     uint32_t *len, uint32_t *kind, int refs, int64_t spin_ns)
{
    int r = recv_once(mine, peer, size, buf, cap, len, kind, refs);
    if (r == EAGAIN && spin_ns > 0 && spin_for(mine, peer, size, 0, 0, spin_ns))
        r = recv_once(mine, peer, size, buf, cap, len, kind, refs);
    return r;
}

int fayt_stream_arm(void *mine, const void *peer, uint64_t size, int for_, uint32_t len)
{
    struct fayt_stream_end *m = hdr(mine);
    const struct fayt_stream_end *p = chdr(peer);
    if (for_)
        STORE(&m->tx_asleep, 1);
    else
        STORE(&m->rx_asleep, 1);
    FENCE();
    int ready;
    uint32_t st = LOAD(&p->state);
    if (for_ == 0) {
        ready = LOAD(&p->tx_head) != m->rx_tail || (st & (FAYT_STREAM_WR_SHUT | FAYT_STREAM_RESET));
    } else {
        uint64_t tail = LOAD(&p->rx_tail), head = m->tx_head;
        /* a broken word is "ready": the send that follows says EPROTO */
        ready = tail > head || head - tail > size || size - (head - tail) >= frame_bytes(len)
                || (st & (FAYT_STREAM_RD_SHUT | FAYT_STREAM_RESET));
    }
    if (ready && for_)
        STORE(&m->tx_asleep, 0);
    else if (ready)
        STORE(&m->rx_asleep, 0);
    return ready;
}

void fayt_stream_disarm(void *mine)
{
    STORE(&hdr(mine)->rx_asleep, 0);
    STORE(&hdr(mine)->tx_asleep, 0);
}

int fayt_stream_set_state(void *mine, const void *peer, uint32_t bits)
{
    struct fayt_stream_end *m = hdr(mine);
    __atomic_fetch_or(&m->state, bits, __ATOMIC_SEQ_CST);
    return LOAD(&chdr(peer)->rx_asleep) || LOAD(&chdr(peer)->tx_asleep);
}
