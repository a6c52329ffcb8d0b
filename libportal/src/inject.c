/* inject.c: the faults libportal injects in its own process (docs/testing.md).
 *
 * Lock takes, handlers and doorbells never pass through faytd, so faytd
 * cannot fail them; it writes a plan into the context page instead
 * (fayt/context.h: struct fayt_inject_plan, a seqlock) and the process
 * injects the faults itself: it dies holding a lock or inside a handler, or
 * leaves a doorbell unrung.  What it counts (events seen, faults injected)
 * it writes into its own part of the page, where faytd reads it to log and
 * count them.
 *
 * Cost: the lock's uncontended path loads plan.kinds once (take_at_home in
 * sharepoint.c); a set bit sends the take down the slow path, which asks
 * fp_inject_fires.  A sender loads it once a post.  Nothing else changes.
 *
 * Trust: only faytd and this process can write the page, so a bad plan is
 * this process's own doing; still every field is bounded where it is used
 * (a kind index, ppm clamped), no loop depends on it, and a plan read while
 * faytd writes it (an odd or changed seq) injects nothing this time.
 */
#include "fastpath.h"

#include <signal.h>
#include <unistd.h>

#include "fayt/context.h"
#include "fayt/ring.h"

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define RELAXED(p) __atomic_load_n((p), __ATOMIC_RELAXED)

uint64_t fp_splitmix64(uint64_t x)
{
    uint64_t z = x + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Whether the rule of kind bit `kind` (FAYT_INJECT_*) fires at this event.
 * match: the event's argument (a share-point id, a slot), compared with the
 * rule's arg when match_arg; an event of another argument is not counted.
 * *arg_out (or NULL): the rule's arg (a delay).  Counts the event and the
 * fault in the page's `injected` part. */
int fp_inject_fires(struct fayt_context_page *p, uint32_t kind, uint32_t match, int match_arg,
                    uint32_t *arg_out)
{
    if (!p || !kind || (kind & (kind - 1)) || kind > FAYT_INJECT_DOORBELL_DELAY)
        return 0;
    int i = __builtin_ctz(kind);
    struct fayt_inject_plan *plan = &p->inject;
    uint32_t seq = LOAD(&plan->seq);
    if (seq & 1)
        return 0;                       /* faytd is writing it: next time */
    uint32_t kinds = RELAXED(&plan->kinds);
    struct fayt_inject_rule r;
    r.arg = RELAXED(&plan->rule[i].arg);
    r.after = RELAXED(&plan->rule[i].after);
    r.count = RELAXED(&plan->rule[i].count);
    r.ppm = RELAXED(&plan->rule[i].ppm);
    r.seed = RELAXED(&plan->rule[i].seed);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (RELAXED(&plan->seq) != seq || !(kinds & kind))
        return 0;
    if (match_arg && r.arg != match)
        return 0;
    struct fayt_inject_state *st = &p->injected;
    if (st->seq != seq) {               /* a new plan: its events count from 0 */
        for (int k = 0; k < FAYT_INJECT_KINDS; k++) {
            st->events[k] = 0;
            st->fired[k] = 0;
        }
        __atomic_store_n(&st->seq, seq, __ATOMIC_RELEASE);
    }
    uint64_t n = st->events[i];
    __atomic_store_n(&st->events[i], n + 1, __ATOMIC_RELEASE);
    if (arg_out)
        *arg_out = r.arg;
    if (n < r.after || (r.count && st->fired[i] >= r.count))
        return 0;
    if (r.ppm < FAYT_INJECT_PPM && fp_splitmix64(r.seed + n) % FAYT_INJECT_PPM >= r.ppm)
        return 0;
    __atomic_store_n(&st->fired[i], st->fired[i] + 1, __ATOMIC_RELEASE);
    return 1;
}

/* The fault is counted in the page (faytd reads it when it sees the death):
 * the process dies now, as a SIGKILL from outside would kill it. */
void fp_inject_die(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (;;) {
        kill(getpid(), SIGKILL);
        pause();
    }
}

/* A lock of share-point sp_id was just taken (the record HELD). */
void fp_inject_lock_taken(struct fayt_context_page *p, uint32_t sp_id)
{
    if (fp_inject_fires(p, FAYT_INJECT_LOCK_KILL, sp_id, 1, NULL))
        fp_inject_die();
}

/* The doorbell of a post: FAYT_DOORBELL_RING, _DROP or _DELAY (*delay_ns). */
int fp_inject_doorbell(struct fayt_context_page *p, int64_t *delay_ns)
{
    uint32_t kinds = RELAXED(&p->inject.kinds);
    uint32_t us = 0;
    *delay_ns = 0;
    if ((kinds & FAYT_INJECT_DOORBELL_DROP)
        && fp_inject_fires(p, FAYT_INJECT_DOORBELL_DROP, 0, 0, NULL))
        return FAYT_DOORBELL_DROP;
    if ((kinds & FAYT_INJECT_DOORBELL_DELAY)
        && fp_inject_fires(p, FAYT_INJECT_DOORBELL_DELAY, 0, 0, &us)) {
        *delay_ns = (int64_t)(us > 10000000u ? 10000000u : us) * 1000;
        return FAYT_DOORBELL_DELAY;
    }
    return FAYT_DOORBELL_RING;
}

/* inject_fires(page, kind, match, match_arg) -> bool: fp_inject_fires for
 * the runtime's Python (dispatch.py: handlers). */
static PyObject *inject_fires(PyObject *mod, PyObject *const *args, Py_ssize_t n)
{
    void *page;
    if (n != 4) {
        PyErr_SetString(PyExc_TypeError, "inject_fires takes 4 arguments");
        return NULL;
    }
    if (fp_addr_arg(args[0], &page) < 0)
        return NULL;
    unsigned long kind = PyLong_AsUnsignedLong(args[1]);
    unsigned long match = PyLong_AsUnsignedLong(args[2]);
    int match_arg = PyObject_IsTrue(args[3]);
    if (PyErr_Occurred() || match_arg < 0)
        return NULL;
    return PyBool_FromLong(fp_inject_fires(page, (uint32_t)kind, (uint32_t)match, match_arg,
                                           NULL));
}

/* inject_die(): the process dies (SIGKILL), as an injected fault. */
static PyObject *inject_die(PyObject *mod, PyObject *unused)
{
    fp_inject_die();
    Py_RETURN_NONE;
}

/* splitmix64(x) -> int: the rule's hash, for tests and faytd's own rules. */
static PyObject *splitmix64(PyObject *mod, PyObject *arg)
{
    unsigned long long x = PyLong_AsUnsignedLongLongMask(arg);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(fp_splitmix64(x));
}

PyMethodDef fp_inject_functions[] = {
    {"inject_fires", (PyCFunction)(void (*)(void))inject_fires, METH_FASTCALL,
     "inject_fires($module, page, kind, match, match_arg, /)\n--\n\n"
     "Whether the context page's injection rule of kind (one FAYT_INJECT_* bit) fires at "
     "this event (its arg compared with match when match_arg); counts the event."},
    {"inject_die", (PyCFunction)inject_die, METH_NOARGS,
     "inject_die($module, /)\n--\n\n"
     "Die of SIGKILL now (an injected fault)."},
    {"splitmix64", (PyCFunction)splitmix64, METH_O,
     "splitmix64($module, x, /)\n--\n\n"
     "The hash an injection rule draws from: splitmix64 of x (mod 2**64)."},
    {NULL}
};
