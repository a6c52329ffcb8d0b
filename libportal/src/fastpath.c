/* _fastpath: the share-point wrappers' hot path as a CPython type.
 *
 * A cffi call costs about 100 ns here; a METH_NOARGS/METH_FASTCALL method of
 * a C type costs a fraction of that, so lock, unlock and the fused
 * lock-check-copy-unlock calls live here.  libportal.sharepoint.SharePoint
 * subclasses SharePointCore, so calling sp.lock() runs this C directly.
 *
 * The mapping itself belongs to the Python object; _invalidate() is called
 * before it is unmapped, after which every method fails with EBADF rather
 * than touching freed memory.  Sleeping on the futex releases the GIL; a
 * signal (EINTR) runs Python's handlers and then the wait resumes.
 *
 * Share-point calls are notification dispatch points (the pending hint,
 * fayt/notification.h).  A runtime with handlers registers its context's
 * hint word, its notify.depth and a hook (libportal/notification.py).  Every
 * lock, try_lock, read, write, add and `with` entry starts with one load of
 * each registered word (none registered: one load of a static count, a
 * target without handlers pays nothing else); a word that changed since the
 * last look runs the hook before the call takes its lock, and unlock and
 * `with`'s exit look after releasing.  Never dispatched there: off the main
 * thread (Python runs handlers there only), while the process holds a
 * share-point lock recorded in the runtime's context page (a handler using
 * that share-point would deadlock on it; the records do not say which
 * thread holds it, so another thread's lock only puts the dispatch off; a
 * lock taken through another connection is not seen), while a handler runs (depth != 0: deferred
 * notifications never interrupt one; its dispatch loop takes them next),
 * inside the hook itself.  Then the change stays unseen and a later call
 * looks again.  The hook returns False when it could not dispatch after all:
 * the change is left unseen too.  An exception from the hook (a handler's
 * KeyboardInterrupt, SystemExit) is raised by the share-point call, as a
 * signal handler's would be; a call that raises so has not taken its lock.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "deadline.h"
#include "fayt/context.h"
#include "fayt/lock.h"
#include "fayt/lock_fast.h"
#include "fayt/notification.h"
#include "fayt/portal.h"
#include "fayt/ring.h"
#include "fayt/sharepoint.h"
#include "fayt/syscall.h"

#define FASTPATH_ABI 5

#include <pthread.h>
#include <pythread.h>
/* PyThread_get_thread_ident() is pthread_self() on Linux; called directly
 * it costs no call into libpython on the lock's hot path. */
#define THREAD_IDENT() ((unsigned long)pthread_self())
#define MINE(self) ((self)->holder != 0 && (self)->holder == THREAD_IDENT())

static PyObject *error_factory = NULL;

/* -- the pending hint: share-point calls as dispatch points (see above) ---- */
#define HINT_MAX 4
static int nhints;                          /* registered hint words */
static uint32_t *hint_word[HINT_MAX];       /* fayt_notify_hint.posted of a runtime's context */
static uint32_t hint_seen[HINT_MAX];        /* its value when last dispatched */
static uint32_t *hint_depth[HINT_MAX];      /* that context page's notify.depth */
static struct fayt_context_page *hint_page[HINT_MAX];   /* that context page */
static PyObject *hint_hook[HINT_MAX];       /* the runtime's dispatch: () -> bool */
static unsigned long main_ident;            /* Python's main thread */
static int in_hook;

/* Whether this process holds or is taking a share-point lock recorded in a
 * registered runtime's context page (any thread: the records do not say
 * which; a lock of another thread only puts the dispatch off). */
static int locks_recorded(void)
{
    for (int i = 0; i < nhints; i++)
        for (int k = 0; k < FAYT_HELD_LOCKS_MAX; k++)
            if (__atomic_load_n(&hint_page[i]->held[k].sp_id, __ATOMIC_RELAXED))
                return 1;
    return 0;
}

static __attribute__((noinline, cold)) int hint_dispatch(void)
{
    if (in_hook || PyThread_get_thread_ident() != main_ident || locks_recorded())
        return 0;
    for (int i = 0; i < nhints; i++) {
        uint32_t h = __atomic_load_n(hint_word[i], __ATOMIC_ACQUIRE);
        if (h == hint_seen[i] || __atomic_load_n(hint_depth[i], __ATOMIC_RELAXED) != 0)
            continue;
        uint32_t old = hint_seen[i];
        uint32_t *word = hint_word[i];
        PyObject *hook = hint_hook[i];
        hint_seen[i] = h;       /* before: a post during the dispatch is seen next time */
        Py_INCREF(hook);
        in_hook = 1;
        PyObject *r = PyObject_CallNoArgs(hook);
        in_hook = 0;
        int ok = r ? PyObject_IsTrue(r) : -1;
        Py_XDECREF(r);
        Py_DECREF(hook);
        if (ok == 0 && i < nhints && hint_word[i] == word && hint_seen[i] == h)
            hint_seen[i] = old;     /* not dispatched: look again next time */
        return ok < 0 ? -1 : 0;
    }
    return 0;
}

/* The dispatch point, once a word is registered: 0, or -1 with an
 * exception set.  Out of line: the share-point calls only test nhints. */
static __attribute__((noinline)) int hint_check(void)
{
    for (int i = 0; i < nhints; i++)
        if (__builtin_expect(__atomic_load_n(hint_word[i], __ATOMIC_RELAXED) != hint_seen[i], 0))
            return hint_dispatch();
    return 0;
}

#define DISPATCH_POINT()                                                            \
    do {                                                                            \
        if (__builtin_expect(nhints != 0, 0) && hint_check() < 0)                   \
            return NULL;                                                            \
    } while (0)

