"""Build the grader upload from the project's own modules: one ``classification.py`` + ``birds_model.pt``.

    python tools/build_submission.py --model birds_model.pt --out submission/

The single file is the project modules that ``solution.py`` uses, in an order derived from their imports
(a topological sort), with their intra-project imports removed; nothing is kept by hand. Two parts:

- the modules ``solution.py`` imports at its top (and theirs): what ``classify`` needs, run on import;
- the modules it imports inside a function (training: Lightning, scikit-learn): kept as source text and
  defined on the first call of ``train_classifier``, so ``import classification`` and ``classify`` never
  import Lightning (whose import probes the temp dir with a file) nor scikit-learn.

The build refuses a top-level name defined by two modules, a relative import, a project import inside a
function anywhere but ``solution.py``, a training-only package in the first part, and any package the
grader does not have.
"""

from __future__ import annotations

import argparse
import ast
import graphlib
import shutil
import sys
from pathlib import Path

from finetune.checkpoint import Classifier

ROOT = Path(__file__).resolve().parent.parent
ENTRY = "solution"
PROJECT_PACKAGES = {"probe", "finetune", "solution", "tools"}
# What the grader has (GRADER.md), plus the standard library.
GRADER_PACKAGES = {"torch", "torchvision", "lightning", "pytorch_lightning", "sklearn", "numpy", "PIL", "tqdm",
                   "timm", "albumentations", "cv2"}
TRAINING_ONLY = {"lightning", "pytorch_lightning", "sklearn"}  # never imported by `import classification`
SECTION = "_TRAINING_SOURCE"


def module_file(name: str) -> Path:
    """'probe.data' -> probe/data.py (or probe/data/__init__.py for a package)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"


def _tops(node: ast.AST) -> list[str]:
    """The top-level packages an import statement imports from ('.' for a relative one); [] for others."""
    if isinstance(node, ast.ImportFrom):
        return [(node.module or "").split(".")[0] if node.level == 0 else "."]
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    return []


def _top(node: ast.AST) -> str | None:
    """The one top-level package an import statement imports from (mixing a project package with another in
    one ``import`` is refused), or None for a non-import."""
    tops = _tops(node)
    if len(set(tops) & PROJECT_PACKAGES) and len(set(tops)) > 1:
        raise SystemExit(f"build: line {node.lineno} imports {tops} in one statement; split it.")
    return tops[0] if tops else None


def _imported_module(node: ast.stmt) -> str:
    return node.module if isinstance(node, ast.ImportFrom) else node.names[0].name


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test)


def nested_project_imports(tree: ast.Module) -> list[ast.stmt]:
    """Project imports below the module level (inside functions), main guards excepted."""
    found = []
    for node in tree.body:
        if _is_main_guard(node) or _top(node) is not None:
            continue
        found += [n for n in ast.walk(node) if _top(n) in PROJECT_PACKAGES]
    return found


def dependencies(name: str) -> tuple[list[str], list[str]]:
    """(modules imported at the top, modules imported inside functions) of project module ``name``."""
    tree = ast.parse(module_file(name).read_text())
    top = [_imported_module(n) for n in tree.body if _top(n) in PROJECT_PACKAGES]
    nested = [_imported_module(n) for n in nested_project_imports(tree)]
    if nested and name != ENTRY:
        raise SystemExit(f"build: {name} imports {nested} inside a function; only {ENTRY}.py may (training only).")
    return top, nested


def closure(roots: list[str]) -> dict[str, list[str]]:
    """{module: its top-level project imports} for ``roots`` and everything they import, transitively."""
    graph, todo = {}, list(roots)
    while todo:
        name = todo.pop()
        if name not in graph:
            graph[name] = dependencies(name)[0]
            todo += graph[name]
    return graph


def module_order() -> tuple[list[str], list[str]]:
    """(eager modules, training modules), each in dependency order, the entry last among the eager ones."""
    top, nested = dependencies(ENTRY)
    eager = closure(top)
    training = {k: v for k, v in closure(nested).items() if k not in eager}

    def order(graph: dict[str, list[str]]) -> list[str]:
        sorter = graphlib.TopologicalSorter({k: [d for d in graph[k] if d in graph] for k in sorted(graph)})
        return list(sorter.static_order())

    return order(eager) + [ENTRY], order(training)


def _bindings(tree: ast.Module, rel: str) -> dict[str, str]:
    """{top-level name: what binds it}: a definition of this module, or an import (the same import in two
    modules binds the same thing and is no clash)."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            found[node.name] = f"defined in {rel}"
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names = t.elts if isinstance(t, ast.Tuple) else [t]
                found.update({n.id: f"defined in {rel}" for n in names if isinstance(n, ast.Name)})
        elif isinstance(node, ast.Import) and _top(node) not in PROJECT_PACKAGES:
            found.update({(a.asname or a.name.split(".")[0]): f"import {a.name}" for a in node.names})
        elif isinstance(node, ast.ImportFrom) and _top(node) not in PROJECT_PACKAGES | {"__future__"}:
            found.update({(a.asname or a.name): f"from {node.module} import {a.name}" for a in node.names})
    return found


