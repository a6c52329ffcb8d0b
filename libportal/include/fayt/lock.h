/* fayt/lock.h: the share-point lock and the calls libportal and faytd make in C.
 * Implemented in libportal/src/lock.c; built into both the cffi module and the
 * _fastpath extension.
 */
#ifndef FAYT_LOCK_H
#define FAYT_LOCK_H

#include <stdint.h>
#include <stddef.h>

/* The contended path of a lock whose robust record the caller keeps:
 * *state (the record's state word, or NULL) is set PENDING while the lock
 * is tried and WAITING while this thread sleeps; it is PENDING when the
 * lock was taken (the caller marks it HELD), WAITING after any other
 * return.  abort (or NULL): when another thread sets *abort and wakes the
 * lock word's sleepers, the call returns ECANCELED without having taken
 * the lock.  Returns 0, EOWNERDEAD, ETIMEDOUT, EINTR, ECANCELED. */
int fayt_sp_lock_wait(void *base, uint32_t *state, int64_t timeout_ns, const int *abort);
/* Wake every sleeper of the lock word (they look again and sleep on). */
void fayt_sp_wake_all(void *base);
/* Wake one waiter of the lock (after fayt_sp_drop found it contended). */
void fayt_sp_wake(void *base);
/* Clear the owner-died bit of a held lock. */
void fayt_sp_mark_consistent(void *base);
/* faytd: release a lock whose holder died: state free, owner-died set, one waiter woken. */
void fayt_sp_recover(void *base);
/* The lock byte, read atomically. */
int fayt_sp_lock_state(void *base);
/* Offset of the data for a share-point of nframes frames. */
size_t fayt_sp_data_offset(size_t nframes);

/* mmap(2) of a whole backing object.  addr 0: anywhere; else exactly there
 * (MAP_FIXED_NOREPLACE).  Returns the address, or 0 with *err set. */
uintptr_t fayt_map(int fd, size_t length, uintptr_t addr, int prot, int *err);
/* mmap(2) with flags (MAP_SHARED with an fd, or MAP_PRIVATE|MAP_ANONYMOUS
 * with fd -1), at addr exactly when addr is not 0, with the same errors. */
uintptr_t fayt_mmap_at(uintptr_t addr, size_t length, int prot, int flags, int fd, int *err);
/* fayt_map for a portal: also MADV_DONTFORK, so that a fork child never
 * keeps a view of it (portals do not cross fork(); faytd may hand an object
 * this context destroyed back to this same context for its next portal). */
uintptr_t fayt_map_portal(int fd, size_t length, uintptr_t addr, int prot, int *err);
int fayt_unmap(uintptr_t addr, size_t length);

#endif
