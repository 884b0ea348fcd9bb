"""The house has no import circle (issue 22): modules of the installed ``zsad`` namespace (the core and the stage
folders mapped into it) import each other in one direction only, at module level and inside functions alike.

Read from the source with ``ast`` (nothing is imported). The one exception is the package root ``zsad``: every
module takes ``ZsadError`` from it, and its lazy ``__getattr__`` names a convenience (``zsad.Predictor``), so edges
out of the root are not followed.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"zsad": "zsad", "zsad.train": "train", "zsad.export": "export", "zsad.kernels": "kernels",
           "zsad.bench": "bench", "zsad.serve": "serve", "zsad.triton_models": "triton_models"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in FOLDERS.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = list(f.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the zsad modules it imports (an imported name that is a submodule counts as that submodule)."""
    mods = _modules()

    def owner(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        if m == "zsad":
            continue  # the package root (module docstring)
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg
                    for _ in range(node.level - 1):
                        up = up.rpartition(".")[0]
                    base = f"{up}.{base}" if base else up
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t.startswith("zsad") and (o := owner(t)) and o != m:
                    graph[m].add(o)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_scan_sees_circles_and_function_level_imports():
    """The scanner itself: a made-up circle through a function-level import is found, a one-way chain is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    # zsad.load imports the importers inside a function; zsad.checkpoint must not import them at all
    assert "zsad.importers" in graph["zsad.load"] and "zsad.checkpoint" in graph["zsad.load"]
    assert not any(t.startswith("zsad.importers") for t in graph["zsad.checkpoint"])
    assert "zsad.methods.stages" in graph["zsad.protocols"]  # forward_with_terms' function-level import


def test_export_imports_no_serve_and_the_served_package_no_zsad():
    """zsad-export writes repositories without the serving code (issue 22 item 4), and the package copied beside
    every served model (triton_models/zsad_common) imports only its own modules of zsad's namespace."""
    graph = import_graph()
    assert not [(m, t) for m, ts in graph.items() if m.startswith("zsad.export") for t in ts
                if t.startswith("zsad.serve")]
    common = "zsad.triton_models.zsad_common"
    assert {m for m in graph if m.startswith(common + ".")} >= {f"{common}.{n}" for n in ("guard", "image", "text")}
    assert not [(m, t) for m, ts in graph.items() if m.startswith(common) for t in ts if not t.startswith(common)]
