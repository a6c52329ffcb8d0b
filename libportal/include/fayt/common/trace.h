/* trace.h: libportal's writer of the context page's trace area (common C,
 * not a layout: cffi does not read it; the layout is context.h's).
 * fayt_tracing() is the one load a hot path pays while no trace runs;
 * fayt_trace_put() is called only when it said yes.  Several threads may
 * record at once: each takes its own position with an atomic add.  The
 * page is this process's own: what it writes here misleads only its own
 * track of the trace (faytd checks every record). */
#ifndef FAYT_COMMON_TRACE_H
#define FAYT_COMMON_TRACE_H

#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "../context.h"
#include "../portal.h"
#include "deadline.h"

_Static_assert(FAYT_CONTEXT_BYTES == FAYT_PAGE_SIZE
               + FAYT_TRACE_RECORDS * sizeof(struct fayt_trace_record),
               "FAYT_CONTEXT_BYTES: the page and the trace area");
_Static_assert(sizeof(struct fayt_context_page) == FAYT_PAGE_SIZE, "the context page");

static inline int fayt_tracing(const struct fayt_context_page *page)
{
    return page && __atomic_load_n(&page->trace.on, __ATOMIC_RELAXED) == 1;
}

static inline int32_t fayt_trace_tid(void)
{
    static __thread int32_t tid;
    if (!tid)
        tid = (int32_t)syscall(SYS_gettid);
    return tid;
}

/* One record; ts 0: now. */
static inline void fayt_trace_put(struct fayt_context_page *page, uint16_t kind, uint16_t slot,
                                  uint32_t id, uint32_t pos, uint32_t aux, int64_t value,
                                  int64_t ts)
{
    struct fayt_trace_record *recs =
        (struct fayt_trace_record *)((char *)page + FAYT_PAGE_SIZE);
    uint32_t n = __atomic_fetch_add(&page->trace.head, 1, __ATOMIC_RELAXED);
    struct fayt_trace_record *r = &recs[n % FAYT_TRACE_RECORDS];
    __atomic_store_n(&r->seq, 0, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    r->kind = kind;
    r->slot = slot;
    r->tid = fayt_trace_tid();
    r->id = id;
    r->ts = (uint64_t)(ts ? ts : fayt_now_ns());
    r->pos = pos;
    r->aux = aux;
    r->value = value;
    __atomic_store_n(&r->seq, n + 1, __ATOMIC_RELEASE);
}

#endif
