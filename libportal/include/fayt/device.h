/* fayt/device.h: an emulated device's shared pages and the driver's
 * register accessors (docs/devices.md).
 *
 * Structs are packed like every layout of these headers (cffi reads them
 * packed); every 8-byte word is at an offset that is a multiple of 8 in a
 * page-aligned mapping, so its loads and stores are single accesses.
 *
 * Three pages carry a window's register accesses, each with one writer:
 * the driver's ring (the driver), the model's page (the model) and the
 * state page (faytd).  Counts only grow and are read and written as one
 * aligned 8-byte access; the value is written before the count that
 * publishes it.  Every reader validates what the other side wrote.
 *
 * The accessors (device.c) are the driver's side, for C drivers and for
 * libportal's Device: a C driver compiles libportal/src/device.c with
 * these headers, maps the three pages and the two eventfds that
 * DEV_ATTACH gives it, and fills a struct fayt_dev_driver.
 */
#ifndef FAYT_DEVICE_H
#define FAYT_DEVICE_H

#include <stdint.h>

/* One register access (op FAYT_DEV_OP_*, fayt/syscall.h). */
struct fayt_dev_entry {
    uint32_t op;
    uint32_t offset;            /* in the register page, aligned to the access */
    uint64_t value;             /* a write's value */
} __attribute__((packed));

/* The driver's ring: one page, written by the driver only.  252 entries
 * (FAYT_DEV_RING_ENTRIES) after a 64-byte head. */
struct fayt_dev_ring {
    uint64_t head;              /* entries posted */
    uint64_t irq_seen;          /* the interrupts the driver took (a hint to faytd) */
    uint64_t reserved[6];
    struct fayt_dev_entry entries[252];
} __attribute__((packed));

/* The model's page, written by the model only. */
struct fayt_dev_model_page {
    uint64_t tail;              /* entries taken */
    uint64_t answer_seq;        /* the last read answered: its position + 1 */
    uint64_t answer;            /* its value */
} __attribute__((packed));

/* The state page, written by faytd only. */
struct fayt_dev_state_page {
    uint64_t state;             /* FAYT_DEV_STATE_SERVED or _DEAD (0: never served) */
    uint64_t generation;        /* registrations of the window so far */
    uint64_t irq_raised;        /* interrupts raised */
    uint64_t window;            /* the window's id */
    uint64_t model;             /* the serving model's context id (0: none), from faytd's
                                   records: whom a driver grants its DMA-able RAM to */
    uint64_t driver;            /* the attached driver's context id (0: none): a model
                                   drops what it mapped of a driver's RAM when it changes */
} __attribute__((packed));

/* A driver's end of a window: its mappings and eventfds, and its own
 * copies of the counts (what it posted, what it saw taken). */
struct fayt_dev_driver {
    struct fayt_dev_ring *ring;                 /* mapped read-write */
    const struct fayt_dev_model_page *model;    /* mapped read-only */
    const struct fayt_dev_state_page *state;    /* mapped read-only */
    int ev_model;               /* written after a post: the model's doorbell */
    int ev_driver;              /* the model writes it after an answer or room made */
    uint64_t head;              /* entries posted (the ring's head) */
    uint64_t tail;              /* the model's tail when last read */
} __attribute__((packed));

/* Post one access (op, offset, value) for the model, waiting up to
 * timeout_ns (-1: for ever) for room; *pos is its position.  0, or ENODEV
 * (the model is gone), EINVAL (op or offset), EPROTO (the model's tail out
 * of range), ETIMEDOUT (the ring stayed full), EINTR (a signal came before
 * anything was posted: call again). */
int fayt_dev_post(struct fayt_dev_driver *d, uint32_t op, uint32_t offset, uint64_t value,
                  int64_t timeout_ns, uint64_t *pos);

/* Wait up to timeout_ns for the model's answer to the read at pos: 0 and
 * *value, or ENODEV, EPROTO, ETIMEDOUT, EINTR (call again). */
int fayt_dev_answer(struct fayt_dev_driver *d, uint64_t pos, int64_t timeout_ns,
                    uint64_t *value);

/* The accessors: a write is posted and returns; a read posts and waits for
 * its answer.  0 or an errno as above (EINTR is retried inside; the
 * timeout then runs from the first try). */
int fayt_dev_write32(struct fayt_dev_driver *d, uint32_t offset, uint32_t value,
                     int64_t timeout_ns);
int fayt_dev_write64(struct fayt_dev_driver *d, uint32_t offset, uint64_t value,
                     int64_t timeout_ns);
int fayt_dev_read32(struct fayt_dev_driver *d, uint32_t offset, int64_t timeout_ns,
                    uint32_t *value);
int fayt_dev_read64(struct fayt_dev_driver *d, uint32_t offset, int64_t timeout_ns,
                    uint64_t *value);

#endif
