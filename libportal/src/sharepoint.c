/* SharePointCore: a mapped share-point's lock, fused access and views.
 *
 * A cffi call costs about 100 ns here; a METH_NOARGS/METH_FASTCALL method of
 * a C type costs a fraction of that, so lock, unlock and the fused
 * lock-check-copy-unlock calls live here.  libportal.portal.SharePoint
 * subclasses SharePointCore, so calling sp.lock() runs this C directly.
 *
 * The mapping itself belongs to the Python object; _invalidate() is called
 * before it is unmapped, after which every method fails with EBADF rather
 * than touching freed memory.  Sleeping on the futex releases the GIL; a
 * signal (EINTR) runs Python's handlers and then the wait resumes.
 *
 * Every lock, try_lock, read, write, add and `with` entry is a dispatch
 * point of the notification runtime (dispatch.c): DISPATCH_POINT before the
 * call takes its lock, and after unlock and `with`'s exit release it.
 *
 * GIL: a SharePointCore's fields (holder, slot, region, ...) are read and
 * written only with the GIL held, and so are the robust records of the
 * context page (below); only `closing` and `waiters` are touched by a
 * thread that released it, with atomics (see acquire()).
 */
#include "fastpath.h"

#include <structmember.h>

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "fayt/common/trace.h"
#include "fayt/common/deadline.h"
#include "fayt/common/waits.h"
#include "fayt/context.h"
#include "fayt/lock.h"
#include "fayt/lock_fast.h"
#include "fayt/portal.h"
#include "fayt/sharepoint.h"

#define MINE(self) ((self)->holder != 0 && (self)->holder == THREAD_IDENT())

typedef struct {
    PyObject_HEAD
    fastpath_state *st;       /* the module's: hints, error factory, Region type */
    uint8_t *base;            /* the mapping (its meta-structure); NULL once unmapped */
    size_t data_offset;
    size_t length;
    int prot;
    uint32_t sp_id;
    struct fayt_context_page *ctx;
    int slot;
    unsigned long holder;     /* thread that holds the lock through this object, or 0 */
    int closing;              /* being unmapped: waiters in lock() give up (ECANCELED) */
    int waiters;              /* threads in lock() with the GIL released */
    PyObject *region;         /* the Region view() exports, made at the first view() */
    uintptr_t addr;           /* the mapping's address, kept after unmapping (repr) */
    PyObject *weakreflist;
    PyObject *dict;
} SharePointCore;

/* The module state is found once, when the object is made (a walk of the
 * MRO), and kept: the hot paths read the hints and raise through it. */
static PyObject *core_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    fastpath_state *st = fp_state_of_type(type);
    if (!st)
        return NULL;
    SharePointCore *self = (SharePointCore *)type->tp_alloc(type, 0);
    if (self) {
        self->st = st;
        self->slot = -1;
    }
    return (PyObject *)self;
}

/* SharePointCore(reply, context): reply is the Reply of the PORTAL call
 * that mapped it (transport.c), context the address of the connection's
 * context page (its robust records), or 0. */
static int core_init(SharePointCore *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"reply", "context", NULL};
    PyObject *reply;
    unsigned long long ctx;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OK", kwlist, &reply, &ctx))
        return -1;
    if (Py_TYPE(reply) != self->st->reply_type
        || Py_TYPE(PyStructSequence_GET_ITEM(reply, FP_REPLY_PORTAL))
           != self->st->portal_reply_type) {
        PyErr_Format(PyExc_TypeError, "reply: the Reply of a PORTAL call that mapped a "
                     "share-point, not %.100s", Py_TYPE(reply)->tp_name);
        return -1;
    }
    PyObject *pr = PyStructSequence_GET_ITEM(reply, FP_REPLY_PORTAL);
    unsigned long long base = PyLong_AsUnsignedLongLong(
        PyStructSequence_GET_ITEM(reply, FP_REPLY_ADDR));
    Py_ssize_t map_length =
        PyLong_AsSsize_t(PyStructSequence_GET_ITEM(pr, FP_PORTAL_MAP_LENGTH));
    Py_ssize_t data_offset =
        PyLong_AsSsize_t(PyStructSequence_GET_ITEM(pr, FP_PORTAL_DATA_OFFSET));
    long prot = PyLong_AsLong(PyStructSequence_GET_ITEM(pr, FP_PORTAL_PROT));
    unsigned long sp_id = PyLong_AsUnsignedLong(PyStructSequence_GET_ITEM(pr, FP_PORTAL_SP_ID));
    if (PyErr_Occurred())
        return -1;
    if (!base || data_offset < (Py_ssize_t)sizeof(struct fayt_sharepoint_meta)
        || map_length < data_offset) {
        PyErr_SetString(PyExc_ValueError, "bad share-point geometry");
        return -1;
    }
    self->base = (uint8_t *)(uintptr_t)base;
    self->addr = (uintptr_t)base;
    self->data_offset = (size_t)data_offset;
    self->length = (size_t)(map_length - data_offset);
    self->prot = (int)prot;
    self->sp_id = (uint32_t)sp_id;
    self->ctx = (struct fayt_context_page *)(uintptr_t)ctx;
    self->slot = -1;
    self->holder = 0;
    self->closing = 0;
    self->waiters = 0;
    Py_CLEAR(self->region);
    return 0;
}

