"""Build the grader upload: one ``classification.py`` that embeds the project's modules, + ``birds_model.pt``.

    python tools/build_submission.py --model birds_model.pt --out submission/

The file carries every project module ``solution.py`` needs, verbatim, in ``MODULES = {name: (is_package,
source)}``, with a small importer over that table (:class:`EmbeddedImporter`) that it puts first in
``sys.meta_path``: each module keeps its own namespace, file name and line numbers, and nothing is written.
The modules are those its imports reach (read with ``ast``), in two parts: classify's, which the build proves
imports neither Lightning nor scikit-learn, and training's, loaded when ``train_classifier`` first runs. An
import of a package the grader lacks (GRADER.md), or of a missing module, is refused with its file and line.
"""

from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.util
import inspect
import os
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from birds_lpft.classifier import Classifier
from birds_lpft.recipe import PRESETS, grader_recipe
from birds_lpft.utils.cli import check_output_dir, fail, read_or_fail
from birds_lpft.utils.outputs import copy_file, write_text

from finetune.levers import lever_modules

ROOT = Path(__file__).resolve().parent.parent
ENTRY = "solution"
TRAINING_FUNCTION = "train_classifier"  # the entry's imports inside it are training's part
# What the grader has (GRADER.md), plus the standard library.
# huggingface_hub and safetensors come with timm (its own requirements), for timm/ backbones' weights.
GRADER_PACKAGES = {"torch", "torchvision", "lightning", "pytorch_lightning", "sklearn", "numpy", "PIL", "tqdm",
                   "timm", "huggingface_hub", "safetensors", "albumentations", "cv2"}
# The entry's line that the build rewrites, in its copy in the grader file, to hold the shipped model's recipe.
RECIPE_LINE = "SHIPPED_RECIPE: dict | None = None\n"
TRAINING_ONLY = {"lightning", "pytorch_lightning", "sklearn"}  # never imported by `import classification`


# --------------------------------------------------------------------------- copied into classification.py


class EmbeddedImporter(importlib.abc.MetaPathFinder, importlib.abc.ExecutionLoader):
    """Finds and loads modules from an in-memory table ``{name: (is_package, source)}``; writes nothing.

    A module's file is named ``<origin>/<its path in the project>`` (``.../classification.py/birds_lpft/data/sets.py``):
    no such file exists, so ``linecache`` and ``traceback`` ask :meth:`get_source` for its lines. Code is
    compiled by ``ExecutionLoader.get_code`` (``dont_inherit``: each module's own ``__future__`` imports).
    """

    def __init__(self, modules: dict[str, tuple[bool, str]], origin: str):
        self.modules = modules
        self.origin = origin

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.modules:
            return None  # not embedded: the next finder looks
        return importlib.util.spec_from_file_location(fullname, self.get_filename(fullname), loader=self)

    def get_filename(self, fullname: str) -> str:
        path = os.path.join(self.origin, *fullname.split("."))
        return os.path.join(path, "__init__.py") if self.is_package(fullname) else path + ".py"

    def is_package(self, fullname: str) -> bool:
        return self._entry(fullname)[0]

    def get_source(self, fullname: str) -> str:
        return self._entry(fullname)[1]

    def _entry(self, fullname: str) -> tuple[bool, str]:
        if fullname not in self.modules:
            raise ImportError(f"{fullname} is not embedded in {self.origin}", name=fullname)
        return self.modules[fullname]


def install_importer(modules: dict[str, tuple[bool, str]], origin: str) -> EmbeddedImporter:
    """Put an importer of ``modules`` first in ``sys.meta_path``, once per ``origin`` (importing the file again
    reuses it), after checking that no module of the same name is already imported: it would shadow ours."""
    for finder in sys.meta_path:
        if type(finder).__name__ == "EmbeddedImporter" and finder.origin == origin:
            return finder
    for name in modules:
        if sys.modules.get(name) is not None:
            raise ImportError(f"{name} is already imported from {getattr(sys.modules[name], '__file__', None)}; "
                              f"it would shadow the copy embedded in {origin}", name=name)
    importer = EmbeddedImporter(modules, origin)
    sys.meta_path.insert(0, importer)
    return importer


# --------------------------------------------------------------------------- reading the project's imports


@dataclass
class Module:
    """One project module as the build sees it: its file, and what each of its import statements reaches."""

    name: str
    path: Path
    is_package: bool
    source: str
    # (project module or top-level package, line, whether it sits in the entry's training function)
    edges: list[tuple[str, int, bool]] = field(default_factory=list)
    external: list[tuple[str, int, bool]] = field(default_factory=list)


