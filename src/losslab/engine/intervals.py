"""Bootstrap confidence intervals for metrics of pooled predictions, resampling patients.

The cases of a test split are not independent when one patient contributes several of them
(levels of one spine, studies of one person): resampling cases would understate the spread. The
cluster bootstrap resamples *patients* with replacement, takes every case of each drawn patient,
recomputes the metric, and reports the percentile interval of the resampled values (Efron &
Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13; Field & Welsh, "Bootstrapping
clustered data", JRSS B 69, 2007).

Why not ``scipy.stats.bootstrap``: it resamples observations; grouping works only by resampling
patient indices through a non-vectorised statistic, and a resample that happens to lack a class
leaves AUC and that class's recall undefined — SciPy then returns NaN for the whole interval. Here
such resamples are left out for the metric they leave undefined (``n_valid`` counts the rest), and
the interval is the percentile interval of the defined values. The tests check this against
SciPy's percentile bootstrap on data where every resample is defined.

Shapes: ``y_true (N,)`` int, ``probs (N, K)``, ``y_pred (N,)`` int, ``groups (N,)`` patient ids.
MLflow-free (``engine`` never imports ``mlflow``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = ["Interval", "fast_metrics", "grouped_bootstrap", "interval_metrics"]

#: The metrics that get intervals, besides ``recall_<class>``.
SUMMARY_METRICS = ("balanced_accuracy", "f1_macro", "auc")


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    n_valid: int  # resamples in which the metric was defined


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the Mann–Whitney rank sum (ties get average ranks); NaN without both classes."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def fast_metrics(y_true: np.ndarray, probs: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """``balanced_accuracy``, ``f1_macro``, ``auc`` and ``recall_<class>`` with the definitions of
    :func:`losslab.engine.metrics.classification_metrics` (numpy only, fast enough to run a thousand
    times), except that the recall of a class absent from ``y_true`` is NaN (undefined), not 0."""
    k = len(class_names)
    y, pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-300, None)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        f1_denominator = support + predicted  # 2 tp + fp + fn
        f1 = np.where(f1_denominator > 0, 2 * tp / f1_denominator, 0.0)
    present = np.flatnonzero(support > 0)
    out = {"balanced_accuracy": float(np.nanmean(recall)) if len(present) else float("nan"),
           "f1_macro": float(f1.mean())}
    if len(present) < 2:
        out["auc"] = float("nan")
    elif k == 2:
        out["auc"] = _binary_auc(y == 1, p[:, 1])
    else:
        out["auc"] = float(np.mean([_binary_auc(y == c, p[:, c]) for c in present]))
    out |= {f"recall_{name}": float(recall[c]) for c, name in enumerate(class_names)}
    return out


def grouped_bootstrap(y_true: Any, probs: Any, y_pred: Any, groups: Any, class_names: Sequence[str],
                      n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Interval]:
    """Percentile intervals of :func:`fast_metrics` over ``n_resamples`` patient-level resamples.

    Each resample draws as many patients as there are, with replacement (``numpy`` generator seeded
    with ``seed``), and pools all their cases. Returns one :class:`Interval` per metric; NaN bounds
    when no resample defined the metric.

    Raises:
        ValueError: inputs of different lengths, ``n_resamples < 1`` or ``confidence`` outside (0, 1).
    """
    y, pred = np.asarray(y_true), np.asarray(y_pred)
    p, groups = np.asarray(probs), np.asarray(groups)
    if not (len(y) == len(p) == len(pred) == len(groups)):
        raise ValueError(f"y_true, probs, y_pred and groups need one row per case; got lengths "
                         f"{len(y)}, {len(p)}, {len(pred)}, {len(groups)}")
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < confidence < 1, got {n_resamples}, {confidence}")
    _, patient = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(patient == g) for g in range(patient.max() + 1)] if len(y) else []
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_resamples if members else 0):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        for key, value in fast_metrics(y[rows], p[rows], pred[rows], class_names).items():
            samples.setdefault(key, []).append(value)
    alpha = (1.0 - confidence) / 2.0
    out = {}
    for key in (*SUMMARY_METRICS, *(f"recall_{c}" for c in class_names)):
        values = np.asarray(samples.get(key, []), dtype=np.float64)
        values = values[~np.isnan(values)]
        if len(values) == 0:
            out[key] = Interval(float("nan"), float("nan"), 0)
        else:
            low, high = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
            out[key] = Interval(float(low), float(high), len(values))
    return out


def interval_metrics(outputs: dict[str, Any], groups: Any, class_names: Sequence[str], prefix: str,
                     n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """``<prefix>/<metric>_ci_low`` and ``_ci_high`` for predict() outputs (``labels``, ``probs``,
    ``pred``) whose cases belong to ``groups`` (patient ids, one per row of the outputs)."""
    intervals = grouped_bootstrap(outputs["labels"], outputs["probs"], outputs["pred"], groups, class_names,
                                  n_resamples, confidence, seed)
    out = {}
    for key, interval in intervals.items():
        out[f"{prefix}/{key}_ci_low"] = interval.low
        out[f"{prefix}/{key}_ci_high"] = interval.high
    return out