def module_body(name: str, seen: dict[str, str], training: bool) -> tuple[list[str], str]:
    """(external import lines, body source) of one module, checking names and imports."""
    path = module_file(name)
    source, rel = path.read_text(), path.relative_to(ROOT).as_posix()
    tree = ast.parse(source)
    for bound, binding in _bindings(tree, rel).items():
        if seen.setdefault(bound, binding) != binding:
            raise SystemExit(f"build: {rel} binds {bound!r} ({binding}), already bound by another module "
                             f"({seen[bound]}); rename one.")
    if not training:  # classify's part: not even a function may import a training-only package
        for node in ast.walk(tree):
            if set(_tops(node)) & TRAINING_ONLY:
                raise SystemExit(f"build: {rel}:{node.lineno} imports {_tops(node)}; classify must not need it.")
    lines, imports, drop = source.splitlines(), [], set()
    for i, node in enumerate(tree.body):
        top = _top(node)
        is_docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant)
        if top is not None or _is_main_guard(node) or is_docstring:
            drop.update(range(node.lineno - 1, node.end_lineno))
        if top == ".":
            raise SystemExit(f"build: {rel} uses a relative import; use an absolute one.")
        if top is None or top == "__future__" or top in PROJECT_PACKAGES:
            continue
        for package in _tops(node):
            if package not in GRADER_PACKAGES and package not in sys.stdlib_module_names:
                raise SystemExit(f"build: {rel} imports {package!r}, which the grader does not have.")
        if top in TRAINING_ONLY and not training:
            raise SystemExit(f"build: {rel} imports {top!r} but classify needs it; import it only for training.")
        imports.append(ast.unparse(node))
    _load_training_instead(tree, lines, drop)
    body = "\n".join(line for n, line in enumerate(lines) if n not in drop).strip()
    return imports, f"# {'-' * 20} {rel} {'-' * 20}\n{body}\n"


def _load_training_instead(tree: ast.Module, lines: list[str], drop: set[int]) -> None:
    """Replace the first project import inside each function with a call that defines the training section."""
    done_blocks = set()
    for node in nested_project_imports(tree):
        block = id(_enclosing_block(tree, node))
        drop.update(range(node.lineno - 1, node.end_lineno))
        if block not in done_blocks:
            done_blocks.add(block)
            indent = lines[node.lineno - 1][: node.col_offset]
            lines[node.lineno - 1] = f"{indent}_import_training()"
            drop.discard(node.lineno - 1)


def _enclosing_block(tree: ast.Module, target: ast.stmt) -> ast.AST:
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            if target in getattr(node, field, []):
                return node
    return tree


LOADER = f'''

def _import_training() -> None:
    """Define the training code (Lightning, scikit-learn) in this module, once, on the first training call.

    It is kept as text so that importing this file and ``classify`` never import Lightning (whose import
    probes the temp dir with a file) nor scikit-learn; the project itself imports it inside the function.
    """
    if {SECTION} is not None:
        # compile() inherits this file's `from __future__ import annotations`, as the modules had it themselves
        source, name = {SECTION}, __file__ + " (training section)"
        globals()["{SECTION}"] = None
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)  # tracebacks show its lines
        exec(compile(source, name, "exec"), globals())
'''


def build_source() -> str:
    """The text of the self-contained ``classification.py``."""
    eager, training = module_order()
    seen: dict[str, str] = {}
    parts = {"eager": ([], []), "training": ([], [])}
    for part, names in (("training", training), ("eager", eager)):
        imports, bodies = parts[part]
        for name in names:
            mod_imports, body = module_body(name, seen, training=part == "training")
            imports += [i for i in mod_imports if i not in imports]
            bodies.append(body)
    section = "\n".join(parts["training"][0]) + "\n\n\n" + "\n\n".join(parts["training"][1])
    if "'''" in section or section.endswith("\\"):
        raise SystemExit("build: the training modules contain ''' (or end with a backslash); the section is r'''...'''.")
    header = ('"""Bird-species classifier for the grader: train_classifier() and classify().\n\n'
              "Generated by tools/build_submission.py from the birds-lpft project's modules; edit those, not this.\n"
              '"""\n\nfrom __future__ import annotations\n\n')
    eager_imports, eager_bodies = parts["eager"][0] + ["import linecache"], parts["eager"][1]  # LOADER's
    return (header + "\n".join(dict.fromkeys(eager_imports)) + "\n\n\n" + "\n\n".join(eager_bodies[:-1])
            + f"\n\n# {'-' * 20} training section {'-' * 20}\n{SECTION} = r'''\n{section}'''\n" + LOADER
            + "\n\n" + eager_bodies[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint from `python -m finetune ... --out`")
    p.add_argument("--out", type=Path, default=ROOT / "submission")
    args = p.parse_args(argv)
    Classifier.load(args.model)  # refuse to ship a file that is not a loadable checkpoint
    args.out.mkdir(parents=True, exist_ok=True)
    code = build_source()
    compile(code, "classification.py", "exec")
    (args.out / "classification.py").write_text(code)
    if args.model.resolve() != (args.out / "birds_model.pt").resolve():
        shutil.copyfile(args.model, args.out / "birds_model.pt")
    print(f"built {args.out / 'classification.py'} ({len(code.splitlines())} lines) and {args.out / 'birds_model.pt'}")


if __name__ == "__main__":
    main()
