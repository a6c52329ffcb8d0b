/* The call transport: the client's system call, one request, one reply.
 *
 * Transport(fd, *, spin_ns=0, max_fds=8): a connection's socket and how it
 * waits, given once; then
 *     call(msg, seq, fds=None, portal=None) -> Reply
 *     send(msg, fds=None)                   (a FAYT_REQ_NOREPLY request)
 *     next_reply(seq, portal=None) -> Reply (wait for one more reply)
 *
 * Sends msg (next_reply: nothing, only waits for the next reply), with fds
 * as SCM_RIGHTS when given, on the SOCK_SEQPACKET socket and (not send)
 * reads one message.  faytd answers most calls within a few microseconds,
 * and on a virtual machine a sleeping receiver costs a wake-up worth many of
 * those (cross-CPU wake-ups were ~50-70 us on the Firecracker VM this was
 * measured on, a round trip ~15 us without), so the wait spins first: for up
 * to HELD_SPIN_NS it looks with a non-blocking recvmsg, the GIL held (a
 * short hold costs other threads less than a GIL hand-off, which a busy
 * thread can stretch to the switch interval, 5 ms), then, up to spin_ns, it
 * polls with the GIL released, and then sleeps in poll(2).  Between looks it
 * gives the CPU away (fayt_spin_pause: sched_yield) and runs Python's signal
 * handlers.  The reply itself is always read with the GIL held.
 *
 * seq: this request's.  A reply whose seq is not seq is not this call's
 * (a call abandoned when a signal handler raised): its descriptors are
 * closed at once, before any Python code runs, and its fds are empty.
 * portal: None, or (addr, prot, share) for a PORTAL call.  If the reply is
 * that call's success with its one fd, the object is mapped (at addr or
 * anywhere, MADV_DONTFORK, read-write for a share-point: its lock byte must
 * be writable) and the fd closed before any Python object is made (a
 * collection could run finalizers that hand the GIL to another thread), so
 * no fork() of another thread can inherit it: faytd may reuse the object of
 * a share-point this context destroys for its next one, and nobody else
 * may hold a descriptor of it.  The Reply's portal is then the
 * fayt_portal_reply (a PortalReply, named fields), addr the address (0 if
 * mmap failed: map_err says why), paddr the physical addresses, and fds is
 * empty; otherwise portal and paddr are None.
 *
 * A signal handler that raises ends the call with its exception (the reply,
 * if one comes, is then another call's to skip).  Received descriptors are
 * close-on-exec.  OSError on a failed send or receive; EPROTO (the fds
 * closed) for a reply cut short (MSG_TRUNC, MSG_CTRUNC), shorter than
 * struct fayt_rep_hdr or with a bad magic, or a portal reply that does not
 * add up; ConnectionResetError when faytd closed the connection.  The
 * reply comes back parsed, as a Reply (named fields): its body (after the
 * header), fds, and the header's op, seq and err.
 *
 * GIL: the call's descriptors are closed or mapped before any Python object
 * is made, and a fork() in another thread needs the GIL (os.fork holds it),
 * so that no child inherits one.  Without the GIL another thread could
 * fork between the recvmsg and the close.
 */
#include "fastpath.h"

#include <structmember.h>

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fayt/common/deadline.h"
#include "fayt/common/scm.h"
#include "fayt/lock.h"
#include "fayt/portal.h"
#include "fayt/syscall.h"

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

/* The fayt_portal_reply as a PortalReply: its fields by name. */
static PyObject *portal_reply_new(fastpath_state *st, const struct fayt_portal_reply *r)
{
    PyObject *o = PyStructSequence_New(st->portal_reply_type);
    if (!o)
        return NULL;
    PyObject *v[7] = {
        PyLong_FromUnsignedLongLong(r->handle), PyLong_FromUnsignedLongLong(r->map_length),
        PyLong_FromUnsignedLongLong(r->data_offset), PyLong_FromUnsignedLong(r->sp_id),
        PyLong_FromUnsignedLong(r->nframes), PyLong_FromLong(r->prot),
        PyLong_FromUnsignedLong(r->flags),
    };
    int bad = 0;
    for (int i = 0; i < 7; i++) {
        bad |= v[i] == NULL;
        PyStructSequence_SET_ITEM(o, i, v[i]);      /* NULL items: the dealloc skips them */
    }
    if (bad)
        Py_CLEAR(o);
    return o;
}

