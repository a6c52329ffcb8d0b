/* fayt/context.h: the context page, one per connected process, shared with faytd.
 *
 * It holds the robust list: the share-point locks this process holds or is
 * about to take.  A locker claims a slot (sp_id from 0 to its id with a CAS),
 * marks it PENDING, takes the lock, marks it HELD; unlock clears the slot.
 * When the process dies faytd walks the slots: HELD locks are released with
 * the owner-died bit set; a PENDING lock is released the same way only if the
 * lock is held and no live context records it (see faytd/sharepoint.py).
 * All fields are naturally aligned; the struct is packed only so that cffi
 * and gcc agree byte for byte.
 */
#ifndef FAYT_CONTEXT_H
#define FAYT_CONTEXT_H

#include <stdint.h>

#define FAYT_CONTEXT_MAGIC   0x46435458   /* "FCTX" */
#define FAYT_CONTEXT_VERSION 1
#define FAYT_HELD_LOCKS_MAX  64

#define FAYT_HELD_FREE    0
#define FAYT_HELD_PENDING 1
#define FAYT_HELD_HELD    2

struct fayt_held_lock {
    uint32_t sp_id;      /* 0: slot free */
    uint32_t state;      /* FAYT_HELD_* */
} __attribute__((packed));

struct fayt_context_page {
    uint32_t magic;
    uint32_t version;
    int32_t pid;
    uint32_t context_id;
    struct fayt_held_lock held[64];  /* FAYT_HELD_LOCKS_MAX */
    uint8_t reserved[3568];          /* to 4096: notifications land here */
} __attribute__((packed));

#endif
