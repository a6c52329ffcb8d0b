"""libportal's modules import each other one way: no circle, whether the
import is at module level or inside a function (a late import only hides
a circle).  Read from the sources with ast; nothing is imported."""
import ast
import os

import libportal

PKG = os.path.dirname(os.path.abspath(libportal.__file__))


def _imports():
    """{module: {modules of libportal it imports}} for libportal/*.py."""
    graph = {}
    for fn in sorted(os.listdir(PKG)):
        if not fn.endswith(".py") or fn == "__init__.py":
            continue
        with open(os.path.join(PKG, fn)) as f:
            tree = ast.parse(f.read(), fn)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module] if node.module else [a.name for a in node.names])
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names]
                deps.update(n.split(".")[1] for n in names
                            if n and n.startswith("libportal.") and n.count(".") == 1)
        graph[fn[:-3]] = deps & {f[:-3] for f in os.listdir(PKG) if f.endswith(".py")}
    return graph


def _circle(graph):
    """One import circle as a list of modules, or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d, path + [d])
                if found:
                    return found
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_libportal_imports_form_no_circle():
    graph = _imports()
    assert {"portal", "special", "syscall", "notification"} <= set(graph)
    assert _circle(graph) is None, " -> ".join(_circle(graph))


def test_libportal_connection_imports_no_module_that_maps():
    """The connection keeps its own registry of mappings: syscall.py needs
    nothing from the modules that make them."""
    assert not _imports()["syscall"] & {"portal", "special", "mapping", "notification",
                                        "dispatch", "channel", "rings"}


def test_libportal_circle_finder_sees_a_circle():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set()}) is None
