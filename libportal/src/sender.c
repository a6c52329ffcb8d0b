/* SenderRing: a sender's end of one notification ring, the one binding of
 * fayt_ring_post_fault and fayt_ring_wait_return.
 *
 * What stays the same for every post into a ring (its address, the id the
 * sender posts as, the target's doorbell pidfd and signal, the address of
 * its pending-hint word) is given once, by keyword, when the object is
 * made; a post then takes only what changes (index, payload, flags), so
 * no call crosses into C with a long list of positional arguments.
 *
 * post() never waits (FAYT_NOTIFY_NOWAIT) and keeps the GIL: it is the hot
 * path of Channel.send, where a cffi call's argument checks and GIL
 * hand-off would cost more than the post.  post_waiting() and
 * wait_return() may sleep on a futex: they release the GIL unless told not
 * to wait (timeout_ns 0, or NOWAIT for a post).
 *
 * The ring is mapped by Python (rings.py); close() is called before it is
 * unmapped, after which every call answers EBADF instead of touching it.
 * GIL: the fields are read and written with it held; a call that released
 * it works on copies taken before.
 */
#include "fastpath.h"

#include <errno.h>

#include "fayt/common/trace.h"
#include "fayt/context.h"
#include "fayt/notification.h"
#include "fayt/ring.h"

typedef struct {
    PyObject_HEAD
    void *ring;                 /* NULL once closed */
    uint32_t *hint;             /* the target's fayt_notify_hint.posted, or NULL */
    struct fayt_context_page *page; /* the sender's own context page (its wait record,
                                       its injected doorbell faults), or NULL */
    uint32_t sender;            /* the context id this end posts as */
    int pidfd;                  /* the target's pidfd to signal, or -1: faytd rings */
    int signo;                  /* the doorbell */
} SenderRing;

static int sender_init(SenderRing *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ring", "sender", "pidfd", "signo", "hint", "context", NULL};
    unsigned long long ring = 0, hint = 0, page = 0;
    unsigned int sender = 0;
    int pidfd = -1, signo = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|$IiiKK", kwlist, &ring, &sender, &pidfd,
                                     &signo, &hint, &page))
        return -1;
    if (!ring) {
        PyErr_SetString(PyExc_ValueError, "ring: the address of a mapped ring, not 0");
        return -1;
    }
    self->ring = (void *)(uintptr_t)ring;
    self->hint = (uint32_t *)(uintptr_t)hint;
    self->sender = sender;
    self->pidfd = pidfd;
    self->signo = signo;
    self->page = (struct fayt_context_page *)(uintptr_t)page;
    return 0;
}

/* The doorbell fault of this post, if a plan arms one (inject.c). */
static inline int doorbell_of(SenderRing *self, int64_t *delay_ns)
{
    *delay_ns = 0;
    if (self->page && INJECT_ARMED(self->page, FAYT_INJECT_DOORBELL_DROP
                                               | FAYT_INJECT_DOORBELL_DELAY))
        return fp_inject_doorbell(self->page, delay_ns);
    return FAYT_DOORBELL_RING;
}

/* The timeline trace (fayt/common/trace.h): a post or a return, recorded
 * in the sender's own page while faytd traces.  The target named is the
 * ring header's word (the target can write it): faytd checks it against
 * its own record of this sender's rings. */
static inline void trace_post(SenderRing *self, int r, uint32_t index, uint32_t flags,
                              uint32_t pos)
{
    if ((r == 0 || r == FAYT_RING_POSTED_RING) && fayt_tracing(self->page) && self->ring)
        fayt_trace_put(self->page, FAYT_TRACE_NOTIFY_SEND, (uint16_t)index,
                       __atomic_load_n(&((struct fayt_ring_header *)self->ring)->target,
                                       __ATOMIC_RELAXED), pos, flags, 0, 0);
}

/* index, payload and flags of a post: 0, or -1 with an exception set.  A
 * negative index or flags word is EINVAL in *err (as fayt_ring_post answers
 * an index past the slots); a payload that is no buffer is TypeError. */
static int post_args(PyObject *const *args, Py_ssize_t n, const char *name, Py_ssize_t least,
                     uint32_t *index, uint32_t *flags, Py_buffer *b, int *err)
{
    if (n < least || n > least + 1) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd or %zd arguments", name, least, least + 1);
        return -1;
    }
    long i = PyLong_AsLong(args[0]);
    long f = n > 2 ? PyLong_AsLong(args[2]) : 0;
    if ((i == -1 || f == -1) && PyErr_Occurred())
        return -1;
    *err = (i < 0 || f < 0 || i > 0xffffffffL || f > 0xffffffffL) ? EINVAL : 0;
    *index = (uint32_t)i;
    *flags = (uint32_t)f;
    if (PyObject_GetBuffer(args[1], b, PyBUF_SIMPLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "notify: payload: a bytes-like object is required, "
                         "not %.100s", Py_TYPE(args[1])->tp_name);
        }
        return -1;
    }
    if (!*err && b->len > FAYT_NOTIFY_PAYLOAD_MAX)
        *err = EINVAL;
    return 0;
}