static void core_dealloc(SharePointCore *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakreflist)
        PyObject_ClearWeakRefs((PyObject *)self);
    Py_CLEAR(self->dict);
    Py_CLEAR(self->region);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);          /* a heap type's instances own a reference to it */
}

static int core_traverse(SharePointCore *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->dict);
    Py_VISIT(self->region);
    return 0;
}

static int core_clear(SharePointCore *self)
{
    Py_CLEAR(self->dict);
    Py_CLEAR(self->region);
    return 0;
}

#define CHECK_MAPPED(self)                                                          \
    do {                                                                            \
        if (!(self)->base)                                                          \
            return fp_raise((self)->st, EBADF, "share-point is unmapped");             \
    } while (0)

/* The robust record (include/fayt/context.h), kept here rather than in
 * lock.c.  GIL: every claim and clear happens with the GIL held, so the threads of
 * this process never race on a slot and plain stores in program order do:
 * faytd reads the page only after the process died, when every store it
 * made is visible. */
/* Claim slot k for sp_id if it is free: the one place a record is
 * claimed (rec_claim, and take_at_home's uncontended case).  1 if claimed,
 * the record PENDING; 0 if the slot is taken. */
static inline int rec_take(struct fayt_context_page *ctx, unsigned k, uint32_t sp_id)
{
    if (ctx->held[k].sp_id != 0)
        return 0;
    __atomic_store_n(&ctx->held[k].sp_id, sp_id, __ATOMIC_RELAXED);
    __atomic_store_n(&ctx->held[k].state, FAYT_HELD_PENDING, __ATOMIC_RELEASE);
    return 1;
}

/* A free slot for sp_id, from its home slot on: its index, -1 without a
 * context page, -2 if every slot is taken. */
static int rec_claim(struct fayt_context_page *ctx, uint32_t sp_id)
{
    if (!ctx)
        return -1;
    unsigned start = sp_id % FAYT_HELD_LOCKS_MAX;
    for (unsigned i = 0; i < FAYT_HELD_LOCKS_MAX; i++) {
        unsigned k = (start + i) % FAYT_HELD_LOCKS_MAX;
        if (rec_take(ctx, k, sp_id))
            return (int)k;
    }
    return -2;
}

static inline void rec_set(struct fayt_context_page *ctx, int slot, uint32_t state)
{
    if (ctx && slot >= 0)
        __atomic_store_n(&ctx->held[slot].state, state, __ATOMIC_RELEASE);
}

static inline void rec_clear(struct fayt_context_page *ctx, int slot)
{
    if (ctx && slot >= 0) {
        __atomic_store_n(&ctx->held[slot].state, FAYT_HELD_FREE, __ATOMIC_RELEASE);
        __atomic_store_n(&ctx->held[slot].sp_id, 0, __ATOMIC_RELEASE);
    }
}

/* Take the lock; returns 0 or EOWNERDEAD, or -1 with an exception set.
 * The record is PENDING while the lock is being taken, HELD once it is. */
