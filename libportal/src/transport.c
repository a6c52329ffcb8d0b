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
#include <sys/syscall.h>
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
    int fd;                     /* -1 once detached (the socket closed or lost) */
    int max_fds;                /* descriptors a reply may carry */
    long long spin_ns;          /* how long a wait spins before it sleeps */
    /* request()'s state: see "The connection's call" below. */
    PyObject *sock;             /* the socket object, closed here when faytd is lost */
    PyThread_type_lock lock;    /* one call in flight */
    uint32_t seq;               /* the last request's seq */
    unsigned long caller;       /* the thread inside request(), or 0 */
    int main_calls;             /* the main thread is in request() */
    char broken;                /* faytd went away (the socket was closed here) */
    char close_pending;         /* close() came from a signal handler inside a call */
    PyObject *unanswered;       /* set: seqs of FAYT_REQ_NOREPLY requests not known done */
    PyObject *abandoned;        /* set: seqs of calls whose wait a signal handler ended */
    PyObject *no_reply;         /* the Reply of a FAYT_REQ_NOREPLY request */
} Transport;

/* How xfer() failed (request() tells faytd's protocol errors, lost
 * connections and Python's own exceptions apart). */
enum { FAIL_NONE, FAIL_PROTO, FAIL_IO, FAIL_OTHER };

/* One request (iov, niov; none if niov is 0) and (want) its reply: see the
 * top of this file.  map: a PORTAL call's (addr, prot, share) if want_map. */
static PyObject *xfer(Transport *t, struct iovec *iov, int niov, const int *sfds, int nsfds,
                      int want, uint32_t expect_seq, int want_map,
                      unsigned long long map_addr, int map_prot, int map_share, int *fail)
{
    fastpath_state *st = t->st;
    int fd = t->fd;
    long long spin_ns = t->spin_ns;
    long max_fds = t->max_fds;
    FAYT_SCM_BUFFER(cbuf, CALL_MAX_FDS);
    *fail = FAIL_OTHER;
    if (niov) {
        struct msghdr mh = {0};
        mh.msg_iov = iov;
        mh.msg_iovlen = niov;
        fayt_scm_put(&mh, cbuf.buf, sfds, nsfds);
        if (send_request(fd, &mh) < 0) {
            if (PyErr_ExceptionMatches(PyExc_OSError))
                *fail = FAIL_IO;
            return NULL;
        }
    }
    if (!want) {
        *fail = FAIL_NONE;
        Py_RETURN_NONE;
    }

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
            *fail = FAIL_IO;
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
            *fail = FAIL_IO;
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
        *fail = FAIL_PROTO;
        return fp_raise(st, EPROTO, (rh.msg_flags & MSG_TRUNC)
                           ? "faytd's reply was longer than FAYT_MSG_MAX"
                           : "faytd's reply carried more descriptors than expected");
    }
    struct fayt_rep_hdr rep;
    struct mapped_reply m = {0};
    if ((size_t)r >= sizeof rep) {
        memcpy(&rep, buf, sizeof rep);
        if (rep.seq != expect_seq) {        /* not this call's: nobody takes them */
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
                *fail = FAIL_PROTO;
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
            *fail = FAIL_IO;
            return NULL;
        }
        *fail = FAIL_PROTO;
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
    if (t_)
        *fail = FAIL_NONE;
    return t_;
}

/* Parse fds_obj (NULL or None: none) into sfds; the count, or -1. */
static Py_ssize_t parse_fds(PyObject *fds_obj, int *sfds)
{
    if (!fds_obj || fds_obj == Py_None)
        return 0;
    PyObject *seq = PySequence_Fast(fds_obj, "fds: a sequence of ints");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > CALL_MAX_FDS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "fds: at most 8");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        sfds[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
    Py_DECREF(seq);
    return PyErr_Occurred() ? -1 : n;
}

/* portal: Py_None, or a PORTAL call's (addr, prot, share): *want says
 * which.  0, or -1 with an exception. */
