"""The benchmark's steps that run in their own 'spawn' child process (``tools.bench`` names them by string,
so its own process never imports this module, nor Lightning through it).

Each takes plain values (paths, configs, flags) and returns a JSON-able dict.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from birds_lpft.data.sets import read_gt, stratified_split
from birds_lpft.data.synthetic import load_data
from birds_lpft.tools.baseline import BaselineConfig, baseline_classifier, baseline_net, train_baseline
from birds_lpft.utils.timing import Stopwatch

from probe.pipeline import ProbeConfig, run_probe

from finetune.config import FinetuneConfig
from finetune.train import fine_tune

import solution


def probe_step(data_dir: Path, weights: str, progress: bool) -> dict:
    """The plain linear probe with ``ProbeConfig`` defaults."""
    train, test = load_data(data_dir)
    result = run_probe(train, test, ProbeConfig(), weights, progress=progress)
    stages = dict(result.stopwatch.seconds)
    seconds = sum(v for k, v in stages.items() if k != "test features")
    fitted = result.fitted
    return {
        "val_accuracy": fitted.val_accuracy, "test_accuracy": result.test_accuracy, "C": fitted.C,
        "val_scores": {str(c): s for c, s in fitted.val_scores.items()}, "stages": stages, "seconds": seconds,
        "train_images": len(train), "images_per_s": len(train) / seconds, "config": asdict(ProbeConfig()),
    }


def baseline_step(data_dir: Path, cfg: BaselineConfig, weights: str, progress: bool) -> dict:
    """Train the online baseline on the 80% split, score validation and test."""
    train, test = load_data(data_dir)
    fit_idx, val_idx = stratified_split(train.labels, cfg.val_fraction, cfg.seed)
    sw = Stopwatch()
    with sw("load network"):
        net = baseline_net(train.num_classes, cfg, weights)
    with sw("train"):
        history = train_baseline(net, train.subset(fit_idx), cfg, progress)
    with sw("evaluate"):
        model = baseline_classifier(net, cfg)
        val_acc = model.score(train.subset(val_idx), precision=cfg.precision) if len(val_idx) else None
        test_acc = model.score(test, precision=cfg.precision) if test is not None else None
    return {
        "val_accuracy": val_acc, "test_accuracy": test_acc, "history": history, "stages": dict(sw.seconds),
        "seconds": sw.seconds["load network"] + sw.seconds["train"],
        "images_per_s": len(fit_idx) * cfg.epochs / sw.seconds["train"], "config": asdict(cfg),
    }


def pipeline_step(data_dir: Path, cfg: FinetuneConfig, weights: str, progress: bool, checkpoint: Path | None) -> dict:
    """Both LP-FT stages, test predictions with probabilities, the checkpoint saved where asked."""
    train, test = load_data(data_dir)
    result = fine_tune(train, cfg, weights, progress=progress, accelerator="cpu", devices=1)
    stages = dict(result.stopwatch.seconds)
    out = {
        "val_accuracy": result.val_accuracy, "probe_C": result.fitted.C,
        "probe_val_accuracy": result.fitted.val_accuracy, "stages": stages, "seconds": sum(stages.values()),
        "history": result.history, "train_images_per_s": result.trained_samples / stages["fine-tune"],
        "cache_mib": result.cache_bytes / 2**20, "cache_images": result.cache_images, "test_accuracy": None,
        "config": asdict(cfg),
    }
    if test is not None:
        out.update(test_outputs(result.classifier, test, cfg.precision, progress))
    if checkpoint is not None:
        result.classifier.save(checkpoint)
        out["checkpoint"] = str(checkpoint)
    return out


def test_outputs(model, test, precision: str, progress: bool) -> dict:
    """Test predictions, the probabilities of the predicted and of the true class, accuracy and seconds."""
    start = time.perf_counter()
    out = model.evaluate(test, precision=precision, progress=progress)
    seconds = time.perf_counter() - start
    probs = out["probabilities"]
    return {"test_seconds": seconds, "test_predictions": out["predictions"].tolist(),
            "test_labels": test.labels.tolist(), "test_names": list(test.names),
            "test_p_predicted": probs.max(1).tolist(),
            "test_p_true": probs[np.arange(len(probs)), test.labels].tolist(),
            "test_accuracy": out["accuracy"]}


def classify_step(model_path: Path, split_dir: Path) -> dict:
    """``solution.classify`` on the test folder, timed around the call (model load included)."""
    start = time.perf_counter()
    predicted = solution.classify(str(model_path), str(split_dir / "images"))
    seconds = time.perf_counter() - start
    gt = read_gt(split_dir / "gt.csv")
    return {
        "images": len(predicted), "seconds": seconds, "images_per_s": len(predicted) / seconds,
        "accuracy": float(np.mean([predicted.get(name) == label for name, label in gt.items()])),
    }