static int acquire(SharePointCore *self, int64_t timeout_ns)
{
    int slot = rec_claim(self->ctx, self->sp_id);
    if (slot == -2) {
        fp_raise(self->st, ENOLCK, "share-point lock: this process holds too many locks "
                            "(FAYT_HELD_LOCKS_MAX)");
        return -1;
    }
    int died = 0;
    int r = fayt_sp_take(self->base, FAYT_LOCK_HELD, &died) ? (died ? EOWNERDEAD : 0) : EBUSY;
    if (r == EBUSY && timeout_ns != 0) {
        /* The contended path: the record says WAITING while this thread
         * sleeps (fayt_sp_lock_wait), so that faytd never takes a sleeper
         * for a possible holder.  unmap() from another thread sets
         * `closing`, wakes the sleepers and waits until `waiters` is 0
         * before it unmaps: a waiter gives up (ECANCELED) without the lock,
         * or releases one it took meanwhile, before it counts itself out
         * (with the GIL held again, so that no unmap starts in between). */
        int64_t deadline = timeout_ns > 0 ? fayt_now_ns() + timeout_ns : 0;
        int64_t traced = fayt_tracing(self->ctx) ? fayt_now_ns() : 0;  /* the timeline */
        uint32_t *state = slot >= 0 ? &self->ctx->held[slot].state : NULL;
        uint8_t *base = self->base;
        int *closing = &self->closing, *waiters = &self->waiters;
        for (;;) {
            int64_t left = -1;
            if (timeout_ns > 0) {
                left = deadline - fayt_now_ns();
                if (left < 0)
                    left = 0;
            }
            if (__atomic_load_n(closing, __ATOMIC_ACQUIRE)) {
                r = ECANCELED;
                break;
            }
            __atomic_add_fetch(waiters, 1, __ATOMIC_ACQ_REL);
            struct fayt_context_page *page = self->ctx;
            Py_BEGIN_ALLOW_THREADS
            fayt_wait_begin(page);      /* the scheduler's events (context.h) */
            r = fayt_sp_lock_wait(base, state, left, closing);
            fayt_wait_end(page);
            Py_END_ALLOW_THREADS
            /* The GIL held again: `closing` is set only by a GIL holder,
             * which then waits (GIL released) for `waiters` to reach 0,
             * the memory still mapped.  Not set now: an unmap later sees
             * `holder` and releases the lock itself. */
            if ((r == 0 || r == EOWNERDEAD) && __atomic_load_n(closing, __ATOMIC_ACQUIRE)) {
                if ((fayt_sp_drop(base) & FAYT_LOCK_STATE_MASK) == FAYT_LOCK_CONTENDED)
                    fayt_sp_wake(base);
                r = ECANCELED;
            }
            __atomic_sub_fetch(waiters, 1, __ATOMIC_ACQ_REL);
            if (r != EINTR)
                break;
            if (PyErr_CheckSignals() < 0) {
                rec_clear(self->ctx, slot);
                return -1;
            }
        }
        if (traced && fayt_tracing(self->ctx))
            fayt_trace_put(self->ctx, FAYT_TRACE_LOCK_WAIT, 0, self->sp_id, 0, (uint32_t)r,
                           fayt_now_ns() - traced, traced);
    }
    if (r == 0 || r == EOWNERDEAD) {
        rec_set(self->ctx, slot, FAYT_HELD_HELD);
        self->slot = slot;
        self->holder = THREAD_IDENT();
        if (self->ctx && INJECT_ARMED(self->ctx, FAYT_INJECT_LOCK_KILL))
            fp_inject_lock_taken(self->ctx, self->sp_id);   /* may die here, holding it */
        return r;
    }
    rec_clear(self->ctx, slot);
    if (r == EBUSY && timeout_ns == 0)
        return EBUSY;
    if (r == ECANCELED)
        fp_raise(self->st, EBADF, "share-point lock: the share-point was unmapped by another thread "
                           "while this one waited");
    else if (r == EBUSY || r == ETIMEDOUT)
        fp_raise(self->st, ETIMEDOUT, "share-point lock: timed out");
    else
        fp_raise(self->st, r, "share-point lock failed");
    return -1;
}

/* Unlock: the record goes back to PENDING first, so that a death between
 * the release and the clear is never taken for a death holding the lock. */
static int release(SharePointCore *self)
{
    int r = 0;
    rec_set(self->ctx, self->slot, FAYT_HELD_PENDING);
    uint8_t old = fayt_sp_drop(self->base);
    rec_clear(self->ctx, self->slot);
    if ((old & FAYT_LOCK_STATE_MASK) == FAYT_LOCK_CONTENDED)
        fayt_sp_wake(self->base);
    else if ((old & FAYT_LOCK_STATE_MASK) == FAYT_LOCK_FREE)
        r = EPERM;
    self->holder = 0;
    self->slot = -1;
    return r;
}

