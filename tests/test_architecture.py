"""The import structure: no circle among nativevit's modules, kernels and backends below the public ops."""

from __future__ import annotations

import ast
from pathlib import Path

import nativevit

PACKAGE = Path(nativevit.__file__).parent
KERNELS = PACKAGE.parent / "kernels"


def _module_files() -> dict[str, Path]:
    files = {}
    for root, prefix in ((PACKAGE, "nativevit"), (KERNELS, "nativevit.kernels")):
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((prefix, *parts)).removesuffix(".__init__")
            files.setdefault(name, path)
    return files


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """nativevit modules that ``name`` imports at module level (``import``, ``from``, importlib strings)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    # imports for type checkers only (``if TYPE_CHECKING:``) never run
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
            targets = [node.value]  # importlib.import_module("nativevit.x")
        found |= {t for t in targets if t in modules and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    files = _module_files()
    return {name: _imports(name, path, set(files)) for name, path in files.items()}


def test_no_import_circle():
    graph = _graph()
    # a package's __init__ re-exporting its submodules is not a circle; drop edges into parent packages
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d) :] + [d] if d in path else [m, d]
                raise AssertionError(f"import circle: {' -> '.join(cycle)}")
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_kernels_and_backends_never_import_the_public_ops():
    graph = _graph()
    below = [m for m in graph if m.startswith(("nativevit.kernels", "nativevit.backends"))]
    assert "nativevit.backends.registry" in below and "nativevit.kernels.varlen_attention" in below
    offenders = {m: graph[m] & {"nativevit.ops", "nativevit"} for m in below if graph[m] & {"nativevit.ops"}}
    assert not offenders, offenders
