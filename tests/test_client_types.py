"""The client's C types and functions (libportal._fastpath) as Python sees
them: dir(), help(), inspect.signature and repr work on each, and the module
keeps its state per module object (multi-phase init), not in the process.
"""
import ctypes
import errno
import glob
import importlib.util
import mmap
import inspect
import os
import pydoc
import re
import runpy
import types

import pytest

from libportal import _fastpath
from libportal._abi import ffi, lib, HANDLE_REQ
from libportal.portal_req import encode_portal_req

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from test_sharepoint import names  # noqa: F401

SHAREPOINT_SIGNATURES = {
    "lock": "(timeout=None)",
    "try_lock": "()",
    "unlock": "()",
    "mark_consistent": "()",
    "read": "(offset, size, /)",
    "write": "(offset, data, /)",
    "add": "(offset, delta, /)",
    "view": "()",
}

MODULE_SIGNATURES = {
    "set_error_factory": "(factory, /)",
    "dispatch_step": "(dispatcher, stack_rec, result, status, /)",
    "hint_register": "(word, page, hook, /)",
    "hint_unregister": "(word, /)",
    "hint_reset": "()",
    "hint_state": "()",
    "inject_fires": "(page, kind, match, match_arg, /)",
    "inject_die": "()",
    "splitmix64": "(x, /)",
}


def test_sharepoint_dir_lists_the_c_and_the_python_attributes(lp, names):
    sp = lp.share_create(names("dir"), 4096)
    try:
        d = dir(sp)
        for a in list(SHAREPOINT_SIGNATURES) + ["length", "data_offset", "sp_id", "held",
                                                 "handle", "identifier", "destroy"]:
            assert a in d, a
        assert sp.__dict__["identifier"] == sp.identifier
    finally:
        sp.destroy()


def test_sharepoint_methods_have_signatures(lp, names):
    sp = lp.share_create(names("sig"), 4096)
    try:
        for name, sig in SHAREPOINT_SIGNATURES.items():
            assert str(inspect.signature(getattr(sp, name))) == sig, name
        assert str(inspect.signature(_fastpath.SharePointCore)) == "(reply, context)"
        assert str(inspect.signature(_fastpath.SharePointCore.read)) == "(self, offset, size, /)"
    finally:
        sp.destroy()


def test_sharepoint_help_renders_its_methods(lp):
    text = pydoc.render_doc(lp.SharePoint, renderer=pydoc.plaintext)
    assert "lock(self, /, timeout=None)" in text
    assert "read(self, offset, size, /)" in text
    assert "bytes of data" in text                  # a getset's doc


def test_sharepoint_repr_gives_the_mapping_and_the_data_length(lp, names):
    sp = lp.share_create(names("repr"), 4096)
    try:
        assert sp.length == 4064 and sp.map_length == 4096
        assert re.fullmatch(r"<SharePoint handle=%d sp_id=%d addr=%#x length=4096 data=4064>"
                            % (sp.handle, sp.sp_id, sp.addr), repr(sp)), repr(sp)
    finally:
        sp.destroy()
    assert repr(sp).endswith(" length=4096 data=4064 unmapped>"), repr(sp)


def test_sharepoint_repr_of_a_larger_one(lp, names):
    sp = lp.share_create(names("repr3"), 3 * 4096 + 1)
    try:
        assert "length=%d data=%d>" % (sp.map_length, sp.length) in repr(sp)
        assert sp.map_length == 4 * 4096 and sp.length == sp.map_length - sp.data_offset
    finally:
        sp.destroy()


def test_region_dir_signature_and_repr(lp):
    p = lp.portal(lp.ANON, lp.PROT_RW, 8192)
    try:
        region = p.buf.obj
        assert type(region) is _fastpath.Region
        assert {"close", "orphan", "exports"} <= set(dir(region))
        assert str(inspect.signature(_fastpath.Region)) == "(addr, length, readonly)"
        assert str(inspect.signature(region.orphan)) == "(addr, length, /)"
        assert repr(region) == "<Region addr=%#x length=8192 exports=1>" % p.addr
        view = memoryview(region)
        assert repr(region).endswith(" exports=2>")
        view.release()
        ro = _fastpath.Region(p.addr, 4096, True)
        assert repr(ro) == "<Region addr=%#x length=4096 readonly exports=0>" % p.addr
        ro.close()
        assert repr(ro).endswith(" closed>")
    finally:
        p.unmap()