/* libportal's rule for every timeout (errors.check_timeout): None waits for
 * ever; seconds >= 0 bound the wait; so many that int64 ns cannot hold them
 * (inf included) are for ever too; negative or nan is EINVAL, no number
 * TypeError, each naming `timeout`.  *out: ns, or -1 for ever. */
#define FOREVER_S 9.2e9
static int parse_timeout(fastpath_state *st, PyObject *obj, int64_t *out)
{
    if (obj == NULL || obj == Py_None) {
        *out = -1;
        return 0;
    }
    if (!PyFloat_Check(obj) && !PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "timeout: must be None or a number of seconds, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    double t = PyFloat_AsDouble(obj);
    if (t == -1.0 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();                  /* an int beyond a double: its sign says */
        t = _PyLong_Sign(obj) < 0 ? -1.0 : FOREVER_S;
    }
    if (!(t >= 0)) {                    /* negative, or nan */
        fp_raise_fmt(st, EINVAL, "timeout: %R is not a number of seconds >= 0 (None waits "
                         "for ever)", obj);
        return -1;
    }
    *out = t >= FOREVER_S ? -1 : (int64_t)(t * 1e9);
    return 0;
}

/* A Py_ssize_t argument of a fused call: an int too large for it is EINVAL
 * and no int TypeError, each naming the argument (out of line: the fused
 * calls' path is one PyLong_AsSsize_t and a compare, as before). */
static int __attribute__((cold, noinline))
ssize_arg_failed(SharePointCore *self, PyObject *o, const char *call, const char *name)
{
    if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
        PyErr_Clear();
        fp_raise_fmt(self->st, EINVAL, "%s: %s: %R is outside the share-point's %zu bytes",
                     call, name, o, self->length);
    } else if (PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: %s: must be an int, not %.100s",
                     call, name, Py_TYPE(o)->tp_name);
    }
    return -1;
}

static inline int ssize_arg(SharePointCore *self, PyObject *o, const char *call, const char *name,
                            Py_ssize_t *out)
{
    Py_ssize_t v = PyLong_AsSsize_t(o);
    if (__builtin_expect(v == -1, 0) && PyErr_Occurred())
        return ssize_arg_failed(self, o, call, name);
    *out = v;
    return 0;
}

/* The uncontended case: the home slot of the robust record free, the lock
 * free, no lock fault armed (one load: inject.c).  1 and *r (0 or
 * EOWNERDEAD) if it took the lock, the record HELD; else 0 and nothing
 * changed (acquire() does the rest, injected faults included). */
static inline int take_at_home(SharePointCore *self, unsigned long me, int *r)
{
    struct fayt_context_page *ctx = self->ctx;
    unsigned k = self->sp_id % FAYT_HELD_LOCKS_MAX;
    int died;
    if (!ctx || INJECT_ARMED(ctx, FAYT_INJECT_LOCK_KILL) || !rec_take(ctx, k, self->sp_id))
        return 0;
    if (!fayt_sp_take(self->base, FAYT_LOCK_HELD, &died)) {
        rec_clear(ctx, (int)k);
        return 0;
    }
    __atomic_store_n(&ctx->held[k].state, FAYT_HELD_HELD, __ATOMIC_RELEASE);
    self->slot = (int)k;
    self->holder = me;
    *r = died ? EOWNERDEAD : 0;
    return 1;
}

static __attribute__((noinline)) PyObject *
lock_slow(SharePointCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int64_t timeout = -1;
    PyObject *t = nargs == 1 ? args[0] : NULL;
    DISPATCH_POINT(self->st);
    CHECK_MAPPED(self);
    if (nargs == 0 && kwnames == NULL) {
        unsigned long me = THREAD_IDENT();
        if (self->holder == me)
            return fp_raise(self->st, EDEADLK, "share-point lock: this thread already holds it");
        int r;
        if (!take_at_home(self, me, &r))
            r = acquire(self, -1);
        return r < 0 ? NULL : PyLong_FromLong(r);
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw > 1)
        return fp_raise(self->st, EINVAL, "lock(timeout=None): too many arguments");
    if (nkw == 1) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0)) ||
            PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0) {
            PyErr_SetString(PyExc_TypeError, "lock() got an unexpected keyword argument");
            return NULL;
        }
        t = args[0];
    }
    if (t && parse_timeout(self->st, t, &timeout) < 0)
        return NULL;
    if (MINE(self))
        return fp_raise(self->st, EDEADLK, "share-point lock: this thread already holds it");
    int r = acquire(self, timeout < 0 ? -1 : (timeout == 0 ? 1 : timeout));
    if (r < 0)
        return NULL;
    return PyLong_FromLong(r);
}

