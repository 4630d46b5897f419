"""The layout holds: no import cycle, replay does not need qmp_tools, no
module over 500 lines without a reason.

Every module of ``replay`` and ``qmp_tools`` is parsed with :mod:`ast` (none
is imported). Two graphs are built from its imports:

* **modules**, from the imports that run when the module is imported (at
  module level, outside ``if TYPE_CHECKING:``); importing ``a.b.c`` also
  imports the packages ``a`` and ``a.b``, unless they contain the importer
  (Python initialises those first). A cycle here is an import-order bug
  waiting for the next edit.
* **packages**, from every import, lazy ones inside functions and
  type-checking ones included: a module's node is its sub-package of
  ``replay`` (``replay.shadow``, ``replay.analysis`` ...), or the module
  itself for one directly in ``replay`` (``replay.session``, ``replay.cli``
  ...), or ``qmp_tools``. A cycle here means two parts cannot be understood,
  tested or moved apart. :data:`LAZY_EXCEPTIONS` lists the lazy imports left
  out of this graph, each with its reason (``docs/architecture.md``).

The capture side depends on the replay side (the trace format, the errors,
the file layout), never the other way: only the exceptions import
``qmp_tools`` from ``replay``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
PACKAGES = ("replay", "qmp_tools")
MAX_LINES = 500
REASON = "Longer than 500 lines because"

#: (importing module, imported package): lazy imports (inside a function)
#: the package graph leaves out, and why. ``docs/architecture.md`` lists the
#: same ones.
LAZY_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("replay.cli", "qmp_tools"): "the command wires every side: ``shadowtrace capture`` and "
    "``shadowtrace xen`` run the capture side, imported only when those commands run",
}


#: The packages from the top down, as docs/architecture.md lists them: each
#: imports only packages on later lines (never its own line).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("replay.cli", "replay.bench", "replay"),
    ("replay.xen",),
    ("replay.sweep",),
    ("replay.session",),
    ("replay.report",),
    ("replay.analysis",),
    ("replay.driver",),
    ("replay.shadow", "qmp_tools"),
    ("replay.trace",),
    ("replay.guest",),
    ("replay.errors", "replay.paths"),
)


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    #: At module level, run when the module is imported.
    eager: bool
    #: Under ``if TYPE_CHECKING:`` (for the type checker only).
    typing_only: bool


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((TOP / package).rglob("*.py")):
            parts = list(path.relative_to(TOP).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = module_files()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(body: list[ast.stmt], eager: bool, typing_only: bool
          ) -> Iterator[tuple[ast.stmt, bool, bool]]:
    """Every import statement under ``body``, with how it runs."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, eager, typing_only
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _walk(node.body, False, typing_only)
        elif isinstance(node, ast.ClassDef):
            yield from _walk(node.body, eager, typing_only)
        elif isinstance(node, ast.If):
            tc = _is_type_checking(node.test)
            yield from _walk(node.body, eager and not tc, typing_only or tc)
            yield from _walk(node.orelse, eager, typing_only)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    stmts = [s for s in inner if isinstance(s, ast.stmt)]
                    stmts += [s for h in inner if isinstance(h, ast.ExceptHandler)
                              for s in h.body]
                    yield from _walk(stmts, eager, typing_only)


def _known(name: str) -> str | None:
    """``name`` if it is one of our modules, else its longest module prefix."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(source: str) -> list[Import]:
    tree = ast.parse(MODULES[source].read_text())
    base = source.split(".") if is_package(source) else source.split(".")[:-1]
    out = []
    for node, eager, typing_only in _walk(tree.body, True, False):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            assert isinstance(node, ast.ImportFrom)
            if node.level:
                stem = base[: len(base) - node.level + 1]
                module = ".".join(stem + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub``
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module
                       for a in node.names]
        for target in targets:
            known = _known(target)
            if known is not None:
                out.append(Import(source, known, node.lineno, eager, typing_only))
    return out


ALL_IMPORTS = [imp for name in MODULES for imp in imports(name)]


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in ALL_IMPORTS:
        if not imp.eager or imp.target == imp.source:
            continue
        mine = set(ancestors(imp.source)) | ({imp.source} if is_package(imp.source) else set())
        for target in [*ancestors(imp.target), imp.target]:
            if target in MODULES and target not in mine and target != imp.source:
                graph[imp.source].add(target)
    return graph


def node(name: str) -> str:
    """The package-graph node of a module."""
    parts = name.split(".")
    if parts[0] != "replay":
        return parts[0]
    if len(parts) == 1:
        return "replay"
    sub = ".".join(parts[:2])
    return sub


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {node(name): set() for name in MODULES}
    for imp in ALL_IMPORTS:
        a, b = node(imp.source), node(imp.target)
        if a == b or (not imp.eager and (imp.source, b) in LAZY_EXCEPTIONS):
            continue
        graph[a].add(b)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(graph: dict[str, set[str]], comp: list[str]) -> str:
    edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp]
    return "; ".join(edges)


def test_the_parser_sees_the_imports() -> None:
    # a few imports this test must find, or it checks nothing
    seen = {(i.source, i.target, i.eager) for i in ALL_IMPORTS}
    assert ("replay.shadow.engine", "replay.shadow.multi", True) in seen
    assert ("qmp_tools.capture", "replay.trace.format", True) in seen
    assert ("replay.cli", "qmp_tools.capture", False) in seen  # lazy, inside _capture
    typing = {(i.source, i.target) for i in ALL_IMPORTS if i.typing_only}
    assert ("replay.trace.prefetch", "replay.trace.reader") in typing
    assert len(MODULES) > 40


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    # a -> b -> c -> a is one; a self-import is not counted (it is no cycle
    # of two parts); d and e are alone
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules() -> None:
    graph = module_graph()
    assert cycles(graph) == [], [_describe(graph, c) for c in cycles(graph)]


def test_no_import_cycle_between_packages() -> None:
    graph = package_graph()
    assert cycles(graph) == [], [_describe(graph, c) for c in cycles(graph)]
    # the pipeline, as docs/architecture.md draws it, really is a pipeline
    assert "replay.trace" in graph["qmp_tools"]
    assert "replay.shadow" in graph["replay.driver"]
    assert "replay.driver" not in graph["replay.shadow"]


def test_packages_import_downwards() -> None:
    layer = {name: k for k, names in enumerate(LAYERS) for name in names}
    graph = package_graph()
    assert set(graph) == set(layer)  # every package has its place, no other is listed
    up = [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a]) if layer[b] <= layer[a]]
    assert up == []


def test_replay_needs_qmp_tools_only_where_documented() -> None:
    wrong = [f"{i.source}:{i.line} imports {i.target}" for i in ALL_IMPORTS
             if node(i.source) != "qmp_tools" and node(i.target) == "qmp_tools"
             and (i.eager or (i.source, "qmp_tools") not in LAZY_EXCEPTIONS)]
    assert wrong == []
    # and every exception is still needed (else it is stale)
    for source, target in LAZY_EXCEPTIONS:
        assert any(i.source == source and node(i.target) == target for i in ALL_IMPORTS), source


def test_long_modules_say_why() -> None:
    long = []
    for path in MODULES.values():
        text = path.read_text()
        n = len(text.splitlines())
        doc = ast.get_docstring(ast.parse(text)) or ""
        if n > MAX_LINES and REASON not in " ".join(doc.split()):
            long.append(f"{path.relative_to(TOP)}: {n} lines")
    assert long == [], f"over {MAX_LINES} lines with no '{REASON} ...' in the docstring"