TYPE_SIGNATURES = {
    "SenderRing": ("(ring, *, sender, pidfd=-1, signo=0, hint=0, context=0)", {
        "post": "(index, payload, flags=0, /)",
        "post_waiting": "(index, payload, flags, timeout_ns, /)",
        "wait_return": "(pos, timeout_ns, /)",
        "close": "()"}),
    "Transport": ("(fd, *, spin_ns=0, max_fds=8, sock=None)", {
        "request": "(op, body=b'', flags=0, fds=None, portal=None, /)",
        "acquire": "()",
        "release": "()",
        "detach": "()",
        "call": "(msg, seq, fds=None, portal=None, /)",
        "send": "(msg, fds=None, /)",
        "next_reply": "(seq, portal=None, /)"}),
}


def test_fastpath_types_have_signatures():
    for name, (sig, methods) in TYPE_SIGNATURES.items():
        t = getattr(_fastpath, name)
        assert str(inspect.signature(t)) == sig, name
        for m, msig in methods.items():
            assert str(inspect.signature(getattr(t, m))) == "(self, " + msig[1:] \
                if msig != "()" else "(self, /)", (name, m)


def test_portal_reply_has_named_fields(lp, names):
    """A PORTAL call's reply is read by name: Reply, and its PortalReply."""
    name = names("reply")
    sp = lp.share_create(name, 4096)
    try:
        conn = sp.connection
        r = conn.call_portal(encode_portal_req(lp.SHARE | lp.ANON, lp.PROT_RW, 0,
                                               identifier=name), 0, lp.PROT_RW, True)
        try:
            assert type(r) is _fastpath.Reply and type(r.portal) is _fastpath.PortalReply
            assert r.portal.sp_id == sp.sp_id and r.portal.map_length == 4096
            assert r.portal.data_offset == sp.data_offset and r.portal.nframes == 1
            assert r.portal.prot == lp.PROT_RW and r.addr and r.map_err == 0
            assert r.fds == [] and r.err == 0 and r.op == lib.FAYT_SYS_PORTAL
            assert len(r.paddr) == 1
            assert "handle=%d" % r.portal.handle in repr(r.portal)
        finally:
            conn.call(lib.FAYT_SYS_UNMAP, HANDLE_REQ.pack(r.portal.handle))
            lib.fayt_unmap(r.addr, r.portal.map_length)
    finally:
        sp.destroy()


def test_each_c_function_is_bound_once():
    """One binding per C function: what _fastpath binds (FASTPATH_BINDS) and
    what only C calls (C_ONLY) are left out of the cffi module, every
    function the cffi module binds is called from Python, and each of
    FASTPATH_BINDS is called in _fastpath's sources."""
    build = runpy.run_path(os.path.join(ROOT, "libportal", "_build.py"))
    cffi_fns = {n for n in dir(lib) if n.startswith("fayt_") and callable(getattr(lib, n))}
    assert not cffi_fns & set(build["FASTPATH_BINDS"]), "bound twice"
    assert not cffi_fns & set(build["C_ONLY"]), "C_ONLY bound by cffi"
    python = ""
    for d in ("libportal", "faytd", "bench", "tests", "servers"):
        for path in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True):
            with open(path) as f:
                python += f.read()
    unused = sorted(n for n in cffi_fns if not re.search(r"\b%s\(" % n, python))
    assert not unused, "cffi binds functions no Python calls: %s" % unused
    c = ""
    for path in build["FASTPATH_SOURCES"]:
        if os.path.basename(path) not in ("lock.c", "ring.c"):     # the functions themselves
            with open(os.path.join(ROOT, path)) as f:
                c += f.read()
    for name in build["FASTPATH_BINDS"]:
        assert re.search(r"\b%s\(" % name, c), name + " is not called by _fastpath"
    headers = ""
    for h in build["HEADERS"]:
        with open(os.path.join(ROOT, "libportal", "include", "fayt", h)) as f:
            headers += f.read()
    for name in list(build["FASTPATH_BINDS"]) + list(build["C_ONLY"]):
        assert re.search(r"\b%s\(" % name, headers), name + " is declared in no header"


