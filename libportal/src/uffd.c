/* uffd.c: userfaultfd(2), the pager channel rings, and the faytd-death guard.
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
#include <linux/futex.h>
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
#include "fayt/lock.h"
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
    struct uffd_msg msg[32];
    if (max > 32)
        max = 32;
    ssize_t n = read(fd, msg, sizeof(msg[0]) * max);
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

int fayt_uffd_wake(int fd, uint64_t addr, uint64_t len)
{
    struct uffdio_range r = { .start = addr, .len = len };
    return ioctl(fd, UFFDIO_WAKE, &r) < 0 ? errno : 0;
}

int fayt_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, int wp,
                   uint64_t *copied)
{
    uint64_t done = 0, total = 0;
    int skipped = 0, err = 0;
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
            done += PAGE;          /* present already: skip it */
            skipped = 1;
            continue;
        }
        if (errno == EAGAIN)
            continue;
        err = errno;
        break;
    }
    (void)skipped;
    *copied = total;
    int w = fayt_uffd_wake(fd, dst, len);
    return err ? err : w;
}

int fayt_uffd_continue(int fd, uint64_t dst, uint64_t len, uint64_t *mapped)
{
    uint64_t done = 0, total = 0;
    int err = 0;
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
            done += PAGE;          /* mapped already: skip it */
            continue;
        }
        if (e == EAGAIN)
            continue;
        err = e;                   /* EFAULT: the object lacks this page */
        break;
    }
    *mapped = total;
    int w = fayt_uffd_wake(fd, dst, len);
    return err ? err : w;
}

int fayt_uffd_poison(int fd, uint64_t addr, uint64_t len)
{
    int err = 0;
    for (uint64_t off = 0; off < len; off += PAGE) {
        struct uffdio_poison p = { .range = { .start = addr + off, .len = PAGE },
                                   .mode = UFFDIO_COPY_MODE_DONTWAKE };
        if (ioctl(fd, UFFDIO_POISON, &p) < 0 && errno != EEXIST && errno != EAGAIN) {
            err = errno;
            break;
        }
    }
    int w = fayt_uffd_wake(fd, addr, len);
    return err ? err : w;
}