static int parse_map(PyObject *portal, int *want, unsigned long long *addr, int *prot,
                     int *share)
{
    *want = portal != Py_None;
    return *want && !PyArg_ParseTuple(portal, "Kip", addr, prot, share) ? -1 : 0;
}

/* call/send/next_reply: msg (NULL: send nothing), fds_obj (NULL or None:
 * none), portal (Py_None or (addr, prot, share)). */
static PyObject *transport_call(Transport *t, PyObject *msg, PyObject *fds_obj, int want,
                                unsigned long expect_seq, PyObject *portal)
{
    unsigned long long map_addr = 0;
    int map_prot = 0, map_share = 0, want_map, fail;
    if (parse_map(portal, &want_map, &map_addr, &map_prot, &map_share) < 0)
        return NULL;
    int sfds[CALL_MAX_FDS];
    Py_ssize_t nsfds = parse_fds(fds_obj, sfds);
    if (nsfds < 0)
        return NULL;
    if (t->fd < 0)
        return fp_raise(t->st, EBADF, "the transport's socket is closed");
    if (!msg)
        return xfer(t, NULL, 0, NULL, 0, want, (uint32_t)expect_seq, want_map, map_addr,
                    map_prot, map_share, &fail);
    Py_buffer b;
    if (PyObject_GetBuffer(msg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    struct iovec iov = {b.buf, (size_t)b.len};
    PyObject *r = xfer(t, &iov, 1, sfds, (int)nsfds, want, (uint32_t)expect_seq, want_map,
                       map_addr, map_prot, map_share, &fail);
    PyBuffer_Release(&b);
    return r;
}

/* -- The connection's call: request() ---------------------------------------
 *
 * request(op, body=b"", flags=0, fds=None, portal=None) is a Connection's
 * whole system call: the seq, the header (with the calling thread's Linux
 * tid), the send, the wait, the replies of earlier calls to skip, the
 * error check; what libportal's Connection._call did in Python (about a
 * microsecond a call), kept here in one place:
 *
 * - One call is in flight per connection: `lock` (a Python lock, taken
 *   without releasing the GIL when it is free) serialises threads (a signal
 *   handler's call inside a call of its own thread is EDEADLK); close()
 *   takes it too (`with transport:`) so that the descriptor is not closed
 *   under a call.  `caller` is the thread inside, `main_calls` counts the
 *   main thread in from before it takes the lock to after it let go: a
 *   signal handler that runs in between (the doorbell's) sees the count and
 *   leaves the connection alone, since the lock is not reentrant.
 * - A FAYT_REQ_NOREPLY request is only sent; its seq goes into
 *   `unanswered`.  faytd answers one only if it failed: such a reply, met
 *   while waiting for a later call's, is warned about (RuntimeWarning)
 *   once the lock is let go.
 * - A signal handler that raises while a reply is awaited ends the call
 *   with its exception; its seq goes into `abandoned`, and when its reply
 *   comes (to a later call) a portal it granted is given back at once
 *   (UNMAP, or UNMAP_DESTROY if that call created it, sent unanswered).
 * - faytd answers in order: once a call's own reply came, both sets are
 *   cleared.
 * - A failed send or receive means faytd went away: the socket is closed
 *   here (`broken`; a restarted faytd re-adopts share-points from its
 *   journal, and the context page stays mapped) and the call raises
 *   ECONNRESET.  A reply that breaks the protocol raises EPROTO (cut
 *   short, a bad magic, a malformed portal, a seq that is neither the
 *   call's nor one to skip, another op, a negative err) and closes the
 *   socket too (`broken`): the replies after it could not be matched to
 *   their requests, and a call would take an earlier call's answer.  A
 *   refusal raises the exception of its errno with faytd's message.
 */

/* The calling thread's Linux tid, asked once per thread (and again in a
 * fork() child, whose thread has a tid of its own). */
static __thread pid_t cached_tid;
static pthread_once_t tid_once = PTHREAD_ONCE_INIT;

static void tid_after_fork(void)
{
    cached_tid = 0;
}

static void tid_register(void)
{
    pthread_atfork(NULL, NULL, tid_after_fork);
}

static pid_t my_tid(void)
{
    if (cached_tid == 0) {
        pthread_once(&tid_once, tid_register);
        cached_tid = (pid_t)syscall(SYS_gettid);
    }
    return cached_tid;
}

/* Take t->lock: at once if it is free, else with the GIL released (signal
 * handlers run when the wait is interrupted).  0, or -1 with an exception. */
static int take_lock(Transport *t)
{
    if (PyThread_acquire_lock(t->lock, NOWAIT_LOCK))
        return 0;
    for (;;) {
        PyLockStatus r;
        Py_BEGIN_ALLOW_THREADS
        r = PyThread_acquire_lock_timed(t->lock, -1, 1);
        Py_END_ALLOW_THREADS
        if (r == PY_LOCK_ACQUIRED)
            return 0;
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
}

/* Send h + body (fds with it); 0 or -1 (fail says how). */
static int send_msg(Transport *t, struct fayt_req_hdr *h, const void *body, size_t blen,
                    const int *sfds, int nsfds, int *fail)
{
    struct iovec iov[2] = {{h, sizeof *h}, {(void *)body, blen}};
    PyObject *r = xfer(t, iov, blen ? 2 : 1, sfds, nsfds, 0, 0, 0, 0, 0, 0, fail);
    if (!r)
        return -1;
    Py_DECREF(r);
    return 0;
}

static void fill_header(Transport *t, struct fayt_req_hdr *h, unsigned op, unsigned flags)
{
    h->magic = FAYT_REQ_MAGIC;
    h->op = (uint16_t)op;
    h->flags = (uint16_t)flags;
    h->seq = ++t->seq;
    h->tid = my_tid();
}

static long reply_long(PyObject *reply, int field)
{
    return PyLong_AsLong(PyStructSequence_GET_ITEM(reply, field));
}

static void close_reply_fds(PyObject *reply)
{
    PyObject *fds = PyStructSequence_GET_ITEM(reply, FP_REPLY_FDS);
    for (Py_ssize_t i = 0; fds && PyList_Check(fds) && i < PyList_GET_SIZE(fds); i++)
        close((int)PyLong_AsLong(PyList_GET_ITEM(fds, i)));
    PyErr_Clear();
}

/* The reply of an abandoned call: a portal it granted is unmapped in faytd
 * (destroyed if that call created it) at once, unanswered; its descriptors
 * were closed on receipt and it was never mapped here.  Under the lock.
 * 0, or -1 (fail says how). */
static int give_back(Transport *t, PyObject *reply, int *fail)
{
    PyObject *body = PyStructSequence_GET_ITEM(reply, FP_REPLY_BODY);
    struct fayt_portal_reply pr;
    if (reply_long(reply, FP_REPLY_OP) != FAYT_SYS_PORTAL || reply_long(reply, FP_REPLY_ERR)
        || !PyBytes_Check(body) || (size_t)PyBytes_GET_SIZE(body) < sizeof pr) {
        PyErr_Clear();
        return 0;
    }
    memcpy(&pr, PyBytes_AS_STRING(body), sizeof pr);
    struct fayt_req_hdr h;
    struct fayt_handle_req hr = {pr.handle};
    fill_header(t, &h, (pr.flags & FAYT_PORTAL_REPLY_CREATED) ? FAYT_SYS_UNMAP_DESTROY
                                                              : FAYT_SYS_UNMAP,
                FAYT_REQ_NOREPLY);
    if (send_msg(t, &h, &hr, sizeof hr, NULL, 0, fail) < 0)
        return -1;
    PyObject *s = PyLong_FromUnsignedLong(h.seq);
    int r = s ? PySet_Add(t->unanswered, s) : -1;
    Py_XDECREF(s);
    if (r < 0)
        *fail = FAIL_OTHER;
    return r;
}

/* Whether seq is in set (and take it out): 1, 0, or -1. */
static int take_seq(PyObject *set, PyObject *seq)
{
    if (PySet_GET_SIZE(set) == 0)
        return 0;
    return PySet_Discard(set, seq);
}

/* Close the socket here (its number is never used again by this
 * transport): `broken`.  The exception set, if any, stays.  Under the lock. */
static void drop(Transport *t)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    t->broken = 1;
    t->fd = -1;
    if (t->sock) {
        PyObject *r = PyObject_CallMethod(t->sock, "close", NULL);
        Py_XDECREF(r);
        PyErr_Clear();
    }
    PyErr_Restore(et, ev, tb);
}

/* faytd went away: drop the socket and raise ECONNRESET.  Under the lock. */
static void lost(Transport *t)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *why = ev ? PyObject_GetAttrString(ev, "strerror") : NULL;
    const char *s = why && PyUnicode_Check(why) ? PyUnicode_AsUTF8(why) : NULL;
    if (!s)
        PyErr_Clear();
    drop(t);
    if (t->close_pending)
        fp_raise(t->st, ECONNRESET, "faytd connection closed (close() while this call waited)");
    else
        fp_raise_fmt(t->st, ECONNRESET, "faytd connection lost: %s", s ? s : "closed");
    Py_XDECREF(why);
    Py_XDECREF(et);
    Py_XDECREF(ev);
    Py_XDECREF(tb);
}

/* The late failures met (a list of Replies): one RuntimeWarning each. */
static void warn_late(PyObject *late)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(late); i++) {
        PyObject *g = PyList_GET_ITEM(late, i);
        PyObject *body = PyStructSequence_GET_ITEM(g, FP_REPLY_BODY);
        PyObject *msg = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body),
                                             "replace");
        if (!msg || PyErr_WarnFormat(PyExc_RuntimeWarning, 2,
                                     "[Errno %ld] op %ld (unanswered call %ld) failed in "
                                     "faytd: %U", reply_long(g, FP_REPLY_ERR),
                                     reply_long(g, FP_REPLY_OP), reply_long(g, FP_REPLY_SEQ),
                                     msg) < 0)
            PyErr_WriteUnraisable(NULL);    /* a warning made an error: the call still happened */
        Py_XDECREF(msg);
    }
}

