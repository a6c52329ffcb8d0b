"""The client's C types and functions (libportal._fastpath) as Python sees
them: dir(), help(), inspect.signature and repr work on each, and the module
keeps its state per module object (multi-phase init), not in the process.
"""
import importlib.util
import inspect
import pydoc
import re
import types

import pytest

from libportal import _fastpath
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
    "call": "(fd, msg, fds, want_reply, spin_ns, max_fds, expect, /)",
    "set_error_factory": "(factory, /)",
    "notify_post": "(ring, index, flags, sender, payload, pidfd, signo, hint, /)",
    "dispatch_step": "(dispatcher, stack_rec, result, status, /)",
    "hint_register": "(word, page, hook, /)",
    "hint_unregister": "(word, /)",
    "hint_reset": "()",
    "hint_state": "()",
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
        assert str(inspect.signature(_fastpath.SharePointCore)) == \
            "(base, data_offset, length, prot, sp_id, context)"
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
