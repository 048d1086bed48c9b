"""The package's import graph, read from the source (every `import` statement, those inside functions included):
imports run one way, with no cycle; no module takes another's private names; the library never imports the
experiments."""

from __future__ import annotations

import ast
from pathlib import Path

import kitelm

ROOT = Path(kitelm.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["kitelm", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported kitelm module, names taken from it) for every import statement of module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "kitelm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kitelm":
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            found += [(m, []) for m in submodules]
            found.append((target, [n for n in names if f"{target}.{n}" not in MODULES]))
    return [(m, names) for m, names in found if m in MODULES]


GRAPH = {name: sorted({m for m, _ in _imports(name)} - {name}) for name in MODULES}


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return components


def test_the_graph_is_read_from_every_module_including_imports_inside_functions():
    assert len(MODULES) > 40 and "kitelm.models.griffin" in GRAPH["kitelm.models"]
    # evaluate_checkpoint's `from . import load` and `from .data.corpus import load_corpus` sit inside the function
    assert {"kitelm", "kitelm.data.corpus"} <= set(GRAPH["kitelm.evaluation"])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


def test_imports_have_no_cycle():
    assert _cycles(GRAPH) == []


def test_no_module_imports_another_modules_private_names():
    private = [(name, target, n) for name in MODULES for target, names in _imports(name) for n in names
               if n.startswith("_") and not n.endswith("__") and target != name]
    assert private == []


def test_the_library_never_imports_the_experiments():
    library = [name for name in MODULES if not name.startswith("kitelm.experiments") and name != "kitelm.cli"]
    assert [(name, m) for name in library for m in GRAPH[name] if m.startswith("kitelm.experiments")] == []