/* request(op, body=b"", flags=0, fds=None, portal=None) -> Reply */
static PyObject *transport_request(Transport *t, PyObject *const *args, Py_ssize_t n)
{
    if (n < 1 || n > 5) {
        PyErr_SetString(PyExc_TypeError, "request takes 1 to 5 arguments");
        return NULL;
    }
    unsigned long op = PyLong_AsUnsignedLong(args[0]);
    unsigned long flags = n > 2 ? PyLong_AsUnsignedLong(args[2]) : 0;
    if (PyErr_Occurred())
        return NULL;
    if (op > 0xffff || flags > 0xffff) {
        PyErr_SetString(PyExc_ValueError, "op and flags: 16 bits");
        return NULL;
    }
    PyObject *portal = n > 4 ? args[4] : Py_None;
    unsigned long long map_addr = 0;
    int map_prot = 0, map_share = 0, want_map;
    if (parse_map(portal, &want_map, &map_addr, &map_prot, &map_share) < 0)
        return NULL;
    int sfds[CALL_MAX_FDS];
    Py_ssize_t nsfds = parse_fds(n > 3 ? args[3] : NULL, sfds);
    if (nsfds < 0)
        return NULL;
    Py_buffer b = {0};
    if (n > 1 && args[1] != Py_None && PyObject_GetBuffer(args[1], &b, PyBUF_SIMPLE) < 0)
        return NULL;
    int noreply = (flags & FAYT_REQ_NOREPLY) != 0;

    unsigned long me = PyThread_get_thread_ident();
    int main = me == t->st->hints.main_ident, fail = FAIL_OTHER;
    PyObject *got = NULL, *late = NULL, *seq;
    struct fayt_req_hdr h = {0};
    if (main)
        t->main_calls++;
    if (t->caller == me) {              /* the lock is not reentrant: it would wait for ever */
        fp_raise(t->st, EDEADLK, "a signal handler called this connection inside a call of "
                                 "its own thread: call it after that call returns");
        goto out;
    }
    if (take_lock(t) < 0)
        goto out;
    if (t->fd < 0) {
        fp_raise(t->st, ECONNRESET, t->broken ? "faytd connection lost"
                                              : "faytd connection closed");
        goto unlock;
    }
    t->caller = me;
    fill_header(t, &h, (unsigned)op, (unsigned)flags);
    if (noreply) {
        if (send_msg(t, &h, b.buf, (size_t)b.len, sfds, (int)nsfds, &fail) == 0
            && (seq = PyLong_FromUnsignedLong(h.seq)) != NULL) {
            if (PySet_Add(t->unanswered, seq) == 0) {
                got = t->no_reply;
                Py_INCREF(got);
            }
            Py_DECREF(seq);
        } else if (fail == FAIL_IO) {
            lost(t);
        }
        goto unlock_caller;
    }
    struct iovec iov[2] = {{&h, sizeof h}, {b.buf, (size_t)b.len}};
    got = xfer(t, iov, b.len ? 2 : 1, sfds, (int)nsfds, 1, h.seq, want_map, map_addr,
               map_prot, map_share, &fail);
    while (got) {                       /* its header was checked in xfer */
        if ((uint32_t)reply_long(got, FP_REPLY_SEQ) == h.seq)
            break;
        PyObject *rseq = PyStructSequence_GET_ITEM(got, FP_REPLY_SEQ);
        int r = take_seq(t->unanswered, rseq);
        if (r > 0) {                    /* a FAYT_REQ_NOREPLY call failed after all */
            if ((!late && !(late = PyList_New(0))) || PyList_Append(late, got) < 0)
                r = -1;
        } else if (r == 0 && (r = take_seq(t->abandoned, rseq)) > 0) {
            r = give_back(t, got, &fail) < 0 ? -1 : 1;
        }
        if (r == 0)
            break;                      /* nobody's: out of step (below) */
        Py_CLEAR(got);
        if (r < 0)
            break;
        got = xfer(t, NULL, 0, NULL, 0, 1, h.seq, want_map, map_addr, map_prot, map_share,
                   &fail);
    }
    if (got && ((uint32_t)reply_long(got, FP_REPLY_SEQ) != h.seq
                || (unsigned long)reply_long(got, FP_REPLY_OP) != op
                || reply_long(got, FP_REPLY_ERR) < 0)) {
        close_reply_fds(got);
        Py_CLEAR(got);
        fail = FAIL_PROTO;
        fp_raise(t->st, EPROTO, "faytd's reply is out of step with the request (the "
                                "connection is closed)");
    }
    if (!got) {
        if (fail == FAIL_IO)
            lost(t);
        else if (fail == FAIL_PROTO)
            drop(t);    /* later replies cannot be matched to their requests */
        else if (fail == FAIL_OTHER) {  /* its reply, when it comes, is given back */
            PyObject *et, *ev, *tb;     /* the handler's exception stays the call's */
            PyErr_Fetch(&et, &ev, &tb);
            seq = PyLong_FromUnsignedLong(h.seq);
            if (!seq || PySet_Add(t->abandoned, seq) < 0)
                PyErr_WriteUnraisable(NULL);
            Py_XDECREF(seq);
            PyErr_Restore(et, ev, tb);
        }
    } else {
        if (PySet_GET_SIZE(t->unanswered))  /* faytd answers in order: the rest succeeded */
            PySet_Clear(t->unanswered);
        if (PySet_GET_SIZE(t->abandoned))
            PySet_Clear(t->abandoned);
    }
unlock_caller:
    t->caller = 0;
unlock:
    PyThread_release_lock(t->lock);
    if (late) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        warn_late(late);
        PyErr_Restore(et, ev, tb);
        Py_DECREF(late);
    }
    if (got && !noreply) {
        long err = reply_long(got, FP_REPLY_ERR);   /* seq, op and err >= 0: checked above */
        if (err) {
            close_reply_fds(got);
            PyObject *body = PyStructSequence_GET_ITEM(got, FP_REPLY_BODY);
            PyObject *msg = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(body),
                                                 PyBytes_GET_SIZE(body), "replace");
            const char *s = msg ? PyUnicode_AsUTF8(msg) : NULL;
            Py_CLEAR(got);
            if (s)
                fp_raise(t->st, (int)err, s);
            Py_XDECREF(msg);
        }
    }