def test_fastpath_functions_have_signatures():
    for name, sig in MODULE_SIGNATURES.items():
        assert str(inspect.signature(getattr(_fastpath, name))) == sig, name
    for name in dir(_fastpath):
        f = getattr(_fastpath, name)
        if isinstance(f, types.BuiltinFunctionType):
            assert name in MODULE_SIGNATURES, "a function without a tested signature: " + name
    assert "hint_register(word, page, hook, /)" in pydoc.render_doc(_fastpath,
                                                                    renderer=pydoc.plaintext)


def _second_instance():
    """Another module object of the same extension (multi-phase init makes
    a new one, with its own state and types, rather than the cached one)."""
    spec = importlib.util.spec_from_file_location(_fastpath.__name__, _fastpath.__file__)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_fastpath_state_is_the_module_objects(lp):
    m = _second_instance()
    assert m is not _fastpath
    assert m.SharePointCore is not _fastpath.SharePointCore
    assert m.ABI_VERSION == _fastpath.ABI_VERSION
    assert m.hint_state() == (0, 0)
    # No error factory was given to the new one: its errors are plain OSError,
    # while the imported module's are libportal's.
    with pytest.raises(OSError) as e:
        m.hint_register(0, 0, None)
    assert type(e.value) is OSError and e.value.errno == 22
    with pytest.raises(lp.InvalidArgument):
        _fastpath.hint_register(0, 0, None)


def test_sender_ring_posts_by_keyword_and_refuses_after_close():
    """SenderRing: what every post shares is given once, by keyword; a post
    takes index, payload and flags; close() makes every call EBADF.  (A
    ring laid out by fayt_ring_init in private memory: no target, so the
    post asks for faytd's doorbell, and the return is abandoned.)"""
    size = lib.fayt_ring_bytes()
    mem = mmap.mmap(-1, size)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    try:
        lib.fayt_ring_init(ffi.cast("void *", addr), 7, 8, os.getpid())
        ffi.cast("struct fayt_ring_header *", addr).armed = 1     # the target handles it
        hint = ctypes.c_uint32(0)
        with pytest.raises(TypeError):
            _fastpath.SenderRing(addr, 7)               # sender is keyword-only
        port = _fastpath.SenderRing(addr, sender=7, hint=ctypes.addressof(hint))
        assert repr(port).startswith("<SenderRing ring=%#x sender=7 pidfd=-1" % addr)
        assert port.post(3, b"hi") == 0                 # deferred: no doorbell
        assert hint.value == 1                          # the target's pending hint, bumped
        # IMMEDIATE rings the doorbell; without a pidfd faytd must ring it.
        assert port.post(3, b"hi", lib.FAYT_NOTIFY_IMMEDIATE) == lib.FAYT_RING_POSTED_RING
        e, pos = port.post_waiting(4, b"x", lib.FAYT_NOTIFY_RETURN | lib.FAYT_NOTIFY_NOWAIT, 0)
        assert e == 0 and pos == 2 and hint.value == 3
        assert port.wait_return(pos, 0) == (errno.ETIMEDOUT, 0, 0)   # abandoned
        assert port.post(-1, b"") == errno.EINVAL
        assert port.post(lib.FAYT_NOTIFICATION_SLOTS, b"") == errno.EINVAL
        with pytest.raises(TypeError, match="payload: a bytes-like object is required, not int"):
            port.post(1, 5)
        port.close()
        assert port.closed and repr(port).endswith(" closed>")
        assert port.post(3, b"hi") == errno.EBADF
        assert port.post_waiting(3, b"hi", 0, -1) == (errno.EBADF, 0)
        assert port.wait_return(pos, -1)[0] == errno.EBADF
    finally:
        mem.close()
