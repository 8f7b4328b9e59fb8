"""The architecture, checked from the source with ``ast`` (nothing is imported): layers run one way,
tools -> solution -> finetune -> probe; library files stay small; so do functions, bar the ones listed
with the reason they must be longer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"probe": 0, "finetune": 1, "solution": 2, "tools": 3}
LIBRARY = ("probe", "finetune")
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 40
LONGER = {}  # "path:function": why it must be longer than MAX_FUNCTION_LINES


def sources() -> list[Path]:
    return sorted(p for d in ("probe", "finetune", "tools") for p in (ROOT / d).rglob("*.py")) + [ROOT / "solution.py"]


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
        layer = LAYERS[path.relative_to(ROOT).parts[0].removesuffix(".py")]
        for line, module in imports(path):
            target = LAYERS.get(module.split(".")[0])
            if target is not None and target > layer:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert upward == []
    assert any(m.startswith("probe") for _, m in imports(ROOT / "finetune" / "train.py"))  # it saw real imports


LEAVES = {"probe.__main__", "probe.pipeline", "probe.compare", "finetune.__main__", "finetune.cv", "finetune.predict",
          "probe.weights.provision", "probe.weights.__main__"}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_clis_and_orchestration_are_leaves():
    """No library module imports a command-line module or stage one's end-to-end pipeline (only other leaves
    and tools do): shared pieces live below them."""
    for path in sources():
        if path.relative_to(ROOT).parts[0] == "tools" or _module_name(path) in LEAVES:
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
                key = f"{path.relative_to(ROOT)}:{node.name}"
                if lines > MAX_FUNCTION_LINES and key not in LONGER:
                    long[key] = lines
    assert long == {}


@pytest.mark.parametrize("module", ["solution", "finetune.checkpoint", "finetune.inference", "probe.images"])
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
        tree = ast.parse(path.read_text())
        for node in tree.body:  # top level only: solution imports training inside train_classifier
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for n in names:
                assert n.split(".")[0] not in ("lightning", "pytorch_lightning", "sklearn"), f"{name} imports {n}"
                if n.split(".")[0] in LAYERS:
                    todo.append(n)
    assert "probe.data" in seen
