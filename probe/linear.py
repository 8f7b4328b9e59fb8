"""The linear probe: LogisticRegression on standardised features, folded into an ``nn.Linear`` head (LP-FT).

Kumar et al. 2022 ("Fine-Tuning can Distort Pretrained Features"): initialising the head from a probe
before fine-tuning keeps early gradients from distorting the pretrained features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from birds_lpft.data.sets import stratified_split
from birds_lpft.recipe import ProbeFit


class LinearProbe:
    """Standardise features, then multinomial LogisticRegression (scikit-learn estimator conventions).

    Args:
        C: inverse L2 strength of the LogisticRegression.
        max_iter: lbfgs iterations.
        random_state: seed handed to scikit-learn.
    """

    def __init__(self, C: float = 0.01, max_iter: int = 3000, random_state: int = 0):
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray) -> "LinearProbe":
        X = np.asarray(X, dtype=np.float64)
        self.scaler_ = StandardScaler().fit(X)
        self.clf_ = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.random_state)
        self.clf_.fit(self.scaler_.transform(X), y)
        self.classes_ = self.clf_.classes_
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self.clf_.decision_function(self.scaler_.transform(np.asarray(X, dtype=np.float64)))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.clf_.predict(self.scaler_.transform(np.asarray(X, dtype=np.float64)))

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(X) == np.asarray(y)))

    def folded_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) acting on raw features: the standardisation folded in (W/sigma, b - W.mu/sigma).

        Returns one row per class in ``classes_`` order, shapes (K, F) and (K,). A binary probe gives
        rows (0, w): the two-logit softmax equals its predict_proba.
        """
        coef = self.clf_.coef_
        intercept = self.clf_.intercept_
        if coef.shape[0] == 1:  # scikit-learn stores a binary problem as one row for class 1
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.concatenate([[0.0], intercept])
        w = coef / self.scaler_.scale_
        return w, intercept - w @ self.scaler_.mean_


def select_C(
    X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, Cs: Sequence[float],
    random_state: int = 0
) -> tuple[float, dict[float, float]]:
    """Choose C on a validation split by the one-standard-error rule.

    With ~10 validation images per class, accuracy is flat across C within its noise, so plain argmax
    picks at random. The rule takes the smallest C (strongest regularisation) whose accuracy is within
    one binomial standard error of the best.

    Returns:
        (chosen C, {C: validation accuracy})
    """
    if len(y_val) == 0 or len(Cs) == 1:  # nothing to choose with (e.g. one image per class), or nothing to choose
        return float(Cs[len(Cs) // 2]), {}
    scores = path_scores(X_train, y_train, X_val, y_val, Cs, random_state)
    best = max(scores.values())
    standard_error = float(np.sqrt(best * (1.0 - best) / len(y_val)))
    return min(C for C, s in scores.items() if s >= best - standard_error), scores


def path_scores(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, Cs: Sequence[float],
                random_state: int = 0) -> dict[float, float]:
    """{C: validation accuracy} of :class:`LinearProbe` fits along the C path, each warm-started from the
    solution at the next smaller C (the features standardised once): the same optimum as a cold fit per C,
    reached in a fraction of the lbfgs iterations. Only the choice of C uses these fits; the probe that
    becomes the head is refitted cold (:func:`fit_probe`)."""
    X_train = np.asarray(X_train, dtype=np.float64)
    scaler = StandardScaler().fit(X_train)
    Xt, Xv = scaler.transform(X_train), scaler.transform(np.asarray(X_val, dtype=np.float64))
    clf = LogisticRegression(max_iter=LinearProbe().max_iter, random_state=random_state, warm_start=True)
    scores = {}
    for C in sorted(float(c) for c in Cs):
        clf.set_params(C=C).fit(Xt, y_train)
        scores[C] = float(np.mean(clf.predict(Xv) == np.asarray(y_val)))
    return {float(C): scores[float(C)] for C in Cs}


@dataclass
class FittedProbe:
    """A probe fitted by :func:`fit_probe`, with how its C was chosen."""

    probe: LinearProbe
    C: float
    val_scores: dict[float, float]  # {C: accuracy on the held-out split}; empty when nothing was chosen

    @property
    def val_accuracy(self) -> float | None:
        return self.val_scores.get(self.C)


def fit_probe(X: np.ndarray, y: np.ndarray, cfg: ProbeFit, seed: int) -> FittedProbe:
    """Choose C on a seeded stratified split of (X, y), then refit the probe on all of it."""
    tr, va = stratified_split(y, cfg.val_fraction, seed)
    C, scores = select_C(X[tr], y[tr], X[va], y[va], cfg.Cs, seed)
    return FittedProbe(LinearProbe(C, random_state=seed).fit(X, y), C, scores)


def init_head_from_probe(head: nn.Linear, probe: LinearProbe) -> nn.Linear:
    """Copy the probe's folded weights into ``head`` so ``head(f)`` equals ``probe.decision_function(f)``.

    Raises:
        ValueError: the probe's classes are not 0..K-1 in order, or shapes disagree with the head.
    """
    k = head.out_features
    if not np.array_equal(np.asarray(probe.classes_), np.arange(k)):
        raise ValueError(f"probe classes {list(probe.classes_)[:10]}... are not 0..{k - 1}: rows would be mislabelled")
    w, b = probe.folded_weights()
    if w.shape != (k, head.in_features):
        raise ValueError(f"probe weights {w.shape} do not fit head ({k}, {head.in_features})")
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
    return head
