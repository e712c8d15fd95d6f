"""The package's import graph, read from the source: no circle, no import hidden in a
function to dodge one, and the layers in order.

The graph has one node per module of ``foresight_sparse`` (a package is its ``__init__``)
and an edge for every module-level import of a package module, relative imports resolved:
``from . import x`` and ``from .pkg import x`` point at the submodule ``x`` where there is
one, else at the module named. The numba kernel modules are imported by name at run time,
through :func:`foresight_sparse.backends.numba_kernels` (numba must not load at ``import
foresight_sparse``): each call with a literal name is an edge too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import foresight_sparse

ROOT = Path(foresight_sparse.__file__).parent
PACKAGE = "foresight_sparse"

#: The one run-time loader of the package's own modules.
LOADER = "numba_kernels"

#: Modules that call ``importlib.import_module`` on names they are given (not on this
#: package's modules through a loader of their own), and why.
OTHER_IMPORTLIB = {
    # the user's --model module, by its dotted path
    "foresight_sparse.models": "loads the module a model is named in",
    # the built-in measures by "module:class" on first use; _graph() holds these edges
    "foresight_sparse.settings": "resolves measure= names (MEASURES) to their classes",
}


def _measure_edges() -> set[str]:
    """The modules settings.MEASURES imports by name: edges of the import graph too."""
    from foresight_sparse.settings import MEASURES

    return {target.partition(":")[0] for target in MEASURES.values() if target}


#: The layers, lowest first: a module imports only modules of its own layer or below.
#: Modules not listed are the top layer (plans, analysis, the drop-in module, the CLI, ...).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "_version",
            "exceptions",
            "geometry",
            "norms",
            "budget",
            "backends",
            "entropy",
            "_numba",
            "_entropy_kernels",
        ),
    ),
    ("connectivity", ("connectivity",)),
    ("engines", ("engines",)),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package_of(module: str) -> str:
    """The package a module's relative imports start from."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _targets(module: str, node: ast.AST) -> list[str]:
    """The package modules an import statement imports (empty for any other)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    if node.level:
        base = _package_of(module).split(".")
        base = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != PACKAGE:
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _loader_targets(node: ast.AST) -> list[str]:
    """The module a ``numba_kernels("...")`` call loads."""
    if (
        isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", None)) == LOADER
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ):
        return [f"{PACKAGE}.{node.args[0].value}"]
    return []


def _scan(module: str):
    """``(module-level imports, function-level imports, loader calls)`` of a module, each a
    list of ``(target, line)``."""
    top, nested, loaded = [], [], []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found = [(t, child.lineno) for t in _targets(module, child)]
                (nested if in_function else top).extend(found)
            loaded.extend((t, child.lineno) for t in _loader_targets(child))
            visit(child, inner)

    visit(ast.parse(MODULES[module].read_text()), False)
    return top, nested, loaded


SCANS = {module: _scan(module) for module in MODULES}


def _graph(with_loader: bool = True) -> dict[str, set[str]]:
    graph = {module: set() for module in MODULES}
    for module, (top, _, loaded) in SCANS.items():
        edges = top + (loaded if with_loader else [])
        graph[module] |= {t for t, _ in edges if t != module}
    if with_loader:
        graph[f"{PACKAGE}.settings"] |= _measure_edges()
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a closed path, or None (depth-first, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_every_import_resolves_to_a_module_of_the_package():
    for module, (top, nested, loaded) in SCANS.items():
        for target, line in top + nested + loaded:
            assert target in MODULES, f"{module}:{line} imports {target}, which is not a module"


def test_no_import_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_measures_loaded_by_name_are_edges_the_circle_check_sees():
    graph = _graph()
    svd, perturbation = f"{PACKAGE}.svd", f"{PACKAGE}.perturbation"
    assert {svd, perturbation} <= graph[f"{PACKAGE}.settings"]
    graph[svd] = graph[svd] | {f"{PACKAGE}.settings"}  # a measure importing the registry
    assert _cycle(graph) is not None


def test_no_circle_through_a_package_being_initialised():
    """Importing ``a.b.c`` first runs ``a.b``'s ``__init__``. That is harmless when every
    module on the way back from ``a.b`` to ``a.b.c`` lies inside ``a.b`` (``a.b`` is then
    already being imported, which is enough); a path that leaves ``a.b`` and comes back
    (``a.b/__init__`` -> ``x`` -> ``a.b.c``) makes ``x`` run ``a.b``'s ``__init__`` while
    ``x`` itself is half imported, and fails on import order."""
    graph = _graph(with_loader=False)
    for module in MODULES:
        package = module.rpartition(".")[0]
        if not package or package == PACKAGE:
            continue
        # a path package -> ... -> module through a node outside the package
        seen, todo = set(), [(package, (package,), False)]
        while todo:
            node, path, left = todo.pop()
            for nxt in graph[node]:
                out = left or not _in(nxt, package)
                if nxt == module and out:
                    chain = " -> ".join((*path, nxt))
                    pytest.fail(f"{chain} -> (its package) {package}: {package} is re-entered")
                if (nxt, out) not in seen:
                    seen.add((nxt, out))
                    todo.append((nxt, (*path, nxt), out))


def test_no_function_level_import_of_the_package():
    found = [
        f"{module}:{line} imports {target}"
        for module, (_, nested, _) in SCANS.items()
        for target, line in nested
    ]
    assert not found, "imports inside functions: " + "; ".join(found)


def test_the_loader_is_the_one_place_the_package_imports_its_own_modules_at_run_time():
    users = set()
    for module, path in MODULES.items():
        text = path.read_text()
        if "import_module" in text or "__import__(" in text:
            users.add(module)
    assert users - {f"{PACKAGE}.backends"} == set(OTHER_IMPORTLIB), users


def test_numba_is_imported_only_by_kernel_modules_that_no_module_imports():
    """numba loads on first use: the modules that import it are reached through the loader
    alone (or from one another), never by a module-level import of another module."""
    numba_users = set()
    for module, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n.split(".")[0] == "numba" for n in names):
                numba_users.add(module)
    assert f"{PACKAGE}._numba" in numba_users
    for module, (top, _, _) in SCANS.items():
        if module in numba_users:
            continue
        reached = {t for t, _ in top} & numba_users
        # perturbation's own kernels are imported by its estimator; settings.py loads that
        # package by name, on first use of the perturbation measure
        reached -= {f"{PACKAGE}.perturbation._kernels"}
        assert not reached, f"{module} imports {reached}, which import numba"


def _layer(module: str) -> int:
    name = module.removeprefix(PACKAGE + ".")
    for rank, (_, members) in enumerate(LAYERS):
        if any(_in(name, m) for m in members):
            return rank
    return len(LAYERS)


def test_layers_import_only_their_own_or_lower_layers():
    """Foundation (errors, geometry, norms, budgets, backends, entropy, the numba
    machinery) < connectivity < engines < the rest (plans, analysis, the CLI, ...)."""
    wrong = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target}"
        for module, deps in _graph().items()
        if _layer(module) < len(LAYERS)
        for target in deps
        if _layer(target) > _layer(module)
    ]
    assert not wrong, "; ".join(wrong)
