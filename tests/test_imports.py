"""The package's imports flow one way: no import loop, no project import inside a function."""

import ast
from pathlib import Path

import pyro_bc

PACKAGE = Path(pyro_bc.__file__).parent
MODELS = PACKAGE.parent / "models"


def _modules():
    for root, prefix in ((PACKAGE, "pyro_bc"), (MODELS, "pyro_bc.models")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join([prefix, *parts]), path


def _project_imports(name, path):
    """(imported module, node) for every import of a project module in ``path``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("pyro_bc"):
                yield target, node
                for alias in node.names:  # "from . import priors" imports a module too
                    yield f"{target}.{alias.name}", node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pyro_bc"):
                    yield alias.name, node


def _graph():
    modules = dict(_modules())
    graph = {}
    for name, path in modules.items():
        graph[name] = {t for t, _ in _project_imports(name, path) if t in modules and t != name}
    return graph


def test_no_project_import_inside_a_function():
    offenders = []
    for name, path in _modules():
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, ast.ImportFrom) and (
                        node.level or (node.module or "").startswith("pyro_bc")
                    ):
                        offenders.append(f"{name}.{function.name}")
    assert offenders == []


def test_no_import_loop():
    graph = _graph()
    # a package's __init__ re-exports its modules: an edge from a module up to its own package
    # is not a loop of concepts
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    state, loops = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in graph[node]:
            if state.get(target) == "open":
                loops.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert loops == []


def test_the_core_sits_below_compression_and_the_file_format():
    graph = _graph()

    def reaches(source, target):
        seen, todo = set(), [source]
        while todo:
            node = todo.pop()
            for nxt in graph.get(node, ()):
                if nxt == target or nxt.startswith(target + "."):
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    for core in ("distributions", "priors", "nn", "guides", "poutine", "elbo"):
        for above in ("compression", "codec", "plots", "cli"):
            assert not reaches(f"pyro_bc.{core}", f"pyro_bc.{above}"), (core, above)
    assert not reaches("pyro_bc.codec", "pyro_bc.compression")
