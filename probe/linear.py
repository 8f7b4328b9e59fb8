"""The linear probe: LogisticRegression on standardised features, folded into an ``nn.Linear`` head (LP-FT).

Kumar et al. 2022 ("Fine-Tuning can Distort Pretrained Features"): initialising the head from a probe
before fine-tuning keeps early gradients from distorting the pretrained features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from torch import nn

from birds_lpft.data.sets import stratified_split
from birds_lpft.recipe import ProbeFit

MAX_ITER = 3000  # lbfgs iterations: enough for every C tried to converge on standardised features


def linear_probe(C: float = 0.01, random_state: int = 0, warm_start: bool = False) -> Pipeline:
    """The probe: features as float64, standardised, then a multinomial LogisticRegression (a scikit-learn
    Pipeline, so ``fit``, ``decision_function``, ``score`` and ``classes_`` are scikit-learn's own)."""
    return make_pipeline(FunctionTransformer(partial(np.asarray, dtype=np.float64)), StandardScaler(),
                         LogisticRegression(C=C, max_iter=MAX_ITER, random_state=random_state, warm_start=warm_start))


def folded_weights(probe: Pipeline) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) acting on raw features: the standardisation folded in (W/sigma, b - W.mu/sigma).

    Rows in ``classes_`` order; a binary probe gives rows (0, w), whose two-logit softmax equals its predict_proba.
    """
    scaler = probe[-2]
    clf = probe[-1]
    coef = clf.coef_
    intercept = clf.intercept_
    if coef.shape[0] == 1:  # scikit-learn stores a binary problem as one row for class 1
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    w = coef / scaler.scale_
    return w, intercept - w @ scaler.mean_


def select_C(
    X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, Cs: Sequence[float],
    random_state: int = 0
) -> tuple[float, dict[float, float]]:
    """Choose C on a validation split by the one-standard-error rule: (chosen C, {C: validation accuracy}).

    With few validation images per class, accuracy is flat across C within its noise, so a plain argmax picks
    at random; the rule takes the smallest C (strongest regularisation) within one binomial standard error of
    the best.
    """
    if len(y_val) == 0 or len(Cs) == 1:  # nothing to choose with (e.g. one image per class), or nothing to choose
        return float(Cs[len(Cs) // 2]), {}
    scores = path_scores(X_train, y_train, X_val, y_val, Cs, random_state)
    best = max(scores.values())
    standard_error = float(np.sqrt(best * (1.0 - best) / len(y_val)))
    return min(C for C, s in scores.items() if s >= best - standard_error), scores


def path_scores(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, Cs: Sequence[float],
                random_state: int = 0) -> dict[float, float]:
    """{C: validation accuracy} of probes fitted along the C path, each warm-started from the next smaller C's
    solution: the same optimum as a cold fit, in fewer lbfgs iterations. Only the choice of C uses these fits;
    the probe that becomes the head is refitted cold (:func:`fit_probe`)."""
    probe = linear_probe(random_state=random_state, warm_start=True)
    scores = {}
    for C in sorted(float(c) for c in Cs):
        scores[C] = probe.set_params(logisticregression__C=C).fit(X_train, y_train).score(X_val, y_val)
    return {float(C): float(scores[float(C)]) for C in Cs}


@dataclass
class FittedProbe:
    """A probe fitted by :func:`fit_probe`, with how its C was chosen."""

    probe: Pipeline  # linear_probe()'s, fitted
    C: float
    val_scores: dict[float, float]  # {C: accuracy on the held-out split}; empty when nothing was chosen

    @property
    def val_accuracy(self) -> float | None:
        return self.val_scores.get(self.C)


def fit_probe(X: np.ndarray, y: np.ndarray, cfg: ProbeFit, seed: int) -> FittedProbe:
    """Choose C on a seeded stratified split of (X, y), then refit the probe on all of it."""
    tr, va = stratified_split(y, cfg.val_fraction, seed)
    C, scores = select_C(X[tr], y[tr], X[va], y[va], cfg.Cs, seed)
    return FittedProbe(linear_probe(C, random_state=seed).fit(X, y), C, scores)


def init_head_from_probe(head: nn.Linear, probe: Pipeline) -> nn.Linear:
    """Copy the probe's folded weights into ``head`` so ``head(f)`` equals ``probe.decision_function(f)``.

    Raises:
        ValueError: the probe's classes are not 0..K-1 in order, or its shape is not the head's.
    """
    k = head.out_features
    if not np.array_equal(np.asarray(probe.classes_), np.arange(k)):
        raise ValueError(f"probe classes {list(probe.classes_)[:10]}... are not 0..{k - 1}: rows would be mislabelled")
    w, b = folded_weights(probe)
    if w.shape != (k, head.in_features):
        raise ValueError(f"probe weights {w.shape} do not fit head ({k}, {head.in_features})")
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
    return head
