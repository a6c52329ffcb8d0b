/* uffd_io.h: the userfaultfd(2) ioctls, as faytd's fault engine
 * (faytd/core/fault.c) and libportal's uffd.c (the bare calls the bench and
 * the faytd-death guard use) both call them: one definition, included by
 * both (internal to the C: cffi does not read it).  Each returns 0 or a
 * positive errno unless it says otherwise; the Linux facts they rely on are
 * in uffd.c's opening comment.
 *
 * read: fault events into out[max] (at most 32); how many (0: none ready)
 *   or -errno.  Never sleeps, whatever the fd's O_NONBLOCK says (below).
 * copy: UFFDIO_COPY of len bytes, skipping pages already there; wakes
 *   dst..dst+len; *copied gets the bytes copied.
 * continue: UFFDIO_CONTINUE of len bytes (map what the shm object holds at
 *   the same offsets), skipping pages already mapped; a page the object
 *   lacks (EFAULT) ends the run; wakes; *mapped gets the bytes mapped.
 * poison: UFFDIO_POISON page by page, skipping pages already there; wakes.
 */
#ifndef FAYT_COMMON_UFFD_IO_H
#define FAYT_COMMON_UFFD_IO_H

#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fayt/pager.h"

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFDIO_POISON
#define _UFFDIO_POISON 0x08
struct uffdio_poison {
    struct uffdio_range range;
    __u64 mode;
    __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

#ifndef UFFD_FEATURE_MINOR_SHMEM
#define UFFD_FEATURE_MINOR_SHMEM (1 << 10)
#endif

#define UFFD_IO_PAGE 4096ULL

/* UFFDIO_COPY and UFFDIO_CONTINUE answer EAGAIN while the faulting process's
 * address space changes (mmap_changing: a fork, mremap or madvise that a
 * non-cooperative userfaultfd reports).  That lasts until someone reads the
 * event from the fd, which the caller cannot do inside these loops: after
 * this many EAGAINs in a row without progress they give up with EAGAIN (the
 * range is woken, so the faulting thread faults again), never spin. */
#define UFFD_IO_STALLS 8

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

/* O_NONBLOCK belongs to the file description, which faytd shares with the
 * client that sent the fd: the client may clear it at any time, and a read
 * with no fault pending (another fd of the same userfaultfd read it first,
 * or the client did) would then sleep until its next fault, never if it
 * makes none.  RWF_NOWAIT makes this one read non-blocking (kernels whose
 * userfaultfd reads through read_iter: recent ones, 6.18 checked); older
 * ones answer EOPNOTSUPP, and there a poll with no timeout comes first: a
 * read can then sleep only if the client reads that very fault in between.
 * (Includers define _GNU_SOURCE: preadv2.) */
static inline ssize_t uffd_io_read_now(int fd, void *buf, size_t len)
{
    static int no_nowait;
    if (!no_nowait) {
        struct iovec v = { .iov_base = buf, .iov_len = len };
        ssize_t n = preadv2(fd, &v, 1, -1, RWF_NOWAIT);
        if (n >= 0 || (errno != EOPNOTSUPP && errno != ENOSYS))
            return n;
        no_nowait = 1;
    }
    struct pollfd p = { .fd = fd, .events = POLLIN };
    if (poll(&p, 1, 0) <= 0) {
        errno = EAGAIN;
        return -1;
    }
    return read(fd, buf, len);
}

static inline int uffd_io_read(int fd, struct fayt_uffd_fault *out, int max)
{
    struct uffd_msg msg[32];
    if (max > 32)
        max = 32;
    ssize_t n = uffd_io_read_now(fd, msg, sizeof(msg[0]) * max);
    if (n < 0)
        return (errno == EAGAIN || errno == EINTR) ? 0 : -errno;
    int k = 0;
    for (int i = 0; i < n / (ssize_t)sizeof(msg[0]); i++) {
        if (msg[i].event != UFFD_EVENT_PAGEFAULT)
            continue;
        out[k].address = msg[i].arg.pagefault.address;
        out[k].flags = (uint32_t)msg[i].arg.pagefault.flags;
        out[k].tid = msg[i].arg.pagefault.feat.ptid;
        k++;
    }
    return k;
}

static inline int uffd_io_wake(int fd, uint64_t addr, uint64_t len)
{
    struct uffdio_range r = { .start = addr, .len = len };
    return ioctl(fd, UFFDIO_WAKE, &r) < 0 ? errno : 0;
}

static inline int uffd_io_copy(int fd, uint64_t dst, const void *src, uint64_t len, int wp,
                   uint64_t *copied)
{
    uint64_t done = 0, total = 0;
    int err = 0, stalls = 0;
    while (done < len) {
        struct uffdio_copy c = {
            .dst = dst + done, .src = (uint64_t)(uintptr_t)src + done, .len = len - done,
            .mode = UFFDIO_COPY_MODE_DONTWAKE | (wp ? UFFDIO_COPY_MODE_WP : 0),
        };
        if (ioctl(fd, UFFDIO_COPY, &c) == 0) {
            total += c.copy;
            done += c.copy;
            break;
        }
        if (c.copy > 0) {
            total += c.copy;
            done += c.copy;
        }
        if (errno == EEXIST || c.copy == -EEXIST) {
            done += UFFD_IO_PAGE;          /* present already: skip it */
            continue;
        }
        if (errno == EAGAIN && c.copy > 0)
            continue;
        if (errno == EAGAIN && ++stalls < UFFD_IO_STALLS)
            continue;
        err = errno;
        break;
    }
    *copied = total;
    int w = uffd_io_wake(fd, dst, len);
    return err ? err : w;
}

static inline int uffd_io_continue(int fd, uint64_t dst, uint64_t len, uint64_t *mapped)
{
    uint64_t done = 0, total = 0;
    int err = 0, stalls = 0;
    while (done < len) {
        struct uffdio_continue c = {
            .range = { .start = dst + done, .len = len - done },
            .mode = UFFDIO_CONTINUE_MODE_DONTWAKE,
        };
        int r = ioctl(fd, UFFDIO_CONTINUE, &c);
        int e = errno;
        if (c.mapped > 0) {        /* a partial run ends in EAGAIN: go on from there */
            total += c.mapped;
            done += c.mapped;
        }
        if (r == 0)
            break;
        if (c.mapped > 0 && e == EAGAIN)
            continue;
        if (e == EEXIST) {
            done += UFFD_IO_PAGE;          /* mapped already: skip it */
            continue;
        }
        if (e == EAGAIN && ++stalls < UFFD_IO_STALLS)
            continue;
        err = e;                   /* EFAULT: the object lacks this page */
        break;
    }
    *mapped = total;
    int w = uffd_io_wake(fd, dst, len);
    return err ? err : w;
}

static inline int uffd_io_poison(int fd, uint64_t addr, uint64_t len)
{
    int err = 0;
    for (uint64_t off = 0; off < len; off += UFFD_IO_PAGE) {
        struct uffdio_poison p = { .range = { .start = addr + off, .len = UFFD_IO_PAGE },
                                   .mode = UFFDIO_COPY_MODE_DONTWAKE };
        if (ioctl(fd, UFFDIO_POISON, &p) < 0 && errno != EEXIST && errno != EAGAIN) {
            err = errno;
            break;
        }
    }
    int w = uffd_io_wake(fd, addr, len);
    return err ? err : w;
}

static inline int uffd_io_writeprotect(int fd, uint64_t addr, uint64_t len, int protect)
{
    struct uffdio_writeprotect w = {
        .range = { .start = addr, .len = len },
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    return ioctl(fd, UFFDIO_WRITEPROTECT, &w) < 0 ? errno : 0;
}

#endif
