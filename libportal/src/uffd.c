/* uffd.c: userfaultfd(2) for clients (the ioctls themselves: uffd_io.h), the
 * chain server's side of the channel rings, and the faytd-death guard.
 *
 * Linux facts this relies on:
 * - A userfaultfd acts on the address space of the process that created it,
 *   whoever holds the fd: faytd, given the client's uffd, resolves the
 *   client's faults with UFFDIO_COPY from faytd's own memory.
 * - Without privilege (CAP_SYS_PTRACE) and with vm.unprivileged_userfaultfd
 *   at 0, only UFFD_USER_MODE_ONLY is allowed: faults taken by the kernel
 *   itself (read(2) into the region) then fail with EFAULT instead of waiting.
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
 *   and the range turns into plain memory (zero pages): so the client keeps
 *   its own fd, and the guard poisons what was never supplied if faytd dies.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "deadline.h"
#include "futex.h"
#include "fayt/lock.h"
#include "fayt/pager.h"
#include "uffd_io.h"

#define PAGE 4096ULL

_Static_assert(sizeof(struct fayt_pager_header) <= FAYT_PAGER_HEADER_SIZE, "pager header");
_Static_assert(sizeof(struct fayt_page_request) <= FAYT_PAGER_DESC_SIZE, "page request");
#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)

/* -- userfaultfd ------------------------------------------------------- */

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

/* -- timerfd ------------------------------------------------------------ */

/* -- channels ----------------------------------------------------------- */

static inline struct fayt_pager_header *hdr(void *ch) { return (struct fayt_pager_header *)ch; }

struct fayt_page_request *fayt_pager_slot(void *ch, uint32_t slot)
{
    return (struct fayt_page_request *)((char *)ch + FAYT_PAGER_HEADER_SIZE +
                                        (uint64_t)slot * hdr(ch)->slot_stride);
}

void *fayt_pager_data(void *ch, uint32_t slot)
{
    return (char *)fayt_pager_slot(ch, slot) + FAYT_PAGER_DESC_SIZE;
}

int fayt_pager_take(void *ch, int64_t timeout_ns, int64_t spin_ns)
{
    struct fayt_pager_header *h = hdr(ch);
    struct timespec deadline, now, rel;
    fayt_deadline(timeout_ns, &deadline);
    int64_t spin_until = spin_ns > 0 ? fayt_now_ns() + spin_ns : 0;
    for (;;) {
        uint32_t tail = h->req_tail;
        uint32_t head = LOAD(&h->req_head);
        if (head == tail && fayt_now_ns() < spin_until) {
            fayt_spin_pause();
            continue;
        }
        if (head != tail) {
            uint32_t slot = LOAD(&h->req_ring[tail % FAYT_PAGER_SLOTS_MAX]);
            STORE(&h->req_tail, tail + 1);
            return (int)slot;
        }
        if (LOAD(&h->state) != FAYT_PAGER_LIVE)
            return -EPIPE;
        struct timespec *tsp = NULL;
        if (timeout_ns >= 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            rel.tv_sec = deadline.tv_sec - now.tv_sec;
            rel.tv_nsec = deadline.tv_nsec - now.tv_nsec;
            if (rel.tv_nsec < 0) {
                rel.tv_sec--;
                rel.tv_nsec += 1000000000;
            }
            if (rel.tv_sec < 0)
                return -ETIMEDOUT;
            tsp = &rel;
        }
        __atomic_store_n(&h->server_waiting, 1, __ATOMIC_SEQ_CST);
        FENCE();
        int r = 0;
        if (LOAD(&h->req_head) == head && LOAD(&h->state) == FAYT_PAGER_LIVE)
            r = fayt_futex_sleep(&h->req_head, head, tsp);
        __atomic_store_n(&h->server_waiting, 0, __ATOMIC_RELAXED);
        if (r == EINTR)
            return -EINTR;
        if (r == ETIMEDOUT && LOAD(&h->req_head) == head)
            return -ETIMEDOUT;
    }
}

int fayt_pager_answer(void *ch, uint32_t slot, uint32_t verdict, int32_t error,
                      uint32_t length, int eventfd)
{
    struct fayt_pager_header *h = hdr(ch);
    if (slot >= h->nslots || verdict < FAYT_PAGE_DATA || verdict > FAYT_PAGE_MAPPED ||
        length > h->run_max || length % PAGE)
        return EINVAL;
    struct fayt_page_request *r = fayt_pager_slot(ch, slot);
    r->error = error;
    r->answer_length = length;
    STORE(&r->verdict, verdict);
    uint32_t head = h->ans_head;
    STORE(&h->ans_ring[head % FAYT_PAGER_SLOTS_MAX], slot);
    __atomic_store_n(&h->ans_head, head + 1, __ATOMIC_SEQ_CST);
    if (!__atomic_exchange_n(&h->rung, 1, __ATOMIC_SEQ_CST)) {
        uint64_t one = 1;
        if (write(eventfd, &one, sizeof one) < 0)
            return errno;
    }
    return 0;
}

