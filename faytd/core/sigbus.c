/* sigbus.c: faytd's guard against shared objects a client truncates
 * (core.h: fayt_sigbus_guard).  faytd's alone: no client installs it, so it
 * lives here and not in libportal's C (it was lock.c's until issue 11).
 *
 * The Linux facts: an access past the end of a shared object's pages
 * raises SIGBUS with si_code BUS_ADRERR at the faulting address; a
 * MAP_FIXED anonymous page there makes the access succeed when it runs
 * again.  mmap(2) is async-signal-safe in practice (a system call).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>

#include "fayt/portal.h"
#include "internal.h"

static uint64_t sigbus_count;
static struct sigaction sigbus_prev;    /* what was there before (faulthandler, default) */

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    int saved = errno;
    (void)uc;
    if (si->si_code == BUS_ADRERR) {
        uintptr_t page = (uintptr_t)si->si_addr & ~(uintptr_t)(FAYT_PAGE_SIZE - 1);
        void *p = mmap((void *)page, FAYT_PAGE_SIZE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (p != MAP_FAILED) {
            __atomic_add_fetch(&sigbus_count, 1, __ATOMIC_RELAXED);
            errno = saved;
            return;                     /* the access runs again, on the zero page */
        }
    }
    /* Not ours to mend: the previous handler (or the default action) gets
     * it when the access runs again. */
    sigaction(sig, &sigbus_prev, NULL);
    errno = saved;
}

int fayt_sigbus_guard(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, &sigbus_prev) ? errno : 0;
}

uint64_t fayt_sigbus_count(void)
{
    return __atomic_load_n(&sigbus_count, __ATOMIC_RELAXED);
}
