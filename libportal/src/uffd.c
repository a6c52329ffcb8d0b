/* uffd.c: userfaultfd(2) for clients: opening one with the features faytd
 * uses, registering a range, and the bare ioctls the bench uses (the ioctls
 * themselves are uffd_io.h's, shared with faytd's fault engine).  The pager
 * channel of a chain server is pager.c; the client's SPECIAL mapping and
 * its guard against faytd's death are special.c.
 *
 * Linux facts this relies on:
 * - A userfaultfd acts on the address space of the process that created it,
 *   whoever holds the fd: faytd, given the client's uffd, resolves the
 *   client's faults with UFFDIO_COPY from faytd's own memory.
 * - Without privilege (CAP_SYS_PTRACE) and with vm.unprivileged_userfaultfd
 *   at 0, only UFFD_USER_MODE_ONLY is allowed: faults taken by the kernel
 *   itself (read(2) into the region) then fail with EFAULT instead of waiting.
 * - UFFDIO_API may be called once per fd, so the features are learnt on a
 *   probe fd first and then asked for on the real one.
 * - UFFDIO_COPY fails with EEXIST at a page already present; the copy stops
 *   there (`copy` says how far it got): we skip that page and go on.
 * - UFFDIO_POISON (6.6) installs a marker: the access gets SIGBUS.
 * - Minor faults (5.14, UFFD_FEATURE_MINOR_SHMEM): a shmem mapping
 *   registered MINOR faults on a page its object's page cache already
 *   holds, and UFFDIO_CONTINUE maps that very page (no copy).  In a
 *   MAP_PRIVATE mapping it is mapped read-only, so a write copies it
 *   (copy-on-write) and never reaches the object.  It fails with EEXIST at
 *   a page already mapped and EFAULT at one the object lacks; like
 *   UFFDIO_COPY it stops there (`mapped` says how far it got).  A hole of
 *   a MAP_PRIVATE shmem mapping still raises a MISSING fault, and
 *   UFFDIO_COPY there makes a private anonymous page.  Linux does not
 *   fault around (map neighbouring cached pages) in uffd-minor VMAs, so
 *   every page comes through a fault.
 * - Write-protect mode on anonymous memory (5.7; unpopulated pages 6.4 with
 *   UFFD_FEATURE_WP_UNPOPULATED): UFFDIO_COPY_MODE_WP installs the page
 *   protected, the first write raises a WP fault, UFFDIO_WRITEPROTECT clears it.
 * - When the last fd of a userfaultfd closes, its blocked faults are woken
 *   and the range turns into plain memory (zero pages): see special.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "fayt/pager.h"
#include "fayt/common/uffd_io.h"

static int uffd_new(int flags)
{
    int fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | flags);
    return fd < 0 ? -errno : fd;
}

static int api(int fd, uint64_t features, uint64_t *got)
{
    struct uffdio_api a = { .api = UFFD_API, .features = features };
    if (ioctl(fd, UFFDIO_API, &a) < 0)
        return errno;
    if (got)
        *got = a.features;
    return 0;
}

int fayt_uffd_open(uint32_t *caps)
{
    int mode = 0;
    int fd = uffd_new(0);
    if (fd == -EPERM) {
        mode = UFFD_USER_MODE_ONLY;
        fd = uffd_new(mode);
    }
    if (fd < 0)
        return fd;
    /* Learn the features on a probe: UFFDIO_API may be called once per fd. */
    uint64_t have = 0;
    int probe = uffd_new(mode);
    if (probe >= 0) {
        api(probe, 0, &have);
        close(probe);
    }
    uint64_t want = have & (UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_THREAD_ID |
                            UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_WP_UNPOPULATED |
                            UFFD_FEATURE_POISON | UFFD_FEATURE_MINOR_SHMEM);
    int r = api(fd, want, NULL);
    if (r) {
        close(fd);
        return -r;
    }
    *caps = (mode ? FAYT_UFFD_USER_MODE : 0) |
            ((want & UFFD_FEATURE_PAGEFAULT_FLAG_WP) && (want & UFFD_FEATURE_WP_UNPOPULATED)
             ? FAYT_UFFD_WP : 0) |
            ((want & UFFD_FEATURE_POISON) ? FAYT_UFFD_POISON : 0) |
            ((want & UFFD_FEATURE_MINOR_SHMEM) ? FAYT_UFFD_MINOR : 0);
    return fd;
}

int fayt_uffd_register(int fd, uint64_t addr, uint64_t len, int modes)
{
    struct uffdio_register r = {
        .range = { .start = addr, .len = len },
        .mode = UFFDIO_REGISTER_MODE_MISSING |
                ((modes & FAYT_UFFD_REGISTER_WP) ? UFFDIO_REGISTER_MODE_WP : 0) |
                ((modes & FAYT_UFFD_REGISTER_MINOR) ? UFFDIO_REGISTER_MODE_MINOR : 0),
    };
    return ioctl(fd, UFFDIO_REGISTER, &r) < 0 ? errno : 0;
}

int fayt_uffd_read(int fd, struct fayt_uffd_fault *out, int max)
{
    return uffd_io_read(fd, out, max);
}

int fayt_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, int wp,
                   uint64_t *copied)
{
    return uffd_io_copy(fd, dst, src, len, wp, copied);
}

int fayt_uffd_poison(int fd, uint64_t addr, uint64_t len)
{
    return uffd_io_poison(fd, addr, len);
}
