"""The package's layers, read from its imports (docs/design.md, "Modules"): the core never imports the
operator tools, and no module imports itself back through others (lazy imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "rare_celery"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the rare_celery modules it imports (``from . import x`` resolved to ``pkg.x`` when x is one)."""
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        found = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
        found.discard(name)
    return graph


def test_the_core_never_imports_the_operator_tools():
    core = {m: deps for m, deps in imports().items() if not m.startswith("rare_celery.tools")}
    assert {m: sorted(d for d in deps if d.startswith("rare_celery.tools")) for m, deps in core.items()
            if any(d.startswith("rare_celery.tools") for d in deps)} == {}


def test_no_module_imports_itself_back():
    graph = imports()
    circles = set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in graph.get(node, ()):
            if nxt in path:
                circles.add(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt != "rare_celery":  # the package's __init__ re-exports; importing it is not a cycle
                walk(nxt, [*path, nxt])

    for start in graph:
        if start != "rare_celery":
            walk(start, [start])
    assert not circles, sorted(circles)[:5]
