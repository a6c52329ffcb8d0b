/* deadline.h: CLOCK_MONOTONIC now, and a deadline timeout_ns from now
 * (internal to libportal's C; cffi does not read it).  Returns 0 (no deadline) for a
 * negative timeout, else 1 with *d set. */
#ifndef FAYT_SRC_DEADLINE_H
#define FAYT_SRC_DEADLINE_H

#include <stdint.h>
#include <time.h>

/* CLOCK_MONOTONIC, in nanoseconds. */
static inline int64_t fayt_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline int fayt_deadline(int64_t timeout_ns, struct timespec *d)
{
    if (timeout_ns < 0)
        return 0;
    clock_gettime(CLOCK_MONOTONIC, d);
    d->tv_sec += timeout_ns / 1000000000;
    d->tv_nsec += timeout_ns % 1000000000;
    if (d->tv_nsec >= 1000000000) {
        d->tv_sec++;
        d->tv_nsec -= 1000000000;
    }
    return 1;
}

#endif