uintptr_t fayt_map_special(uint64_t length, uintptr_t addr, int prot, int *err)
{
    return fayt_mmap_at(addr, length, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, err);
}

static uintptr_t map_fixed(int fd, uint64_t length, uintptr_t addr, int prot, int flags,
                           int *err)
{
    void *p = mmap((void *)addr, length, prot, flags | MAP_FIXED, fd, 0);
    if (p == MAP_FAILED) {
        *err = errno;
        return 0;
    }
    *err = 0;
    return (uintptr_t)p;
}

uintptr_t fayt_map_over(int fd, uint64_t length, uintptr_t addr, int prot, int *err)
{
    return map_fixed(fd, length, addr, prot, MAP_SHARED, err);
}

uintptr_t fayt_map_private_over(int fd, uint64_t length, uintptr_t addr, int *err)
{
    return map_fixed(fd, length, addr, PROT_NONE, MAP_PRIVATE, err);
}

int fayt_protect(uintptr_t addr, uint64_t length, int prot)
{
    return mprotect((void *)addr, length, prot) < 0 ? errno : 0;
}

/* A copy that touches the pages of a SPECIAL portal in address order, one
 * page at a time: glibc's memcpy may load the tail of a large copy first
 * (depending on how source and destination are aligned), which would fault
 * the last page before the second and defeat the chain's prefetch run. */
void fayt_copy(uintptr_t dst, uintptr_t src, uint64_t n)
{
    while (n) {
        uint64_t chunk = 4096 - (src & 4095), to_dst = 4096 - (dst & 4095);
        if (chunk > to_dst)
            chunk = to_dst;
        if (chunk > n)
            chunk = n;
        memcpy((void *)dst, (const void *)src, chunk);
        dst += chunk;
        src += chunk;
        n -= chunk;
    }
}

/* -- the guard against faytd's death ------------------------------------- */

struct guarded {
    int uffd;
    uint64_t addr, len;
};

static pthread_mutex_t guard_mu = PTHREAD_MUTEX_INITIALIZER;
static struct guarded *guards;
static int nguards, guard_cap;
static int guard_pidfd = -1;
static int guard_running;
static int guard_forked_registered;

/* A fork child has no guard thread; its copies of special regions are not
 * registered with the parent's userfaultfds any more. */
static void guard_child(void)
{
    nguards = 0;
    guard_running = 0;
    if (guard_pidfd >= 0)
        close(guard_pidfd);
    guard_pidfd = -1;
    pthread_mutex_init(&guard_mu, NULL);
}

static void *guard_main(void *arg)
{
    (void)arg;
    struct pollfd p = { .fd = guard_pidfd, .events = POLLIN };
    while (poll(&p, 1, -1) < 0 && errno == EINTR)
        ;
    pthread_mutex_lock(&guard_mu);
    for (int i = 0; i < nguards; i++)
        fayt_uffd_poison(guards[i].uffd, guards[i].addr, guards[i].len);
    nguards = 0;
    close(guard_pidfd);
    guard_pidfd = -1;
    guard_running = 0;
    pthread_mutex_unlock(&guard_mu);
    return NULL;
}

int fayt_special_guard(int faytd_pidfd, int uffd, uint64_t addr, uint64_t len)
{
    int err = 0;
    pthread_mutex_lock(&guard_mu);
    if (!guard_forked_registered) {
        pthread_atfork(NULL, NULL, guard_child);
        guard_forked_registered = 1;
    }
    if (nguards == guard_cap) {
        int cap = guard_cap ? guard_cap * 2 : 16;
        struct guarded *g = realloc(guards, cap * sizeof *g);
        if (!g) {
            err = ENOMEM;
            goto out;
        }
        guards = g;
        guard_cap = cap;
    }
    if (!guard_running) {
        guard_pidfd = fcntl(faytd_pidfd, F_DUPFD_CLOEXEC, 0);
        if (guard_pidfd < 0) {
            err = errno;
            goto out;
        }
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&a, 65536);
        err = pthread_create(&t, &a, guard_main, NULL);
        pthread_attr_destroy(&a);
        if (err) {
            close(guard_pidfd);
            guard_pidfd = -1;
            goto out;
        }
        guard_running = 1;
    }
    guards[nguards].uffd = uffd;
    guards[nguards].addr = addr;
    guards[nguards].len = len;
    nguards++;
out:
    pthread_mutex_unlock(&guard_mu);
    return err;
}

void fayt_special_unguard(int uffd)
{
    pthread_mutex_lock(&guard_mu);
    for (int i = 0; i < nguards; i++) {
        if (guards[i].uffd == uffd) {
            guards[i] = guards[--nguards];
            break;
        }
    }
    pthread_mutex_unlock(&guard_mu);
}