/* lock(): the common case (no argument, no hint registered, mapped, not
 * held by this thread, uncontended) without leaving this function;
 * anything else is lock_slow's, which looks at all of it again. */
static PyObject *core_lock(SharePointCore *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    if (__builtin_expect(nargs == 0 && kwnames == NULL && self->st->hints.n == 0
                         && self->base != NULL, 1)) {
        unsigned long me = THREAD_IDENT();
        int r;
        if (self->holder != me && take_at_home(self, me, &r))
            return PyLong_FromLong(r);
    }
    return lock_slow(self, args, nargs, kwnames);
}

static PyObject *core_try_lock(SharePointCore *self, PyObject *unused)
{
    DISPATCH_POINT(self->st);
    CHECK_MAPPED(self);
    if (MINE(self))
        return fp_raise(self->st, EDEADLK, "share-point lock: this thread already holds it");
    int r = acquire(self, 0);
    if (r < 0)
        return NULL;
    return PyLong_FromLong(r);
}

static PyObject *core_unlock(SharePointCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs) {
        PyErr_SetString(PyExc_TypeError, "unlock() takes no arguments");
        return NULL;
    }
    CHECK_MAPPED(self);
    if (self->holder != THREAD_IDENT() || !self->holder)
        return fp_raise(self->st, EPERM, "share-point unlock: this thread does not hold it");
    if (release(self) == EPERM)
        return fp_raise(self->st, EPERM, "share-point unlock: the lock was already free "
                                  "(released behind this object's back)");
    DISPATCH_POINT(self->st);       /* after the release: a handler may take this lock */
    Py_RETURN_NONE;
}

static PyObject *core_mark_consistent(SharePointCore *self, PyObject *unused)
{
    CHECK_MAPPED(self);
    if (!MINE(self))
        return fp_raise(self->st, EPERM, "mark_consistent: this thread does not hold the lock");
    fayt_sp_mark_consistent(self->base);
    Py_RETURN_NONE;
}

static int check_access(SharePointCore *self, Py_ssize_t offset, Py_ssize_t n, int need)
{
    if (!(self->prot & need)) {
        fp_raise(self->st, EACCES, need == FAYT_PROT_WRITE ? "share-point is not writable (prot)"
                                                    : "share-point is not readable (prot)");
        return -1;
    }
    if (offset < 0 || n < 0 || (size_t)offset > self->length || (size_t)n > self->length - (size_t)offset) {
        PyObject *m = PyUnicode_FromFormat("offset %zd + size %zd is outside the share-point's "
                                           "%zu bytes", offset, n, self->length);
        if (m) {
            fp_raise(self->st, EINVAL, PyUnicode_AsUTF8(m));
            Py_DECREF(m);
        }
        return -1;
    }
    return 0;
}

/* Lock for a fused call; an owner-died lock is released again and refused. */
static int fused_acquire(SharePointCore *self)
{
    if (MINE(self)) {
        fp_raise(self->st, EDEADLK, "fused access while this thread holds the lock: use view()");
        return -1;
    }
    int r = acquire(self, -1);
    if (r < 0)
        return -1;
    if (r == EOWNERDEAD) {
        release(self);
        fp_raise(self->st, EOWNERDEAD, "share-point lock: the previous holder died; lock() it, "
                                "repair the data and mark_consistent()");
        return -1;
    }
    return 0;
}

