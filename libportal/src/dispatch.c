/* The dispatch point: share-point calls run a runtime's notification
 * handlers; and the target's dispatch step (a sender's calls are
 * sender.c's).
 *
 * Share-point calls are notification dispatch points (the pending hint,
 * fayt/notification.h).  A runtime with handlers registers its context's
 * hint word, its notify.depth and a hook (libportal/dispatch.py).  Every
 * lock, try_lock, read, write, add and `with` entry starts with one load of
 * the registered count (none registered: a target without handlers pays
 * nothing else) and, with some registered, one load of each registered
 * word; a word that changed since the last look runs the hook before the
 * call takes its lock, and unlock and `with`'s exit look after releasing.
 * Never dispatched there: off the main thread (Python runs handlers there
 * only), while the process holds a share-point lock recorded in the
 * runtime's context page (a handler using that share-point would deadlock
 * on it; the records do not say which thread holds it, so another thread's
 * lock only puts the dispatch off; a lock taken through another connection
 * is not seen), while a handler runs (depth != 0: deferred notifications
 * never interrupt one; its dispatch loop takes them next), inside the hook
 * itself.  Then the change stays unseen and a later call looks again.  The
 * hook returns False when it could not dispatch after all: the change is
 * left unseen too.  An exception from the hook (a handler's
 * KeyboardInterrupt, SystemExit) is raised by the share-point call, as a
 * signal handler's would be; a call that raises so has not taken its lock.
 *
 * The registrations live in the module state (struct fp_hints): the hooks
 * are the objects of the interpreter that imported the module.
 * GIL: they are registered, looked at and dispatched with the GIL held;
 * in_hook and seen[] need nothing more.
 *
 * dispatch_step, the one binding of fayt_dispatch_step: a cffi call with
 * pointer arguments costs a few hundred ns (argument checks, the GIL
 * released and taken back); it takes the dispatcher's address as an int and
 * never sleeps, so it keeps the GIL.
 */
#include "fastpath.h"

#include <errno.h>
#include <string.h>

#include "fayt/context.h"
#include "fayt/notification.h"
#include "fayt/ring.h"

/* Whether this process holds or is taking a share-point lock recorded in a
 * registered runtime's context page (any thread: the records do not say
 * which; a lock of another thread only puts the dispatch off). */
static int locks_recorded(const struct fp_hints *h)
{
    for (int i = 0; i < h->n; i++)
        for (int k = 0; k < FAYT_HELD_LOCKS_MAX; k++)
            if (__atomic_load_n(&h->page[i]->held[k].sp_id, __ATOMIC_RELAXED))
                return 1;
    return 0;
}

static __attribute__((noinline, cold)) int hint_dispatch(struct fp_hints *h)
{
    if (h->in_hook || PyThread_get_thread_ident() != h->main_ident || locks_recorded(h))
        return 0;
    for (int i = 0; i < h->n; i++) {
        uint32_t w = __atomic_load_n(h->word[i], __ATOMIC_ACQUIRE);
        if (w == h->seen[i] || __atomic_load_n(h->depth[i], __ATOMIC_RELAXED) != 0)
            continue;
        uint32_t old = h->seen[i];
        uint32_t *word = h->word[i];
        PyObject *hook = h->hook[i];
        h->seen[i] = w;         /* before: a post during the dispatch is seen next time */
        Py_INCREF(hook);
        h->in_hook = 1;
        PyObject *r = PyObject_CallNoArgs(hook);
        h->in_hook = 0;
        int ok = r ? PyObject_IsTrue(r) : -1;
        Py_XDECREF(r);
        Py_DECREF(hook);
        /* The hook may have unregistered or replaced entries: undo only if
         * entry i is still this word, as the dispatch left it. */
        if (ok == 0 && i < h->n && h->word[i] == word && h->seen[i] == w)
            h->seen[i] = old;   /* not dispatched: look again next time */
        return ok < 0 ? -1 : 0;
    }
    return 0;
}

/* The dispatch point, once a word is registered: 0, or -1 with an
 * exception set.  Out of line: the share-point calls only test the count. */
__attribute__((noinline)) int fp_hint_check(fastpath_state *st)
{
    struct fp_hints *h = &st->hints;
    for (int i = 0; i < h->n; i++)
        if (__builtin_expect(__atomic_load_n(h->word[i], __ATOMIC_RELAXED) != h->seen[i], 0))
            return hint_dispatch(h);
    return 0;
}

void fp_hints_init(struct fp_hints *h)
{
    memset(h, 0, sizeof *h);
    h->main_ident = PyThread_get_thread_ident();
}

