/* lock.c: the share-point lock byte, futex sleeping, and the robust
 * record's state word while a lock is waited for (the record itself is
 * claimed and cleared by its caller: sharepoint.c).
 *
 * Linux facts this relies on:
 * - FUTEX_WAIT compares a 32-bit aligned word; our lock is a byte, so we wait
 *   on the word that holds it (offset 0 of a page-aligned mapping).  The other
 *   three bytes belong to prot, which does not change while anyone sleeps, so
 *   a word that differs only means "look again".
 * - Shared (not FUTEX_PRIVATE) futexes key on the backing page, so waiters in
 *   different processes mapping the same object meet.
 * The protocol is Drepper's three-state mutex ("Futexes are tricky") on a byte,
 * with bit 0x80 for "owner died" kept across acquire and release until the
 * new holder marks the data consistent.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "fayt/common/deadline.h"
#include "fayt/common/futex.h"
#include "fayt/context.h"
#include "fayt/lock.h"
#include "fayt/lock_fast.h"
#include "fayt/portal.h"
#include "fayt/sharepoint.h"

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define SPIN_LIMIT 100

static inline uint8_t *lock_byte(void *base) { return (uint8_t *)base; }
static inline uint32_t *lock_word(void *base) { return (uint32_t *)base; }

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* The record's state word: PENDING before the lock is tried (a store all
 * other CPUs see before the try's CAS), WAITING before a sleep. */
static inline void state_pending(uint32_t *state)
{
    if (state)
        __atomic_store_n(state, FAYT_HELD_PENDING, __ATOMIC_SEQ_CST);
}

static inline void state_waiting(uint32_t *state)
{
    if (state)
        __atomic_store_n(state, FAYT_HELD_WAITING, __ATOMIC_RELEASE);
}

int fayt_sp_lock_wait(void *base, uint32_t *state, int64_t timeout_ns, const int *abort)
{
    uint8_t *l = lock_byte(base);
    int died = 0;
    struct timespec deadline, rel;

    state_pending(state);
    if (fayt_sp_take(l, FAYT_LOCK_HELD, &died))
        goto taken;
    for (int i = 0; i < SPIN_LIMIT; i++) {
        cpu_relax();
        if ((__atomic_load_n(l, __ATOMIC_RELAXED) & FAYT_LOCK_STATE_MASK) == FAYT_LOCK_FREE &&
            fayt_sp_take(l, FAYT_LOCK_HELD, &died))
            goto taken;
    }
    fayt_deadline(timeout_ns, &deadline);
    for (;;) {
        if (abort && __atomic_load_n(abort, __ATOMIC_ACQUIRE)) {
            state_waiting(state);
            return ECANCELED;
        }
        /* Announce a waiter: held -> contended; a free lock is taken as
         * contended, since others may still sleep. */
        uint8_t c = __atomic_load_n(l, __ATOMIC_RELAXED);
        if ((c & FAYT_LOCK_STATE_MASK) == FAYT_LOCK_FREE) {
            if (fayt_sp_take(l, FAYT_LOCK_CONTENDED, &died))
                goto taken;
            continue;
        }
        if ((c & FAYT_LOCK_STATE_MASK) == FAYT_LOCK_HELD) {
            uint8_t want = (uint8_t)((c & FAYT_LOCK_OWNER_DIED) | FAYT_LOCK_CONTENDED);
            if (!__atomic_compare_exchange_n(l, &c, want, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                continue;
            c = want;
        }
        uint32_t w = __atomic_load_n(lock_word(base), __ATOMIC_RELAXED);
        if ((uint8_t)(w & 0xff) != c)   /* little-endian: the lock is the low byte */
            continue;
        const struct timespec *tsp = NULL;
        if (timeout_ns >= 0) {
            if (!fayt_remaining(&deadline, &rel)) {
                state_waiting(state);
                return ETIMEDOUT;
            }
            tsp = &rel;
        }
        state_waiting(state);
        if (abort && __atomic_load_n(abort, __ATOMIC_ACQUIRE))
            return ECANCELED;
        int r = fayt_futex_sleep(lock_word(base), w, tsp);
        if (r == ETIMEDOUT || r == EINTR)
            return r;
        state_pending(state);
    }
taken:
    return died ? EOWNERDEAD : 0;
}

void fayt_sp_wake_all(void *base)
{
    fayt_futex_wake_n(lock_word(base), 0x7fffffff);
}

void fayt_sp_wake(void *base)
{
    fayt_futex_wake_n(lock_word(base), 1);
}

void fayt_sp_mark_consistent(void *base)
{
    __atomic_fetch_and(lock_byte(base), (uint8_t)FAYT_LOCK_STATE_MASK, __ATOMIC_RELEASE);
}

void fayt_sp_recover(void *base)
{
    /* The holder is gone: free the lock, mark it, and wake one waiter, which
     * re-marks contention if others still sleep.  Waking one is enough. */
    __atomic_store_n(lock_byte(base), (uint8_t)FAYT_LOCK_OWNER_DIED, __ATOMIC_RELEASE);
    fayt_futex_wake_n(lock_word(base), 1);
}

int fayt_sp_lock_state(void *base)
{
    return fayt_sp_state(lock_byte(base));
}

size_t fayt_sp_data_offset(size_t nframes)
{
    return FAYT_SP_DATA_OFFSET(nframes);       /* sharepoint.h: the one formula */
}

uintptr_t fayt_mmap_at(uintptr_t addr, size_t length, int prot, int flags, int fd, int *err)
{
    if (addr) {
        if (addr % FAYT_PAGE_SIZE) {
            *err = EINVAL;
            return 0;
        }
        flags |= MAP_FIXED_NOREPLACE;
    }
    void *p = mmap((void *)addr, length, prot, flags, fd, 0);
    if (p == MAP_FAILED) {
        *err = errno;
        return 0;
    }
    if (addr && (uintptr_t)p != addr) {
        /* Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and treat addr as a hint. */
        munmap(p, length);
        *err = EEXIST;
        return 0;
    }
    *err = 0;
    return (uintptr_t)p;
}

uintptr_t fayt_map(int fd, size_t length, uintptr_t addr, int prot, int *err)
{
    return fayt_mmap_at(addr, length, prot, MAP_SHARED, fd, err);
}

uintptr_t fayt_map_portal(int fd, size_t length, uintptr_t addr, int prot, int *err)
{
    uintptr_t a = fayt_mmap_at(addr, length, prot, MAP_SHARED, fd, err);
    if (a && madvise((void *)a, length, MADV_DONTFORK) < 0) {
        *err = errno;
        munmap((void *)a, length);
        return 0;
    }
    return a;
}

int fayt_unmap(uintptr_t addr, size_t length)
{
    return munmap((void *)addr, length) == 0 ? 0 : errno;
}