/* post(index, payload, flags=0) -> 0, FAYT_RING_POSTED_RING or an errno. */
static PyObject *sender_post(SenderRing *self, PyObject *const *args, Py_ssize_t n)
{
    uint32_t index, flags, pos;
    Py_buffer b;
    int r;
    if (post_args(args, n, "post", 2, &index, &flags, &b, &r) < 0)
        return NULL;
    if (!r && !self->ring)
        r = EBADF;
    if (!r) {
        int64_t delay;
        int db = doorbell_of(self, &delay);
        if (db != FAYT_DOORBELL_DELAY) {
            r = fayt_ring_post_fault(self->ring, index, flags | FAYT_NOTIFY_NOWAIT, self->sender,
                                     b.buf, (uint32_t)b.len, 0, self->pidfd, self->signo, &pos,
                                     self->hint, db, delay);
        } else {            /* an injected delay sleeps: not with the GIL */
            void *ring = self->ring;
            uint32_t *hint = self->hint, sender = self->sender;
            int pidfd = self->pidfd, signo = self->signo;
            Py_BEGIN_ALLOW_THREADS
            r = fayt_ring_post_fault(ring, index, flags | FAYT_NOTIFY_NOWAIT, sender, b.buf,
                                     (uint32_t)b.len, 0, pidfd, signo, &pos, hint, db, delay);
            Py_END_ALLOW_THREADS
        }
        trace_post(self, r, index, flags, pos);
    }
    PyBuffer_Release(&b);
    return PyLong_FromLong(r);
}

/* post_waiting(index, payload, flags, timeout_ns) -> (err, pos). */
static PyObject *sender_post_waiting(SenderRing *self, PyObject *const *args, Py_ssize_t n)
{
    uint32_t index, flags, pos = 0;
    Py_buffer b;
    int r;
    if (n != 4) {
        PyErr_SetString(PyExc_TypeError, "post_waiting takes 4 arguments");
        return NULL;
    }
    long long timeout_ns = PyLong_AsLongLong(args[3]);
    if (timeout_ns == -1 && PyErr_Occurred())
        return NULL;
    if (post_args(args, 3, "post_waiting", 2, &index, &flags, &b, &r) < 0)
        return NULL;
    if (!r && !self->ring)
        r = EBADF;
    if (!r) {
        void *ring = self->ring;
        uint32_t *hint = self->hint, sender = self->sender;
        int pidfd = self->pidfd, signo = self->signo;
        int64_t delay;
        int db = doorbell_of(self, &delay);
        if (((flags & FAYT_NOTIFY_NOWAIT) || timeout_ns == 0) && db != FAYT_DOORBELL_DELAY) {
            r = fayt_ring_post_fault(ring, index, flags, sender, b.buf, (uint32_t)b.len,
                                     timeout_ns, pidfd, signo, &pos, hint, db, delay);
        } else {
            /* It may sleep for space (or an injected delay), on copies of
             * the fields: the caller keeps the ring mapped until the call
             * returns (rings.py). */
            Py_BEGIN_ALLOW_THREADS
            r = fayt_ring_post_fault(ring, index, flags, sender, b.buf, (uint32_t)b.len,
                                     timeout_ns, pidfd, signo, &pos, hint, db, delay);
            Py_END_ALLOW_THREADS
        }
        trace_post(self, r, index, flags, pos);
    }
    PyBuffer_Release(&b);
    return Py_BuildValue("(iI)", r, (unsigned)pos);
}

/* wait_return(pos, timeout_ns) -> (err, result, status). */
static PyObject *sender_wait_return(SenderRing *self, PyObject *const *args, Py_ssize_t n)
{
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "wait_return takes 2 arguments");
        return NULL;
    }
    unsigned long pos = PyLong_AsUnsignedLong(args[0]);
    long long timeout_ns = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    int64_t result = 0;
    int32_t status = 0;
    int r;
    void *ring = self->ring;
    struct fayt_context_page *page = self->page;
    if (!ring)
        r = EBADF;
    else if (timeout_ns == 0)
        r = fayt_ring_wait_return(ring, (uint32_t)pos, 0, &result, &status, NULL);
    else {
        Py_BEGIN_ALLOW_THREADS
        r = fayt_ring_wait_return(ring, (uint32_t)pos, timeout_ns, &result, &status, page);
        Py_END_ALLOW_THREADS
    }
    if (r == 0 && self->ring && fayt_tracing(self->page))
        fayt_trace_put(self->page, FAYT_TRACE_NOTIFY_RETURN, 0,
                       __atomic_load_n(&((struct fayt_ring_header *)self->ring)->target,
                                       __ATOMIC_RELAXED), (uint32_t)pos, (uint32_t)status,
                       result, 0);
    return Py_BuildValue("(iLi)", r, (long long)result, (int)status);
}

