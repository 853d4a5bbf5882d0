"""The package's import graph: no module of src/knnlm imports (directly or through others)
a module that imports it back, counting imports inside functions and `if TYPE_CHECKING:`
blocks too (a circle there still ties the modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """knnlm module -> the knnlm modules it imports anywhere in its body (a `from pkg import
    name` names the submodule pkg.name when there is one, else pkg)."""
    files = {_module_name(p, src): p for p in (src / "knnlm").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:  # `import knnlm.core.x` of a package's attribute
                    name = name.rpartition(".")[0]
                if name.startswith("knnlm") and name != mod:
                    graph[mod].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycles_are_found():
    """The checker itself: a -> b -> c -> a is one circle, d alone is none."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_function_level_imports(tmp_path):
    pkg = tmp_path / "knnlm"
    (pkg / "run").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "run" / "__init__.py").write_text("")
    (pkg / "run" / "a.py").write_text("def f():\n    from knnlm.run.b import g\n")
    (pkg / "run" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    g = import_graph(tmp_path)
    assert g["knnlm.run.a"] == {"knnlm.run.b"} and g["knnlm.run.b"] == {"knnlm.run.a"}
    assert cycles(g) == [["knnlm.run.a", "knnlm.run.b"]]


def test_no_import_cycle_in_src():
    found = cycles(import_graph())
    assert not found, "import circles in src/knnlm: " + "; ".join(" <-> ".join(c) for c in found)
