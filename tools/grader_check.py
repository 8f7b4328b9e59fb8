"""Run the built submission the way the grader does, in a fresh folder, and prove it wrote nothing.

    python tools/grader_check.py DATA_DIR [--submission submission/] [--python PYTHON]

A child process, started in an empty folder holding only ``classification.py`` and ``birds_model.pt``,
with the on-disk project blocked from import (only the file's embedded copies load), CUDA hidden, the network
unreachable (its own network namespace where ``unshare -n`` works, and Python sockets blocked in any case),
and fresh HOME, TMPDIR and TORCH_HOME (so no pretrained weights, as on the grader), does the grader's steps
(GRADER.md): read ``train/gt.csv``, ``train_classifier(..., fast_train=True)``, ``classify(model_path,
test_dir)``, format the lines, score.
The parent compares every file under the four writable places before and after, and scores the same
model with the project's own evaluation. Exit status 1 on any write, missing key, non-int label, or project
module that did not come from the file's embedded table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from birds_lpft.classifier import Classifier
from birds_lpft.data.sets import load_split_dir

# First in every child: the project may be installed in this interpreter (editable: a finder in sys.meta_path),
# and the single file must not lean on it. A blocking finder goes first in sys.meta_path; the file's own
# importer then goes in front of it, so its embedded modules load and any other project import fails.
# ``not_embedded`` (called after the run) names each loaded project module that came from anywhere else; ``peak``
# is the child's own peak memory in MiB.
PROJECT_GUARD = r"""
import importlib.abc, os, sys
PROJECT = ("birds_lpft", "probe", "finetune", "solution", "tools")

class ProjectBlocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in PROJECT:
            raise ModuleNotFoundError(f"{name} is not embedded in classification.py (the project is blocked)",
                                      name=name)
        return None

sys.meta_path.insert(0, ProjectBlocker())

def project_modules():
    return sorted(n for n, m in sys.modules.items() if m is not None and n.partition(".")[0] in PROJECT)

def not_embedded(classification):
    own = os.path.join(classification.__file__, "")  # the embedded modules' files are named under it
    loaders = [f for f in sys.meta_path if getattr(f, "origin", None) == classification.__file__]
    specs = {n: getattr(sys.modules[n], "__spec__", None) for n in project_modules()}
    return [n for n, spec in specs.items()
            if spec is None or spec.loader not in loaders or not (spec.origin or "").startswith(own)]

def peak():  # VmHWM: ru_maxrss would include the parent's peak, carried across fork+exec
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))
"""

CHILD = PROJECT_GUARD + r"""
import csv, json, socket, time

def _blocked(*args, **kwargs):
    raise OSError("network blocked by grader_check")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = socket.getaddrinfo = _blocked

data = sys.argv[1]
out = {}
with open(os.path.join(data, "train", "gt.csv")) as f:
    train_gt = {row[0]: int(row[1]) for row in list(csv.reader(f))[1:]}
t = time.perf_counter(); import classification
out["import_s"] = time.perf_counter() - t
t = time.perf_counter()
classification.train_classifier(train_gt, os.path.join(data, "train", "images"), fast_train=True)
out["fast_train_s"], out["fast_train_peak_mb"] = time.perf_counter() - t, peak()
test_dir = os.path.join(data, "test", "images")
t = time.perf_counter()
pred = classification.classify(os.path.abspath("birds_model.pt"), test_dir)
out["classify_s"], out["peak_mb"] = time.perf_counter() - t, peak()
out["non_int"] = sorted(k for k, v in pred.items() if type(v) is not int)
lines = ["%s,%d" % (k, pred[k]) for k in sorted(pred)]  # the grader writes these; we keep them in RAM
with open(os.path.join(data, "test", "gt.csv")) as f:
    gt = {row[0]: int(row[1]) for row in list(csv.reader(f))[1:]}
out["missing"] = sorted(k for k in gt if k not in pred)
out["accuracy"] = sum(pred.get(k) == v for k, v in gt.items()) / len(gt)
out["images"], out["lines"] = len(os.listdir(test_dir)), len(lines)
out["project_modules"] = len(project_modules())
out["not_embedded"] = not_embedded(classification)
print("GRADER_CHECK " + json.dumps(out))
"""


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} for every file and folder under ``root``."""
    found = {}
    for path in root.rglob("*"):  # symbolic links listed, not followed (as os.walk does)
        st = path.lstat()
        found[str(path.relative_to(root))] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return found