int fayt_uffd_writeprotect(int fd, uint64_t addr, uint64_t len, int protect)
{
    struct uffdio_writeprotect w = {
        .range = { .start = addr, .len = len },
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    return ioctl(fd, UFFDIO_WRITEPROTECT, &w) < 0 ? errno : 0;
}

/* -- timerfd ------------------------------------------------------------ */

/* -- channels ----------------------------------------------------------- */

static inline struct fayt_pager_header *hdr(void *ch) { return (struct fayt_pager_header *)ch; }

uint64_t fayt_pager_bytes(uint32_t nslots, uint32_t run_max)
{
    return FAYT_PAGER_HEADER_SIZE + (uint64_t)nslots * (FAYT_PAGER_DESC_SIZE + run_max);
}

void fayt_pager_init(void *ch, uint32_t nslots, uint32_t run_max, uint32_t chain_id,
                     uint32_t position)
{
    struct fayt_pager_header *h = hdr(ch);
    h->nslots = nslots;
    h->run_max = run_max;
    h->slot_stride = FAYT_PAGER_DESC_SIZE + run_max;
    h->chain_id = chain_id;
    h->position = position;
    STORE(&h->magic, FAYT_PAGER_MAGIC);
}

struct fayt_page_request *fayt_pager_slot(void *ch, uint32_t slot)
{
    return (struct fayt_page_request *)((char *)ch + FAYT_PAGER_HEADER_SIZE +
                                        (uint64_t)slot * hdr(ch)->slot_stride);
}

void *fayt_pager_data(void *ch, uint32_t slot)
{
    return (char *)fayt_pager_slot(ch, slot) + FAYT_PAGER_DESC_SIZE;
}

static int futex_wait(uint32_t *w, uint32_t expect, const struct timespec *rel)
{
    if (syscall(SYS_futex, w, FUTEX_WAIT, expect, rel, NULL, 0) == 0)
        return 0;
    return errno == EAGAIN ? 0 : errno;
}

/* One turn of a spin that waits for another process: a pause, and a
 * sched_yield(2) so that, if that process waits for our CPU, it runs now
 * (spinning on the CPU the other side needs would only delay it). */
static inline void spin_pause(void)
{
    __builtin_ia32_pause();
    sched_yield();
}

int fayt_pager_await(void *ch, int64_t spin_ns)
{
    struct fayt_pager_header *h = hdr(ch);
    uint32_t tail = h->ans_tail;
    if (LOAD(&h->ans_head) != tail)
        return 1;
    if (spin_ns <= 0)
        return 0;
    /* rung = 1: the server skips its eventfd write while we look. */
    if (__atomic_exchange_n(&h->rung, 1, __ATOMIC_SEQ_CST))
        return LOAD(&h->ans_head) != tail;     /* a write is on its way anyway */
    int64_t until = fayt_now_ns() + spin_ns;
    int got = 0;
    while (!(got = LOAD(&h->ans_head) != tail) && fayt_now_ns() < until)
        spin_pause();
    __atomic_store_n(&h->rung, 0, __ATOMIC_SEQ_CST);
    FENCE();    /* rung cleared before the last look (pairs with answer) */
    return got || LOAD(&h->ans_head) != tail;
}

void fayt_pager_post(void *ch, uint32_t slot)
{
    struct fayt_pager_header *h = hdr(ch);
    uint32_t head = h->req_head;
    STORE(&h->req_ring[head % FAYT_PAGER_SLOTS_MAX], slot);
    __atomic_store_n(&h->req_head, head + 1, __ATOMIC_SEQ_CST);
    FENCE();    /* head before server_waiting (pairs with take) */
    if (LOAD(&h->server_waiting))
        syscall(SYS_futex, &h->req_head, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
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
            spin_pause();
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
            r = futex_wait(&h->req_head, head, tsp);
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

void fayt_pager_clear_rung(void *ch)
{
    __atomic_store_n(&hdr(ch)->rung, 0, __ATOMIC_SEQ_CST);
}

int fayt_pager_reap(void *ch)
{
    struct fayt_pager_header *h = hdr(ch);
    uint32_t tail = h->ans_tail;
    if (LOAD(&h->ans_head) == tail)
        return -1;
    uint32_t slot = LOAD(&h->ans_ring[tail % FAYT_PAGER_SLOTS_MAX]);
    STORE(&h->ans_tail, tail + 1);
    return slot < h->nslots ? (int)slot : -2;
}

void fayt_pager_fault(void *ch, uint32_t stride, uint32_t slot, uint64_t id, uint64_t offset,
                      uint32_t run_max, uint32_t chain_id, uint32_t region_id,
                      int32_t client_pid, uint64_t region_length, const char *chain,
                      const char *message, uint32_t message_length, uint32_t backing,
                      int uffd, uint64_t region_addr, int64_t spin_ns,
                      struct fayt_fast_fault *out)
{
    struct fayt_pager_header *h = hdr(ch);
    char *at = (char *)ch + FAYT_PAGER_HEADER_SIZE + (uint64_t)slot * stride;
    struct fayt_page_request *d = (struct fayt_page_request *)at;
    uint64_t room = region_length - offset;
    uint32_t run = run_max < room ? run_max : (uint32_t)room;
    out->state = FAYT_FAST_POSTED;
    out->err = 0;
    out->copied = 0;
    out->verdict = FAYT_PAGE_PENDING;
    out->reserved = 0;
    /* The whole descriptor, as faytd's Python writes it (strings padded). */
    memset(d, 0, sizeof *d);
    d->id = id;
    d->offset = offset;
    d->length = PAGE;
    d->run_max = run;
    d->access = FAYT_ACCESS_READ;
    d->flags = backing ? FAYT_PAGE_BACKED : 0;
    d->backing = backing;
    d->chain_id = chain_id;
    d->region_id = region_id;
    d->client_pid = client_pid;
    d->region_length = region_length;
    d->verdict = FAYT_PAGE_PENDING;
    d->message_length = message_length;
    strncpy(d->chain, chain, sizeof d->chain - 1);
    if (message_length)
        memcpy(d->message, message, message_length < sizeof d->message - 1
                                    ? message_length : sizeof d->message - 1);
    fayt_pager_post(ch, slot);
    if (!fayt_pager_await(ch, spin_ns))
        return;
    uint32_t tail = h->ans_tail;
    if (LOAD(&h->ans_ring[tail % FAYT_PAGER_SLOTS_MAX]) != slot)
        return;                             /* not ours: the Python reaper sorts it out */
    STORE(&h->ans_tail, tail + 1);
    out->state = FAYT_FAST_ANSWERED;
    /* The server may write anything here: read each field once. */
    uint32_t verdict = LOAD(&d->verdict);
    uint32_t n = __atomic_load_n(&d->answer_length, __ATOMIC_RELAXED);
    /* MAPPED where the region does not map this server's backing: Python
     * fails it as the protocol error it is. */
    if (verdict != FAYT_PAGE_DATA && !(verdict == FAYT_PAGE_MAPPED && backing))
        return;
    if (n > run)
        n = run;
    n -= n % PAGE;
    if (n < PAGE)
        return;                             /* Python fails it (ENODATA) */
    out->verdict = verdict;
    int err;
    if (verdict == FAYT_PAGE_MAPPED) {
        err = fayt_uffd_continue(uffd, region_addr + offset, n, &out->copied);
        if (err && out->copied == 0) {      /* not even the faulting page: SIGBUS */
            out->state = FAYT_FAST_FAILED;
            out->err = err;
            return;
        }
        out->state = FAYT_FAST_DONE;
        out->err = err;
        return;
    }
    err = fayt_uffd_copy(uffd, region_addr + offset, at + FAYT_PAGER_DESC_SIZE, n, 0,
                         &out->copied);
    if (err && out->copied == 0 && err != ENOENT) {
        out->state = FAYT_FAST_FAILED;
        out->err = err;
        return;
    }
    out->state = FAYT_FAST_DONE;
    out->err = err;
}

void fayt_pager_close(void *ch)
{
    struct fayt_pager_header *h = hdr(ch);
    __atomic_store_n(&h->state, FAYT_PAGER_CLOSED, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&h->req_head, 0, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &h->req_head, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
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

void fayt_copy(uintptr_t dst, uintptr_t src, uint64_t n)
{
    memcpy((void *)dst, (const void *)src, n);
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
