/* Region: memory a memoryview may be made of, with its exports counted.
 *
 * A memoryview cannot be invalidated once made, so, as mmap.mmap does, the
 * owner refuses to unmap while any exists (BufferError): Portal.buf and
 * SharePoint.view() are memoryviews of a Region, and every memoryview made
 * from those (slices, casts) holds the same export until it is released
 * or collected.  close() fails while exports remain; orphan() (a connection
 * closed under live views) leaves the memory mapped until the last export
 * goes, then unmaps it.
 *
 * GIL: the buffer calls run with it held, so `exports` needs no atomics.
 */
#include "fastpath.h"

#include <errno.h>
#include <stdio.h>

#include "fayt/lock.h"

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
        fastpath_state *st = fp_state_of_type(Py_TYPE(self));
        if (st)
            fp_raise(st, EBADF, "portal is unmapped");
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

PyObject *fp_region_close(Region *self, PyObject *unused)
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

PyObject *fp_region_orphan(Region *self, PyObject *args)
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

static PyObject *region_repr(Region *self)
{
    char addr[24];          /* PyUnicode_FromFormat has no %#zx */
    snprintf(addr, sizeof addr, "%#zx", (size_t)(uintptr_t)self->addr);
    return PyUnicode_FromFormat("<%s addr=%s length=%zd%s exports=%zd%s>",
                                _PyType_Name(Py_TYPE(self)), addr, self->length,
                                self->readonly ? " readonly" : "", self->exports,
                                self->addr && !self->unmap_addr ? "" : " closed");
}

PyObject *fp_region_new(fastpath_state *st, void *addr, Py_ssize_t length, int readonly)
{
    Region *r = PyObject_New(Region, st->region_type);
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

static PyMethodDef region_methods[] = {
    {"close", (PyCFunction)fp_region_close, METH_NOARGS,
     "close($self, /)\n--\n\n"
     "Forget the memory; BufferError while memoryviews of it exist."},
    {"orphan", (PyCFunction)fp_region_orphan, METH_VARARGS,
     "orphan($self, addr, length, /)\n--\n\n"
     "If memoryviews of it exist, munmap(addr, length) when the last goes and return True; "
     "else return False and do nothing."},
    {NULL}
};

static PyGetSetDef region_getset[] = {
    {"exports", (getter)region_exports, NULL, "buffers exported (live memoryviews)", NULL},
    {NULL}
};

static PyType_Slot region_slots[] = {
    {Py_tp_doc, "Region(addr, length, readonly)\n--\n\n"
                "Mapped memory whose memoryviews are counted."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, region_init},
    {Py_tp_dealloc, fp_plain_dealloc},
    {Py_tp_repr, region_repr},
    {Py_bf_getbuffer, region_getbuffer},
    {Py_bf_releasebuffer, region_releasebuffer},
    {Py_tp_methods, region_methods},
    {Py_tp_getset, region_getset},
    {0, NULL},
};

PyType_Spec fp_region_spec = {
    .name = "libportal._fastpath.Region",
    .basicsize = sizeof(Region),
    .flags = Py_TPFLAGS_DEFAULT
#ifdef Py_TPFLAGS_IMMUTABLETYPE
             | Py_TPFLAGS_IMMUTABLETYPE
#endif
    ,
    .slots = region_slots,
};