def network_prefix() -> list[str]:
    """``unshare -n`` (an empty network namespace) where this machine allows it, else nothing."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


@contextmanager
def sandbox(submission: Path, prefix: str) -> Iterator[dict[str, Path]]:
    """Fresh folders for a child that runs the upload as the grader would: ``workdir`` (a copy of the two built
    files), ``home``, ``temp`` and ``torch_home`` (so no pretrained weights); removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        places = {name: Path(tmp) / name for name in ("workdir", "home", "temp", "torch_home")}
        for path in places.values():
            path.mkdir()
        for name in ("classification.py", "birds_model.pt"):
            shutil.copy2(submission / name, places["workdir"] / name)
        yield places


def child_env(places: dict[str, Path]) -> dict[str, str]:
    """The child's environment: the sandbox's folders, CUDA hidden, no byte-code files, nothing of this tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HOME=str(places["home"]), TMPDIR=str(places["temp"]), TORCH_HOME=str(places["torch_home"]),
               CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1", PYTHONNOUSERSITE="1")
    return env


def child_result(proc: subprocess.CompletedProcess, marker: str, failed: str) -> dict:
    """The JSON the child printed after ``marker``; its output and ``failed`` (exit N) where it failed."""
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(marker + " ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{failed} (exit {proc.returncode})")
    return json.loads(line.split(" ", 1)[1])


def run_child(python: str, data: Path, places: dict[str, Path]) -> tuple[dict, float, str]:
    prefix = network_prefix()
    start = time.perf_counter()
    # The grader has no matplotlib; where this interpreter has it (the benchmark's), Lightning imports it and it
    # writes its config and font cache: those go to an unwatched folder, the only writes the check forgives.
    env = {**child_env(places), "MPLCONFIGDIR": str(places["home"].parent / "matplotlib")}
    proc = subprocess.run([*prefix, python, "-c", CHILD, str(data.resolve())], cwd=places["workdir"], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    network = "own empty network namespace (unshare -n) + sockets blocked" if prefix else "Python sockets blocked"
    return child_result(proc, "GRADER_CHECK", "grader_check: the submission failed"), wall, network


def own_accuracy(model: Path, data: Path) -> float:
    """The project's own evaluation of the same model on ``data/test``."""
    classifier = Classifier.load(model)
    test = load_split_dir(data, "test", num_classes=classifier.net_cfg.num_classes)
    return classifier.evaluate(test)["accuracy"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path, help="grader layout with train/ and test/")
    p.add_argument("--submission", type=Path, default=Path("submission"), help="folder with the two built files")
    p.add_argument("--python", default=sys.executable, help="interpreter of the grader-like environment")
    args = p.parse_args(argv)
    if os.sep in args.python:  # the child runs in another folder: a relative path would not resolve there
        args.python = str(Path(args.python).absolute())
    with sandbox(args.submission, "grader_check_") as places:
        before = {name: snapshot(path) for name, path in places.items()}
        out, wall, network = run_child(args.python, args.data_dir, places)
        changed = {name: sorted(set(snapshot(path).items()) ^ set(before[name].items()))
                   for name, path in places.items()}
    own = own_accuracy(args.submission / "birds_model.pt", args.data_dir)
    ok = report(out, wall, network, changed, own)
    sys.exit(0 if ok else 1)


def report(out: dict, wall: float, network: str, changed: dict, own: float) -> bool:
    writes = {name: sorted({path for path, _ in diff}) for name, diff in changed.items() if diff}
    print(f"network: {network}; CUDA hidden; HOME, TMPDIR, TORCH_HOME fresh (no pretrained weights)")
    print(f"import classification: {out['import_s']:.1f}s")
    print(f"train_classifier(fast_train=True): {out['fast_train_s']:.1f}s, "
          f"peak RSS {out['fast_train_peak_mb']:.0f} MiB")
    print(f"classify: {out['images']} files in {out['classify_s']:.1f}s "
          f"({out['images'] / out['classify_s']:.1f} images/s), "
          f"peak RSS {out['peak_mb']:.0f} MiB")
    print(f"whole child process: {wall:.1f}s")
    print(f"accuracy (grader-style): {out['accuracy']:.4f}; project's own evaluation: {own:.4f}; "
          f"{'equal' if abs(out['accuracy'] - own) < 1e-12 else 'DIFFERENT'}")
    print(f"missing keys: {len(out['missing'])}, non-int labels: {len(out['non_int'])}")
    print(f"project modules loaded: {out['project_modules']}, not from classification.py's embedded table: "
          f"{out['not_embedded'] or 'none'}")
    print(f"files created or changed in workdir, HOME, TMPDIR, TORCH_HOME: {json.dumps(writes) if writes else 'none'}")
    ok = not writes and not out["missing"] and not out["non_int"] and not out["not_embedded"]
    return ok and abs(out["accuracy"] - own) < 1e-12


if __name__ == "__main__":
    main()