/* Forget every registration (the module's m_clear, and hint_reset). */
void fp_hints_clear(struct fp_hints *h)
{
    int n = h->n;
    h->n = 0;
    for (int i = 0; i < n; i++)
        Py_CLEAR(h->hook[i]);
}

int fp_hints_traverse(struct fp_hints *h, visitproc visit, void *arg)
{
    for (int i = 0; i < h->n; i++)
        Py_VISIT(h->hook[i]);
    return 0;
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
    if (fp_addr_arg(args[0], &d) < 0)
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
    fastpath_state *st = PyModule_GetState(mod);
    struct fp_hints *h = &st->hints;
    void *word, *page;
    if (n != 3) {
        PyErr_SetString(PyExc_TypeError, "hint_register takes 3 arguments");
        return NULL;
    }
    if (fp_addr_arg(args[0], &word) < 0 || fp_addr_arg(args[1], &page) < 0)
        return NULL;
    if (!word || !page || !PyCallable_Check(args[2]))
        return fp_raise(st, EINVAL, "hint_register(word, page, hook): two addresses, a callable");
    int i = 0;
    while (i < h->n && h->word[i] != word)
        i++;
    if (i == HINT_MAX)
        return fp_raise(st, ENOSPC, "notifications: at most 4 connections of one process "
                                    "may have handlers");
    Py_INCREF(args[2]);
    PyObject *old = i < h->n ? h->hook[i] : NULL;
    h->word[i] = word;
    h->page[i] = page;
    h->depth[i] = &((struct fayt_context_page *)page)->notify.depth;
    h->hook[i] = args[2];
    h->seen[i] = __atomic_load_n((uint32_t *)word, __ATOMIC_ACQUIRE) - 1;
    if (i == h->n)
        h->n++;
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

/* hint_unregister(word): forget it (before its runtime unmaps it). */
static PyObject *hint_unregister(PyObject *mod, PyObject *arg)
{
    struct fp_hints *h = &((fastpath_state *)PyModule_GetState(mod))->hints;
    void *word;
    if (fp_addr_arg(arg, &word) < 0)
        return NULL;
    for (int i = 0; i < h->n; i++) {
        if (h->word[i] != word)
            continue;
        PyObject *hook = h->hook[i];
        int last = --h->n;
        h->word[i] = h->word[last];
        h->depth[i] = h->depth[last];
        h->page[i] = h->page[last];
        h->hook[i] = h->hook[last];
        h->seen[i] = h->seen[last];
        h->hook[last] = NULL;
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
    struct fp_hints *h = &((fastpath_state *)PyModule_GetState(mod))->hints;
    fp_hints_clear(h);
    h->main_ident = PyThread_get_thread_ident();
    h->in_hook = 0;
    Py_RETURN_NONE;
}

/* hint_state() -> (registered words, whether a lock is recorded in their pages). */
static PyObject *hint_state(PyObject *mod, PyObject *unused)
{
    struct fp_hints *h = &((fastpath_state *)PyModule_GetState(mod))->hints;
    return Py_BuildValue("(ii)", h->n, locks_recorded(h));
}

PyMethodDef fp_dispatch_functions[] = {
    {"dispatch_step", (PyCFunction)(void (*)(void))dispatch_step, METH_FASTCALL,
     "dispatch_step($module, dispatcher, stack_rec, result, status, /)\n--\n\n"
     "fayt_dispatch_step: (rec, payload, index, sender) of the next notification started, "
     "payload a memoryview of it on its notification stack; or (rec < 0, None, None, None)."},
    {"hint_register", (PyCFunction)(void (*)(void))hint_register, METH_FASTCALL,
     "hint_register($module, word, page, hook, /)\n--\n\n"
     "Make share-point calls dispatch points for a runtime: hook() -> bool runs on the main "
     "thread when the hint word changed."},
    {"hint_unregister", (PyCFunction)hint_unregister, METH_O,
     "hint_unregister($module, word, /)\n--\n\n"
     "Forget the hint word (before its runtime unmaps it)."},
    {"hint_reset", (PyCFunction)hint_reset, METH_NOARGS,
     "hint_reset($module, /)\n--\n\n"
     "Forget every hint; the caller is the main thread (at exit, fork child)."},
    {"hint_state", (PyCFunction)hint_state, METH_NOARGS,
     "hint_state($module, /)\n--\n\n"
     "(registered hint words, 1 if a lock is recorded in their pages)."},
    {NULL}
};
