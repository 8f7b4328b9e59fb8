"""Nothing a user owns is lost or mixed: every write is atomic (faults injected at each stage of a save, a
file-size limit, Ctrl-C, two saves racing), and every command refuses a bad flag or destination before any
work. Random-init networks and generated images only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import birds_lpft.tools.bench as bench
import birds_lpft.utils.outputs as outputs
from birds_lpft.classifier import Classifier
from birds_lpft.data.synthetic import make_synthetic, write_grader_layout
from birds_lpft.models.net import NetConfig, build_net

import finetune.__main__ as finetune_cli
import finetune.cv as cv
from finetune.predict import main as predict_main

from conftest import make_classifier

SIZE = 64
ROOT = Path(__file__).resolve().parent.parent


def _classifier(seed: int) -> Classifier:
    torch.manual_seed(seed)
    cfg = NetConfig("mobilenet_v2", 3, 14)
    return make_classifier(build_net(cfg).eval(), cfg, SIZE)


def _same_weights(a: Classifier, b: Classifier) -> bool:
    sa, sb = a.net.state_dict(), b.net.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


@pytest.fixture
def saved(tmp_path) -> tuple[Path, bytes]:
    """A checkpoint already at the destination, and its bytes."""
    path = tmp_path / "birds_model.pt"
    _classifier(0).save(path)
    return path, path.read_bytes()


# --------------------------------------------------------------------------- a fault at every stage


class Boom(Exception):
    pass


def _raise(*args, **kwargs):
    raise Boom


def _half_written(error: BaseException):
    """A ``torch.save`` that writes part of a checkpoint, then fails as a full disk or a Ctrl-C would."""

    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + bytes(100_000))
        raise error

    return save


@pytest.mark.parametrize("stage", ["write", "interrupt", "fsync", "chmod", "replace"])
def test_a_failed_save_leaves_the_old_checkpoint_byte_identical(saved, monkeypatch, stage):
    path, before = saved
    errors = {"write": OSError(28, "No space left on device"), "interrupt": KeyboardInterrupt()}
    if stage in errors:
        monkeypatch.setattr(torch, "save", _half_written(errors[stage]))
    else:
        monkeypatch.setattr(outputs.os, stage, _raise)
    with pytest.raises(type(errors.get(stage, Boom()))):
        _classifier(1).save(path)
    assert path.read_bytes() == before
    assert _leftovers(path.parent) == []


def test_a_save_under_a_file_size_limit_keeps_the_old_file(saved):
    path, before = saved
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises EFBIG instead\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))\n"
        "sys.path[:0] = [sys.argv[2], sys.argv[2] + '/tests']\n"
        "from tests.test_outputs import _classifier\n"
        "try:\n"
        "    _classifier(1).save(sys.argv[1])\n"
        "except (OSError, RuntimeError) as err:  # torch reports EFBIG as either\n"
        "    print('refused', type(err).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(path), str(ROOT)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "refused" in proc.stdout, proc.stderr[-2000:]
    assert path.read_bytes() == before and _leftovers(path.parent) == []


def test_two_saves_racing_to_one_path_leave_one_whole_model(tmp_path):
    path, models = tmp_path / "m.pt", (_classifier(1), _classifier(2))
    for _ in range(20):
        barrier = threading.Barrier(2)

        def save(model, barrier=barrier):
            barrier.wait()
            model.save(path)

        threads = [threading.Thread(target=save, args=(m,)) for m in models]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        loaded = Classifier.load(path)
        assert _same_weights(loaded, models[0]) or _same_weights(loaded, models[1])
    assert _leftovers(tmp_path) == []


def test_atomic_write_keeps_the_replaced_files_permissions(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("old")
    path.chmod(0o640)
    outputs.write_text(path, "new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o640


# --------------------------------------------------------------------------- interrupts


def test_ctrl_c_during_training_exits_130_and_keeps_the_old_model(saved, tmp_path):
    path, before = saved
    cmd = [sys.executable, "-m", "finetune", "--random-init", "--preset", "fast", "--image-size", str(SIZE),
           "epochs=500", "--no-progress", "--out", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # SIGINT back to its default in the child: a runner started in the background (nohup, &) passes it on
    # ignored, and Python would then never raise KeyboardInterrupt.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # every trunk view is cached ("trunk cache: N images x V views in ..."): epochs next
        if line.startswith("trunk cache:") and " views in " in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "python -m finetune: interrupted; nothing was written"
    assert "checkpoint written" not in out
    assert path.read_bytes() == before and _leftovers(path.parent) == []


def test_ctrl_c_inside_the_api_propagates_as_keyboard_interrupt_with_state_restored():
    import lightning as L

    from birds_lpft.recipe import PRESETS

    from finetune.train import fine_tune

    class CtrlC(L.Callback):
        def on_train_batch_start(self, *args):
            raise KeyboardInterrupt

    handler, rng = signal.getsignal(signal.SIGINT), torch.get_rng_state()
    images = make_synthetic(num_classes=3, per_class=4, size=48, seed=0)
    with pytest.raises(KeyboardInterrupt):  # not Lightning's SystemExit(1), which would quit a notebook
        fine_tune(images, replace(PRESETS["fast"], image_size=SIZE), "none", progress=False, accelerator="cpu",
                  devices=1,
                  callbacks=[CtrlC()])
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning ignores SIGINT after one; ours is back
    assert torch.equal(torch.get_rng_state(), rng)


# --------------------------------------------------------------------------- checked before any work


def _usage_error(capsys, main, argv) -> str:
    """The one error line of a command refused before any work (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


@pytest.mark.parametrize("argv, flag", [
    (["--out", "{tmp}/missing/m.pt"], "--out"),
    (["--out", "{tmp}"], "--out"),
    (["epochs=0"], "epochs"),
    (["--epochs", "0"], "epochs"),
    (["batch_size=0"], "batch_size"),
    (["pooling=foo"], "pooling"),
    (["lr_head=-1e-3"], "lr_head"),
    (["--image-size", "8"], "image_size"),
    (["nope=1"], "nope"),
    (["views=2.5"], "views"),
])
def test_finetune_refuses_bad_flags_and_destinations_before_any_work(tmp_path, capsys, monkeypatch, argv, flag):
    monkeypatch.setattr(finetune_cli, "load_data", _raise)  # proves that nothing was read
    line = _usage_error(capsys, finetune_cli.main, [a.format(tmp=tmp_path) for a in argv] + ["--random-init"])
    assert line.startswith("python -m finetune: error:") and flag in line


def test_a_read_only_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: Path(p) != folder and real_access(p, mode))
    monkeypatch.setattr(finetune_cli, "load_data", _raise)
    line = _usage_error(capsys, finetune_cli.main, ["--out", str(folder / "m.pt")])
    assert "not writable" in line and str(folder) in line


