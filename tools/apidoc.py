"""The API reference, docs/api.md, made from the public API's docstrings
and signatures (make docs).

    python tools/apidoc.py            write docs/api.md
    python tools/apidoc.py --check    fail if docs/api.md is not what it would write

The public API is every name libportal exports (dir(libportal) without a
leading underscore, modules left out) and faytd.testing's (its __all__).
Signatures are shown with their annotations as written (the type aliases
of libportal/_types.py expanded).  Warnings, any of which fails the run
(exit status 1), so the reference cannot silently lose an entry or point
nowhere:
- a public function, class, method or property without a docstring;
- a callable whose signature cannot be read;
- a broken reference: an annotation that does not resolve
  (typing.get_type_hints), a relative Markdown link of the reference, or a
  docs/NAME.md a docstring names, whose file does not exist.
`make test` runs --check, so CI builds the reference too.
"""
import argparse
import enum
import inspect
import os
import re
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "api.md")
MODULES = ("libportal", "faytd.testing")


def _doc(obj):
    d = inspect.getdoc(obj)
    return d.strip() if d else ""


class _Written(str):
    """An annotation written as a string, shown as written (no quotes)."""

    def __repr__(self):
        return str(self)


# Module paths inspect puts before this project's classes and typing's names.
_QUALIFIED = re.compile(r"\b(?:libportal|faytd)(?:\.\w+)*\.(?=[A-Z]\w*)|\btyping\.")


def _sig(name, obj, warn, where):
    try:
        sig = inspect.signature(obj)
    except (ValueError, TypeError):
        warn.append("%s: no signature can be read" % where)
        return "%s(...)" % name
    try:
        inspect.signature(obj, eval_str=True)
    except Exception as e:      # NameError, SyntaxError...: the annotation names nothing
        warn.append("%s: broken reference: an annotation does not resolve: %s: %s"
                    % (where, type(e).__name__, e))

    def shown(a):
        return _Written(a) if isinstance(a, str) else a
    sig = sig.replace(
        parameters=[p.replace(annotation=shown(p.annotation)) for p in sig.parameters.values()],
        return_annotation=shown(sig.return_annotation))
    return "%s%s" % (name, _QUALIFIED.sub("", str(sig)))


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s#]+)(?:#[^)]*)?\)")
_DOCS_PATH = re.compile(r"\bdocs/([\w.-]+\.md)\b")


def _check_refs(text, warn):
    """Relative links of the reference and docs/NAME.md mentions that name
    no file."""
    docs = os.path.join(ROOT, "docs")
    for target in _LINK.findall(text):
        if "://" not in target and not os.path.exists(os.path.join(docs, target)):
            warn.append("broken reference: link to %s: no such file in docs/" % target)
    for name in sorted(set(_DOCS_PATH.findall(text))):
        if not os.path.exists(os.path.join(docs, name)):
            warn.append("broken reference: docs/%s is named but does not exist" % name)


def _public(module):
    if module.__name__ == "libportal":
        names = [n for n in dir(module) if not n.startswith("_")]
    else:
        names = getattr(module, "__all__", None) or [
            n for n, v in vars(module).items() if not n.startswith("_")
            and getattr(v, "__module__", None) == module.__name__]
    return sorted(n for n in names if not isinstance(getattr(module, n), types.ModuleType))


def _members(cls):
    """Public methods and properties defined by cls or its bases of this project."""
    out = []
    for n in sorted(dir(cls)):
        if n.startswith("_"):
            continue
        owner = next((k for k in cls.__mro__ if n in vars(k)), None)
        if owner is None or owner is object or not (owner.__module__ or "").startswith(
                ("libportal", "faytd")):
            continue
        if owner.__module__ == "builtins":
            continue
        raw = vars(owner)[n]
        out.append((n, raw))
    return out