out:
    if (main)
        t->main_calls--;
    if (b.obj)
        PyBuffer_Release(&b);
    return got;
}

/* -- Transport: the Python object ------------------------------------------ */

static PyObject *transport_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    fastpath_state *st = fp_state_of_type(type);
    if (!st)
        return NULL;
    Transport *self = (Transport *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    self->st = st;
    self->fd = -1;
    self->max_fds = CALL_MAX_FDS;
    self->lock = PyThread_allocate_lock();
    self->unanswered = PySet_New(NULL);
    self->abandoned = PySet_New(NULL);
    self->no_reply = PyStructSequence_New(st->reply_type);
    if (!self->lock || !self->unanswered || !self->abandoned || !self->no_reply) {
        Py_DECREF(self);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    PyObject *items[] = {PyBytes_FromStringAndSize("", 0), PyTuple_New(0), PyLong_FromLong(0),
                         PyLong_FromLong(0), PyLong_FromLong(0), Py_None, PyLong_FromLong(0),
                         PyLong_FromLong(0), Py_None};
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    int bad = 0;
    for (int i = 0; i < 9; i++) {
        bad |= items[i] == NULL;
        PyStructSequence_SET_ITEM(self->no_reply, i, items[i]);
    }
    if (bad) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void transport_dealloc(Transport *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->lock)
        PyThread_free_lock(self->lock);
    Py_CLEAR(self->sock);
    Py_CLEAR(self->unanswered);
    Py_CLEAR(self->abandoned);
    Py_CLEAR(self->no_reply);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int transport_init(Transport *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "spin_ns", "max_fds", "sock", NULL};
    int fd, max_fds = CALL_MAX_FDS;
    long long spin_ns = 0;
    PyObject *sock = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|$LiO", kwlist, &fd, &spin_ns, &max_fds,
                                     &sock))
        return -1;
    if (fd < 0 || max_fds < 0 || max_fds > CALL_MAX_FDS || spin_ns < 0) {
        PyErr_Format(PyExc_ValueError, "Transport: fd >= 0, spin_ns >= 0, max_fds 0..%d",
                     CALL_MAX_FDS);
        return -1;
    }
    self->fd = fd;
    self->spin_ns = spin_ns;
    self->max_fds = max_fds;
    Py_XSETREF(self->sock, sock == Py_None ? NULL : (Py_INCREF(sock), sock));
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

