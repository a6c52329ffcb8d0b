/* special.c: the client's side of a SPECIAL portal: its range (mapped,
 * then the share's object or a chain's backing mapped over it), the copies
 * into and out of it, and the guard against faytd's death.
 *
 * Linux facts this relies on:
 * - MAP_FIXED over a range this process reserved replaces it atomically:
 *   the range is never unmapped in between (no other mmap can take it).
 * - When the last fd of a userfaultfd closes, its blocked faults are woken
 *   and the range turns into plain memory (zero pages): so the client keeps
 *   its own fd, and if faytd dies the guard poisons what was never supplied
 *   (UFFDIO_POISON: accesses blocked then, and later, get SIGBUS).
 * - A pidfd polls readable when its process exits: one C thread (no GIL
 *   needed) sleeps in poll(2) on faytd's, for every guarded region.
 * - A fork child has the parent's memory but not its threads, and Linux
 *   drops userfaultfd registrations in the child: it has no guard.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fayt/lock.h"
#include "fayt/pager.h"

/* -- the range ------------------------------------------------------------ */

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
