"""The newer surfaces as a careless user meets them, each command in a real subprocess: weights files, backbone
names, CV candidates, ignored flags and broken models. Each case ends with one line and the right exit status
(2: a bad command line, 1: a bad file), no traceback, and, where it is refused before any work, no progress or
fold line first. Random-init networks and generated images only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from birds_lpft.data.synthetic import make_synthetic, write_grader_layout
from birds_lpft.models.net import NetConfig, build_net
from birds_lpft.models.zoo import get_spec

from conftest import make_classifier

ROOT = Path(__file__).resolve().parent.parent
WORK = ("trunk cache", "fold 1/", "features:", "stage one")  # what any work prints first


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_grader_layout(root, "train", make_synthetic(num_classes=3, per_class=6, size=48, seed=0))
    write_grader_layout(root, "test", make_synthetic(num_classes=3, per_class=2, size=48, seed=1))
    return root


def run(args: list[str], tmp_path: Path, code: str | None = None) -> subprocess.CompletedProcess:
    """A command as a user runs it (``code``: a ``python -c`` prelude, then the module's main), in an empty
    torch hub cache."""
    env = {"PATH": "/usr/bin:/bin", "TORCH_HOME": str(tmp_path / "torch_home"), "HOME": str(tmp_path)}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def one_line(proc: subprocess.CompletedProcess, status: int, *words: str) -> str:
    """The refusal: ``status``, one line on stderr that says ``words``, no traceback, no work printed."""
    err = proc.stderr.strip()
    assert proc.returncode == status, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr[-3000:]
    assert all(w in err for w in words), err
    assert not any(w in proc.stdout for w in WORK), proc.stdout[-2000:]
    return err


# --------------------------------------------------------------------------- weights files


def _weights_files(folder: Path) -> dict[str, Path]:
    """Every kind of file a careless user might pass as MobileNetV2's weights."""
    own = get_spec("mobilenet_v2").build().state_dict()
    files = {}

    def saved(name: str, obj) -> None:
        files[name] = folder / name
        torch.save(obj, files[name])

    (folder / "empty.pth").write_bytes(b"")
    (folder / "random.pth").write_bytes(bytes(range(256)) * 64)
    (folder / "random.safetensors").write_bytes(bytes(range(256)) * 64)
    files.update({n: folder / n for n in ("empty.pth", "random.pth", "random.safetensors")})
    saved("full.pth", own)
    files["truncated.pth"] = folder / "truncated.pth"
    files["truncated.pth"].write_bytes(files["full.pth"].read_bytes()[:100_000])
    saved("renamed.pth", {("x" + k if k == "features.0.0.weight" else k): v for k, v in own.items()})
    saved("resnet18.pth", get_spec("resnet18").build().state_dict())
    saved("wrapped.pth", {"state_dict": own, "epoch": 3})
    saved("nan.pth", {k: v.clone().fill_(float("nan")) if k == "classifier.1.bias" else v for k, v in own.items()})
    saved("pickled.pth", {"features.0.0.weight": Path("/")})  # an object that weights_only refuses to build
    return files


EXPECTED = {"empty.pth": "empty", "random.pth": "not a weights file", "random.safetensors": "not a weights file",
            "truncated.pth": "not a weights file", "renamed.pth": "1 of its 314 entries missing, 1 unexpected",
            "resnet18.pth": "not mobilenet_v2's weights", "wrapped.pth": "a training checkpoint",
            "nan.pth": "NaN or infinite", "pickled.pth": "refused as unsafe"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_bad_weights_file_is_one_line_before_any_work(data, tmp_path, name):
    files = _weights_files(tmp_path)
    proc = run(["-m", "finetune", str(data), "--preset", "fast", "--weights", str(files[name])], tmp_path)
    one_line(proc, 1, str(files[name]), EXPECTED[name])


def test_a_good_weights_file_is_taken(data, tmp_path):
    files = _weights_files(tmp_path)
    proc = run(["-m", "probe", str(data), "--weights", str(files["full.pth"]), "--no-progress"], tmp_path)
    assert proc.returncode == 0 and "test accuracy" in proc.stdout, proc.stderr[-2000:]


# --------------------------------------------------------------------------- backbone names and sizes


@pytest.mark.parametrize("args, words", [
    (["-m", "finetune", "{data}", "--random-init", "--backbone", "timm/no_such_model"], ["timm/no_such_model"]),
    (["-m", "finetune", "{data}", "--random-init", "--backbone", "timm/vit_tiny_patch16_224"], ["not image maps",
                                                                                             "Input height"]),
    (["-m", "probe", "{data}", "--random-init", "--backbones", "mobilenet_v2", "timm/no_such_model"],
     ["--backbones", "timm/no_such_model"]),
    (["-m", "finetune.cv", "{data}", "--random-init", "--folds", "2", "--candidates", "fast",
      "fast:backbone=timm/no_such_model"], ["--candidates", "timm/no_such_model"]),
    (["-m", "finetune", "{data}", "--random-init", "--backbone", "efficientnet_b0", "image_size=16"],
     ["image_size"]),
])
def test_a_backbone_that_cannot_run_is_refused_before_any_work(data, tmp_path, args, words):
    proc = run([a.replace("{data}", str(data)) for a in args], tmp_path)
    err = one_line(proc, 2)
    assert any(w in err for w in words), err


def test_a_huge_model_is_refused_without_being_built(data, tmp_path):
    prelude = ("import atexit, resource, sys\n"
               "atexit.register(lambda: print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024))\n"
               "from finetune.__main__ import main; main(sys.argv[1:])")

    def peak_mib(backbone: str) -> int:
        proc = run([str(data), "--random-init", "--backbone", backbone], tmp_path, code=prelude)
        one_line(proc, 2, backbone, "splits")
        return int(proc.stdout.split("PEAK")[-1])

    # Against a 5 MB model refused the same way, so that what the libraries map in (which differs by machine)
    # cancels: built, vit_h_14's 2.4 GiB of weights would show.
    assert peak_mib("vit_h_14") - peak_mib("squeezenet1_0") < 600


def test_cv_finds_a_later_candidates_missing_weights_before_the_first_fold(data, tmp_path):
    own = get_spec("mobilenet_v2").build().state_dict()
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    cached.parent.mkdir(parents=True)
    torch.save(own, cached)
    prelude = ("import sys, birds_lpft.models.weights as w; w.verify = lambda path, spec: path  # a stand-in for "
               "the official file\nfrom finetune.cv import main; main(sys.argv[1:])")
    proc = run([str(data), "--folds", "2", "--candidates", "fast", "fast:backbone=efficientnet_b0"], tmp_path,
               code=prelude)
    one_line(proc, 1, "efficientnet_b0", "--weights FILE")


# --------------------------------------------------------------------------- flags that would be ignored


@pytest.mark.parametrize("args, words", [
    (["-m", "probe", "{data}", "--backbones", "efficientnet_b0", "--weights", "{file}"], ["--weights", "--backbones"]),
    (["-m", "probe", "{data}", "--random-init", "--weights", "{file}"], ["--weights", "--random-init"]),
    (["-m", "finetune", "{data}", "--random-init", "--weights", "{file}"], ["--weights", "--random-init"]),
    (["-m", "finetune.cv", "{data}", "--random-init", "--allow-download"], ["--allow-download", "--random-init"]),
    (["-m", "finetune.cv", "{data}", "--weights", "{file}", "--candidates", "fast", "fast:backbone=resnet18"],
     ["--weights", "resnet18"]),
    (["-m", "probe", "{data}", "--backbones", "mobilenet_v2", "--out", "{folder}"], ["table.md"]),
])
def test_a_flag_that_would_be_ignored_is_refused(data, tmp_path, args, words):
    (tmp_path / "w.pth").write_bytes(b"x")
    (tmp_path / "t.md").mkdir()
    values = {"{data}": str(data), "{file}": str(tmp_path / "w.pth"), "{folder}": str(tmp_path / "t.md")}
    proc = run([values.get(a, a) for a in args], tmp_path)
    one_line(proc, 2, *words)


# --------------------------------------------------------------------------- models that must not ship


@pytest.fixture
def nan_model(tmp_path) -> Path:
    cfg = NetConfig("mobilenet_v2", 3, 14)
    clf = make_classifier(build_net(cfg).eval(), cfg, 64)
    with torch.no_grad():
        clf.net.head.bias.fill_(float("nan"))
    clf.save(tmp_path / "nan.pt")
    return tmp_path / "nan.pt"


def test_a_nan_model_is_refused_by_predict_and_the_build(data, tmp_path, nan_model):
    proc = run(["-m", "finetune.predict", str(nan_model), str(data / "test" / "images")], tmp_path)
    one_line(proc, 1, str(nan_model), "NaN or infinite", "head.bias")
    proc = run(["tools/build_submission.py", "--model", str(nan_model), "--out", str(tmp_path / "sub")], tmp_path)
    one_line(proc, 2, "NaN or infinite")
    assert not (tmp_path / "sub").exists() or not any((tmp_path / "sub").iterdir())


def test_classify_labels_every_file_of_a_nan_model_and_says_so(data, nan_model):
    import solution

    with pytest.warns(UserWarning, match="NaN or infinite.*labels are guesses"):
        labels = solution.classify(str(nan_model), str(data / "test" / "images"))
    assert len(labels) == 6 and all(type(v) is int for v in labels.values())


def test_training_that_diverges_stops_and_writes_nothing(data, tmp_path):
    prelude = ("import sys, torch.nn.functional as F; ce = F.cross_entropy\n"
               "F.cross_entropy = lambda *a, **k: ce(*a, **k) * float('nan')  # a run that diverges\n"
               "from finetune.__main__ import main; main(sys.argv[1:])")
    out = tmp_path / "m.pt"
    proc = run([str(data), "--random-init", "--preset", "fast", "--out", str(out), "--no-progress"], tmp_path,
               code=prelude)
    assert proc.returncode == 1 and "training diverged" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_checkpoint_rebuilt_on_another_architecture_with_the_same_entries_is_refused(tmp_path):
    pytest.importorskip("timm")
    from birds_lpft.classifier import Classifier

    cfg = NetConfig("timm/efficientnet_b0", 3, 7)
    make_classifier(build_net(cfg).eval(), cfg, 64).save(tmp_path / "m.pt")
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    ckpt["recipe"]["backbone"] = "timm/tf_efficientnet_b0"  # the same keys and shapes, 'same' padding
    assert set(build_net(NetConfig("timm/tf_efficientnet_b0", 3, 7)).state_dict()) == set(ckpt["state_dict"])
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="another architecture"):
        Classifier.load(tmp_path / "edited.pt")
