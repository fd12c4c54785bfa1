"""The package's imports point one way: no two modules import each other (counting imports made
inside functions and for type checking), besides a package and its own modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "batchllm"


def _imports() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = (path, name if is_package else name.rsplit(".", 1)[0])
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                wanted = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(w for w in wanted if w in modules and w != name)
    return graph


def test_no_two_modules_import_each_other() -> None:
    graph = _imports()
    assert len(graph) > 50 and "batchllm.engine.checks" in graph["batchllm.engine.plan"]
    circles = sorted(
        f"{a} <-> {b}"
        for a in graph
        for b in graph[a]
        if a < b and a in graph[b] and not (b.startswith(a + ".") or a.startswith(b + "."))
    )
    assert circles == []