static PyObject *raise_errno(int err, const char *msg)
{
    if (error_factory) {
        PyObject *exc = PyObject_CallFunction(error_factory, "is", err, msg);
        if (exc) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        return NULL;
    }
    PyObject *args = Py_BuildValue("(is)", err, msg);
    if (args) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

/* -- Region: memory a memoryview may be made of, with its exports counted ----
 * A memoryview cannot be invalidated once made, so, as mmap.mmap does, the
 * owner refuses to unmap while any exists (BufferError): Portal.buf and
 * SharePoint.view() are memoryviews of a Region, and every memoryview made
 * from those (slices, casts) holds the same export until it is released
 * or collected.  close() fails while exports remain; orphan() (a connection
 * closed under live views) leaves the memory mapped until the last export
 * goes, then unmaps it. */
typedef struct {
    PyObject_HEAD
    char *addr;
    Py_ssize_t length;
    int readonly;
    Py_ssize_t exports;
    uintptr_t unmap_addr;      /* orphaned: munmap this when exports reach 0 */
    size_t unmap_length;
} Region;

static PyObject *raise_errno(int err, const char *msg);

static int region_init(Region *self, PyObject *args, PyObject *kw)
{
    unsigned long long addr;
    Py_ssize_t length;
    int readonly;
    if (!PyArg_ParseTuple(args, "Knp", &addr, &length, &readonly))
        return -1;
    if (!addr || length < 0) {
        PyErr_SetString(PyExc_ValueError, "Region(addr, length, readonly): bad region");
        return -1;
    }
    self->addr = (char *)(uintptr_t)addr;
    self->length = length;
    self->readonly = readonly;
    return 0;
}

static int region_getbuffer(Region *self, Py_buffer *view, int flags)
{
    if (!self->addr || self->unmap_addr) {
        raise_errno(EBADF, "portal is unmapped");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->addr, self->length, self->readonly,
                          flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void region_releasebuffer(Region *self, Py_buffer *view)
{
    if (--self->exports == 0 && self->unmap_addr) {
        fayt_unmap(self->unmap_addr, self->unmap_length);
        self->unmap_addr = 0;
    }
}

static PyObject *region_close(Region *self, PyObject *unused)
{
    if (self->exports) {
        PyErr_Format(PyExc_BufferError, "cannot unmap: %zd memoryview%s of its memory still "
                     "exist%s (release() them, or let them go, first)", self->exports,
                     self->exports == 1 ? "" : "s", self->exports == 1 ? "s" : "");
        return NULL;
    }
    self->addr = NULL;
    Py_RETURN_NONE;
}

static PyObject *region_orphan(Region *self, PyObject *args)
{
    unsigned long long addr, length;
    if (!PyArg_ParseTuple(args, "KK", &addr, &length))
        return NULL;
    if (!self->exports)
        Py_RETURN_FALSE;
    self->unmap_addr = (uintptr_t)addr;
    self->unmap_length = (size_t)length;
    Py_RETURN_TRUE;
}

static PyObject *region_exports(Region *self, void *c) { return PyLong_FromSsize_t(self->exports); }

static PyBufferProcs region_as_buffer = {
    (getbufferproc)region_getbuffer, (releasebufferproc)region_releasebuffer,
};

static PyMethodDef region_methods[] = {
    {"close", (PyCFunction)region_close, METH_NOARGS,
     "Forget the memory; BufferError while memoryviews of it exist."},
    {"orphan", (PyCFunction)region_orphan, METH_VARARGS,
     "orphan(addr, length) -> bool: if memoryviews of it exist, munmap(addr, length) when the "
     "last goes (True); else False and nothing happens."},
    {NULL}
};

static PyGetSetDef region_getset[] = {
    {"exports", (getter)region_exports, NULL, "buffers exported (live memoryviews)", NULL},
    {NULL}
};

static PyTypeObject RegionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "libportal._fastpath.Region",
    .tp_basicsize = sizeof(Region),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Region(addr, length, readonly): mapped memory whose memoryviews are counted.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)region_init,
    .tp_as_buffer = &region_as_buffer,
    .tp_methods = region_methods,
    .tp_getset = region_getset,
};

static PyObject *region_new(void *addr, Py_ssize_t length, int readonly)
{
    Region *r = PyObject_New(Region, &RegionType);
    if (!r)
        return NULL;
    r->addr = addr;
    r->length = length;
    r->readonly = readonly;
    r->exports = 0;
    r->unmap_addr = 0;
    r->unmap_length = 0;
    return (PyObject *)r;
}

typedef struct {
    PyObject_HEAD
    uint8_t *base;
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
    PyObject *weakreflist;
    PyObject *dict;
} SharePointCore;

static int core_init(SharePointCore *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"base", "data_offset", "length", "prot", "sp_id", "context", NULL};
    unsigned long long base, ctx;
    Py_ssize_t data_offset, length;
    int prot;
    unsigned int sp_id;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KnniIK", kwlist, &base, &data_offset, &length,
                                     &prot, &sp_id, &ctx))
        return -1;
    if (!base || data_offset < (Py_ssize_t)sizeof(struct fayt_sharepoint_meta) || length < 0) {
        PyErr_SetString(PyExc_ValueError, "bad share-point geometry");
        return -1;
    }
    self->base = (uint8_t *)(uintptr_t)base;
    self->data_offset = (size_t)data_offset;
    self->length = (size_t)length;
    self->prot = prot;
    self->sp_id = sp_id;
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
    PyObject_GC_UnTrack(self);
    if (self->weakreflist)
        PyObject_ClearWeakRefs((PyObject *)self);
    Py_CLEAR(self->dict);
    Py_CLEAR(self->region);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int core_traverse(SharePointCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->dict);
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
            return raise_errno(EBADF, "share-point is unmapped");                  \
    } while (0)

/* The robust record (include/fayt/context.h), kept here rather than in
 * lock.c: every claim and clear happens with the GIL held, so the threads of
 * this process never race on a slot and plain stores in program order do:
 * faytd reads the page only after the process died, when every store it
 * made is visible. */