static PyObject *sender_close(SenderRing *self, PyObject *unused)
{
    self->ring = NULL;
    self->hint = NULL;
    self->page = NULL;
    Py_RETURN_NONE;
}

static PyObject *sender_repr(SenderRing *self)
{
    char addr[24];
    snprintf(addr, sizeof addr, "%#zx", (size_t)(uintptr_t)self->ring);
    return PyUnicode_FromFormat("<%s ring=%s sender=%u pidfd=%d%s>", _PyType_Name(Py_TYPE(self)),
                                addr, (unsigned)self->sender, self->pidfd,
                                self->ring ? "" : " closed");
}

static PyObject *sender_closed(SenderRing *self, void *c) { return PyBool_FromLong(!self->ring); }

static PyObject *sender_get_page(SenderRing *self, void *c)
{
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)self->page);
}

/* page = the context page's address (0: none); after close() it stays NULL. */
static int sender_set_page(SenderRing *self, PyObject *v, void *c)
{
    if (!v) {
        PyErr_SetString(PyExc_TypeError, "page: cannot be deleted");
        return -1;
    }
    unsigned long long a = PyLong_AsUnsignedLongLong(v);
    if (a == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    self->page = self->ring ? (struct fayt_context_page *)(uintptr_t)a : NULL;
    return 0;
}

static PyMethodDef sender_methods[] = {
    {"post", (PyCFunction)(void (*)(void))sender_post, METH_FASTCALL,
     "post($self, index, payload, flags=0, /)\n--\n\n"
     "fayt_ring_post, never waiting (FAYT_NOTIFY_NOWAIT), the GIL held: 0, "
     "FAYT_RING_POSTED_RING (posted; faytd must ring the doorbell) or an errno."},
    {"post_waiting", (PyCFunction)(void (*)(void))sender_post_waiting, METH_FASTCALL,
     "post_waiting($self, index, payload, flags, timeout_ns, /)\n--\n\n"
     "fayt_ring_post, waiting up to timeout_ns (-1: for ever) for space unless flags has "
     "FAYT_NOTIFY_NOWAIT, the GIL released while it may wait: (err, pos), pos the entry's "
     "position when err is 0 or FAYT_RING_POSTED_RING."},
    {"wait_return", (PyCFunction)(void (*)(void))sender_wait_return, METH_FASTCALL,
     "wait_return($self, pos, timeout_ns, /)\n--\n\n"
     "fayt_ring_wait_return for the entry at pos, the GIL released unless timeout_ns is 0: "
     "(err, result, status)."},
    {"close", (PyCFunction)sender_close, METH_NOARGS,
     "close($self, /)\n--\n\n"
     "Forget the ring (before it is unmapped): every later call answers EBADF."},
    {NULL}
};

static PyGetSetDef sender_getset[] = {
    {"closed", (getter)sender_closed, NULL, "close() was called", NULL},
    {"page", (getter)sender_get_page, (setter)sender_set_page,
     "the sender's context page (an address; 0: none): wait_return counts its sleeps in "
     "the page's wait record (scheduling events)", NULL},
    {NULL}
};

static PyType_Slot sender_slots[] = {
    {Py_tp_doc, "SenderRing(ring, *, sender, pidfd=-1, signo=0, hint=0, context=0)\n--\n\n"
                "A sender's end of a mapped notification ring: ring and hint are addresses "
                "(hint: the target's pending-hint word, or 0), sender the context id posted "
                "as, pidfd the target's pidfd to signal with signo (-1: faytd rings), context "
                "the sender's own context page, or 0.  Its `page` attribute is that context "
                "page: its injected doorbell faults, and the wait record that counts "
                "wait_return's sleeps."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, sender_init},
    {Py_tp_dealloc, fp_plain_dealloc},
    {Py_tp_repr, sender_repr},
    {Py_tp_methods, sender_methods},
    {Py_tp_getset, sender_getset},
    {0, NULL},
};

PyType_Spec fp_sender_spec = {
    .name = "libportal._fastpath.SenderRing",
    .basicsize = sizeof(SenderRing),
    .flags = Py_TPFLAGS_DEFAULT
#ifdef Py_TPFLAGS_IMMUTABLETYPE
             | Py_TPFLAGS_IMMUTABLETYPE
#endif
    ,
    .slots = sender_slots,
};
