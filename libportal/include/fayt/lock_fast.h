/* fayt/lock_fast.h: the uncontended share-point lock, inline.
 *
 * The byte protocol of lock.c without a function call, for the _fastpath
 * methods where a call and its checks cost as much as the lock itself.
 * Not a layout: cffi does not read this file.
 */
#ifndef FAYT_LOCK_FAST_H
#define FAYT_LOCK_FAST_H

#include <stdint.h>

#include "fayt/sharepoint.h"

/* Take a free lock, installing state `want` (FAYT_LOCK_HELD or _CONTENDED)
 * and keeping the owner-died bit.  1 if taken (*died set), 0 if held. */
static inline int fayt_sp_take(uint8_t *l, uint8_t want, int *died)
{
    uint8_t c = __atomic_load_n(l, __ATOMIC_RELAXED);
    while ((c & FAYT_LOCK_STATE_MASK) == FAYT_LOCK_FREE) {
        if (__atomic_compare_exchange_n(l, &c, (uint8_t)((c & FAYT_LOCK_OWNER_DIED) | want),
                                        0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
            *died = (c & FAYT_LOCK_OWNER_DIED) != 0;
            return 1;
        }
    }
    return 0;
}

/* The lock byte, read atomically (fayt_sp_lock_state is its binding for
 * faytd's Python). */
static inline uint8_t fayt_sp_state(const uint8_t *l)
{
    return __atomic_load_n(l, __ATOMIC_ACQUIRE);
}

/* Release a held lock, keeping the owner-died bit; the byte before.  The
 * caller wakes a waiter (fayt_sp_wake) if the state was CONTENDED. */
static inline uint8_t fayt_sp_drop(uint8_t *l)
{
    return __atomic_fetch_and(l, (uint8_t)FAYT_LOCK_OWNER_DIED, __ATOMIC_RELEASE);
}

#endif