static int rec_claim(struct fayt_context_page *ctx, uint32_t sp_id)
{
    if (!ctx)
        return -1;
    unsigned start = sp_id % FAYT_HELD_LOCKS_MAX;
    for (unsigned i = 0; i < FAYT_HELD_LOCKS_MAX; i++) {
        unsigned k = (start + i) % FAYT_HELD_LOCKS_MAX;
        if (ctx->held[k].sp_id == 0) {
            __atomic_store_n(&ctx->held[k].sp_id, sp_id, __ATOMIC_RELAXED);
            __atomic_store_n(&ctx->held[k].state, FAYT_HELD_PENDING, __ATOMIC_RELEASE);
            return (int)k;
        }
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
        raise_errno(ENOLCK, "share-point lock: this process holds too many locks "
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
            Py_BEGIN_ALLOW_THREADS
            r = fayt_sp_lock_wait(base, state, left, closing);
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
    }
    if (r == 0 || r == EOWNERDEAD) {
        rec_set(self->ctx, slot, FAYT_HELD_HELD);
        self->slot = slot;
        self->holder = THREAD_IDENT();
        return r;
    }
    rec_clear(self->ctx, slot);
    if (r == EBUSY && timeout_ns == 0)
        return EBUSY;
    if (r == ECANCELED)
        raise_errno(EBADF, "share-point lock: the share-point was unmapped by another thread "
                           "while this one waited");
    else if (r == EBUSY || r == ETIMEDOUT)
        raise_errno(ETIMEDOUT, "share-point lock: timed out");
    else
        raise_errno(r, "share-point lock failed");
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

/* The message of an EINVAL naming an argument: fmt as PyUnicode_FromFormat. */
static PyObject *raise_errno_fmt(int err, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    PyObject *m = PyUnicode_FromFormatV(fmt, va);
    va_end(va);
    if (m) {
        raise_errno(err, PyUnicode_AsUTF8(m));
        Py_DECREF(m);
    }
    return NULL;
}

/* libportal's rule for every timeout (errors.check_timeout): None waits for
 * ever; seconds >= 0 bound the wait; so many that int64 ns cannot hold them
 * (inf included) are for ever too; negative or nan is EINVAL, no number
 * TypeError, each naming `timeout`.  *out: ns, or -1 for ever. */
#define FOREVER_S 9.2e9
static int parse_timeout(PyObject *obj, int64_t *out)
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
        raise_errno_fmt(EINVAL, "timeout: %R is not a number of seconds >= 0 (None waits "
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
ssize_arg_failed(PyObject *o, const char *call, const char *name, size_t length)
{
    if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
        PyErr_Clear();
        raise_errno_fmt(EINVAL, "%s: %s: %R is outside the share-point's %zu bytes",
                        call, name, o, length);
    } else if (PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: %s: must be an int, not %.100s",
                     call, name, Py_TYPE(o)->tp_name);
    }
    return -1;
}

static inline int ssize_arg(PyObject *o, const char *call, const char *name, size_t length,
                            Py_ssize_t *out)
{
    Py_ssize_t v = PyLong_AsSsize_t(o);
    if (__builtin_expect(v == -1, 0) && PyErr_Occurred())
        return ssize_arg_failed(o, call, name, length);
    *out = v;
    return 0;
}

static PyObject *core_lock(SharePointCore *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    int64_t timeout = -1;
    PyObject *t = nargs == 1 ? args[0] : NULL;
    DISPATCH_POINT();
    CHECK_MAPPED(self);
    if (nargs == 0 && kwnames == NULL) {
        /* The uncontended case inline: its home record slot free, the lock free. */
        unsigned long me = THREAD_IDENT();
        if (self->holder == me)
            return raise_errno(EDEADLK, "share-point lock: this thread already holds it");
        struct fayt_context_page *ctx = self->ctx;
        unsigned k = self->sp_id % FAYT_HELD_LOCKS_MAX;
        int died;
        if (ctx && ctx->held[k].sp_id == 0) {
            __atomic_store_n(&ctx->held[k].sp_id, self->sp_id, __ATOMIC_RELAXED);
            __atomic_store_n(&ctx->held[k].state, FAYT_HELD_PENDING, __ATOMIC_RELEASE);
            if (fayt_sp_take(self->base, FAYT_LOCK_HELD, &died)) {
                __atomic_store_n(&ctx->held[k].state, FAYT_HELD_HELD, __ATOMIC_RELEASE);
                self->slot = (int)k;
                self->holder = me;
                return PyLong_FromLong(died ? EOWNERDEAD : 0);
            }
            rec_clear(ctx, (int)k);
        }
        int r = acquire(self, -1);
        return r < 0 ? NULL : PyLong_FromLong(r);
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw > 1)
        return raise_errno(EINVAL, "lock(timeout=None): too many arguments");
    if (nkw == 1) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0)) ||
            PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0) {
            PyErr_SetString(PyExc_TypeError, "lock() got an unexpected keyword argument");
            return NULL;
        }
        t = args[0];
    }
    if (t && parse_timeout(t, &timeout) < 0)
        return NULL;
    if (MINE(self))
        return raise_errno(EDEADLK, "share-point lock: this thread already holds it");
    int r = acquire(self, timeout < 0 ? -1 : (timeout == 0 ? 1 : timeout));
    if (r < 0)
        return NULL;
    return PyLong_FromLong(r);
}

static PyObject *core_try_lock(SharePointCore *self, PyObject *unused)
{
    DISPATCH_POINT();
    CHECK_MAPPED(self);
    if (MINE(self))
        return raise_errno(EDEADLK, "share-point lock: this thread already holds it");
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
        return raise_errno(EPERM, "share-point unlock: this thread does not hold it");
    if (release(self) == EPERM)
        return raise_errno(EPERM, "share-point unlock: the lock was already free "
                                  "(released behind this object's back)");
    DISPATCH_POINT();       /* after the release: a handler may take this lock */
    Py_RETURN_NONE;
}

static PyObject *core_mark_consistent(SharePointCore *self, PyObject *unused)
{
    CHECK_MAPPED(self);
    if (!MINE(self))
        return raise_errno(EPERM, "mark_consistent: this thread does not hold the lock");
    fayt_sp_mark_consistent(self->base);
    Py_RETURN_NONE;
}

