/* timers.c: timerfd(2)s for faytd's deadlines (core.h): a chain's request
 * timeouts, notices retried, lock re-checks.  faytd's alone: no client
 * arms one. */
#include <errno.h>
#include <string.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "fayt/common/deadline.h"
#include "internal.h"

int fayt_timerfd_open(void)
{
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    return fd < 0 ? -errno : fd;
}

int fayt_timerfd_arm(int fd, int64_t ns)
{
    struct itimerspec t;
    memset(&t, 0, sizeof t);
    if (ns > 0)
        fayt_ns_to_ts(ns, &t.it_value);
    return timerfd_settime(fd, 0, &t, NULL) < 0 ? errno : 0;
}

void fayt_timerfd_drain(int fd)
{
    uint64_t n;
    while (read(fd, &n, sizeof n) == sizeof n)
        ;
}
