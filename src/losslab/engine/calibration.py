"""Post-hoc calibration chosen on validation and applied unchanged at test.

Nothing here ever sees test labels: every ``fit_*`` takes validation labels and returns numbers
(a threshold, per-class offsets, a temperature) that :class:`Calibrator` stores and applies.

Shapes at this module's boundary:
    y_true      ``(N,)`` int class indices
    p_positive  ``(N,)`` probability (or any score) of class 1
    logits      ``(N, K)``; log-probabilities work too. Binary models with one output may pass
                ``(N,)`` or ``(N, 1)`` logits, read as ``[0, z]`` (so ``softmax`` = ``sigmoid(z)``).

MLflow-free (``engine`` never imports ``mlflow``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import precision_recall_curve, roc_curve

from losslab.engine.metrics import to_numpy

__all__ = [
    "Calibrator",
    "fit_logit_offsets",
    "fit_temperature",
    "fit_threshold",
    "as_logits",
]

_THRESHOLD_METHODS = ("youden", "f1")
_OFFSET_OBJECTIVES = ("balanced_accuracy", "f1_macro")


def as_logits(logits: Any) -> np.ndarray:
    """``(N, K)`` float64 logits; ``(N,)`` / ``(N, 1)`` binary logits become ``[0, z]``."""
    z = to_numpy(logits).astype(np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2:
        raise ValueError(f"logits must have shape (N, K) or (N,), got {z.shape}")
    if z.shape[1] == 1:
        z = np.concatenate([np.zeros_like(z), z], axis=1)
    return z


def _labels(y: Any) -> np.ndarray:
    arr = to_numpy(y)
    if arr.ndim != 1:
        raise ValueError(f"y_true must have shape (N,), got {arr.shape}")
    return arr.astype(np.int64)


# --------------------------------------------------------------------------- threshold
def fit_threshold(y_true: Any, p_positive: Any, method: str = "youden") -> float:
    """Decision threshold on the positive-class score; predict 1 when ``p >= threshold``.

    Args:
        y_true: ``(N,)`` binary labels.
        p_positive: ``(N,)`` score of class 1 (probability, or any monotone score).
        method: ``"youden"`` maximises ``TPR - FPR`` along ``sklearn.metrics.roc_curve``;
            ``"f1"`` maximises F1 of class 1 along ``sklearn.metrics.precision_recall_curve``.
            Ties go to the first (highest) threshold.

    Returns:
        A threshold equal to one of the validation scores (so it reproduces the chosen
        operating point exactly on validation). With a single class in ``y_true`` nothing can
        be fitted: warns and returns 0.5.

    Raises:
        ValueError: on an unknown ``method``.
    """
    if method not in _THRESHOLD_METHODS:
        raise ValueError(f"method must be one of {_THRESHOLD_METHODS}, got {method!r}")
    y = _labels(y_true)
    p = to_numpy(p_positive).astype(np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"p_positive has shape {p.shape}, expected {y.shape}")
    if len(np.unique(y)) < 2:
        warnings.warn(
            "fit_threshold: y_true holds a single class; returning the default threshold 0.5",
            UserWarning,
            stacklevel=2,
        )
        return 0.5
    if method == "youden":
        fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
        best = int(np.argmax(tpr - fpr))
    else:
        precision, recall, thresholds = precision_recall_curve(y, p)
        # the last (precision=1, recall=0) point has no threshold
        precision, recall = precision[:-1], recall[:-1]
        denominator = precision + recall
        f1 = np.divide(
            2 * precision * recall, denominator, out=np.zeros_like(denominator),
            where=denominator > 0,
        )
        best = int(np.argmax(f1))
    threshold = float(thresholds[best])
    if not math.isfinite(threshold):  # roc_curve's leading +inf: predict nothing positive
        threshold = float(np.nextafter(p.max(), np.inf))
    return threshold


# --------------------------------------------------------------------------- logit offsets
def _scores(y: np.ndarray, predictions: np.ndarray, num_classes: int, objective: str) -> np.ndarray:
    """Objective of each row of ``predictions`` ``(G, N)`` against ``y`` ``(N,)`` -> ``(G,)``.

    Hand-written, vectorised over candidates (a confusion matrix per row via ``np.bincount``);
    equal to ``sklearn.metrics.balanced_accuracy_score`` (mean recall over classes present in
    ``y``) and ``f1_score(average="macro", labels=range(K), zero_division=0)`` — the tests
    check both against scikit-learn. Calling scikit-learn once per candidate would be ~100x
    slower inside the coordinate search.
    """
    g, k = predictions.shape[0], num_classes
    flat = (np.arange(g)[:, None] * k * k + y[None, :] * k + predictions).ravel()
    cm = np.bincount(flat, minlength=g * k * k).reshape(g, k, k)
    true_positive = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    support = cm.sum(axis=2).astype(np.float64)  # rows: true class
    predicted = cm.sum(axis=1).astype(np.float64)  # columns: predicted class
    if objective == "balanced_accuracy":
        present = support[0] > 0
        return (true_positive[:, present] / support[:, present]).mean(axis=1)
    denominator = support + predicted
    f1 = np.divide(
        2 * true_positive, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    return f1.mean(axis=1)


def fit_logit_offsets(
    y_true: Any,
    logits: Any,
    objective: str = "balanced_accuracy",
    grid: Any | None = None,
    max_rounds: int = 5,
) -> np.ndarray:
    """Per-class additive offsets ``b`` so that ``argmax(logits + b)`` maximises ``objective``
    on validation (``b[0] = 0``; only differences between classes matter).

    Hand-written coordinate ascent: starting from ``b = 0``, for each class ``k >= 1`` in turn
    try every value of ``grid`` for ``b[k]`` with the other offsets fixed and keep the best;
    repeat until a full round no longer improves (at most ``max_rounds``). Among tied grid
    values the middle one of the tied set is kept, which sits inside the best plateau rather
    than on its edge and transfers better to test.

    Args:
        y_true: ``(N,)`` int labels in ``[0, K)``.
        logits: ``(N, K)`` logits or log-probabilities.
        objective: ``"balanced_accuracy"`` (default) or ``"f1_macro"``.
        grid: candidate offsets; default 161 points on ``[-s, s]`` with ``s`` the 95th
            percentile of the per-row logit range (at least 1), so the grid follows the scale
            of the logits.
        max_rounds: passes over the classes, default 5.

    Returns:
        ``(K,)`` float64 offsets.

    Raises:
        ValueError: on an unknown ``objective`` or labels outside ``[0, K)``.
    """
    if objective not in _OFFSET_OBJECTIVES:
        raise ValueError(f"objective must be one of {_OFFSET_OBJECTIVES}, got {objective!r}")
    y, z = _checked_labels_and_logits(y_true, logits)
    offsets = np.zeros(z.shape[1])
    if len(y) == 0:
        return offsets
    candidates = _offset_candidates(z, grid)
    best_score = float(_scores(y, z.argmax(axis=1)[None, :], z.shape[1], objective)[0])
    for _ in range(int(max_rounds)):
        improved = False
        for c in range(1, z.shape[1]):
            scores = _scores_with_class_offset(y, z, offsets, c, candidates, objective)
            tied = np.flatnonzero(scores >= scores.max() - 1e-12)
            choice = tied[len(tied) // 2]
            if scores[choice] > best_score + 1e-12:
                improved = True
            if scores[choice] >= best_score - 1e-12:
                best_score = float(scores[choice])
                offsets[c] = candidates[choice]
        if not improved:
            break
    return offsets


def _checked_labels_and_logits(y_true: Any, logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(y (N,), z (N, K))``; raises when the counts differ or a label is outside ``[0, K)``."""
    y = _labels(y_true)
    z = as_logits(logits)
    n, k = z.shape
    if n != len(y):
        raise ValueError(f"logits has {n} rows but y_true has {len(y)} samples")
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"y_true must lie in [0, {k}), got [{y.min()}, {y.max()}]")
    return y, z