static int check_access(SharePointCore *self, Py_ssize_t offset, Py_ssize_t n, int need)
{
    if (!(self->prot & need)) {
        raise_errno(EACCES, need == FAYT_PROT_WRITE ? "share-point is not writable (prot)"
                                                    : "share-point is not readable (prot)");
        return -1;
    }
    if (offset < 0 || n < 0 || (size_t)offset > self->length || (size_t)n > self->length - (size_t)offset) {
        PyObject *m = PyUnicode_FromFormat("offset %zd + size %zd is outside the share-point's "
                                           "%zu bytes", offset, n, self->length);
        if (m) {
            raise_errno(EINVAL, PyUnicode_AsUTF8(m));
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
        raise_errno(EDEADLK, "fused access while this thread holds the lock: use view()");
        return -1;
    }
    int r = acquire(self, -1);
    if (r < 0)
        return -1;
    if (r == EOWNERDEAD) {
        release(self);
        raise_errno(EOWNERDEAD, "share-point lock: the previous holder died; lock() it, "
                                "repair the data and mark_consistent()");
        return -1;
    }
    return 0;
}

static PyObject *core_read(SharePointCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    DISPATCH_POINT();
    CHECK_MAPPED(self);
    if (nargs != 2)
        return raise_errno(EINVAL, "read(offset, size): two arguments");
    Py_ssize_t off, n;
    if (ssize_arg(args[0], "read", "offset", self->length, &off) < 0
        || ssize_arg(args[1], "read", "size", self->length, &n) < 0)
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
    DISPATCH_POINT();
    CHECK_MAPPED(self);
    if (nargs != 2)
        return raise_errno(EINVAL, "write(offset, data): two arguments");
    Py_ssize_t off;
    if (ssize_arg(args[0], "write", "offset", self->length, &off) < 0)
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
    DISPATCH_POINT();
    CHECK_MAPPED(self);
    if (nargs != 2)
        return raise_errno(EINVAL, "add(offset, delta): two arguments");
    Py_ssize_t off;
    if (ssize_arg(args[0], "add", "offset", self->length, &off) < 0)
        return NULL;
    long long delta = PyLong_AsLongLong(args[1]);
    if (delta == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            return raise_errno_fmt(EINVAL, "add: delta: %R does not fit an int64", args[1]);
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
            raise_errno(EINVAL, PyUnicode_AsUTF8(m));
            Py_DECREF(m);
        }
        return NULL;
    }
    if ((self->prot & (FAYT_PROT_READ | FAYT_PROT_WRITE)) != (FAYT_PROT_READ | FAYT_PROT_WRITE))
        return raise_errno(EACCES, "add needs a readable and writable share-point (prot)");
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
        return raise_errno(EACCES, "share-point is not readable (prot)");
    if (!self->region) {
        self->region = region_new(self->base + self->data_offset, (Py_ssize_t)self->length,
                                  !(self->prot & FAYT_PROT_WRITE));
        if (!self->region)
            return NULL;
    }
    return PyMemoryView_FromObject(self->region);
}

static PyObject *core_enter(SharePointCore *self, PyObject *unused)
{
    DISPATCH_POINT();
    CHECK_MAPPED(self);
    if (MINE(self))
        return raise_errno(EDEADLK, "share-point lock: this thread already holds it");
    if (fused_acquire(self) < 0)
        return NULL;
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *core_exit(SharePointCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (self->base && MINE(self))
        release(self);
    DISPATCH_POINT();
    Py_RETURN_FALSE;
}

/* Whether it may be unmapped: BufferError while memoryviews of view() exist. */
static PyObject *core_check_unmap(SharePointCore *self, PyObject *unused)
{
    CHECK_MAPPED(self);
    if (self->region && ((Region *)self->region)->exports)
        return region_close((Region *)self->region, NULL);
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
    return region_orphan((Region *)self->region, args);
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
    return PyLong_FromLong(fayt_sp_lock_state(self->base));
}
static PyObject *get_owner_died(SharePointCore *self, void *c)
{
    CHECK_MAPPED(self);
    return PyBool_FromLong((fayt_sp_lock_state(self->base) & FAYT_LOCK_OWNER_DIED) != 0);
}

static PyMethodDef core_methods[] = {
    {"lock", (PyCFunction)(void (*)(void))core_lock, METH_FASTCALL | METH_KEYWORDS,
     "lock(timeout=None) -> 0 or errno.EOWNERDEAD. Take the share-point lock; "
     "EOWNERDEAD means the previous holder died: repair the data, then mark_consistent()."},
    {"try_lock", (PyCFunction)core_try_lock, METH_NOARGS,
     "try_lock() -> 0, errno.EOWNERDEAD or errno.EBUSY (not taken)."},
    {"unlock", (PyCFunction)(void (*)(void))core_unlock, METH_FASTCALL,
     "Release the lock this object holds."},
    {"mark_consistent", (PyCFunction)core_mark_consistent, METH_NOARGS,
     "Clear the owner-died mark of the held lock."},
    {"read", (PyCFunction)(void (*)(void))core_read, METH_FASTCALL,
     "read(offset, size) -> bytes: lock, check, copy, unlock in one call."},
    {"write", (PyCFunction)(void (*)(void))core_write, METH_FASTCALL,
     "write(offset, data): lock, check, copy, unlock in one call."},
    {"add", (PyCFunction)(void (*)(void))core_add, METH_FASTCALL,
     "add(offset, delta) -> int: add to the native int64 at offset under the lock; the new value."},
    {"view", (PyCFunction)core_view, METH_NOARGS,
     "A memoryview of the data (read-only without PROT_WRITE). Take the lock around its use."},
    {"__enter__", (PyCFunction)core_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))core_exit, METH_FASTCALL, NULL},
    {"_invalidate", (PyCFunction)core_invalidate, METH_NOARGS, NULL},
    {"_check_unmap", (PyCFunction)core_check_unmap, METH_NOARGS, NULL},
    {"_orphan", (PyCFunction)core_orphan, METH_VARARGS, NULL},
    {"_forget", (PyCFunction)core_forget, METH_NOARGS, NULL},
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
    {NULL}
};

static PyTypeObject SharePointCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "libportal._fastpath.SharePointCore",
    .tp_basicsize = sizeof(SharePointCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C core of a mapped share-point: lock, fused access, views.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_methods = core_methods,
    .tp_getset = core_getset,
    .tp_weaklistoffset = offsetof(SharePointCore, weakreflist),
    .tp_dictoffset = offsetof(SharePointCore, dict),
};

static PyObject *set_error_factory(PyObject *mod, PyObject *f)
{
    Py_XDECREF(error_factory);
    Py_INCREF(f);
    error_factory = f;
    Py_RETURN_NONE;
}

/* -- notifications: the per-notification calls of a sender and a target ----
 * Same reason as above: a cffi call with pointer arguments costs a few
 * hundred ns (argument checks, the GIL released and taken back); these take
 * addresses as ints and never sleep, so they keep the GIL. */

