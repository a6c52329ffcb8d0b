/* fastpath.h: what the files of the _fastpath extension share (internal).
 *
 *   fastpath.c    the module: its state, multi-phase init, errors
 *   region.c      Region: mapped memory whose memoryviews are counted
 *   sharepoint.c  SharePointCore: the share-point lock and fused access
 *   dispatch.c    the dispatch point (hint_*) and the target's dispatch step
 *   sender.c      SenderRing: a sender's end of a ring (post, wait for the return)
 *   producer.c    QueueProducer: the producer's end of a user->kernel queue
 *   transport.c   Transport: one system call to faytd, its Reply, its mapping
 *
 * State lives in the module (fastpath_state), one per interpreter that
 * imports the module; an object that needs it on a hot path keeps a
 * pointer to it (its type keeps the module alive, so the pointer does too).
 *
 * The GIL: every file relies on it.  Methods run with it held, and what the
 * threads of this process share (a SharePointCore's fields, the robust
 * records of a context page, the registered hints, a Region's export count)
 * is read and written with it held, with no lock of its own; the places
 * where that matters say so ("GIL:").  The module is therefore marked
 * Py_MOD_GIL_USED: a free-threaded build turns the GIL on when it is
 * imported.
 */
#ifndef FAYT_SRC_FASTPATH_H
#define FAYT_SRC_FASTPATH_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>

#include "fayt/context.h"

#define FASTPATH_ABI 10

/* PyThread_get_thread_ident() is pthread_self() on Linux; called directly
 * it costs no call into libpython on the lock's hot path. */
#define THREAD_IDENT() ((unsigned long)pthread_self())

/* -- the pending hint: share-point calls as dispatch points (dispatch.c) -- */
#define HINT_MAX 4
struct fp_hints {
    int n;                                  /* registered hint words */
    int in_hook;                            /* the hook runs: no dispatch inside it */
    unsigned long main_ident;               /* Python's main thread */
    uint32_t *word[HINT_MAX];               /* fayt_notify_hint.posted of a runtime's context */
    uint32_t seen[HINT_MAX];                /* its value when last dispatched */
    uint32_t *depth[HINT_MAX];              /* that context page's notify.depth */
    struct fayt_context_page *page[HINT_MAX];   /* that context page */
    PyObject *hook[HINT_MAX];               /* the runtime's dispatch: () -> bool */
};

typedef struct {
    PyTypeObject *sharepoint_type;          /* SharePointCore */
    PyTypeObject *region_type;              /* Region */
    PyTypeObject *sender_type;              /* SenderRing */
    PyTypeObject *producer_type;            /* QueueProducer */
    PyTypeObject *transport_type;           /* Transport */
    PyTypeObject *reply_type;               /* Reply: a reply of faytd, by name */
    PyTypeObject *portal_reply_type;        /* PortalReply: struct fayt_portal_reply */
    PyObject *error_factory;                /* f(errno, message) -> exception, or NULL */
    struct fp_hints hints;
} fastpath_state;

/* -- fastpath.c: the module ------------------------------------------------ */
extern struct PyModuleDef fp_module_def;

/* The state of the module that defined type (or a base of it), or NULL
 * with an exception set.  A walk of the MRO: not for hot paths. */
fastpath_state *fp_state_of_type(PyTypeObject *type);

/* Raise the error factory's exception for err (OSError without one);
 * NULL.  _fmt: the message as PyUnicode_FromFormat. */
PyObject *fp_raise(fastpath_state *st, int err, const char *msg);
PyObject *fp_raise_fmt(fastpath_state *st, int err, const char *fmt, ...);

/* An address passed as an int: 0, or -1 with an exception set. */
int fp_addr_arg(PyObject *o, void **out);

/* tp_dealloc of a heap type whose objects hold no references. */
void fp_plain_dealloc(PyObject *self);

/* -- region.c -------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    char *addr;                 /* NULL once closed: no new views */
    Py_ssize_t length;
    int readonly;
    Py_ssize_t exports;         /* GIL: counted by the buffer calls, which hold it */
    uintptr_t unmap_addr;       /* orphaned: munmap this when exports reach 0 */
    size_t unmap_length;
} Region;

extern PyType_Spec fp_region_spec;
PyObject *fp_region_new(fastpath_state *st, void *addr, Py_ssize_t length, int readonly);
PyObject *fp_region_close(Region *self, PyObject *unused);
PyObject *fp_region_orphan(Region *self, PyObject *args);

/* -- sharepoint.c ---------------------------------------------------------- */
extern PyType_Spec fp_sharepoint_spec;

/* -- sender.c -------------------------------------------------------------- */
extern PyType_Spec fp_sender_spec;

/* -- producer.c ------------------------------------------------------------ */
extern PyType_Spec fp_producer_spec;

/* -- dispatch.c ------------------------------------------------------------ */
extern PyMethodDef fp_dispatch_functions[];
int fp_hint_check(fastpath_state *st);
void fp_hints_init(struct fp_hints *h);
void fp_hints_clear(struct fp_hints *h);
int fp_hints_traverse(struct fp_hints *h, visitproc visit, void *arg);

/* The dispatch point of a share-point call: returns NULL from the calling
 * method if a hook raised.  With no hint registered it is one load and a
 * compare; fp_hint_check is out of line. */
#define DISPATCH_POINT(st)                                                          \
    do {                                                                            \
        if (__builtin_expect((st)->hints.n != 0, 0) && fp_hint_check(st) < 0)       \
            return NULL;                                                            \
    } while (0)

/* -- inject.c: faults injected in this process (docs/testing.md) ---------- */
extern PyMethodDef fp_inject_functions[];
uint64_t fp_splitmix64(uint64_t x);
int fp_inject_fires(struct fayt_context_page *p, uint32_t kind, uint32_t match, int match_arg,
                    uint32_t *arg_out);
void fp_inject_die(void);
void fp_inject_lock_taken(struct fayt_context_page *p, uint32_t sp_id);
int fp_inject_doorbell(struct fayt_context_page *p, int64_t *delay_ns);

/* Whether a fault of one of kinds may be injected in page's process: one
 * load (fayt/context.h, plan.kinds). */
#define INJECT_ARMED(page, which) \
    __builtin_expect(__atomic_load_n(&(page)->inject.kinds, __ATOMIC_RELAXED) & (which), 0)

/* -- transport.c ----------------------------------------------------------- */
extern PyType_Spec fp_transport_spec;
extern PyStructSequence_Desc fp_reply_desc;
extern PyStructSequence_Desc fp_portal_reply_desc;
/* Field numbers of a Reply and of a PortalReply (transport.c's descs). */
enum { FP_REPLY_BODY, FP_REPLY_FDS, FP_REPLY_OP, FP_REPLY_SEQ, FP_REPLY_ERR, FP_REPLY_PORTAL,
       FP_REPLY_ADDR, FP_REPLY_MAP_ERR, FP_REPLY_PADDR };
enum { FP_PORTAL_HANDLE, FP_PORTAL_MAP_LENGTH, FP_PORTAL_DATA_OFFSET, FP_PORTAL_SP_ID,
       FP_PORTAL_NFRAMES, FP_PORTAL_PROT, FP_PORTAL_FLAGS };

#endif