def _offset_candidates(z: np.ndarray, grid: Any | None) -> np.ndarray:
    """The given grid (sorted, unique), else 161 points on ``[-s, s]``, ``s`` the 95th percentile
    of the per-row logit range (at least 1)."""
    if grid is not None:
        return np.unique(np.asarray(grid, dtype=np.float64).ravel())
    span = max(1.0, float(np.quantile(z.max(axis=1) - z.min(axis=1), 0.95)))
    return np.linspace(-span, span, 161)


def _scores_with_class_offset(y: np.ndarray, z: np.ndarray, offsets: np.ndarray, c: int,
                              candidates: np.ndarray, objective: str) -> np.ndarray:
    """The objective ``(G,)`` for each candidate offset of class ``c``, the other offsets fixed:
    class ``c`` wins where its shifted logit beats the best of the other (shifted) classes."""
    n = len(y)
    shifted = z + offsets
    shifted[:, c] = -np.inf
    other_index = shifted.argmax(axis=1)
    other_value = shifted[np.arange(n), other_index]
    wins = z[None, :, c] + candidates[:, None] > other_value[None, :]
    return _scores(y, np.where(wins, c, other_index[None, :]), z.shape[1], objective)


# --------------------------------------------------------------------------- temperature
def fit_temperature(logits: Any, y_true: Any, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature ``T`` minimising the validation NLL of ``softmax(logits / T)``.

    Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017,
    arXiv:1706.04599). Searches ``log T`` with ``scipy.optimize.minimize_scalar`` (bounded,
    on ``[log bounds[0], log bounds[1]]``); ``T > 1`` softens over-confident logits.

    Args:
        logits: ``(N, K)`` logits (or ``(N,)`` binary logits).
        y_true: ``(N,)`` int labels.
        bounds: search interval for ``T``, default ``(0.05, 20)``.

    Returns:
        ``T`` as a float; 1.0 for an empty input.
    """
    z = as_logits(logits)
    y = _labels(y_true)
    if z.shape[0] != len(y):
        raise ValueError(f"logits has {z.shape[0]} rows but y_true has {len(y)} samples")
    if len(y) == 0:
        return 1.0
    rows = np.arange(len(y))

    def nll(log_temperature: float) -> float:
        return float(-log_softmax(z / math.exp(log_temperature), axis=1)[rows, y].mean())

    low, high = math.log(bounds[0]), math.log(bounds[1])
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x))


# --------------------------------------------------------------------------- calibrator
@dataclass
class Calibrator:
    """Holds what was fitted on validation and applies it to new logits.

    ``method`` is ``"threshold"`` (K = 2: predict class 1 when the temperature-scaled
    ``p_1 >= threshold``), ``"offsets"`` (K > 2: ``argmax(logits / T + offsets)``) or
    ``"none"`` (unfitted: plain argmax, ``T = 1``). Threshold and offsets are fitted on the
    temperature-scaled logits so that ``predict`` and ``transform_probs`` agree.

    Example (YAML-free; the evaluate pipeline stores ``to_dict()`` as a JSON artifact)::

        calibrator = Calibrator().fit(y_val, logits_val, num_classes=2)
        probs_test = calibrator.transform_probs(logits_test)
        y_pred_test = calibrator.predict(logits_test)
    """

    method: str = "none"
    num_classes: int | None = None
    threshold: float | None = None
    offsets: list[float] | None = None
    temperature: float = 1.0
    threshold_method: str | None = None
    objective: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def fit(
        self,
        y_val: Any,
        logits_val: Any,
        num_classes: int,
        threshold_method: str = "youden",
        objective: str = "balanced_accuracy",
    ) -> "Calibrator":
        """Fit temperature, then a threshold (K = 2) or logit offsets (K > 2). Returns self."""
        z = as_logits(logits_val)
        if z.shape[1] != int(num_classes):
            raise ValueError(f"logits have {z.shape[1]} classes, num_classes={num_classes}")
        y = _labels(y_val)
        self.num_classes = int(num_classes)
        self.temperature = fit_temperature(z, y)
        scaled = z / self.temperature
        if self.num_classes == 2:
            self.method = "threshold"
            self.threshold_method = threshold_method
            self.threshold = fit_threshold(y, softmax(scaled, axis=1)[:, 1], threshold_method)
            self.offsets = None
        else:
            self.method = "offsets"
            self.objective = objective
            self.offsets = [float(o) for o in fit_logit_offsets(y, scaled, objective)]
            self.threshold = None
        return self

    def transform_probs(self, logits: Any) -> np.ndarray:
        """``(N, K)`` probabilities ``softmax(logits / T)``."""
        return softmax(as_logits(logits) / self.temperature, axis=1)

    def predict(self, logits: Any) -> np.ndarray:
        """``(N,)`` int predictions with the fitted threshold / offsets."""
        scaled = as_logits(logits) / self.temperature
        if self.method == "threshold":
            p_positive = softmax(scaled, axis=1)[:, 1]
            return (p_positive >= self.threshold).astype(np.int64)
        if self.method == "offsets":
            return np.argmax(scaled + np.asarray(self.offsets), axis=1).astype(np.int64)
        return np.argmax(scaled, axis=1).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (floats, lists, strings, None)."""
        return {
            "method": self.method,
            "num_classes": self.num_classes,
            "threshold": None if self.threshold is None else float(self.threshold),
            "offsets": None if self.offsets is None else [float(o) for o in self.offsets],
            "temperature": float(self.temperature),
            "threshold_method": self.threshold_method,
            "objective": self.objective,
            "extra": dict(self.extra),
        }
