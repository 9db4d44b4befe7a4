"""The package's import graph, read with `ast` from the sources: no module imports one that imports it
back, directly or through others, and the stages import downwards only."""

import ast
from pathlib import Path

import padd

ROOT = Path(padd.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["padd", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the padd modules it imports (anywhere in the file, in-function imports included)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("padd"):
                # `from padd.x import y` imports padd.x, and the submodule padd.x.y if y is one
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                edges.update(t for t in targets if t in modules)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
        graph[name] = edges - {name}
    return graph


def _cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if one exists."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert "padd.losses" in graph["padd.phase_b.objective"]
    assert "padd.generation.rollout" in graph["padd.generation.vllm"]


def test_no_import_circles():
    graph = import_graph()
    cycles = [c for m in sorted(graph) if (c := _cycle_from(graph, m))]
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_run_with_the_grain():
    """Evaluation, the world and Stage I do not reach up into Phase B; the losses and the generation
    backends sit below both the warm-up and the loop."""
    graph = import_graph()
    for low in ("padd.eval", "padd.world.tasks", "padd.stage1.warmup", "padd.stage1.decompose", "padd.data"):
        assert not any(m.startswith("padd.phase_b") for m in graph[low]), (low, graph[low])
    assert not any(m.startswith(("padd.study", "padd.report")) for m in graph["padd.eval"])
    assert graph["padd.world.tasks"] <= {"padd.errors"}