static int addr_arg(PyObject *o, void **out)
{
    unsigned long long a = PyLong_AsUnsignedLongLong(o);
    if (a == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (void *)(uintptr_t)a;
    return 0;
}

/* notify_post(ring, index, flags, sender, payload, pidfd, signo, hint) -> 0,
 * FAYT_RING_POSTED_RING (posted; faytd must ring: pidfd -1) or errno.
 * fayt_ring_post with FAYT_NOTIFY_NOWAIT: never waits (EAGAIN when full);
 * hint: the address of the target's hint word, or 0. */
static PyObject *notify_post(PyObject *mod, PyObject *const *args, Py_ssize_t n)
{
    void *ring, *hint;
    if (n != 8) {
        PyErr_SetString(PyExc_TypeError, "notify_post takes 8 arguments");
        return NULL;
    }
    if (addr_arg(args[0], &ring) < 0 || addr_arg(args[7], &hint) < 0)
        return NULL;
    long index = PyLong_AsLong(args[1]), flags = PyLong_AsLong(args[2]);
    long sender = PyLong_AsLong(args[3]), pidfd = PyLong_AsLong(args[5]);
    long signo = PyLong_AsLong(args[6]);
    if (PyErr_Occurred())
        return NULL;
    if (!ring)
        return PyLong_FromLong(EBADF);
    if (index < 0 || flags < 0 || sender < 0)
        return PyLong_FromLong(EINVAL);
    Py_buffer b;
    if (PyObject_GetBuffer(args[4], &b, PyBUF_SIMPLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "notify: payload: a bytes-like object is required, "
                         "not %.100s", Py_TYPE(args[4])->tp_name);
        }
        return NULL;
    }
    uint32_t pos;
    int r = b.len > FAYT_NOTIFY_PAYLOAD_MAX ? EINVAL
          : fayt_ring_post(ring, (uint32_t)index, (uint32_t)flags | FAYT_NOTIFY_NOWAIT,
                           (uint32_t)sender, b.buf, (uint32_t)b.len, 0, (int)pidfd, (int)signo,
                           &pos, (uint32_t *)hint);
    PyBuffer_Release(&b);
    return PyLong_FromLong(r);
}

/* dispatch_step(dispatcher, stack_rec, result, status) -> (rec, payload, index, sender).
 * fayt_dispatch_step; for a started notification payload is a memoryview of
 * its payload on its notification stack (release it when the handler
 * returns), else rec is -1, -2 or -3 and the rest None. */
static PyObject *dispatch_step(PyObject *mod, PyObject *const *args, Py_ssize_t n)
{
    void *d;
    if (n != 4) {
        PyErr_SetString(PyExc_TypeError, "dispatch_step takes 4 arguments");
        return NULL;
    }
    if (addr_arg(args[0], &d) < 0)
        return NULL;
    long rec = PyLong_AsLong(args[1]);
    long status = PyLong_AsLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    long long result = PyLong_AsLongLong(args[2]);
    if (result == -1 && PyErr_Occurred()) {      /* not an int64: the sender gets EOVERFLOW */
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();
        result = 0;
        status = EOVERFLOW;
    }
    struct fayt_dispatcher *dp = d;
    int s = fayt_dispatch_step(dp, (int)rec, result, (int32_t)status);
    if (s < 0)
        return Py_BuildValue("(iOOO)", s, Py_None, Py_None, Py_None);
    struct fayt_notification_frame *f =
        (struct fayt_notification_frame *)(uintptr_t)dp->page->stacks[s].base;
    PyObject *view = PyMemoryView_FromMemory((char *)f->payload, f->length, PyBUF_WRITE);
    if (!view) {
        fayt_dispatch_end(dp, s, 0, ECANCELED);
        return NULL;
    }
    PyObject *t = PyTuple_New(4);
    if (!t) {
        Py_DECREF(view);
        fayt_dispatch_end(dp, s, 0, ECANCELED);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, PyLong_FromLong(s));
    PyTuple_SET_ITEM(t, 1, view);
    PyTuple_SET_ITEM(t, 2, PyLong_FromUnsignedLong(f->index));
    PyTuple_SET_ITEM(t, 3, PyLong_FromUnsignedLong(f->sender));
    return t;
}

/* hint_register(word, page, hook): make share-point calls dispatch points
 * for a runtime (word: its fayt_notify_hint.posted, page: its context
 * page, both addresses that stay mapped until
 * hint_unregister(word); hook() -> bool, called on the main thread).  The
 * first call after it looks at the rings once. */