static PyObject *core_read(SharePointCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    DISPATCH_POINT(self->st);
    CHECK_MAPPED(self);
    if (nargs != 2)
        return fp_raise(self->st, EINVAL, "read(offset, size): two arguments");
    Py_ssize_t off, n;
    if (ssize_arg(self, args[0], "read", "offset", &off) < 0
        || ssize_arg(self, args[1], "read", "size", &n) < 0)
        return NULL;
    if (check_access(self, off, n, FAYT_PROT_READ) < 0)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (!out)
        return NULL;
    if (fused_acquire(self) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    memcpy(PyBytes_AS_STRING(out), self->base + self->data_offset + off, (size_t)n);
    release(self);
    return out;
}

static PyObject *core_write(SharePointCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    DISPATCH_POINT(self->st);
    CHECK_MAPPED(self);
    if (nargs != 2)
        return fp_raise(self->st, EINVAL, "write(offset, data): two arguments");
    Py_ssize_t off;
    if (ssize_arg(self, args[0], "write", "offset", &off) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "write: data: a bytes-like object is required, "
                         "not %.100s", Py_TYPE(args[1])->tp_name);
        }
        return NULL;
    }
    if (check_access(self, off, view.len, FAYT_PROT_WRITE) < 0 || fused_acquire(self) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    memcpy(self->base + self->data_offset + off, view.buf, (size_t)view.len);
    release(self);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *core_add(SharePointCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    DISPATCH_POINT(self->st);
    CHECK_MAPPED(self);
    if (nargs != 2)
        return fp_raise(self->st, EINVAL, "add(offset, delta): two arguments");
    Py_ssize_t off;
    if (ssize_arg(self, args[0], "add", "offset", &off) < 0)
        return NULL;
    long long delta = PyLong_AsLongLong(args[1]);
    if (delta == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            return fp_raise_fmt(self->st, EINVAL, "add: delta: %R does not fit an int64", args[1]);
        }
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "add: delta: must be an int, not %.100s",
                         Py_TYPE(args[1])->tp_name);
        }
        return NULL;
    }
    if (check_access(self, off, 8, FAYT_PROT_READ | FAYT_PROT_WRITE) < 0)
        return NULL;
    if (off & 7) {      /* the data starts 16-byte aligned: off is the alignment */
        PyObject *m = PyUnicode_FromFormat("add: offset %zd is not a multiple of 8 (the int64 "
                                           "must be naturally aligned)", off);
        if (m) {
            fp_raise(self->st, EINVAL, PyUnicode_AsUTF8(m));
            Py_DECREF(m);
        }
        return NULL;
    }
    if ((self->prot & (FAYT_PROT_READ | FAYT_PROT_WRITE)) != (FAYT_PROT_READ | FAYT_PROT_WRITE))
        return fp_raise(self->st, EACCES, "add needs a readable and writable share-point (prot)");
    if (fused_acquire(self) < 0)
        return NULL;
    int64_t v;
    memcpy(&v, self->base + self->data_offset + off, 8);
    v = (int64_t)((uint64_t)v + (uint64_t)delta);
    memcpy(self->base + self->data_offset + off, &v, 8);
    release(self);
    return PyLong_FromLongLong(v);
}

static PyObject *core_view(SharePointCore *self, PyObject *unused)
{
    CHECK_MAPPED(self);
    if (!(self->prot & FAYT_PROT_READ))
        return fp_raise(self->st, EACCES, "share-point is not readable (prot)");
    if (!self->region) {
        self->region = fp_region_new(self->st, self->base + self->data_offset,
                                     (Py_ssize_t)self->length, !(self->prot & FAYT_PROT_WRITE));
        if (!self->region)
            return NULL;
    }
    return PyMemoryView_FromObject(self->region);
}

