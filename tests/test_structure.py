"""The architecture, checked from the source with ``ast`` (nothing is imported): layers run one way,
tools -> solution -> finetune -> probe -> birds_lpft (the shared foundation), with no import cycle; library
files stay small; so do functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"birds_lpft": 0, "probe": 1, "finetune": 2, "solution": 3, "tools": 4}
LIBRARY = ("birds_lpft", "probe", "finetune")
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 40


def sources() -> list[Path]:
    folders = (*LIBRARY, "tools")
    return sorted(p for d in folders for p in (ROOT / d).rglob("*.py")) + [ROOT / "solution.py"]


def module_name(path: Path) -> str:
    """A file's module, tools under the name they are installed as (``birds_lpft.tools``)."""
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    return f"birds_lpft.{name}" if name.split(".")[0] == "tools" else name


def layer(module: str) -> int | None:
    """The layer of a project module (``birds_lpft.tools.*`` is the tools layer), None outside the project."""
    if module == "birds_lpft.tools" or module.startswith("birds_lpft.tools."):
        return LAYERS["tools"]
    return LAYERS.get(module.split(".")[0])


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_imports_run_one_way():
    upward = []
    for path in sources():
        for line, module in imports(path):
            target = layer(module)
            if target is not None and target > layer(module_name(path)):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert upward == []
    assert any(m.startswith("birds_lpft") for _, m in imports(ROOT / "finetune" / "train.py"))  # it saw real imports


def _project_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports, at any depth}; ``from package import module`` included."""
    names = {module_name(p) for p in sources()}
    graph = {}
    for path in sources():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[module_name(path)] = {t for t in targets & names if t != module_name(path)}
    return graph


def test_no_import_cycles():
    graph = _project_graph()
    assert len(graph) > 30 and graph["finetune.train"]  # it read the project
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        if node not in done:
            for target in sorted(graph.get(node, ())):
                visit(target, (*path, node))
            done.add(node)

    for module in sorted(graph):
        visit(module, ())


LEAVES = {"probe.__main__", "probe.pipeline", "probe.compare", "probe.weights", "finetune.__main__", "finetune.cv",
          "finetune.predict"}


def test_clis_and_orchestration_are_leaves():
    """No library module imports a command-line module or stage one's end-to-end pipeline (only other leaves
    and tools do): shared pieces live below them."""
    for path in sources():
        if layer(module_name(path)) == LAYERS["tools"] or module_name(path) in LEAVES:
            continue
        for line, module in imports(path):
            assert module not in LEAVES, f"{path.relative_to(ROOT)}:{line} imports {module}"


def test_library_files_are_small():
    files = [p for d in LIBRARY for p in (ROOT / d).rglob("*.py")]
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in files}
    assert len(sizes) > 10
    assert {f: n for f, n in sizes.items() if n > MAX_FILE_LINES} == {}


def test_functions_are_short():
    long = {}
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert long == {}


@pytest.mark.parametrize("module", ["solution", "birds_lpft.classifier", "birds_lpft.predict",
                                    "birds_lpft.data.images"])
def test_the_prediction_path_needs_neither_lightning_nor_sklearn(module):
    """By structure: no module ``classify`` imports (transitively) imports them at its top level."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = ROOT.joinpath(*name.split(".")).with_suffix(".py")
        path = path if path.is_file() else path.with_suffix("") / "__init__.py"
        if not path.is_file():  # ``from package import name``: a name, not a module
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:  # top level only: solution imports training inside train_classifier
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for n in names:
                assert n.split(".")[0] not in ("lightning", "pytorch_lightning", "sklearn"), f"{name} imports {n}"
                if n.split(".")[0] in LAYERS:
                    todo.append(n)
    assert "birds_lpft.data.sets" in seen