def test_a_missing_folder_fails_in_a_real_process_before_training(tmp_path):
    out = tmp_path / "missing" / "m.pt"
    proc = subprocess.run([sys.executable, "-m", "finetune", "--random-init", "--preset", "fast", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"python -m finetune: error: --out {out}: the folder {out.parent} does not exist; " \
                                  "create it first"


def test_finetune_refuses_to_write_over_its_data(tmp_path, capsys):
    data = tmp_path / "data"
    write_grader_layout(data, "train", make_synthetic(num_classes=3, per_class=2, size=32, seed=0))
    gt = data / "train" / "gt.csv"
    before = gt.read_bytes()
    line = _usage_error(capsys, finetune_cli.main, [str(data), "--out", str(gt)])
    assert "input of this command" in line and gt.read_bytes() == before
    line = _usage_error(capsys, finetune_cli.main, [str(data), "--out", str(data / "train" / "images" / "m.pt")])
    assert "input folder" in line


def test_predict_refuses_to_write_its_csv_over_the_model(saved, capsys):
    path, before = saved
    line = _usage_error(capsys, predict_main, [str(path), str(path.parent), "--csv", str(path)])
    assert "--csv" in line and "input of this command" in line and path.read_bytes() == before


def test_cv_and_bench_refuse_bad_destinations_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cv, "load_split_dir", _raise)
    line = _usage_error(capsys, cv.main, [str(tmp_path), "--out", str(tmp_path / "missing" / "cv.json")])
    assert line.startswith("python -m finetune.cv: error: --out")
    assert "epochs" in _usage_error(capsys, cv.main, [str(tmp_path), "--candidates", "full:epochs=0"])
    assert "--folds" in _usage_error(capsys, cv.main, [str(tmp_path), "--folds", "1"])
    assert "twice" in _usage_error(capsys, cv.main, [str(tmp_path), "--seed", "0", "1", "0"])
    monkeypatch.setattr(bench, "run_bench", _raise)
    (tmp_path / "file").write_text("")
    assert "not a folder" in _usage_error(capsys, bench.main, [str(tmp_path), "--out", str(tmp_path / "file")])
    assert "views" in _usage_error(capsys, bench.main, [str(tmp_path), "views=-1", "--out", str(tmp_path / "r")])


# --------------------------------------------------------------------------- odd file names


def test_predict_csv_names_a_non_utf8_file_exactly(saved, tmp_path):
    path, _ = saved
    folder = tmp_path / "photos"
    folder.mkdir()
    raw = b"bird\xff.jpg"
    try:
        (folder / os.fsdecode(raw)).write_bytes(b"not an image")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    csv_path = tmp_path / "p.csv"
    (result,) = predict_main([str(path), str(folder), "--csv", str(csv_path), "--no-progress"])
    assert result.error is not None  # unreadable, so reported, and still a row
    rows = csv_path.read_bytes().splitlines()
    assert len(rows) == 2 and os.fsencode(folder) + b"/" + raw in rows[1]
