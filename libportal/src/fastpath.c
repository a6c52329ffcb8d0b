/* _fastpath: libportal's CPython extension for the calls whose cost is the
 * call itself (the share-point lock, a notification's post and dispatch, the
 * system call to faytd), where a cffi call's ~100 ns of argument checks and
 * GIL hand-off would be most of it.  This file is the module: its state,
 * its multi-phase initialisation (PEP 489) and how it raises errors; the
 * objects are in their own files (fastpath.h lists them).
 *
 * Module state, not file statics: each interpreter that imports the module
 * gets its own error factory, types and hint registrations (the hooks are
 * that interpreter's objects).  Nothing of this module is process-global.
 * (ring.c, linked in for its ring calls, keeps one static of its own: a
 * cache of whether futex_waitv exists.)
 */
#include "fastpath.h"

#include <errno.h>
#include <stdarg.h>

/* -- errors ------------------------------------------------------------------ */

PyObject *fp_raise(fastpath_state *st, int err, const char *msg)
{
    if (st->error_factory) {
        PyObject *exc = PyObject_CallFunction(st->error_factory, "is", err, msg);
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

PyObject *fp_raise_fmt(fastpath_state *st, int err, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    PyObject *m = PyUnicode_FromFormatV(fmt, va);
    va_end(va);
    if (m) {
        const char *s = PyUnicode_AsUTF8(m);
        if (s)
            fp_raise(st, err, s);
        Py_DECREF(m);
    }
    return NULL;
}

int fp_addr_arg(PyObject *o, void **out)
{
    unsigned long long a = PyLong_AsUnsignedLongLong(o);
    if (a == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (void *)(uintptr_t)a;
    return 0;
}

static PyObject *set_error_factory(PyObject *mod, PyObject *f)
{
    fastpath_state *st = PyModule_GetState(mod);
    Py_INCREF(f);
    Py_XSETREF(st->error_factory, f);
    Py_RETURN_NONE;
}

/* The dealloc of a heap type whose objects hold no references (Region,
 * SenderRing, Transport): free it, then drop the reference each instance
 * of a heap type holds to its type. */
void fp_plain_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* -- the module ------------------------------------------------------------ */

fastpath_state *fp_state_of_type(PyTypeObject *type)
{
#if PY_VERSION_HEX >= 0x030B0000
    PyObject *m = PyType_GetModuleByDef(type, &fp_module_def);
    return m ? PyModule_GetState(m) : NULL;
#else
    /* PyType_GetModuleByDef (3.11) by hand: the first type of the MRO
     * that this module defined. */
    PyObject *mro = type->tp_mro;
    for (Py_ssize_t i = 0; mro && i < PyTuple_GET_SIZE(mro); i++) {
        PyTypeObject *t = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        if (!PyType_HasFeature(t, Py_TPFLAGS_HEAPTYPE))
            continue;
        PyObject *m = ((PyHeapTypeObject *)t)->ht_module;
        if (m && PyModule_GetDef(m) == &fp_module_def)
            return PyModule_GetState(m);
    }
    PyErr_Format(PyExc_TypeError, "PyType_GetModuleByDef: No superclass of '%s' has "
                 "the given module", type->tp_name);
    return NULL;
#endif
}

/* The main thread's ident: threading's, if it can tell (the module may be
 * imported by another thread first), else the importing thread's. */
static unsigned long main_thread_ident(void)
{
    unsigned long ident = PyThread_get_thread_ident();
    PyObject *th = PyImport_ImportModule("threading");
    PyObject *mt = th ? PyObject_CallMethod(th, "main_thread", NULL) : NULL;
    PyObject *id = mt ? PyObject_GetAttrString(mt, "ident") : NULL;
    if (id && PyLong_Check(id))
        ident = PyLong_AsUnsignedLong(id);
    Py_XDECREF(id);
    Py_XDECREF(mt);
    Py_XDECREF(th);
    PyErr_Clear();
    return ident;
}

/* Keep type (new, or NULL with an exception set) in *slot and add it to
 * the module: 0, or -1. */
static int add_type(PyObject *m, PyTypeObject **slot, PyObject *type)
{
    *slot = (PyTypeObject *)type;
    return type && PyModule_AddType(m, *slot) == 0 ? 0 : -1;
}

static int fastpath_exec(PyObject *m)
{
    fastpath_state *st = PyModule_GetState(m);
    fp_hints_init(&st->hints);
    st->hints.main_ident = main_thread_ident();
    if (add_type(m, &st->sharepoint_type, PyType_FromModuleAndSpec(m, &fp_sharepoint_spec, NULL))
        || add_type(m, &st->region_type, PyType_FromModuleAndSpec(m, &fp_region_spec, NULL))
        || add_type(m, &st->sender_type, PyType_FromModuleAndSpec(m, &fp_sender_spec, NULL))
        || add_type(m, &st->producer_type,
                    PyType_FromModuleAndSpec(m, &fp_producer_spec, NULL))
        || add_type(m, &st->transport_type,
                    PyType_FromModuleAndSpec(m, &fp_transport_spec, NULL))
        || add_type(m, &st->reply_type, (PyObject *)PyStructSequence_NewType(&fp_reply_desc))
        || add_type(m, &st->portal_reply_type,
                    (PyObject *)PyStructSequence_NewType(&fp_portal_reply_desc)))
        return -1;
    if (PyModule_AddFunctions(m, fp_dispatch_functions) < 0
        || PyModule_AddFunctions(m, fp_inject_functions) < 0
        || PyModule_AddIntConstant(m, "ABI_VERSION", FASTPATH_ABI) < 0)
        return -1;
    return 0;
}

static int fastpath_traverse(PyObject *m, visitproc visit, void *arg)
{
    fastpath_state *st = PyModule_GetState(m);
    if (!st)
        return 0;
    Py_VISIT(st->sharepoint_type);
    Py_VISIT(st->region_type);
    Py_VISIT(st->sender_type);
    Py_VISIT(st->producer_type);
    Py_VISIT(st->transport_type);
    Py_VISIT(st->reply_type);
    Py_VISIT(st->portal_reply_type);
    Py_VISIT(st->error_factory);
    return fp_hints_traverse(&st->hints, visit, arg);
}

static int fastpath_clear(PyObject *m)
{
    fastpath_state *st = PyModule_GetState(m);
    if (!st)
        return 0;
    Py_CLEAR(st->sharepoint_type);
    Py_CLEAR(st->region_type);
    Py_CLEAR(st->sender_type);
    Py_CLEAR(st->producer_type);
    Py_CLEAR(st->transport_type);
    Py_CLEAR(st->reply_type);
    Py_CLEAR(st->portal_reply_type);
    Py_CLEAR(st->error_factory);
    fp_hints_clear(&st->hints);         /* the count first: no dispatch to a cleared hook */
    return 0;
}

static void fastpath_free(void *m)
{
    fastpath_clear((PyObject *)m);
}

static PyMethodDef module_methods[] = {
    {"set_error_factory", set_error_factory, METH_O,
     "set_error_factory($module, factory, /)\n--\n\n"
     "factory(errno, message) builds the exception the module raises."},
    {NULL}
};

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, fastpath_exec},
#if PY_VERSION_HEX >= 0x030C0000
    /* Subinterpreters sharing the main GIL: yes (the state is per module);
     * with their own GIL: no, the GIL assumptions above are per process. */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    /* It relies on the GIL (fastpath.h): a free-threaded build enables it. */
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

struct PyModuleDef fp_module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "libportal._fastpath",
    .m_doc = "libportal's hot paths: the share-point lock, notifications, the system call.",
    .m_size = sizeof(fastpath_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = fastpath_traverse,
    .m_clear = fastpath_clear,
    .m_free = fastpath_free,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    return PyModuleDef_Init(&fp_module_def);
}
