"""The package's import graph: no cycle, and no upward import.

Parsed with ast (no import runs). Counted: imports at module level, outside
``if TYPE_CHECKING:`` (annotations only) and outside functions (a lazy import
in a function, such as ``Pool.health()`` importing ``safepool.health``, is
not a load-time dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "safepool"
EXTENSIONS = ("safepool.testing", "safepool.metrics", "safepool.health", "safepool.top")
# The layers of the pool itself (docs/design.md, "Layout"): none may import an extension.
POOL_MODULES = (
    "safepool.pool", "safepool._runner", "safepool._workers", "safepool._internals", "safepool._state",
    "safepool._reporting", "safepool._options", "safepool._detach", "safepool.proxy", "safepool._registry",
    "safepool._surface", "safepool._reclaim", "safepool._holder", "safepool._leasing",
)
# The face's helpers (issue 13): each does one job for the face or the runner
# and imports neither (they reach them through a narrow interface passed in).
FACE_HELPERS = ("safepool._registry", "safepool._surface", "safepool._options", "safepool._leasing")
RUNNER_HELPERS = ("safepool._reclaim", "safepool._holder")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def load_time_imports(path: Path) -> set[str]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("safepool"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("safepool"):
                    continue
                for alias in node.names:  # `from . import _stack` imports a module
                    candidate = f"{target}.{alias.name}"
                    found.add(candidate if candidate in MODULES else target)

    visit(ast.parse(path.read_text()).body)
    found.discard(name)
    return {target for target in found if target in MODULES}


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    return {name: load_time_imports(path) for name, path in MODULES.items()}


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    # Importing a package runs its __init__: a submodule's import of its
    # own package is not an edge back (Python handles it), so drop those.
    for name in edges:
        edges[name] = {target for target in edges[name] if not name.startswith(target + ".")}
    visiting: list[str] = []
    done: set[str] = set()

    def walk(node: str) -> None:
        if node in done:
            return
        assert node not in visiting, "import cycle: " + " -> ".join([*visiting[visiting.index(node):], node])
        visiting.append(node)
        for target in sorted(edges[node]):
            walk(target)
        visiting.pop()
        done.add(node)

    for node in sorted(edges):
        walk(node)


def test_the_pool_never_imports_an_extension() -> None:
    edges = graph()
    for name in POOL_MODULES:
        upward = [target for target in edges[name] if target.startswith(EXTENSIONS)]
        assert not upward, f"{name} imports the extension(s) {upward}"


def test_workers_know_nothing_of_the_core() -> None:
    assert "safepool._state" not in graph()["safepool._workers"]


def test_helpers_do_not_import_what_uses_them() -> None:
    edges = graph()
    for name in (*FACE_HELPERS, *RUNNER_HELPERS):
        upward = edges[name] & {"safepool.pool", "safepool._runner"}
        assert not upward, f"{name} imports {sorted(upward)}"
    for name in FACE_HELPERS:
        assert name in edges["safepool.pool"], f"the face does not use {name}"
    for name in RUNNER_HELPERS:
        assert name in edges["safepool._runner"], f"the runner does not use {name}"


def test_the_graph_sees_the_layers() -> None:
    """The parser itself: the face imports the runner, the runner the workers."""
    edges = graph()
    assert "safepool._runner" in edges["safepool.pool"]
    assert "safepool._workers" in edges["safepool._runner"]
    assert "safepool._internals" in edges["safepool._workers"]