def _entry(qual, name, obj, warn, lines):
    where = qual
    if isinstance(obj, type):
        if issubclass(obj, BaseException):
            lines.append("### exception `%s`\n" % qual)
            bases = ", ".join("`%s`" % b.__name__ for b in obj.__bases__)
            lines.append("Subclass of %s.\n" % bases)
            doc = _doc(obj) if obj.__doc__ else ""
            if doc:
                lines.append(doc + "\n")
            return
        lines.append("### class `%s`\n" % _sig(qual, obj, [], where))
        doc = obj.__dict__.get("__doc__")
        if not doc:
            warn.append("%s: no docstring" % where)
        else:
            lines.append(inspect.cleandoc(doc) + "\n")
        for n, raw in _members(obj):
            w = "%s.%s" % (qual, n)
            if isinstance(raw, property) or type(raw).__name__ == "getset_descriptor" \
                    or type(raw).__name__ == "member_descriptor":
                d = _doc(raw)
                # A __slots__ member has no docstring of its own: the class's says it.
                if not d and type(raw).__name__ != "member_descriptor":
                    warn.append("%s: no docstring" % w)
                lines.append("- `%s` (attribute): %s\n" % (n, d.split("\n\n")[0].replace(
                    "\n", " ") if d else ""))
                continue
            f = getattr(obj, n)
            if not callable(f):
                continue
            d = _doc(raw if not isinstance(raw, (staticmethod, classmethod)) else raw.__func__)
            if not d:
                warn.append("%s: no docstring" % w)
            lines.append("- `%s`\n" % _sig(n, f, warn, w))
            if d:
                lines.append("\n" + "\n".join("  " + x if x else "" for x in d.split("\n"))
                             + "\n")
        lines.append("")
        return
    if callable(obj):
        lines.append("### `%s`\n" % _sig(qual, obj, warn, where))
        d = _doc(obj)
        if not d:
            warn.append("%s: no docstring" % where)
        else:
            lines.append(d + "\n")
        return
    if isinstance(obj, enum.Enum):
        obj = obj.value
    lines.append("- `%s` = `%r`\n" % (qual, obj))


def _aliases():
    """The type aliases the signatures name (libportal/_types.py)."""
    from libportal import _types
    out = ["## Types\n", "The signatures' annotations are checked at run time "
           "(tests/test_typing.py) and ship with the packages (`py.typed`). "
           "The aliases they name, from `libportal._types`:\n"]
    for n, v in vars(_types).items():
        if not n.startswith("_") and not isinstance(v, types.ModuleType) and n not in (
                "Callable", "Union"):
            out.append("- `%s` = `%s`" % (n, _QUALIFIED.sub("", repr(v))))
    return out + [""]


def build():
    import importlib
    warn, lines = [], ["# API reference", "",
                       "Made from the docstrings by `make docs` (`tools/apidoc.py`); do not edit "
                       "by hand. The guides say how the calls fit together: "
                       "[portals.md](portals.md), [notifications.md](notifications.md), "
                       "[special-portals.md](special-portals.md), "
                       "[discovery.md](discovery.md), [testing.md](testing.md), "
                       "[errors.md](errors.md).", "",
                       "`make docs` writes this file from the public API: every name "
                       "`libportal` exports and `faytd.testing.__all__`. It fails (and writes "
                       "nothing) on a warning: a public name without a docstring, a signature "
                       "it cannot read, an annotation that does not resolve, or a link or "
                       "`docs/` file named that does not exist. `make test` runs "
                       "`tools/apidoc.py --check`, which also fails when this file is not what "
                       "`make docs` would write: after changing a docstring or a signature, "
                       "run `make docs` and commit the result.", ""]
    lines += _aliases()
    for modname in MODULES:
        module = importlib.import_module(modname)
        lines.append("## `%s`\n" % modname)
        names = _public(module)
        consts = [n for n in names if not callable(getattr(module, n))]
        for n in [n for n in names if callable(getattr(module, n))]:
            _entry("%s.%s" % (modname, n), n, getattr(module, n), warn, lines)
        if consts:
            lines.append("### Constants\n")
            for n in consts:
                _entry("%s.%s" % (modname, n), n, getattr(module, n), warn, lines)
            lines.append("")
    text = "\n".join(lines).rstrip() + "\n"
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    _check_refs(text, warn)
    return text, warn


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tools/apidoc.py", description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="fail if docs/api.md differs from what would be written")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    text, warn = build()
    for w in warn:
        print("apidoc: warning: %s" % w, file=sys.stderr)
    if warn:
        print("apidoc: %d warnings: every public name needs a docstring and a signature, "
              "every reference a target" % len(warn), file=sys.stderr)
        return 1
    if args.check:
        try:
            with open(OUT) as f:
                same = f.read() == text
        except FileNotFoundError:
            same = False
        if not same:
            print("apidoc: docs/api.md is not up to date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    with open(OUT, "w") as f:
        f.write(text)
    print("apidoc: wrote %s" % os.path.relpath(OUT, ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
