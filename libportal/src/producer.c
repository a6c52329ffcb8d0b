/* QueueProducer: the producer's end of a user->kernel queue (fayt/queue.h,
 * docs/queue.md), the one binding of fayt_queue_put.
 *
 * The queue's address and its eventfd are given once; the object keeps the
 * seq of the last record put, so a put takes only its payload.  put() is
 * the hot path of Queue.put: it never waits and keeps the GIL, which makes
 * it one step for the other threads of this process (a cffi call's argument
 * checks, its GIL hand-off and the Python lock around it cost twice the put
 * itself).  put_raw() may wait for space with the GIL released; while it
 * does, `busy` is set and put() answers EBUSY, so that the caller takes the
 * slow path, whose lock (libportal/queue.py) orders it behind the waiter:
 * only one thread writes the ring at a time.
 *
 * The ring is mapped by Python; close() is called before it is unmapped,
 * after which every call answers EBADF instead of touching it.
 * GIL: the fields are read and written with it held; put_raw works on copies
 * taken before it lets the GIL go.
 */
#include "fastpath.h"

#include <errno.h>

#include "fayt/queue.h"

typedef struct {
    PyObject_HEAD
    void *q;                    /* the mapped queue; NULL once closed */
    int efd;                    /* faytd's wake-up eventfd */
    int busy;                   /* put_raw waits with the GIL released */
    uint32_t seq;               /* the seq of the last record put */
} QueueProducer;

static int producer_init(QueueProducer *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"queue", "efd", NULL};
    unsigned long long q = 0;
    int efd = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|$i", kwlist, &q, &efd))
        return -1;
    if (!q) {
        PyErr_SetString(PyExc_ValueError, "queue: the address of a mapped queue, not 0");
        return -1;
    }
    self->q = (void *)(uintptr_t)q;
    self->efd = efd;
    self->busy = 0;
    self->seq = 0;
    return 0;
}

/* put(payload) -> 0 or an errno; never waits.  EAGAIN: full; EBUSY:
 * another thread's put_raw waits for space; EINVAL: too long. */
static PyObject *producer_put(QueueProducer *self, PyObject *payload)
{
    Py_buffer b;
    int r;
    uint32_t put = 0;
    if (PyObject_GetBuffer(payload, &b, PyBUF_SIMPLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "put: payload: a bytes-like object is required, "
                         "not %.100s", Py_TYPE(payload)->tp_name);
        }
        return NULL;
    }
    if (!self->q)
        r = EBADF;
    else if (self->busy)
        r = EBUSY;
    else if (b.len > FAYT_QUEUE_PAYLOAD_MAX)
        r = EINVAL;
    else {
        r = fayt_queue_put(self->q, FAYT_QREC_DATA, b.buf, (uint32_t)b.len, 1, self->seq + 1,
                           0, self->efd, &put);
        if (put)
            self->seq += 1;
    }
    PyBuffer_Release(&b);
    return PyLong_FromLong(r);
}

/* put_raw(type, payloads, length, n, timeout_ns) -> (err, put, first_seq) */
static PyObject *producer_put_raw(QueueProducer *self, PyObject *const *args, Py_ssize_t n)
{
    if (n != 5) {
        PyErr_SetString(PyExc_TypeError, "put_raw takes 5 arguments");
        return NULL;
    }
    unsigned long type = PyLong_AsUnsignedLong(args[0]);
    unsigned long length = PyLong_AsUnsignedLong(args[2]);
    unsigned long count = PyLong_AsUnsignedLong(args[3]);
    long long timeout_ns = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (type > 0xffff || length > 0xffffffffUL || count > 0xffffffffUL) {
        PyErr_SetString(PyExc_ValueError, "put_raw: type, length or n out of range");
        return NULL;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(args[1], &b, PyBUF_SIMPLE) < 0)
        return NULL;
    uint32_t put = 0, first = self->seq + 1;
    int r;
    if ((size_t)b.len < (size_t)length * count) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "put_raw: payloads shorter than length * n");
        return NULL;
    }
    if (!self->q)
        r = EBADF;
    else if (self->busy)
        r = EBUSY;
    else if (timeout_ns == 0) {
        r = fayt_queue_put(self->q, (uint16_t)type, b.buf, (uint32_t)length, (uint32_t)count,
                           first, 0, self->efd, &put);
    } else {
        void *q = self->q;
        int efd = self->efd;
        self->busy = 1;
        Py_BEGIN_ALLOW_THREADS
        r = fayt_queue_put(q, (uint16_t)type, b.buf, (uint32_t)length, (uint32_t)count, first,
                           timeout_ns, efd, &put);
        Py_END_ALLOW_THREADS
        self->busy = 0;
    }
    self->seq += put;
    PyBuffer_Release(&b);
    return Py_BuildValue("(iII)", r, (unsigned)put, (unsigned)first);
}

static PyObject *producer_close(QueueProducer *self, PyObject *unused)
{
    self->q = NULL;
    Py_RETURN_NONE;
}

static PyObject *producer_repr(QueueProducer *self)
{
    char addr[24];
    snprintf(addr, sizeof addr, "%#zx", (size_t)(uintptr_t)self->q);
    return PyUnicode_FromFormat("<%s queue=%s efd=%d seq=%u%s>", _PyType_Name(Py_TYPE(self)),
                                addr, self->efd, (unsigned)self->seq,
                                self->q ? "" : " closed");
}

static PyObject *producer_closed(QueueProducer *self, void *c) { return PyBool_FromLong(!self->q); }
static PyObject *producer_seq(QueueProducer *self, void *c) { return PyLong_FromUnsignedLong(self->seq); }

static PyMethodDef producer_methods[] = {
    {"put", (PyCFunction)producer_put, METH_O,
     "put($self, payload, /)\n--\n\n"
     "One data record, never waiting, the GIL held: 0, or an errno (EAGAIN full, EBUSY "
     "another thread's put_raw waits, EINVAL too long, EPROTO, EPIPE, EBADF)."},
    {"put_raw", (PyCFunction)(void (*)(void))producer_put_raw, METH_FASTCALL,
     "put_raw($self, type, payloads, length, n, timeout_ns, /)\n--\n\n"
     "fayt_queue_put of n records of length bytes each, waiting up to timeout_ns (-1: for "
     "ever) for space with the GIL released: (err, put, first_seq)."},
    {"close", (PyCFunction)producer_close, METH_NOARGS,
     "close($self, /)\n--\n\n"
     "Forget the queue (before it is unmapped): every later call answers EBADF."},
    {NULL}
};

static PyGetSetDef producer_getset[] = {
    {"closed", (getter)producer_closed, NULL, "close() was called", NULL},
    {"seq", (getter)producer_seq, NULL, "the seq of the last record put", NULL},
    {NULL}
};

static PyType_Slot producer_slots[] = {
    {Py_tp_doc, "QueueProducer(queue, *, efd=-1)\n--\n\n"
                "The producer's end of a mapped user->kernel queue: queue its address, efd "
                "faytd's wake-up eventfd."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, producer_init},
    {Py_tp_dealloc, fp_plain_dealloc},
    {Py_tp_repr, producer_repr},
    {Py_tp_methods, producer_methods},
    {Py_tp_getset, producer_getset},
    {0, NULL},
};

PyType_Spec fp_producer_spec = {
    .name = "libportal._fastpath.QueueProducer",
    .basicsize = sizeof(QueueProducer),
    .flags = Py_TPFLAGS_DEFAULT
#ifdef Py_TPFLAGS_IMMUTABLETYPE
             | Py_TPFLAGS_IMMUTABLETYPE
#endif
    ,
    .slots = producer_slots,
};
