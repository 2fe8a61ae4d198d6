"""The layers of DESIGN.md, checked on every import in the source (function-level ones included).

backbones <- heads <- tasks.config <- tasks.engine <- tasks.data <- the task packages (classification,
segmentation, detection: none imports another) <- tasks.registry <- tasks.{cli, demo, export, budget,
summary} <- tools. A module may import from its own layer's package and from the layers before it;
nothing else. The module graph has no cycle (a package's ``__init__`` counts as a module).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASK_PACKAGES = ("tasks.classification", "tasks.segmentation", "tasks.detection")
# (prefix, rank); the longest matching prefix decides a module's layer
LAYERS = [("backbones", 0), ("heads", 1), ("tasks.config", 2), ("tasks.engine", 3), ("tasks.data", 4),
          *((package, 5) for package in TASK_PACKAGES), ("tasks.registry", 6), ("tasks.cli", 7), ("tasks.demo", 7),
          ("tasks.export", 7), ("tasks.budget", 7), ("tasks.summary", 7), ("tasks.data_command", 7),
          ("tasks.detection_postprocess", 7),
          ("tools", 8)]
TOP = 7  # the command layer: its modules may import one another


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    files = [p for top in ("backbones", "heads", "tasks", "tools") for p in (ROOT / top).rglob("*.py")]
    return {module_name(p): p for p in files}


MODULES = source_modules()


def resolve(importer: str, path: Path, node: ast.AST) -> list[str]:
    """The project modules an import statement reaches (``from pkg import sub`` reaches ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def project_edges() -> list[tuple[str, str, int]]:
    edges = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in resolve(name, path, node):
                    if target.split(".")[0] in ("backbones", "heads", "tasks", "tools"):
                        edges.append((name, target, node.lineno))
    return edges


def layer(module: str) -> tuple[str, int]:
    matches = [(prefix, rank) for prefix, rank in LAYERS if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS (and to DESIGN.md)"
    return max(matches, key=lambda m: len(m[0]))


def test_every_import_follows_the_layers():
    wrong = []
    for importer, target, line in project_edges():
        (own, rank), (their, target_rank) = layer(importer), layer(target)
        if target_rank > rank or (target_rank == rank and own != their and rank != TOP):
            wrong.append(f"{MODULES[importer].relative_to(ROOT)}:{line} imports {target} ({their} is not below {own})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for importer, target, _ in project_edges():
        while target not in MODULES and "." in target:  # `import a.b.c` of a name: its module
            target = target.rsplit(".", 1)[0]
        if target != importer and target in MODULES:
            graph.setdefault(importer, set()).add(target)
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("bad, why", [("tasks.engine.trainer imports tasks.data.loaders", "engine above data"),
                                      ("tasks.segmentation.build imports tasks.detection.model", "two task packages")])
def test_the_layer_rule_catches_a_wrong_edge(bad, why):
    importer, _, target = bad.split()
    (own, rank), (their, target_rank) = layer(importer), layer(target)
    assert target_rank > rank or (target_rank == rank and own != their and rank != TOP), why


def test_no_source_file_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
