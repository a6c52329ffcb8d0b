"""The public API is typed (docs/api.md, "Types"): every public callable of
libportal and of faytd's documented entry points has annotations for each
parameter and its return, and typing.get_type_hints() resolves them at run
time (a name that does not resolve is a broken annotation).  The methods
written in C (libportal._fastpath.SharePointCore, public through
SharePoint) are typed by libportal/_fastpath.pyi, read here with ast.  Both
packages carry py.typed (PEP 561) and ship it (pyproject.toml's package-data).

The project installs no type checker (mypy, pyright): if one is importable
in this environment it is not run here; this test is the check CI runs.
"""
import ast
import inspect
import os
import types
import typing

import pytest

import faytd
import faytd.cli
import faytd.main
import faytd.testing
import libportal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB = os.path.join(ROOT, "libportal", "_fastpath.pyi")


def _public(module):
    """(qualified name, object) of what the API reference documents."""
    if module is libportal:
        names = [n for n in dir(module) if not n.startswith("_")]
    else:
        names = module.__all__
    return [("%s.%s" % (module.__name__, n), getattr(module, n)) for n in sorted(names)
            if not isinstance(getattr(module, n), types.ModuleType)]


def _ours(obj):
    return (getattr(obj, "__module__", None) or "").startswith(("libportal", "faytd"))


def _callables():
    """(qualified name, Python function) of every public callable: functions,
    classes' __init__ and public methods, properties' getters.  C methods
    are listed apart (_c_methods)."""
    out = [("faytd.main.main", faytd.main.main), ("faytd.cli.main", faytd.cli.main)]
    for module in (libportal, faytd.testing):
        for qual, obj in _public(module):
            if isinstance(obj, type):
                if issubclass(obj, BaseException) or not _ours(obj):
                    continue
                for klass in obj.__mro__:
                    if not _ours(klass):
                        continue
                    for n, raw in vars(klass).items():
                        if n.startswith("_") and n != "__init__":
                            continue
                        if isinstance(raw, property):
                            out.append(("%s.%s" % (qual, n), raw.fget))
                        elif isinstance(raw, (staticmethod, classmethod)):
                            out.append(("%s.%s" % (qual, n), raw.__func__))
                        elif isinstance(raw, types.FunctionType):
                            out.append(("%s.%s" % (qual, n), raw))
            elif isinstance(obj, types.FunctionType):
                out.append((qual, obj))
    return out


def _missing(fn):
    """What fn lacks: parameters without an annotation, and its return."""
    hints = typing.get_type_hints(fn)       # raises if one does not resolve
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    lack = [p.name for p in params if p.name not in hints]
    if "return" not in hints:
        lack.append("return")
    return lack


def test_every_public_callable_is_annotated():
    found = _callables()
    names = {q for q, _ in found}
    # The reference's main entries are here (the walk found the API).
    assert {"libportal.portal", "libportal.notify", "libportal.Connection.__init__",
            "libportal.ChainServer.take", "libportal.PageRequest.data",
            "libportal.SpecialPortal.read", "libportal.SharePoint.destroy",
            "libportal.Portal.unmap", "faytd.testing.start_server",
            "faytd.testing.Faytd.stop"} <= names, sorted(names)
    broken = {}
    for qual, fn in found:
        try:
            lack = _missing(fn)
        except Exception as e:          # an annotation that does not resolve
            broken[qual] = "get_type_hints: %s: %s" % (type(e).__name__, e)
            continue
        if lack:
            broken[qual] = "not annotated: %s" % ", ".join(lack)
    assert not broken, "\n".join("%s: %s" % kv for kv in sorted(broken.items()))


def test_published_fields_are_typed():
    hints = typing.get_type_hints(libportal.Published)
    assert list(hints) == list(libportal.Published._fields)


def _stub_class(name):
    with open(STUB) as f:
        tree = ast.parse(f.read(), STUB)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
    raise AssertionError("%s: no class %s" % (STUB, name))


def test_c_methods_of_sharepoint_are_typed_by_the_stub():
    from libportal import _fastpath
    core = _fastpath.SharePointCore
    stub = _stub_class("SharePointCore")
    public = [n for n in dir(core) if not n.startswith("_")]
    assert {"lock", "unlock", "read", "write", "view", "add", "held"} <= set(public)
    lack = []
    for n in public:
        node = stub.get(n)
        if node is None:
            lack.append("%s: not in the stub" % n)
            continue
        a = node.args
        params = (a.posonlyargs + a.args + a.kwonlyargs)[1:]
        for p in params:
            if p.annotation is None:
                lack.append("%s: parameter %s not annotated" % (n, p.arg))
        if node.returns is None:
            lack.append("%s: no return annotation" % n)
        if not isinstance(inspect.getattr_static(core, n), types.GetSetDescriptorType):
            # a method: the stub's parameters are the C method's (its text signature)
            c_params = [p for p in inspect.signature(getattr(core, n)).parameters][1:]
            if [p.arg for p in params] != c_params:
                lack.append("%s: stub parameters %s, the C method's %s"
                            % (n, [p.arg for p in params], c_params))
    assert not lack, "\n".join(lack)


@pytest.mark.parametrize("package", [libportal, faytd])
def test_py_typed_ships(package):
    pkg = os.path.dirname(os.path.abspath(package.__file__))
    assert os.path.isfile(os.path.join(pkg, "py.typed")), "%s has no py.typed" % pkg
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    section = text[text.index("[tool.setuptools.package-data]"):]
    line = next(x for x in section.splitlines() if x.startswith(package.__name__ + " ="))
    assert '"py.typed"' in line, "pyproject.toml's package-data does not ship %s/py.typed" \
        % package.__name__