/* The call lock, for Connection.close(): `with transport:` */
static PyObject *transport_acquire(Transport *self, PyObject *unused)
{
    if (take_lock(self) < 0)
        return NULL;
    Py_RETURN_TRUE;
}

static PyObject *transport_release(Transport *self, PyObject *const *args, Py_ssize_t n)
{
    PyThread_release_lock(self->lock);
    Py_RETURN_NONE;
}

/* detach(): the socket is being closed (under the lock): no call uses its
 * number again. */
static PyObject *transport_detach(Transport *self, PyObject *unused)
{
    self->fd = -1;
    Py_RETURN_NONE;
}

static PyObject *transport_repr(Transport *self)
{
    return PyUnicode_FromFormat("<%s fd=%d spin_ns=%lld max_fds=%d>", _PyType_Name(Py_TYPE(self)),
                                self->fd, self->spin_ns, self->max_fds);
}

static PyMethodDef transport_methods[] = {
    {"request", (PyCFunction)(void (*)(void))transport_request, METH_FASTCALL,
     "request($self, op, body=b'', flags=0, fds=None, portal=None, /)\n--\n\n"
     "A connection's system call, whole: seq and header, send (fds as SCM_RIGHTS), wait, "
     "skip earlier calls' replies, check.  A Reply, or the errno's exception with faytd's "
     "message; ECONNRESET when faytd went away (the socket is closed).  flags with "
     "FAYT_REQ_NOREPLY: sent only.  portal=(addr, prot, share) maps a PORTAL reply's object."},
    {"call", (PyCFunction)(void (*)(void))transport_call_m, METH_FASTCALL,
     "call($self, msg, seq, fds=None, portal=None, /)\n--\n\n"
     "One exchange, by hand: send msg (with fds as SCM_RIGHTS), wait for the reply, "
     "spinning spin_ns before sleeping.  seq: the request's; portal=(addr, prot, share) "
     "maps a PORTAL reply's object and closes its fd.  A Reply.  Not locked: request() is "
     "the connection's call."},
    {"send", (PyCFunction)(void (*)(void))transport_send, METH_FASTCALL,
     "send($self, msg, fds=None, /)\n--\n\n"
     "Send msg (a FAYT_REQ_NOREPLY request): nothing is read."},
    {"next_reply", (PyCFunction)(void (*)(void))transport_next_reply, METH_FASTCALL,
     "next_reply($self, seq, portal=None, /)\n--\n\n"
     "Wait for the next reply without sending (after one that was another call's).  A Reply."},
    {"acquire", (PyCFunction)transport_acquire, METH_NOARGS,
     "acquire($self, /)\n--\n\nTake the call lock (waits; signal handlers run)."},
    {"release", (PyCFunction)(void (*)(void))transport_release, METH_FASTCALL,
     "release($self, /)\n--\n\nLet the call lock go."},
    {"__enter__", (PyCFunction)transport_acquire, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))transport_release, METH_FASTCALL, NULL},
    {"detach", (PyCFunction)transport_detach, METH_NOARGS,
     "detach($self, /)\n--\n\nForget the socket (it is being closed, under the lock)."},
    {NULL}
};