def module_path(root: Path, name: str) -> Path | None:
    """'a.b' -> root/a/b.py, or root/a/b/__init__.py for a package; None if neither."""
    path = root.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _import_statements(tree: ast.Module, is_entry: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement at any depth, with whether it sits in the entry's training function."""
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            continue  # never runs in the uploaded file: the module is imported, not run
        training = is_entry and isinstance(node, ast.FunctionDef) and node.name == TRAINING_FUNCTION
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                yield sub, training


def _targets(node: ast.Import | ast.ImportFrom, package: str, where: str) -> list[tuple[str, bool]]:
    """(absolute module name, whether it must be a module) for what a statement may import: for
    ``from m import n``, ``m`` must be, ``m.n`` may be (n is a submodule or a name defined in m)."""
    if isinstance(node, ast.Import):
        return [(alias.name, True) for alias in node.names]
    try:
        base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
    except ImportError as err:  # a relative import above the top package, or in a top-level module
        raise SystemExit(f"build: {where}:{node.lineno}: {err}") from None
    return [(base, True)] + [(f"{base}.{alias.name}", False) for alias in node.names if alias.name != "*"]


def read_module(root: Path, name: str, entry: str) -> Module:
    """Parse one project module and sort each import it makes into project edges and external packages (refused
    where the grader lacks the package, or the project the module)."""
    path = module_path(root, name)
    module = Module(name, path, path.name == "__init__.py", importlib.util.decode_source(path.read_bytes()))
    package = name if module.is_package else name.rpartition(".")[0]
    where = path.relative_to(root).as_posix()
    for node, training in _import_statements(ast.parse(module.source, where), name == entry):
        for target, required in _targets(node, package, where):
            top = target.partition(".")[0]
            if module_path(root, top) is None:
                if top not in GRADER_PACKAGES and top not in sys.stdlib_module_names:
                    raise SystemExit(f"build: {where}:{node.lineno} imports {top!r}, which the grader does not have.")
                module.external.append((top, node.lineno, training))
            elif module_path(root, target) is not None:
                module.edges.append((target, node.lineno, training))
            elif required:
                raise SystemExit(f"build: {where}:{node.lineno} imports {target}, which is not a project module.")
    return module


# --------------------------------------------------------------------------- the two parts


Chain = tuple[str, ...]


@dataclass
class Plan:
    """The modules to embed, as the two parts of the module docstring, each {name: how it was reached}."""

    modules: dict[str, Module]
    classify: dict[str, Chain]
    training: dict[str, Chain]


def _parents(name: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b']: importing a module first imports each package above it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _reach(root: Path, plan: Plan, starts: dict[str, Chain], entry: str, seen: dict[str, Chain]) -> dict[str, Chain]:
    """{module: a shortest import chain (the file:line of each hop) that reaches it} for ``starts`` and all
    they import, ``seen`` excepted."""
    found = {}
    todo = deque(starts.items())
    while todo:
        name, chain = todo.popleft()  # breadth first: the chain a refusal names is a shortest one
        if name in seen or name in found:
            continue
        found[name] = chain
        if name not in plan.modules:
            plan.modules[name] = read_module(root, name, entry)
        module = plan.modules[name]
        where = module.path.relative_to(root).as_posix()
        todo += [(p, chain) for p in _parents(name)]
        todo += [(t, (*chain, f"{where}:{line}")) for t, line, training in module.edges if not training]
    return found


def plan_modules(root: Path = ROOT, entry: str = ENTRY) -> Plan:
    """Which modules to embed (classify's part, then training's), with the proof that classify's part
    imports no training-only package."""
    plan = Plan({}, {}, {})
    plan.classify = _reach(root, plan, {entry: ()}, entry, {})
    entry_file = plan.modules[entry].path.relative_to(root).as_posix()
    starts = {t: (f"{entry_file}:{line}",) for t, line, training in plan.modules[entry].edges if training}
    plan.training = _reach(root, plan, starts, entry, plan.classify)
    for name, chain in plan.classify.items():
        module = plan.modules[name]
        for package, line, training in module.external:
            if package in TRAINING_ONLY and not (name == entry and training):
                how = " -> ".join(chain) or "it is the entry"
                raise SystemExit(f"build: {module.path.relative_to(root).as_posix()}:{line} imports {package!r}, "
                                 f"and classify needs this module ({how}); import it only for training.")
    return plan


# --------------------------------------------------------------------------- writing classification.py


HEADER = '''"""Bird-species classifier for the grader: train_classifier() and classify().

Generated by tools/build_submission.py from the birds-lpft project; edit the project, not this file.
The project's modules travel verbatim in MODULES below. EmbeddedImporter serves them to ordinary imports
(each module under its own name, in its own namespace), and the last lines put it first in sys.meta_path
and re-export train_classifier and classify from the embedded solution module. Training modules (Lightning,
scikit-learn) load only when train_classifier imports them.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
'''


def _escape(ch: str) -> str:
    """One character of a module's source as it is written inside a ``'''`` string literal."""
    if ch == "'":
        return "\\'"  # so the text never holds the closing quotes, nor ends on a quote that would join them
    if ch == "\n" or (ch.isprintable() and ch != "\\"):
        return ch
    return repr(ch)[1:-1]  # a backslash, a tab, a carriage return (a line break to the compiler), a NUL...


def _literal(source: str) -> str:
    """``source`` as one string literal that reads like the file: its lines as they are, in a ``'''`` string,
    with only quotes, backslashes and unprintable characters escaped (one token: cheap to compile)."""
    return "'''\\\n" + "".join(map(_escape, source)) + "'''"


def _table(plan: Plan, root: Path) -> str:
    """The text of ``MODULES = {...}``, classify's part first; each entry says which part it belongs to."""
    rows = []
    for part, names in (("classify's part", plan.classify), ("training's part", plan.training)):
        for name in sorted(names):
            module = plan.modules[name]
            rows.append(f"    # {module.path.relative_to(root).as_posix()} ({part})\n"
                        f"    {name!r}: ({module.is_package}, {_literal(module.source)}),")
    return "MODULES = {\n" + "\n".join(rows) + "\n}\n"


def with_shipped_recipe(plan: Plan, recipe: dict, entry: str) -> Plan:
    """The plan with the entry's ``SHIPPED_RECIPE`` line holding ``recipe`` (what the grader file's
    ``train_classifier(fast_train=False)`` trains), less the levers neither of the configs the file trains uses:
    a grader file carries only what its model's recipe needs."""
    source = plan.modules[entry].source
    if source.count(RECIPE_LINE) != 1:
        raise SystemExit(f"build: the entry must hold the line {RECIPE_LINE.strip()!r} exactly once")
    plan.modules[entry].source = source.replace(RECIPE_LINE, f"SHIPPED_RECIPE: dict | None = {recipe!r}\n")
    used = {name for cfg in (grader_recipe(False, recipe), grader_recipe(True, recipe)) for name in lever_modules(cfg)}
    unneeded = set(lever_modules()) - used
    return Plan(plan.modules, {k: v for k, v in plan.classify.items() if k not in unneeded},
                {k: v for k, v in plan.training.items() if k not in unneeded})


def build_source(root: Path = ROOT, entry: str = ENTRY, recipe: dict | None = None) -> str:
    """The text of the self-contained ``classification.py`` for the project at ``root``; with ``recipe`` (the
    shipped model's), its entry's ``SHIPPED_RECIPE`` holds that recipe and it carries only the levers it uses."""
    plan = plan_modules(root, entry)
    if recipe is not None:
        plan = with_shipped_recipe(plan, recipe, entry)
    table = _table(plan, root)
    names = {**plan.classify, **plan.training}
    embedded = {name: (plan.modules[name].is_package, plan.modules[name].source) for name in names}
    if ast.literal_eval(table.partition("=")[2]) != embedded:
        raise AssertionError("build: the embedded table does not read back as the modules' sources")
    importer = inspect.getsource(EmbeddedImporter) + "\n\n" + inspect.getsource(install_importer)
    tail = (f"install_importer(MODULES, __file__)\n"
            f"from {entry} import classify, train_classifier  # noqa: E402 - served by the importer above\n\n"
            '__all__ = ["classify", "train_classifier"]\n')
    return HEADER + "\n\n" + importer + "\n\n" + table + "\n" + tail


PROG = "python tools/build_submission.py"


def recipe_of(model: Classifier, preset_name: str | None) -> dict:
    """The recipe the grader file trains: ``--preset``'s, else the model's own; it must build the shipped
    model's network, or the file could not reproduce it."""
    if preset_name is None:
        return model.recipe.to_dict()
    if preset_name not in PRESETS:
        fail(PROG, f"--preset {preset_name!r}: choose one of {sorted(PRESETS)}")
    rebuilt = PRESETS[preset_name].net_config(model.num_classes)
    if rebuilt != model.net_cfg:
        fail(PROG, f"--preset {preset_name} builds {rebuilt}, but the model is {model.net_cfg}: the file's "
                   "fast_train=False would not reproduce it; pass the --preset that trained it, or none")
    return PRESETS[preset_name].to_dict()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint from `python -m finetune ... --out`")
    p.add_argument("--out", type=Path, default=ROOT / "submission")
    p.add_argument("--preset", help="the recipe the file trains (default: the one the checkpoint stores)")
    args = p.parse_args(argv)
    check_output_dir(PROG, "--out", args.out)
    model = read_or_fail(PROG, "--model", lambda: Classifier.load(args.model))  # ship only a loadable checkpoint
    recipe = recipe_of(model, args.preset)
    code = build_source(recipe=recipe)
    compile(code, "classification.py", "exec")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "classification.py", code)
    if args.model.resolve() != (args.out / "birds_model.pt").resolve():
        copy_file(args.model, args.out / "birds_model.pt")
    print(f"built {args.out / 'classification.py'} ({len(code.splitlines())} lines) and {args.out / 'birds_model.pt'}"
          f"; fast_train=False trains {recipe['backbone']} at {recipe['image_size']} px, split {recipe['split']}")


if __name__ == "__main__":
    main()