static PyObject *paddr_tuple(const struct mapped_reply *m)
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
    return paddr;
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

typedef struct {
    PyObject_HEAD
    fastpath_state *st;         /* its module's (found once, in tp_new) */
    int fd;
    int max_fds;                /* descriptors a reply may carry */
    long long spin_ns;          /* how long a wait spins before it sleeps */
} Transport;

/* One request and (want) its reply: see the top of this file.  msg: NULL
 * sends nothing; fds_obj: NULL or None sends none; portal: Py_None or
 * (addr, prot, share). */
static PyObject *transport_call(Transport *t, PyObject *msg, PyObject *fds_obj, int want,
                                unsigned long expect_seq, PyObject *portal)
{
    fastpath_state *st = t->st;
    int fd = t->fd;
    long long spin_ns = t->spin_ns;
    long max_fds = t->max_fds;
    unsigned long long map_addr = 0;
    int map_prot = 0, map_share = 0, want_map = portal != Py_None;
    if (want_map && !PyArg_ParseTuple(portal, "Kip", &map_addr, &map_prot, &map_share))
        return NULL;
    int sfds[CALL_MAX_FDS];
    Py_ssize_t nsfds = 0;
    if (fds_obj && fds_obj != Py_None) {
        PyObject *seq = PySequence_Fast(fds_obj, "fds: a sequence of ints");
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
    FAYT_SCM_BUFFER(cbuf, CALL_MAX_FDS);
    if (msg) {
        Py_buffer b;
        if (PyObject_GetBuffer(msg, &b, PyBUF_SIMPLE) < 0)
            return NULL;
        struct iovec iov = {b.buf, (size_t)b.len};
        struct msghdr mh = {0};
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        fayt_scm_put(&mh, cbuf.buf, sfds, (int)nsfds);
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
            fayt_spin_pause();      /* the GIL held: see above */
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
                fayt_spin_pause();
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
    int got[CALL_MAX_FDS];
    int ngot = fayt_scm_take(&rh, got, CALL_MAX_FDS);
    if (rh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
        close_fds(got, ngot);
        free(buf);
        return fp_raise(st, EPROTO, (rh.msg_flags & MSG_TRUNC)
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
                return fp_raise(st, EPROTO, "portal: malformed reply from faytd");
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
        return fp_raise(st, EPROTO, (size_t)r < sizeof rep ? "short reply from faytd"
                                   : "reply with a bad magic from faytd");
    }

    /* Python objects now. */
    PyObject *t_ = PyStructSequence_New(st->reply_type);
    PyObject *data = t_ ? PyBytes_FromStringAndSize((const char *)buf + sizeof rep,
                                                    r - (ssize_t)sizeof rep) : NULL;
    PyObject *fds = data ? PyList_New(ngot) : NULL;
    for (int i = 0; fds && i < ngot; i++) {
        PyObject *o = PyLong_FromLong(got[i]);
        if (!o) {
            Py_CLEAR(fds);
            break;
        }
        PyList_SET_ITEM(fds, i, o);
    }
    PyObject *pr = Py_None, *paddr = Py_None, *addr = NULL, *map_err = NULL;
    Py_INCREF(pr);
    Py_INCREF(paddr);
    if (fds && m.done) {
        Py_SETREF(pr, portal_reply_new(st, &m.r));
        Py_SETREF(paddr, pr ? paddr_tuple(&m) : NULL);
    }
    if (pr && paddr) {
        addr = PyLong_FromUnsignedLongLong(m.done ? (unsigned long long)m.addr : 0);
        map_err = PyLong_FromLong(m.done && !m.addr ? m.err : 0);
    }
    PyObject *op = map_err ? PyLong_FromUnsignedLong(rep.op) : NULL;
    PyObject *sq = op ? PyLong_FromUnsignedLong(rep.seq) : NULL;
    PyObject *err = sq ? PyLong_FromLong(rep.err) : NULL;
    int ok = err != NULL;
    if (t_) {
        PyObject *items[] = {data, fds, op, sq, err, pr, addr, map_err, paddr};
        for (int i = 0; i < 9; i++)
            PyStructSequence_SET_ITEM(t_, i, items[i]);     /* steals; NULLs are skipped */
    } else {
        Py_XDECREF(pr);
        Py_XDECREF(paddr);
    }
    if (!ok) {                      /* out of memory: nothing may stay behind */
        Py_CLEAR(t_);
        close_fds(got, ngot);
        if (m.done && m.addr)
            fayt_unmap(m.addr, m.r.map_length);
    }
    free(buf);
    return t_;
}

/* -- Transport: the Python object ------------------------------------------ */

static PyObject *transport_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    fastpath_state *st = fp_state_of_type(type);
    if (!st)
        return NULL;
    Transport *self = (Transport *)type->tp_alloc(type, 0);
    if (self) {
        self->st = st;
        self->fd = -1;
        self->max_fds = CALL_MAX_FDS;
    }
    return (PyObject *)self;
}

static int transport_init(Transport *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "spin_ns", "max_fds", NULL};
    int fd, max_fds = CALL_MAX_FDS;
    long long spin_ns = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|$Li", kwlist, &fd, &spin_ns, &max_fds))
        return -1;
    if (fd < 0 || max_fds < 0 || max_fds > CALL_MAX_FDS || spin_ns < 0) {
        PyErr_Format(PyExc_ValueError, "Transport: fd >= 0, spin_ns >= 0, max_fds 0..%d",
                     CALL_MAX_FDS);
        return -1;
    }
    self->fd = fd;
    self->spin_ns = spin_ns;
    self->max_fds = max_fds;
    return 0;
}

static int seq_arg(PyObject *o, unsigned long *out)
{
    unsigned long v = PyLong_AsUnsignedLong(o);
    if (v == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* call(msg, seq, fds=None, portal=None) -> Reply */
static PyObject *transport_call_m(Transport *self, PyObject *const *args, Py_ssize_t n)
{
    unsigned long seq;
    if (n < 2 || n > 4) {
        PyErr_SetString(PyExc_TypeError, "call takes 2 to 4 arguments");
        return NULL;
    }
    if (seq_arg(args[1], &seq) < 0)
        return NULL;
    return transport_call(self, args[0], n > 2 ? args[2] : NULL, 1, seq,
                          n > 3 ? args[3] : Py_None);
}

/* send(msg, fds=None): a request whose reply nobody waits for. */
static PyObject *transport_send(Transport *self, PyObject *const *args, Py_ssize_t n)
{
    if (n < 1 || n > 2) {
        PyErr_SetString(PyExc_TypeError, "send takes 1 or 2 arguments");
        return NULL;
    }
    return transport_call(self, args[0], n > 1 ? args[1] : NULL, 0, 0, Py_None);
}

/* next_reply(seq, portal=None) -> Reply: sends nothing. */
static PyObject *transport_next_reply(Transport *self, PyObject *const *args, Py_ssize_t n)
{
    unsigned long seq;
    if (n < 1 || n > 2) {
        PyErr_SetString(PyExc_TypeError, "next_reply takes 1 or 2 arguments");
        return NULL;
    }
    if (seq_arg(args[0], &seq) < 0)
        return NULL;
    return transport_call(self, NULL, NULL, 1, seq, n > 1 ? args[1] : Py_None);
}

static PyObject *transport_repr(Transport *self)
{
    return PyUnicode_FromFormat("<%s fd=%d spin_ns=%lld max_fds=%d>", _PyType_Name(Py_TYPE(self)),
                                self->fd, self->spin_ns, self->max_fds);
}

static PyMethodDef transport_methods[] = {
    {"call", (PyCFunction)(void (*)(void))transport_call_m, METH_FASTCALL,
     "call($self, msg, seq, fds=None, portal=None, /)\n--\n\n"
     "One system call to faytd: send msg (with fds as SCM_RIGHTS), wait for the reply, "
     "spinning spin_ns before sleeping.  seq: the request's; portal=(addr, prot, share) "
     "maps a PORTAL reply's object and closes its fd.  A Reply."},
    {"send", (PyCFunction)(void (*)(void))transport_send, METH_FASTCALL,
     "send($self, msg, fds=None, /)\n--\n\n"
     "Send msg (a FAYT_REQ_NOREPLY request): nothing is read."},
    {"next_reply", (PyCFunction)(void (*)(void))transport_next_reply, METH_FASTCALL,
     "next_reply($self, seq, portal=None, /)\n--\n\n"
     "Wait for the next reply without sending (after one that was another call's).  A Reply."},
    {NULL}
};

static PyMemberDef transport_members[] = {
    {"fd", T_INT, offsetof(Transport, fd), READONLY, "the connection's socket"},
    {"spin_ns", T_LONGLONG, offsetof(Transport, spin_ns), READONLY,
     "how long a wait spins before it sleeps"},
    {"max_fds", T_INT, offsetof(Transport, max_fds), READONLY,
     "descriptors a reply may carry"},
    {NULL}
};

static PyType_Slot transport_slots[] = {
    {Py_tp_doc, "Transport(fd, *, spin_ns=0, max_fds=8)\n--\n\n"
                "A connection's socket to faytd, and how its calls wait for a reply."},
    {Py_tp_new, transport_new},
    {Py_tp_init, transport_init},
    {Py_tp_dealloc, fp_plain_dealloc},
    {Py_tp_repr, transport_repr},
    {Py_tp_methods, transport_methods},
    {Py_tp_members, transport_members},
    {0, NULL},
};

PyType_Spec fp_transport_spec = {
    .name = "libportal._fastpath.Transport",
    .basicsize = sizeof(Transport),
    .flags = Py_TPFLAGS_DEFAULT
#ifdef Py_TPFLAGS_IMMUTABLETYPE
             | Py_TPFLAGS_IMMUTABLETYPE
#endif
    ,
    .slots = transport_slots,
};

/* -- the replies, by name ---------------------------------------------------- */

static PyStructSequence_Field portal_reply_fields[] = {
    {"handle", "faytd's handle of the mapping"},
    {"map_length", "bytes mapped"},
    {"data_offset", "offset of a share-point's data from the mapping (0 for other portals)"},
    {"sp_id", "the share-point's id (a SPECIAL portal's region id)"},
    {"nframes", "frames of the object (physical addresses that follow)"},
    {"prot", "protection granted"},
    {"flags", "FAYT_PORTAL_REPLY_* bits"},
    {NULL}
};

PyStructSequence_Desc fp_portal_reply_desc = {
    "libportal._fastpath.PortalReply",
    "struct fayt_portal_reply, by name: PortalReply(sequence of its 7 fields).",
    portal_reply_fields, 7,
};

static PyStructSequence_Field reply_fields[] = {
    {"body", "the reply after its header (bytes)"},
    {"fds", "the descriptors it carried (a list; empty once a portal was mapped)"},
    {"op", "the header's op"},
    {"seq", "the header's seq"},
    {"err", "the header's err: 0, or the errno of the refusal (body: its message)"},
    {"portal", "a PORTAL call's PortalReply when its object was mapped, else None"},
    {"addr", "where that object was mapped (0: mmap failed, or no portal)"},
    {"map_err", "mmap's errno when it failed, else 0"},
    {"paddr", "the object's physical addresses (a tuple), or None"},
    {NULL}
};

PyStructSequence_Desc fp_reply_desc = {
    "libportal._fastpath.Reply",
    "One reply of faytd, read by Transport: its fields by name.",
    reply_fields, 9,
};
