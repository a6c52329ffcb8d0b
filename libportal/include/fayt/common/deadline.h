/* deadline.h: the time helpers of libportal's C and faytd's core (common
 * C, not a layout: cffi does not read it): CLOCK_MONOTONIC now, a deadline
 * timeout_ns from now, the time left until one (what FUTEX_WAIT takes),
 * nanoseconds as a timespec, and one turn of a spin that waits for another
 * process until a deadline.
 * Every clock here is CLOCK_MONOTONIC: a wall-clock change must not stretch
 * or cut a wait. */
#ifndef FAYT_COMMON_DEADLINE_H
#define FAYT_COMMON_DEADLINE_H

#include <sched.h>
#include <stdint.h>
#include <time.h>

/* CLOCK_MONOTONIC, in nanoseconds. */
static inline int64_t fayt_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* ns (>= 0) as a timespec. */
static inline void fayt_ns_to_ts(int64_t ns, struct timespec *ts)
{
    ts->tv_sec = ns / 1000000000;
    ts->tv_nsec = ns % 1000000000;
}

/* The deadline timeout_ns from now in *d: 1; a negative timeout is no
 * deadline: 0, *d untouched. */
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

/* The time left until deadline d in *rel: 1, or 0 if d has passed. */
static inline int fayt_remaining(const struct timespec *d, struct timespec *rel)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    rel->tv_sec = d->tv_sec - now.tv_sec;
    rel->tv_nsec = d->tv_nsec - now.tv_nsec;
    if (rel->tv_nsec < 0) {
        rel->tv_sec--;
        rel->tv_nsec += 1000000000;
    }
    return rel->tv_sec >= 0;
}

/* One turn of a spin that waits for another process: a pause, and the
 * CPU given away (sched_yield), so that if that process waits for our CPU
 * it runs now (spinning on the CPU the other side needs only delays it). */
static inline void fayt_spin_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    sched_yield();
}

#endif
