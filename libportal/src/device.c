/* device.c: the driver's register accessors (fayt/device.h, docs/devices.md).
 *
 * A post writes the entry, then the head that publishes it, then the
 * model's eventfd.  Before it trusts the model's page it checks it: the
 * tail only grows and never passes the head (EPROTO otherwise); the state
 * page says whether a model serves the window (ENODEV).  Every wait is a
 * poll of the driver's eventfd bounded by the deadline; a signal ends it
 * with EINTR before anything changed, so that the caller can run its
 * handlers and call again.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <unistd.h>

#include "fayt/device.h"
#include "fayt/syscall.h"
#include "fayt/common/deadline.h"

_Static_assert(sizeof(struct fayt_dev_ring) == 4096, "the driver's ring is one page");
_Static_assert(sizeof(((struct fayt_dev_ring *)0)->entries) / sizeof(struct fayt_dev_entry)
               == FAYT_DEV_RING_ENTRIES, "FAYT_DEV_RING_ENTRIES");
_Static_assert(sizeof(struct fayt_dev_entry) == 16, "an entry is 16 bytes");

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

static int served(const struct fayt_dev_driver *d)
{
    return LOAD(&d->state->state) == FAYT_DEV_STATE_SERVED ? 0 : ENODEV;
}

/* The model's tail, checked against what this driver posted. */
static int read_tail(struct fayt_dev_driver *d)
{
    uint64_t t = LOAD(&d->model->tail);
    if (t < d->tail || t > d->head)
        return EPROTO;
    d->tail = t;
    return 0;
}

/* Sleep on the driver's eventfd until it is written or the deadline
 * (ns on CLOCK_MONOTONIC, -1: none): 0, ETIMEDOUT or EINTR. */
static int wait_driver(const struct fayt_dev_driver *d, int64_t deadline)
{
    int ms = -1;
    if (deadline >= 0) {
        int64_t left = deadline - fayt_now_ns();
        if (left <= 0)
            return ETIMEDOUT;
        ms = (int)((left + 999999) / 1000000);
    }
    struct pollfd p = {d->ev_driver, POLLIN, 0};
    int r = poll(&p, 1, ms);
    if (r < 0)
        return errno == EINTR ? EINTR : errno;
    if (r > 0) {
        uint64_t v;
        if (read(d->ev_driver, &v, sizeof v) < 0 && errno != EAGAIN && errno != EINTR)
            return errno;
    }
    return 0;
}

static int64_t deadline_of(int64_t timeout_ns)
{
    return timeout_ns < 0 ? -1 : fayt_now_ns() + timeout_ns;
}

static int size_of(uint32_t op)
{
    switch (op) {
    case FAYT_DEV_OP_WRITE32: case FAYT_DEV_OP_READ32: return 4;
    case FAYT_DEV_OP_WRITE64: case FAYT_DEV_OP_READ64: return 8;
    default: return 0;
    }
}

static int post(struct fayt_dev_driver *d, uint32_t op, uint32_t offset, uint64_t value,
                int64_t deadline, uint64_t *pos)
{
    int size = size_of(op), r;
    if (!size || offset % size || offset > 4096 - (uint32_t)size)
        return EINVAL;
    if ((r = served(d)))
        return r;
    for (;;) {
        if ((r = read_tail(d)))
            return r;
        if (d->head - d->tail < FAYT_DEV_RING_ENTRIES)
            break;
        if ((r = wait_driver(d, deadline)))
            return r;
        if ((r = served(d)))
            return r;
    }
    if (size == 4)
        value &= 0xffffffffu;
    struct fayt_dev_entry *e = &d->ring->entries[d->head % FAYT_DEV_RING_ENTRIES];
    e->op = op;
    e->offset = offset;
    e->value = value;
    *pos = d->head;
    d->head += 1;
    STORE(&d->ring->head, d->head);         /* the entry, then the head naming it */
    uint64_t one = 1;
    if (write(d->ev_model, &one, sizeof one) < 0 && errno != EAGAIN)
        return errno;
    return 0;
}

static int answer(struct fayt_dev_driver *d, uint64_t pos, int64_t deadline, uint64_t *value)
{
    for (;;) {
        uint64_t seq = LOAD(&d->model->answer_seq);
        uint64_t v = LOAD(&d->model->answer);
        if (seq == pos + 1 && LOAD(&d->model->answer_seq) == seq) {
            int r = read_tail(d);
            if (r)
                return r;
            *value = v;
            return 0;
        }
        int r = served(d);
        if (r)
            return r;
        if ((r = wait_driver(d, deadline)))
            return r;
    }
}

int fayt_dev_post(struct fayt_dev_driver *d, uint32_t op, uint32_t offset, uint64_t value,
                  int64_t timeout_ns, uint64_t *pos)
{
    return post(d, op, offset, value, deadline_of(timeout_ns), pos);
}

int fayt_dev_answer(struct fayt_dev_driver *d, uint64_t pos, int64_t timeout_ns,
                    uint64_t *value)
{
    return answer(d, pos, deadline_of(timeout_ns), value);
}

static int write_op(struct fayt_dev_driver *d, uint32_t op, uint32_t offset, uint64_t value,
                    int64_t timeout_ns)
{
    int64_t deadline = deadline_of(timeout_ns);
    uint64_t pos;
    int r;
    while ((r = post(d, op, offset, value, deadline, &pos)) == EINTR)
        ;
    return r;
}

static int read_op(struct fayt_dev_driver *d, uint32_t op, uint32_t offset,
                   int64_t timeout_ns, uint64_t *value)
{
    int64_t deadline = deadline_of(timeout_ns);
    uint64_t pos;
    int r;
    while ((r = post(d, op, offset, 0, deadline, &pos)) == EINTR)
        ;
    if (r)
        return r;
    while ((r = answer(d, pos, deadline, value)) == EINTR)
        ;
    return r;
}

int fayt_dev_write32(struct fayt_dev_driver *d, uint32_t offset, uint32_t value,
                     int64_t timeout_ns)
{
    return write_op(d, FAYT_DEV_OP_WRITE32, offset, value, timeout_ns);
}

int fayt_dev_write64(struct fayt_dev_driver *d, uint32_t offset, uint64_t value,
                     int64_t timeout_ns)
{
    return write_op(d, FAYT_DEV_OP_WRITE64, offset, value, timeout_ns);
}

int fayt_dev_read32(struct fayt_dev_driver *d, uint32_t offset, int64_t timeout_ns,
                    uint32_t *value)
{
    uint64_t v = 0;
    int r = read_op(d, FAYT_DEV_OP_READ32, offset, timeout_ns, &v);
    *value = (uint32_t)v;
    return r;
}

int fayt_dev_read64(struct fayt_dev_driver *d, uint32_t offset, int64_t timeout_ns,
                    uint64_t *value)
{
    return read_op(d, FAYT_DEV_OP_READ64, offset, timeout_ns, value);
}