static PyObject *hint_register(PyObject *mod, PyObject *const *args, Py_ssize_t n)
{
    void *word, *page;
    if (n != 3) {
        PyErr_SetString(PyExc_TypeError, "hint_register takes 3 arguments");
        return NULL;
    }
    if (addr_arg(args[0], &word) < 0 || addr_arg(args[1], &page) < 0)
        return NULL;
    if (!word || !page || !PyCallable_Check(args[2]))
        return raise_errno(EINVAL, "hint_register(word, page, hook): two addresses, a callable");
    int i = 0;
    while (i < nhints && hint_word[i] != word)
        i++;
    if (i == HINT_MAX)
        return raise_errno(ENOSPC, "notifications: at most 4 connections of one process "
                                   "may have handlers");
    Py_INCREF(args[2]);
    PyObject *old = i < nhints ? hint_hook[i] : NULL;
    hint_word[i] = word;
    hint_page[i] = page;
    hint_depth[i] = &((struct fayt_context_page *)page)->notify.depth;
    hint_hook[i] = args[2];
    hint_seen[i] = __atomic_load_n((uint32_t *)word, __ATOMIC_ACQUIRE) - 1;
    if (i == nhints)
        nhints++;
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

/* hint_unregister(word): forget it (before its runtime unmaps it). */
static PyObject *hint_unregister(PyObject *mod, PyObject *arg)
{
    void *word;
    if (addr_arg(arg, &word) < 0)
        return NULL;
    for (int i = 0; i < nhints; i++) {
        if (hint_word[i] != word)
            continue;
        PyObject *hook = hint_hook[i];
        nhints--;
        hint_word[i] = hint_word[nhints];
        hint_depth[i] = hint_depth[nhints];
        hint_page[i] = hint_page[nhints];
        hint_hook[i] = hint_hook[nhints];
        hint_seen[i] = hint_seen[nhints];
        hint_hook[nhints] = NULL;
        Py_DECREF(hook);
        break;
    }
    Py_RETURN_NONE;
}

/* hint_reset(): forget every registration; the calling thread is the main
 * thread and holds no lock (at exit, and in a fork child: its share-points
 * are forgotten). */
static PyObject *hint_reset(PyObject *mod, PyObject *unused)
{
    int n = nhints;
    nhints = 0;
    for (int i = 0; i < n; i++)
        Py_CLEAR(hint_hook[i]);
    main_ident = PyThread_get_thread_ident();
    in_hook = 0;
    Py_RETURN_NONE;
}

/* hint_state() -> (registered words, whether a lock is recorded in their pages). */
static PyObject *hint_state(PyObject *mod, PyObject *unused)
{
    return Py_BuildValue("(ii)", nhints, locks_recorded());
}


/* -- the client's system call: one request, one reply ---------------------
 * call(fd, msg, fds, want_reply, spin_ns, max_fds, expect)
 *     -> (reply, [fds], mapped) or None
 *
 * Sends msg (None: sends nothing, only waits for the next reply), with fds
 * as SCM_RIGHTS when given, on the SOCK_SEQPACKET socket and, if want_reply,
 * reads one message.  faytd answers most calls within a few microseconds,
 * and on a virtual machine a sleeping receiver costs a wake-up worth many of
 * those (cross-CPU wake-ups were ~50-70 us on the Firecracker VM this was
 * measured on, a round trip ~15 us without), so the wait spins first: for up
 * to HELD_SPIN_NS it looks with a non-blocking recvmsg, the GIL held (a
 * short hold costs other threads less than a GIL hand-off, which a busy
 * thread can stretch to the switch interval, 5 ms), then, up to spin_ns, it
 * polls with the GIL released, and then sleeps in poll(2).  Between looks it
 * gives the CPU away (sched_yield) and runs Python's signal handlers.  The
 * reply itself is always read with the GIL held.
 *
 * expect: (seq, portal).  A reply whose seq is not seq is not this call's
 * (a call abandoned when a signal handler raised): its descriptors are
 * closed at once, before any Python code runs, and [fds] is empty.
 * portal: None, or (addr, prot, share) for a PORTAL call.  If the reply is
 * that call's success with its one fd, the object is mapped (at addr or
 * anywhere, MADV_DONTFORK, read-write for a share-point: its lock byte must
 * be writable) and the fd closed before any Python object is made (a
 * collection could run finalizers that hand the GIL to another thread), so
 * no fork() of another thread can inherit it: faytd may reuse the object of
 * a share-point this context destroys for its next one, and nobody else
 * may hold a descriptor of it.  mapped is then (address or 0, 0 or mmap's
 * errno, the fayt_portal_reply as a tuple, the physical addresses as a
 * tuple) and [fds] is empty; otherwise mapped is None.
 *
 * A signal handler that raises ends the call with its exception (the reply,
 * if one comes, is then another call's to skip).  Received descriptors are
 * close-on-exec.  OSError on a failed send or receive; EPROTO (the fds
 * closed) for a reply cut short (MSG_TRUNC, MSG_CTRUNC), shorter than
 * struct fayt_rep_hdr or with a bad magic, or a portal reply that does not
 * add up; ConnectionResetError when faytd closed the connection.  The
 * reply comes back parsed: its body (after the header), and the header's
 * op, seq and err. */
#define CALL_MAX_FDS 8
#define HELD_SPIN_NS 50000

static void close_fds(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

struct mapped_reply {
    int done;                       /* the object was mapped (or mmap failed) */
    uintptr_t addr;
    int err;
    struct fayt_portal_reply r;
    const uint8_t *paddr;           /* r.nframes entries, in the call's buffer */
};

/* Map a portal reply's object and close its fds; no Python object is made.
 * A split share-point (FAYT_PORTAL_REPLY_SPLIT) comes as two: page 0's
 * object, mapped read-write over the whole range (its lock byte), then the
 * rest's, mapped over it from offset 4096, read-only unless PROT_WRITE was
 * granted (its fd is read-only then).  0, or EPROTO (fds closed) if the
 * reply does not add up. */
static int map_portal_reply(const uint8_t *body, size_t blen, const int *fds, int nfds,
                            unsigned long long addr, int prot, int share,
                            struct mapped_reply *out)
{
    size_t head = sizeof out->r + sizeof(struct portal_req);
    if (blen < head) {
        close_fds(fds, nfds);
        return EPROTO;
    }
    memcpy(&out->r, body, sizeof out->r);
    int split = (out->r.flags & FAYT_PORTAL_REPLY_SPLIT) != 0;
    if (blen < head + (size_t)out->r.nframes * 8 || nfds != (split ? 2 : 1)
        || (split && (!share || out->r.map_length <= FAYT_PAGE_SIZE))) {
        close_fds(fds, nfds);
        return EPROTO;
    }
    out->paddr = body + head;
    out->err = 0;
    out->addr = fayt_map_portal(fds[0], out->r.map_length, (uintptr_t)addr,
                                share ? (FAYT_PROT_READ | FAYT_PROT_WRITE) : prot, &out->err);
    if (split && out->addr) {
        size_t rest = out->r.map_length - FAYT_PAGE_SIZE;
        int tprot = (out->r.prot & FAYT_PROT_WRITE) ? PROT_READ | PROT_WRITE : PROT_READ;
        void *p = mmap((void *)(out->addr + FAYT_PAGE_SIZE), rest, tprot, MAP_SHARED | MAP_FIXED,
                       fds[1], 0);
        if (p == MAP_FAILED || madvise(p, rest, MADV_DONTFORK) < 0) {
            out->err = errno;
            munmap((void *)out->addr, out->r.map_length);
            out->addr = 0;
        }
    }
    close_fds(fds, nfds);
    out->done = 1;
    return 0;
}

/* Whether a PORTAL reply carrying two fds is a split share-point's. */
static int split_reply(const uint8_t *body, size_t blen)
{
    struct fayt_portal_reply r;
    if (blen < sizeof r)
        return 0;
    memcpy(&r, body, sizeof r);
    return (r.flags & FAYT_PORTAL_REPLY_SPLIT) != 0;
}

static PyObject *mapped_tuple(const struct mapped_reply *m)
{
    PyObject *paddr = PyTuple_New(m->r.nframes);
    if (!paddr)
        return NULL;
    for (uint32_t i = 0; i < m->r.nframes; i++) {
        uint64_t v;
        memcpy(&v, m->paddr + (size_t)i * 8, 8);
        PyObject *o = PyLong_FromUnsignedLongLong(v);
        if (!o) {
            Py_DECREF(paddr);
            return NULL;
        }
        PyTuple_SET_ITEM(paddr, i, o);
    }
    const struct fayt_portal_reply *r = &m->r;
    return Py_BuildValue("(KK(KKKIIiI)N)", (unsigned long long)m->addr,
                         (unsigned long long)(m->addr ? 0 : m->err),
                         (unsigned long long)r->handle, (unsigned long long)r->map_length,
                         (unsigned long long)r->data_offset, r->sp_id, r->nframes, r->prot,
                         r->flags, paddr);
}

static int send_request(int fd, struct msghdr *mh)
{
    ssize_t r = sendmsg(fd, mh, MSG_DONTWAIT | MSG_NOSIGNAL);   /* no GIL hand-off if it fits */
    while (r < 0 && (errno == EAGAIN || errno == EINTR)) {
        if (errno == EINTR) {
            if (PyErr_CheckSignals() < 0)
                return -1;
            r = sendmsg(fd, mh, MSG_DONTWAIT | MSG_NOSIGNAL);
            continue;
        }
        int e;
        Py_BEGIN_ALLOW_THREADS
        r = sendmsg(fd, mh, MSG_NOSIGNAL);
        e = errno;
        Py_END_ALLOW_THREADS
        errno = e;
    }
    if (r < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *sys_call(PyObject *mod, PyObject *const *args, Py_ssize_t n)
{
    if (n != 7) {
        PyErr_SetString(PyExc_TypeError, "call takes 7 arguments");
        return NULL;
    }
    int fd = (int)PyLong_AsLong(args[0]);
    int want = PyObject_IsTrue(args[3]);
    long long spin_ns = PyLong_AsLongLong(args[4]);
    long max_fds = PyLong_AsLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (max_fds < 0 || max_fds > CALL_MAX_FDS)
        max_fds = CALL_MAX_FDS;
    unsigned long expect_seq = 0;
    PyObject *portal = Py_None;
    if (!PyArg_ParseTuple(args[6], "kO", &expect_seq, &portal))
        return NULL;
    unsigned long long map_addr = 0;
    int map_prot = 0, map_share = 0, want_map = portal != Py_None;
    if (want_map && !PyArg_ParseTuple(portal, "Kip", &map_addr, &map_prot, &map_share))
        return NULL;
    int sfds[CALL_MAX_FDS];
    Py_ssize_t nsfds = 0;
    if (args[2] != Py_None) {
        PyObject *seq = PySequence_Fast(args[2], "fds: a sequence of ints");
        if (!seq)
            return NULL;
        nsfds = PySequence_Fast_GET_SIZE(seq);
        if (nsfds > CALL_MAX_FDS) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "fds: at most 8");
            return NULL;
        }
        for (Py_ssize_t i = 0; i < nsfds; i++)
            sfds[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        Py_DECREF(seq);
        if (PyErr_Occurred())
            return NULL;
    }
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int) * CALL_MAX_FDS)];
    } cbuf;
    if (args[1] != Py_None) {
        Py_buffer b;
        if (PyObject_GetBuffer(args[1], &b, PyBUF_SIMPLE) < 0)
            return NULL;
        struct iovec iov = {b.buf, (size_t)b.len};
        struct msghdr mh = {0};
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        if (nsfds) {
            memset(&cbuf, 0, sizeof cbuf);
            mh.msg_control = cbuf.buf;
            mh.msg_controllen = CMSG_SPACE(sizeof(int) * nsfds);
            struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int) * nsfds);
            memcpy(CMSG_DATA(c), sfds, sizeof(int) * nsfds);
        }
        int sr = send_request(fd, &mh);
        PyBuffer_Release(&b);
        if (sr < 0)
            return NULL;
    }
    if (!want)
        Py_RETURN_NONE;

    uint8_t *buf = malloc(FAYT_MSG_MAX);    /* this call's: no other thread writes it */
    if (!buf)
        return PyErr_NoMemory();
    int64_t start = fayt_now_ns();
    ssize_t r;
    struct msghdr rh;
    struct iovec riov;
    for (;;) {
        riov.iov_base = buf;
        riov.iov_len = FAYT_MSG_MAX;
        memset(&rh, 0, sizeof rh);
        rh.msg_iov = &riov;
        rh.msg_iovlen = 1;
        rh.msg_control = cbuf.buf;
        rh.msg_controllen = CMSG_SPACE(sizeof(int) * max_fds);
        r = recvmsg(fd, &rh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (r >= 0)
            break;
        if (errno != EAGAIN && errno != EINTR) {
            PyErr_SetFromErrno(PyExc_OSError);
            free(buf);
            return NULL;
        }
        if (PyErr_CheckSignals() < 0) {
            free(buf);
            return NULL;
        }
        int64_t waited = fayt_now_ns() - start;
        if (waited < HELD_SPIN_NS && waited < spin_ns) {
            sched_yield();          /* the GIL held: see above */
            continue;
        }
        /* The GIL released: poll and yield until spin_ns, taking the GIL back
         * now and then for Python's signal handlers; then sleep in poll.  (A
         * signal that comes between the last look and the sleep waits for
         * the reply, as in Python's own socket calls.) */
        struct pollfd pfd = {fd, POLLIN, 0};
        int pr = 0, pe = 0, spinning = fayt_now_ns() - start < spin_ns;
        while (spinning) {
            Py_BEGIN_ALLOW_THREADS
            for (int i = 0; i < 64 && pr == 0 && (spinning = fayt_now_ns() - start < spin_ns); i++) {
                sched_yield();
                pr = poll(&pfd, 1, 0);
            }
            pe = errno;
            Py_END_ALLOW_THREADS
            if (pr != 0)
                break;
            if (PyErr_CheckSignals() < 0) {
                free(buf);
                return NULL;
            }
        }
        if (pr == 0) {
            Py_BEGIN_ALLOW_THREADS
            pr = poll(&pfd, 1, -1);
            pe = errno;
            Py_END_ALLOW_THREADS
        }
        if (pr < 0 && pe != EINTR) {
            errno = pe;
            PyErr_SetFromErrno(PyExc_OSError);
            free(buf);
            return NULL;
        }
        start = fayt_now_ns() - spin_ns;    /* from now on: poll again before reading */
    }

    /* Descriptors first, with no Python in between (see above). */
    int got[CALL_MAX_FDS], ngot = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&rh); c; c = CMSG_NXTHDR(&rh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; i++) {
            int f;
            memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof f);
            if (ngot < CALL_MAX_FDS)
                got[ngot++] = f;
            else
                close(f);
        }
    }
    if (rh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
        close_fds(got, ngot);
        free(buf);
        return raise_errno(EPROTO, (rh.msg_flags & MSG_TRUNC)
                           ? "faytd's reply was longer than FAYT_MSG_MAX"
                           : "faytd's reply carried more descriptors than expected");
    }
    struct fayt_rep_hdr rep;
    struct mapped_reply m = {0};
    if ((size_t)r >= sizeof rep) {
        memcpy(&rep, buf, sizeof rep);
        if (rep.seq != (uint32_t)expect_seq) {      /* not this call's: nobody takes them */
            close_fds(got, ngot);
            ngot = 0;
        } else if (want_map && rep.magic == FAYT_REP_MAGIC && rep.op == FAYT_SYS_PORTAL
                   && rep.err == 0
                   && (ngot == 1 || (ngot == 2 && split_reply(buf + sizeof rep,
                                                              r - sizeof rep)))) {
            int e = map_portal_reply(buf + sizeof rep, r - sizeof rep, got, ngot, map_addr,
                                     map_prot, map_share, &m);
            ngot = 0;
            if (e) {
                free(buf);
                return raise_errno(EPROTO, "portal: malformed reply from faytd");
            }
        }
    }

    /* The reply header, checked here (after the fds are taken care of). */
    if (r == 0 || (size_t)r < sizeof rep || rep.magic != FAYT_REP_MAGIC) {
        close_fds(got, ngot);       /* nothing was mapped: that needs a good header */
        free(buf);
        if (r == 0) {
            PyObject *a = Py_BuildValue("(is)", ECONNRESET, "faytd closed the connection");
            if (a) {
                PyErr_SetObject(PyExc_ConnectionResetError, a);
                Py_DECREF(a);
            }
            return NULL;
        }
        return raise_errno(EPROTO, (size_t)r < sizeof rep ? "short reply from faytd"
                                   : "reply with a bad magic from faytd");
    }

    /* Python objects now. */
    PyObject *data = PyBytes_FromStringAndSize((const char *)buf + sizeof rep,
                                               r - (ssize_t)sizeof rep);
    PyObject *fds = data ? PyList_New(ngot) : NULL;
    PyObject *mapped = Py_None;
    Py_INCREF(Py_None);
    if (fds && m.done) {
        Py_DECREF(mapped);
        mapped = mapped_tuple(&m);
    }
    for (int i = 0; fds && i < ngot; i++) {
        PyObject *o = PyLong_FromLong(got[i]);
        if (!o) {
            Py_CLEAR(fds);
            break;
        }
        PyList_SET_ITEM(fds, i, o);
    }
    PyObject *t = data && fds && mapped
        ? Py_BuildValue("(OOOIIi)", data, fds, mapped, (unsigned)rep.op, (unsigned)rep.seq,
                        (int)rep.err)
        : NULL;
    if (!t) {                       /* out of memory: nothing may stay behind */
        close_fds(got, ngot);
        if (m.done && m.addr)
            fayt_unmap(m.addr, m.r.map_length);
    }
    free(buf);
    Py_XDECREF(data);
    Py_XDECREF(fds);
    Py_XDECREF(mapped);
    return t;
}