static PyMemberDef transport_members[] = {
    {"fd", T_INT, offsetof(Transport, fd), READONLY, "the connection's socket (-1: detached)"},
    {"spin_ns", T_LONGLONG, offsetof(Transport, spin_ns), READONLY,
     "how long a wait spins before it sleeps"},
    {"max_fds", T_INT, offsetof(Transport, max_fds), READONLY,
     "descriptors a reply may carry"},
    {"seq", T_UINT, offsetof(Transport, seq), READONLY, "the last request's seq"},
    {"caller", T_ULONG, offsetof(Transport, caller), READONLY,
     "the thread ident inside request(), or 0"},
    {"main_calls", T_INT, offsetof(Transport, main_calls), READONLY,
     "the main thread is inside request() (from before its lock to after)"},
    {"broken", T_BOOL, offsetof(Transport, broken), READONLY,
     "faytd went away: the socket was closed by a failed call"},
    {"close_pending", T_BOOL, offsetof(Transport, close_pending), 0,
     "close() came from a signal handler inside a call"},
    {"unanswered", T_OBJECT, offsetof(Transport, unanswered), READONLY,
     "seqs of FAYT_REQ_NOREPLY requests not yet known done (a set)"},
    {"abandoned", T_OBJECT, offsetof(Transport, abandoned), READONLY,
     "seqs of calls a signal handler ended while they waited (a set)"},
    {NULL}
};

static PyType_Slot transport_slots[] = {
    {Py_tp_doc, "Transport(fd, *, spin_ns=0, max_fds=8, sock=None)\n--\n\n"
                "A connection's socket to faytd, its call lock, and how its calls wait for a "
                "reply.  sock: the socket object, closed by a call that finds faytd gone."},
    {Py_tp_new, transport_new},
    {Py_tp_init, transport_init},
    {Py_tp_dealloc, transport_dealloc},
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
