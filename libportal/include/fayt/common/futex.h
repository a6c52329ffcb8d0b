/* futex.h: the futex calls of libportal's C and faytd's core, one wrapper
 * each (common C, not a layout: cffi does not read it).
 *
 * - Shared futexes (not FUTEX_PRIVATE_FLAG): the words live in objects that
 *   several processes map (a share-point's lock word, a ring's done and
 *   space words), and a shared futex keys on the backing page, so waiters
 *   in different processes meet.
 * - FUTEX_WAIT's timeout is relative (deadline.h's fayt_remaining makes one
 *   from a CLOCK_MONOTONIC deadline).  EAGAIN (the word was not `expect`
 *   any more) means "look again", the same as a wake-up, so it returns 0.
 */
#ifndef FAYT_COMMON_FUTEX_H
#define FAYT_COMMON_FUTEX_H

#include <errno.h>
#include <stdint.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Sleep while *word == expect, for rel at most (NULL: no limit).  Returns
 * 0 (woken, or the word had changed), ETIMEDOUT or EINTR. */
static inline int fayt_futex_sleep(uint32_t *word, uint32_t expect, const struct timespec *rel)
{
    if (syscall(SYS_futex, word, FUTEX_WAIT, expect, rel, NULL, 0) == 0)
        return 0;
    return errno == EAGAIN ? 0 : errno;
}

/* Wake up to n sleepers of word.  Returns how many were woken, or -errno. */
static inline int fayt_futex_wake_n(uint32_t *word, int n)
{
    long r = syscall(SYS_futex, word, FUTEX_WAKE, n, NULL, NULL, 0);
    return r < 0 ? -errno : (int)r;
}

#endif