static PyMethodDef module_methods[] = {
    {"call", (PyCFunction)(void (*)(void))sys_call, METH_FASTCALL,
     "call(fd, msg, fds, want_reply, spin_ns, max_fds, (seq, portal)) -> (reply body, [fds], "
     "mapped, op, seq, err) or None: one system call to faytd (spins spin_ns for the reply before "
     "sleeping; portal=(addr, prot, share) maps a PORTAL reply's object and closes its fd)."},
    {"set_error_factory", set_error_factory, METH_O,
     "set_error_factory(f): f(errno, message) builds the exception raised."},
    {"notify_post", (PyCFunction)(void (*)(void))notify_post, METH_FASTCALL,
     "notify_post(ring, index, flags, sender, payload, pidfd, signo, hint) -> 0 or errno: "
     "fayt_ring_post, never waiting (FAYT_NOTIFY_NOWAIT)."},
    {"hint_register", (PyCFunction)(void (*)(void))hint_register, METH_FASTCALL,
     "hint_register(word, depth, hook): share-point calls become dispatch points."},
    {"hint_unregister", (PyCFunction)hint_unregister, METH_O, "hint_unregister(word)"},
    {"hint_reset", (PyCFunction)hint_reset, METH_NOARGS,
     "Forget every hint; the caller is the main thread (at exit, fork child)."},
    {"hint_state", (PyCFunction)hint_state, METH_NOARGS,
     "hint_state() -> (registered hint words, 1 if a lock is recorded in their pages)."},
    {"dispatch_step", (PyCFunction)(void (*)(void))dispatch_step, METH_FASTCALL,
     "dispatch_step(dispatcher, stack_rec, result, status) -> (rec, payload, index, sender): "
     "fayt_dispatch_step."},
    {NULL}
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "libportal._fastpath", "Share-point hot path.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&SharePointCoreType) < 0 || PyType_Ready(&RegionType) < 0)
        return NULL;
    main_ident = PyThread_get_thread_ident();
    PyObject *th = PyImport_ImportModule("threading");
    PyObject *mt = th ? PyObject_CallMethod(th, "main_thread", NULL) : NULL;
    PyObject *id = mt ? PyObject_GetAttrString(mt, "ident") : NULL;
    if (id && PyLong_Check(id))
        main_ident = PyLong_AsUnsignedLong(id);
    Py_XDECREF(id);
    Py_XDECREF(mt);
    Py_XDECREF(th);
    PyErr_Clear();
    PyObject *m = PyModule_Create(&fastpath_module);
    if (!m)
        return NULL;
    Py_INCREF(&SharePointCoreType);
    PyModule_AddObject(m, "SharePointCore", (PyObject *)&SharePointCoreType);
    Py_INCREF(&RegionType);
    PyModule_AddObject(m, "Region", (PyObject *)&RegionType);
    PyModule_AddIntConstant(m, "ABI_VERSION", FASTPATH_ABI);
    return m;
}
