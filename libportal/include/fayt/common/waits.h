/* waits.h: the two stores around a libportal wait (common C, not a layout:
 * cffi does not read it).  The context page's wait record (context.h) is
 * bumped just before a thread sleeps and just after it is back; faytd reads
 * it on a timer (faytd/schedevents.py).  No system call, no wake-up: one
 * relaxed atomic add each (several threads of a process may wait at once).
 * A NULL page (no connection yet) counts nothing. */
#ifndef FAYT_COMMON_WAITS_H
#define FAYT_COMMON_WAITS_H

#include "../context.h"

static inline void fayt_wait_begin(struct fayt_context_page *page)
{
    if (page)
        __atomic_fetch_add(&page->waits.blocks, 1, __ATOMIC_RELAXED);
}

static inline void fayt_wait_end(struct fayt_context_page *page)
{
    if (page)
        __atomic_fetch_add(&page->waits.wakes, 1, __ATOMIC_RELAXED);
}

#endif