static PyObject *core_enter(SharePointCore *self, PyObject *unused)
{
    DISPATCH_POINT(self->st);
    CHECK_MAPPED(self);
    if (MINE(self))
        return fp_raise(self->st, EDEADLK, "share-point lock: this thread already holds it");
    if (fused_acquire(self) < 0)
        return NULL;
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *core_exit(SharePointCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (self->base && MINE(self))
        release(self);
    DISPATCH_POINT(self->st);
    Py_RETURN_FALSE;
}

/* Whether it may be unmapped: BufferError while memoryviews of view() exist. */
static PyObject *core_check_unmap(SharePointCore *self, PyObject *unused)
{
    CHECK_MAPPED(self);
    if (self->region && ((Region *)self->region)->exports)
        return fp_region_close((Region *)self->region, NULL);
    Py_RETURN_NONE;
}

/* Before the munmap: threads waiting in lock() give up (EBADF), and a lock
 * this object holds is released. */
static PyObject *core_invalidate(SharePointCore *self, PyObject *unused)
{
    if (self->base) {
        __atomic_store_n(&self->closing, 1, __ATOMIC_RELEASE);
        while (__atomic_load_n(&self->waiters, __ATOMIC_ACQUIRE)) {
            fayt_sp_wake_all(self->base);
            Py_BEGIN_ALLOW_THREADS
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
            Py_END_ALLOW_THREADS
        }
        if (self->holder)
            release(self);
    }
    if (self->region) {
        Region *r = (Region *)self->region;
        if (r->exports)         /* Connection.close() under live views: see orphan */
            r->addr = NULL;
        else
            Py_CLEAR(self->region);
    }
    self->base = NULL;
    Py_RETURN_NONE;
}

/* Connection.close(): whether views keep the memory mapped (then the last
 * one to go unmaps it). */
static PyObject *core_orphan(SharePointCore *self, PyObject *args)
{
    if (!self->region)
        Py_RETURN_FALSE;
    return fp_region_orphan((Region *)self->region, args);
}

/* After fork(): forget the mapping without touching it; the lock and the
 * robust record it names belong to the parent. */
static PyObject *core_forget(SharePointCore *self, PyObject *unused)
{
    if (self->region)
        ((Region *)self->region)->addr = NULL;      /* no new views of it */
    self->base = NULL;
    self->holder = 0;
    self->slot = -1;
    Py_RETURN_NONE;
}

static PyObject *get_length(SharePointCore *self, void *c) { return PyLong_FromSize_t(self->length); }
static PyObject *get_prot(SharePointCore *self, void *c) { return PyLong_FromLong(self->prot); }
static PyObject *get_sp_id(SharePointCore *self, void *c) { return PyLong_FromUnsignedLong(self->sp_id); }
static PyObject *get_data_offset(SharePointCore *self, void *c) { return PyLong_FromSize_t(self->data_offset); }
static PyObject *get_held(SharePointCore *self, void *c) { return PyBool_FromLong(MINE(self)); }
static PyObject *get_mapped(SharePointCore *self, void *c) { return PyBool_FromLong(self->base != NULL); }
static PyObject *get_base(SharePointCore *self, void *c)
{
    return PyLong_FromUnsignedLongLong((uintptr_t)self->base);
}
static PyObject *get_lock_state(SharePointCore *self, void *c)
{
    CHECK_MAPPED(self);
    return PyLong_FromLong(fayt_sp_state(self->base));
}
static PyObject *get_owner_died(SharePointCore *self, void *c)
{
    CHECK_MAPPED(self);
    return PyBool_FromLong((fayt_sp_state(self->base) & FAYT_LOCK_OWNER_DIED) != 0);
}

/* <SharePoint handle=1 sp_id=7 addr=0x7f.. length=4096 data=4064>: length is
 * the mapping's (what share_create was given, rounded to pages), data the
 * bytes after the meta-structure (sp.length).  handle is the Python side's
 * attribute, shown when it is set. */
static PyObject *core_repr(SharePointCore *self)
{
    PyObject *handle = self->dict ? PyDict_GetItemString(self->dict, "handle") : NULL;
    PyObject *h = handle ? PyUnicode_FromFormat(" handle=%R", handle) : PyUnicode_FromString("");
    if (!h)
        return NULL;
    char addr[24];          /* PyUnicode_FromFormat has no %#zx */
    snprintf(addr, sizeof addr, "%#zx", (size_t)self->addr);
    PyObject *r = PyUnicode_FromFormat("<%s%U sp_id=%u addr=%s length=%zu data=%zu%s>",
                                       _PyType_Name(Py_TYPE(self)), h, (unsigned)self->sp_id,
                                       addr, self->data_offset + self->length, self->length,
                                       self->base ? "" : " unmapped");
    Py_DECREF(h);
    return r;
}

static PyMethodDef core_methods[] = {
    {"lock", (PyCFunction)(void (*)(void))core_lock, METH_FASTCALL | METH_KEYWORDS,
     "lock($self, /, timeout=None)\n--\n\n"
     "Take the share-point lock; 0, or errno.EOWNERDEAD: the previous holder died, so "
     "repair the data, then mark_consistent().  timeout: None waits for ever, else seconds "
     "(TimedOut when they pass)."},
    {"try_lock", (PyCFunction)core_try_lock, METH_NOARGS,
     "try_lock($self, /)\n--\n\n"
     "Take the lock if it is free: 0, errno.EOWNERDEAD, or errno.EBUSY (not taken)."},
    {"unlock", (PyCFunction)(void (*)(void))core_unlock, METH_FASTCALL,
     "unlock($self, /)\n--\n\n"
     "Release the lock this object holds."},
    {"mark_consistent", (PyCFunction)core_mark_consistent, METH_NOARGS,
     "mark_consistent($self, /)\n--\n\n"
     "Clear the owner-died mark of the held lock."},
    {"read", (PyCFunction)(void (*)(void))core_read, METH_FASTCALL,
     "read($self, offset, size, /)\n--\n\n"
     "Lock, check, copy size bytes of data at offset, unlock, in one call; the bytes."},
    {"write", (PyCFunction)(void (*)(void))core_write, METH_FASTCALL,
     "write($self, offset, data, /)\n--\n\n"
     "Lock, check, copy data to offset, unlock, in one call."},
    {"add", (PyCFunction)(void (*)(void))core_add, METH_FASTCALL,
     "add($self, offset, delta, /)\n--\n\n"
     "Add delta to the native int64 at offset (a multiple of 8) under the lock; "
     "the new value."},
    {"view", (PyCFunction)core_view, METH_NOARGS,
     "view($self, /)\n--\n\n"
     "A memoryview of the data (read-only without PROT_WRITE).  Take the lock around its "
     "use; unmap() raises BufferError while one exists."},
    {"__enter__", (PyCFunction)core_enter, METH_NOARGS,
     "__enter__($self, /)\n--\n\n"
     "Take the lock (OwnerDied if its previous holder died)."},
    {"__exit__", (PyCFunction)(void (*)(void))core_exit, METH_FASTCALL,
     "__exit__($self, /, *exc_info)\n--\n\n"
     "Release the lock."},
    {"_invalidate", (PyCFunction)core_invalidate, METH_NOARGS,
     "_invalidate($self, /)\n--\n\n"
     "Before the munmap: waiters in lock() give up, a lock held here is released."},
    {"_check_unmap", (PyCFunction)core_check_unmap, METH_NOARGS,
     "_check_unmap($self, /)\n--\n\n"
     "BufferError while memoryviews of view() exist."},
    {"_orphan", (PyCFunction)core_orphan, METH_VARARGS,
     "_orphan($self, addr, length, /)\n--\n\n"
     "Connection.close(): True if views keep the memory mapped (the last one unmaps it)."},
    {"_forget", (PyCFunction)core_forget, METH_NOARGS,
     "_forget($self, /)\n--\n\n"
     "After fork(): forget the mapping without touching it."},
    {NULL}
};

static PyGetSetDef core_getset[] = {
    {"length", (getter)get_length, NULL, "bytes of data", NULL},
    {"prot", (getter)get_prot, NULL, "protection this mapping was granted", NULL},
    {"sp_id", (getter)get_sp_id, NULL, "faytd's id of the share-point", NULL},
    {"data_offset", (getter)get_data_offset, NULL, "offset of the data from the mapping", NULL},
    {"held", (getter)get_held, NULL, "whether the calling thread holds the lock through this object", NULL},
    {"mapped", (getter)get_mapped, NULL, "whether the share-point is still mapped", NULL},
    {"base", (getter)get_base, NULL, "address of the mapping (the meta-structure)", NULL},
    {"lock_state", (getter)get_lock_state, NULL, "the raw lock byte", NULL},
    {"owner_died", (getter)get_owner_died, NULL, "whether the owner-died mark is set", NULL},
    /* A C type with tp_dictoffset has no __dict__ descriptor of its own;
     * without it a subclass that mixes in a Python class (SharePoint:
     * SharePointCore, Mapping) finds the mixin's, which refuses the
     * object, and dir() fails. */
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL}
};

static PyMemberDef core_members[] = {
    {"__dictoffset__", T_PYSSIZET, offsetof(SharePointCore, dict), READONLY, NULL},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(SharePointCore, weakreflist), READONLY, NULL},
    {NULL}
};

static PyType_Slot core_slots[] = {
    {Py_tp_doc, "SharePointCore(reply, context)\n--\n\n"
                "The C core of a mapped share-point: lock, fused access, views.  reply: the "
                "Reply of the PORTAL call that mapped it; context: the context page's address."},
    {Py_tp_new, core_new},
    {Py_tp_init, core_init},
    {Py_tp_dealloc, core_dealloc},
    {Py_tp_traverse, core_traverse},
    {Py_tp_clear, core_clear},
    {Py_tp_repr, core_repr},
    {Py_tp_methods, core_methods},
    {Py_tp_getset, core_getset},
    {Py_tp_members, core_members},
    {0, NULL},
};

PyType_Spec fp_sharepoint_spec = {
    .name = "libportal._fastpath.SharePointCore",
    .basicsize = sizeof(SharePointCore),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC
#ifdef Py_TPFLAGS_IMMUTABLETYPE
             | Py_TPFLAGS_IMMUTABLETYPE
#endif
    ,
    .slots = core_slots,
};
