"""The package's shape stays what the docs and the import contracts say: no import cycle among
sami_mlx's modules, every module in the layers contract, and every module named in docs/ARCHITECTURE.md."""

from __future__ import annotations

import re
from pathlib import Path

import grimp

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter installs tomli there
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sami_mlx"


def modules() -> list[str]:
    """Every module file under sami_mlx/, as a path relative to it ('loop/trainer.py'), packages' __init__ left out."""
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    names = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & set(names)) for m in names}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in names:
        if m not in index:
            visit(m)
    return cycles


def test_no_import_cycle_among_the_modules():
    # Imports inside functions and under TYPE_CHECKING count: a cycle hidden there is still one.
    graph = grimp.build_graph("sami_mlx", exclude_type_checking_imports=False)
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for m in ("p.a", "p.b", "p.c"):
        graph.add_module(m)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a")
    assert import_cycles(graph) == [["p.a", "p.b"]]


def test_the_layers_contract_names_every_top_level_module():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (stack,) = [c for c in contracts if c["type"] == "layers" and c.get("containers") == ["sami_mlx"]]
    layered = {name.strip() for layer in stack["layers"] for name in re.split(r"[|:]", layer)}
    top = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    assert top - {"__init__"} - layered == set(), "add these modules to the layers in pyproject.toml"
    assert layered - top == set(), "these layers name no module of sami_mlx"


def test_the_architecture_doc_names_every_module():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = [m for m in modules() if not re.search(rf"(?<![\w/.]){re.escape(m)}(?![\w])", doc)]
    assert missing == [], "docs/ARCHITECTURE.md's module list leaves these out"


def test_the_architecture_doc_names_only_files_that_exist():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"(?<![\w/.])((?:[\w]+/)*\w+\.py)\b", doc))
    gone = sorted(f for f in named if not any((d / f).is_file() for d in (ROOT, PACKAGE, ROOT / "tests")))
    assert gone == [], "docs/ARCHITECTURE.md names files that do not exist"
