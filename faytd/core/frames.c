/* frames.c: faytd's frame allocator (core.h).
 *
 * Flat arrays, a few bytes per 4 KiB frame: 10,000 one-page share-points
 * cost nothing per frame.  Frames come from a stack of handed-back ones,
 * then from never-used ones above `next`, so a portal's frames need not be
 * contiguous, as on real hardware.  Single-threaded: faytd's loop thread is
 * the only caller (Python or the fast system calls it runs).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

int fayt_frames_init(struct fayt_frames *f, uint32_t nframes)
{
    memset(f, 0, sizeof *f);
    size_t n = nframes ? nframes : 1;
    f->free_stack = calloc(n, sizeof(uint32_t));
    f->refcount = calloc(n, sizeof(uint32_t));
    f->owner = calloc(n, sizeof(uint32_t));
    f->offset = calloc(n, sizeof(uint32_t));
    if (!f->free_stack || !f->refcount || !f->owner || !f->offset) {
        fayt_frames_fini(f);
        return ENOMEM;
    }
    f->nframes = nframes;
    f->next_oid = 1;
    return 0;
}

void fayt_frames_fini(struct fayt_frames *f)
{
    free(f->free_stack);
    free(f->refcount);
    free(f->owner);
    free(f->offset);
    f->free_stack = f->refcount = f->owner = f->offset = NULL;
    f->nframes = f->next = f->nfree = 0;
}

uint32_t fayt_frames_free(const struct fayt_frames *f)
{
    return f->nframes - f->next + f->nfree;
}

int fayt_frames_alloc(struct fayt_frames *f, uint32_t n, uint32_t oid, uint32_t *out)
{
    if (n > fayt_frames_free(f))
        return ENOMEM;
    uint32_t i = 0;
    for (; i < n && f->nfree; i++)          /* the most recently freed first */
        out[i] = f->free_stack[--f->nfree];
    for (; i < n; i++)
        out[i] = f->next++;
    for (i = 0; i < n; i++) {
        uint32_t fr = out[i];
        f->refcount[fr] = 1;
        f->owner[fr] = oid;
        f->offset[fr] = i;
    }
    return 0;
}

void fayt_frames_get(struct fayt_frames *f, const uint32_t *frames, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        f->refcount[frames[i]]++;
}

uint32_t fayt_frames_put(struct fayt_frames *f, const uint32_t *frames, uint32_t n)
{
    uint32_t freed = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t fr = frames[i];
        if (f->refcount[fr] == 0)           /* never: a bug must not corrupt the stack */
            continue;
        if (--f->refcount[fr] == 0) {
            f->owner[fr] = 0;
            f->free_stack[f->nfree++] = fr;
            freed++;
        }
    }
    return freed;
}

int fayt_frames_adopt(struct fayt_frames *f, const uint32_t *frames, uint32_t n, uint32_t oid)
{
    for (uint32_t i = 0; i < n; i++) {
        if (frames[i] >= f->nframes || f->refcount[frames[i]]) {   /* taken, or named twice */
            while (i--)
                f->refcount[frames[i]] = 0;
            return EINVAL;
        }
        f->refcount[frames[i]] = 1;
    }
    for (uint32_t i = 0; i < n; i++) {
        f->owner[frames[i]] = oid;
        f->offset[frames[i]] = i;
        if (frames[i] + 1 > f->next)
            f->next = frames[i] + 1;
    }
    return 0;
}

void fayt_frames_adopted(struct fayt_frames *f)
{
    f->nfree = 0;
    for (uint32_t fr = 0; fr < f->next; fr++)
        if (!f->refcount[fr])
            f->free_stack[f->nfree++] = fr;
}

int fayt_frames_resolve(const struct fayt_frames *f, const uint64_t *paddr, uint32_t n,
                        uint32_t *frames, uint32_t *run_oid, uint32_t *run_page,
                        uint32_t *run_pages, uint32_t *run_at, uint32_t *nruns, uint32_t *bad)
{
    uint32_t r = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t pa = paddr[i];
        *bad = i;
        if (pa % 4096)
            return FAYT_FRAMES_UNALIGNED;
        if (pa < FAYT_RAM_BASE || (pa - FAYT_RAM_BASE) / 4096 >= f->nframes)
            return FAYT_FRAMES_UNBACKED;
        uint32_t fr = (uint32_t)((pa - FAYT_RAM_BASE) / 4096);
        if (!f->refcount[fr])
            return FAYT_FRAMES_FREE;
        frames[i] = fr;
        uint32_t oid = f->owner[fr], page = f->offset[fr];
        if (r && run_oid[r - 1] == oid && run_page[r - 1] + run_pages[r - 1] == page) {
            run_pages[r - 1]++;
        } else {
            run_oid[r] = oid;
            run_page[r] = page;
            run_pages[r] = 1;
            run_at[r] = i;
            r++;
        }
    }
    *nruns = r;
    return 0;
}
