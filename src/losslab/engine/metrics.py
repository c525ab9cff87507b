"""Classification metrics for imbalanced problems, dead-class detection and training alarms.

Shapes at this module's boundary:
    y_true  ``(N,)`` int class indices in ``[0, K)``
    probs   ``(N, K)`` float class probabilities (rows are renormalised to sum to 1)
    y_pred  ``(N,)`` int class indices

Inputs may be numpy arrays, lists or torch tensors (converted with ``.detach().cpu().numpy()``).
Everything returned is a plain python ``float``/``int``/``list`` so it can go straight to MLflow.
The module is MLflow-free (``engine`` never imports ``mlflow``).

Numbers come from scikit-learn wherever it has the metric; the exceptions (ECE and the
balanced-accuracy variance alarm) are hand-written and say so.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn import metrics as skm

__all__ = [
    "multitask_metrics",
    "unexplained_variance",
    "Alarm",
    "Alarms",
    "DeadClassMonitor",
    "RSNA_SEVERITY_WEIGHTS",
    "classification_metrics",
    "confusion_matrix",
    "dead_class_names",
    "dead_classes",
    "pred_counts",
    "expected_calibration_error",
    "rsna_competition_score",
    "rsna_weighted_log_loss",
    "to_numpy",
]

#: Sample weights of the RSNA 2024 lumbar spine competition: normal/mild, moderate, severe.
RSNA_SEVERITY_WEIGHTS: tuple[float, float, float] = (1.0, 2.0, 4.0)


# --------------------------------------------------------------------------- input helpers
def to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _labels(y: Any, name: str = "y_true") -> np.ndarray:
    arr = to_numpy(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.mod(arr, 1) == 0):
            raise TypeError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _probabilities(probs: Any, n_samples: int | None = None) -> np.ndarray:
    """``(N, K)`` float64 probabilities with rows renormalised to sum to one."""
    p = to_numpy(probs).astype(np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (N, K), got {p.shape}")
    if n_samples is not None and p.shape[0] != n_samples:
        raise ValueError(f"probs has {p.shape[0]} rows but y_true has {n_samples} samples")
    if np.any(p < -1e-6):
        raise ValueError("probs must be non-negative (pass probabilities, not logits)")
    p = np.clip(p, 0.0, None)  # round-off negatives (e.g. ordinal heads' differences)
    row_sum = p.sum(axis=1, keepdims=True)
    return np.divide(p, row_sum, out=np.full_like(p, 1.0 / max(p.shape[1], 1)), where=row_sum > 0)


# --------------------------------------------------------------------------- metrics
def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """``(K, K)`` confusion matrix, rows = true class, columns = predicted class.

    scikit-learn's ``confusion_matrix`` with ``labels=range(K)``, so absent classes keep their
    row and column.
    """
    return skm.confusion_matrix(
        _labels(y_true), _labels(y_pred, "y_pred"), labels=list(range(int(num_classes)))
    )


def dead_class_names(counts: Mapping[Any, float]) -> list[Any]:
    """The one rule for a *dead* class: the keys of ``counts`` (class -> number of predictions)
    whose count is 0, in order. A NaN count (not measured) is not dead.

    Used by the engine (warnings, alarms), tracking (tags), train, evaluate and compare.

    Example:
        >>> dead_class_names({"LGG": 0.0, "HGG": 12.0})
        ['LGG']
    """
    return [name for name, count in counts.items() if float(count) == 0.0]


def pred_counts(metrics: Mapping[str, float], prefix: str = "val/") -> dict[str, float]:
    """class name -> count from the ``<prefix>pred_count_<class>`` keys of a metric dict, in order."""
    head = f"{prefix}pred_count_"
    return {key[len(head):]: float(value) for key, value in metrics.items() if key.startswith(head)}


def dead_classes(y_pred: Any, num_classes: int) -> list[int]:
    """Classes in ``range(num_classes)`` that are never predicted in ``y_pred`` ``(N,)``."""
    counts = np.bincount(_labels(y_pred, "y_pred"), minlength=int(num_classes))
    return dead_class_names({int(c): counts[c] for c in range(int(num_classes))})


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error (Guo et al., ICML 2017, "On Calibration of Modern
    Neural Networks", arXiv:1706.04599).

    .. math:: \\mathrm{ECE} = \\sum_b \\frac{|B_b|}{N} \\left|\\mathrm{acc}(B_b) - \\mathrm{conf}(B_b)\\right|

    where the confidence of a sample is its maximum probability, its prediction the argmax, and
    ``B_b`` the samples whose confidence falls in the ``b``-th of ``n_bins`` equal-width bins
    ``(b/n_bins, (b+1)/n_bins]`` (the first bin also takes confidence 0).

    Hand-written: scikit-learn has no ECE (``calibration_curve`` drops empty bins and does
    not return the bin weights).

    Args:
        y_true: ``(N,)`` int labels.
        probs: ``(N, K)`` probabilities.
        n_bins: number of equal-width bins on ``[0, 1]``, default 15, must be >= 1.

    Returns:
        ECE in ``[0, 1]``; NaN for an empty input.
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y = _labels(y_true)
    p = _probabilities(probs, len(y))
    if len(y) == 0:
        return float("nan")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    inner_edges = np.linspace(0.0, 1.0, int(n_bins) + 1)[1:-1]
    # side="left": a confidence equal to an edge belongs to the bin that edge closes
    bin_index = np.searchsorted(inner_edges, confidence, side="left")
    count = np.bincount(bin_index, minlength=n_bins)
    conf_sum = np.bincount(bin_index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(bin_index, weights=correct, minlength=n_bins)
    return float(np.sum(np.abs(acc_sum - conf_sum)) / len(y))


def _log_loss(y: np.ndarray, p: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    # second positional argument: `y_pred` in sklearn < 1.9, `y_proba` from 1.9 on
    return float(
        skm.log_loss(y, p, labels=list(range(p.shape[1])), sample_weight=sample_weight)
    )


def rsna_weighted_log_loss(
    y_true: Any, probs: Any, weights: Sequence[float] = RSNA_SEVERITY_WEIGHTS
) -> float:
    """Sample-weighted log loss of the RSNA 2024 Lumbar Spine Degenerative Classification
    competition (Kaggle, 2024) for one condition.

    .. math:: L = -\\frac{\\sum_i w_{y_i} \\log \\hat p_{i, y_i}}{\\sum_i w_{y_i}}

    with ``w = (1, 2, 4)`` for normal/mild, moderate, severe. As in the competition's scorer,
    each row is first renormalised to sum to one, then probabilities are clipped to
    ``[eps, 1 - eps]`` (``eps`` = machine epsilon of float64) by ``sklearn.metrics.log_loss``.

    Args:
        y_true: ``(N,)`` int labels in ``[0, K)``.
        probs: ``(N, K)`` non-negative scores (renormalised per row).
        weights: ``(K,)`` weight of each class, default ``(1.0, 2.0, 4.0)``.

    Raises:
        ValueError: if ``len(weights)`` differs from ``K`` or a label is out of range.
    """
    y = _labels(y_true)
    p = _probabilities(probs, len(y))
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (p.shape[1],):
        raise ValueError(f"weights must have one entry per class ({p.shape[1]}), got {w.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"y_true must lie in [0, {p.shape[1]}), got [{y.min()}, {y.max()}]")
    return _log_loss(y, p, sample_weight=w[y])


def _rsna_condition_group(condition: str) -> str:
    """The competition scores left and right together: ``spinal``, ``foraminal`` or ``subarticular``."""
    for group in ("spinal", "foraminal", "subarticular"):
        if group in condition:
            return group
    raise ValueError(f"not an RSNA 2024 lumbar condition: {condition!r}")


def rsna_competition_score(
    y_true: Any, probs: Any, study_ids: Sequence[str], conditions: Sequence[str],
    weights: Sequence[float] = RSNA_SEVERITY_WEIGHTS, any_severe_weight: float = 1.0,
) -> dict[str, float]:
    """The RSNA 2024 lumbar competition's score on (study, condition, level) rows: the mean of the
    sample-weighted log loss of each condition group present (:func:`rsna_weighted_log_loss`; left
    and right merged) and, when spinal canal stenosis rows are present, the ``any_severe_spinal``
    term: per study, the label "any spinal level severe", the prediction the largest severe
    probability over its spinal levels, the weight the largest row weight of its spinal levels,
    scored by a weighted binary log loss and averaged in with ``any_severe_weight`` (1 in the
    competition). Written from the competition's published scorer (Kaggle, metric
    rsna-lumbar-metric); no library has it.

    Returns:
        ``rsna_score`` and, with spinal rows, ``rsna_any_severe_spinal_log_loss``.
    """
    y = _labels(y_true)
    p = _probabilities(probs, len(y))
    w = np.asarray(weights, dtype=np.float64)
    groups = np.array([_rsna_condition_group(str(c)) for c in conditions])
    if len(groups) != len(y) or len(study_ids) != len(y):
        raise ValueError(f"study_ids ({len(study_ids)}) and conditions ({len(groups)}) need one entry per row ({len(y)})")
    losses, loss_weights, out = [], [], {}
    for group in ("spinal", "foraminal", "subarticular"):
        rows = groups == group
        if rows.any():
            losses.append(rsna_weighted_log_loss(y[rows], p[rows], weights))
            loss_weights.append(1.0)
    spinal = groups == "spinal"
    if spinal.any():
        severe = len(w) - 1
        studies, study = np.unique(np.asarray(study_ids)[spinal].astype(str), return_inverse=True)
        label, pred, weight = (np.zeros(len(studies)) for _ in range(3))
        np.maximum.at(label, study, (y[spinal] == severe).astype(float))
        np.maximum.at(pred, study, p[spinal, severe])
        np.maximum.at(weight, study, w[y[spinal]])
        out["rsna_any_severe_spinal_log_loss"] = float(skm.log_loss(label, pred, sample_weight=weight, labels=[0, 1]))
        losses.append(out["rsna_any_severe_spinal_log_loss"])
        loss_weights.append(any_severe_weight)
    return {"rsna_score": float(np.average(losses, weights=loss_weights))} | out


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """Binary: ROC AUC of class 1. K > 2: one-vs-rest macro AUC over classes present in y.

    The one-vs-rest average is taken class by class with ``sklearn.metrics.roc_auc_score`` so
    that a class missing from ``y`` is skipped rather than raising (equals sklearn's
    ``multi_class="ovr", average="macro"`` when every class is present).
    """
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    k = p.shape[1]
    if k == 2:
        return float(skm.roc_auc_score(y == 1, p[:, 1]))
    per_class = [skm.roc_auc_score(y == c, p[:, c]) for c in present]
    return float(np.mean(per_class))


def classification_metrics(
    y_true: Any,
    probs: Any,
    class_names: Sequence[str],
    y_pred: Any | None = None,
) -> dict[str, float]:
    """All per-epoch classification metrics as a flat dict of python floats.

    Args:
        y_true: ``(N,)`` int labels in ``[0, K)``.
        probs: ``(N, K)`` class probabilities (rows renormalised to sum to one).
        class_names: ``K`` names; used in the per-class keys.
        y_pred: ``(N,)`` predictions; default ``argmax(probs)``. Pass calibrated predictions
            (threshold / logit offsets) here; ``auc``, ``ece`` and ``log_loss`` always use
            ``probs``.

    Returns:
        ``auc`` (binary: ROC AUC of class 1; K > 2: one-vs-rest macro over the classes present;
        NaN with fewer than two classes in ``y_true``), ``f1_macro`` (over all K labels,
        zero_division=0), ``balanced_accuracy`` (mean recall over classes present in
        ``y_true``), ``accuracy``, ``recall_<c>``, ``precision_<c>`` (zero_division=0),
        ``pred_count_<c>``, ``min_class_recall`` (over classes present in ``y_true``),
        ``dead_class_count`` (classes never predicted), ``ece`` (15 bins, top label) and
        ``log_loss`` (``labels=range(K)``). Empty input gives NaN for every rate.

    Raises:
        ValueError: on inconsistent shapes or ``len(class_names) != K``.
    """
    y, p, names, pred = _checked_classification_inputs(y_true, probs, class_names, y_pred)
    k = p.shape[1]
    counts = np.bincount(pred, minlength=k)[:k] if pred.size else np.zeros(k, dtype=int)
    if len(y) == 0:
        return _empty_classification_metrics(names)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true" and friends: expected on imbalanced epochs
        warnings.simplefilter("ignore")
        precision, recall, _, _ = skm.precision_recall_fscore_support(
            y, pred, labels=list(range(k)), zero_division=0
        )
        out = {"auc": _auc(y, p),
               "f1_macro": float(skm.f1_score(y, pred, labels=list(range(k)), average="macro", zero_division=0)),
               "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred))}
    out["accuracy"] = float(skm.accuracy_score(y, pred))
    for c, name in enumerate(names):
        out[f"recall_{name}"] = float(recall[c])
        out[f"precision_{name}"] = float(precision[c])
        out[f"pred_count_{name}"] = float(counts[c])
    present = np.unique(y)
    out["min_class_recall"] = float(np.min(recall[present]))
    out["dead_class_count"] = float(len(dead_class_names(dict(enumerate(counts)))))
    out["ece"] = expected_calibration_error(y, p, n_bins=15)
    out["log_loss"] = _log_loss(y, p)
    return out


def _checked_classification_inputs(
    y_true: Any, probs: Any, class_names: Sequence[str], y_pred: Any | None
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """``(y (N,), probs (N, K), K class names, predictions (N,))``, each checked against the others."""
    y = _labels(y_true)
    p = _probabilities(probs, len(y))
    k = p.shape[1]
    names = [str(c) for c in class_names]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} names but probs has {k} columns")
    if len(set(names)) != k:
        raise ValueError(f"class_names must be unique, got {names}")
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"y_true must lie in [0, {k}), got [{y.min()}, {y.max()}]")
    pred = p.argmax(axis=1) if y_pred is None else _labels(y_pred, "y_pred")
    if pred.shape != y.shape:
        raise ValueError(f"y_pred has shape {pred.shape}, expected {y.shape}")
    return y, p, names, pred


def _empty_classification_metrics(names: list[str]) -> dict[str, float]:
    """The metrics of an empty split: NaN for every rate, no predictions, every class dead."""
    nan = float("nan")
    out = {"auc": nan, "f1_macro": nan, "balanced_accuracy": nan, "accuracy": nan}
    for name in names:
        out[f"recall_{name}"] = nan
        out[f"precision_{name}"] = nan
        out[f"pred_count_{name}"] = 0.0
    out.update(min_class_recall=nan, dead_class_count=float(len(names)), ece=nan, log_loss=nan)
    return out


# --------------------------------------------------------------------------- monitors
class DeadClassMonitor:
    """Tracks classes that the model stops predicting.

    A class is *dead* once it has had zero predictions for ``patience`` consecutive updates
    (one update per validation epoch). A single prediction resets its streak.

    Args:
        patience: consecutive zero-count updates before a class is reported, default 2, >= 1.

    Example:
        >>> monitor = DeadClassMonitor(patience=2)
        >>> monitor.update([10, 0, 3])
        []
        >>> monitor.update([12, 0, 1])
        [1]
    """

    def __init__(self, patience: int = 2) -> None:
        if not isinstance(patience, (int, np.integer)) or isinstance(patience, bool):
            raise TypeError(f"patience must be an int, got {type(patience).__name__}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = int(patience)
        self.streaks: list[int] = []

    def update(self, pred_counts: Sequence[int]) -> list[int]:
        """Record one epoch's prediction count per class; return the dead classes (sorted)."""
        counts = [int(c) for c in to_numpy(pred_counts).ravel()]
        if self.streaks and len(counts) != len(self.streaks):
            raise ValueError(
                f"pred_counts has {len(counts)} classes, previous updates had {len(self.streaks)}"
            )
        if not self.streaks:
            self.streaks = [0] * len(counts)
        zero = set(dead_class_names(dict(enumerate(counts))))
        self.streaks = [s + 1 if c in zero else 0 for c, s in enumerate(self.streaks)]
        return [c for c, s in enumerate(self.streaks) if s >= self.patience]

    def reset(self) -> None:
        """Forget all streaks."""
        self.streaks = []


@dataclass(frozen=True)
class Alarm:
    """One training alarm: ``name`` is ``"dead_class"``, ``"overfitting"`` or ``"unstable"``."""

    name: str
    message: str
    epoch: int


class Alarms:
    """Rule-based alarms over the per-epoch metric dict (keys as logged to MLflow).

    Rules (each configurable):

    - ``dead_class``: some class has had ``val/pred_count_<c> == 0`` for
      ``dead_class_patience`` consecutive epochs (via :class:`DeadClassMonitor`).
    - ``overfitting``: ``val/loss - train/loss > loss_gap_threshold`` (default 0.5, the
      RSNA plan's table).
    - ``unstable``: over the last ``bal_acc_var_window`` epochs, the population variance
      (``ddof=0``) of ``val/balanced_accuracy`` *around its trend* exceeds
      ``bal_acc_var_threshold`` (default 0.01, i.e. swings of about 0.1); checked once the window
      is full. The trend is the better of the least-squares line and the non-decreasing isotonic
      fit (:func:`unexplained_variance`), so that a model that is learning — balanced accuracy
      rising from 0.5 to 0.8 in five epochs, or at chance for three epochs and then 0.86 — is not
      called unstable; a curve that swings up and down is (for ``[0.5, 0.8, 0.5, 0.8, 0.5]`` the
      variance around either fit is at least 0.018).

    Each kind fires **at most once per run**: after it fires its name is kept in ``fired`` and
    later epochs never report it again (so a run logs one tag / one warning per problem, not
    one per epoch). Use a fresh ``Alarms`` per run. Missing keys simply skip a rule.

    Args:
        dead_class_patience: epochs of zero predictions, default 2.
        loss_gap_threshold: default 0.5.
        bal_acc_var_window: default 5, >= 2.
        bal_acc_var_threshold: default 0.01.
        prefix: metric-key prefix for validation metrics, default ``"val/"``; training loss
            is read from ``train/loss``.
    """

    def __init__(
        self,
        dead_class_patience: int = 2,
        loss_gap_threshold: float = 0.5,
        bal_acc_var_window: int = 5,
        bal_acc_var_threshold: float = 0.01,
        prefix: str = "val/",
    ) -> None:
        if int(bal_acc_var_window) < 2:
            raise ValueError(f"bal_acc_var_window must be >= 2, got {bal_acc_var_window}")
        self.dead_class_monitor = DeadClassMonitor(dead_class_patience)
        self.loss_gap_threshold = float(loss_gap_threshold)
        self.bal_acc_var_window = int(bal_acc_var_window)
        self.bal_acc_var_threshold = float(bal_acc_var_threshold)
        self.prefix = prefix
        self.fired: set[str] = set()
        self._bal_acc: deque[float] = deque(maxlen=self.bal_acc_var_window)

    def update(self, epoch: int, metrics: dict[str, float]) -> list[Alarm]:
        """Feed one epoch's metrics; return the alarms that fire for the first time now."""
        new: list[Alarm] = []
        counts = pred_counts(metrics, self.prefix)
        if counts:
            dead = self.dead_class_monitor.update(list(counts.values()))
            if dead:
                names = [list(counts)[c] for c in dead]
                new.append(
                    Alarm(
                        "dead_class",
                        f"class(es) {', '.join(names)} predicted 0 times for "
                        f"{self.dead_class_monitor.patience} consecutive epochs",
                        int(epoch),
                    )
                )
        val_loss, train_loss = metrics.get(f"{self.prefix}loss"), metrics.get("train/loss")
        if val_loss is not None and train_loss is not None:
            gap = float(val_loss) - float(train_loss)
            if gap > self.loss_gap_threshold:
                new.append(
                    Alarm(
                        "overfitting",
                        f"val/loss - train/loss = {gap:.3f} > {self.loss_gap_threshold}",
                        int(epoch),
                    )
                )
        bal_acc = metrics.get(f"{self.prefix}balanced_accuracy")
        if bal_acc is not None and not math.isnan(float(bal_acc)):
            self._bal_acc.append(float(bal_acc))
            if len(self._bal_acc) == self.bal_acc_var_window:
                variance = unexplained_variance(np.asarray(self._bal_acc))
                if variance > self.bal_acc_var_threshold:
                    new.append(
                        Alarm(
                            "unstable",
                            f"variance of balanced accuracy around its trend over the last "
                            f"{self.bal_acc_var_window} epochs = {variance:.4f} > "
                            f"{self.bal_acc_var_threshold}",
                            int(epoch),
                        )
                    )
        fresh = [alarm for alarm in new if alarm.name not in self.fired]
        self.fired.update(alarm.name for alarm in fresh)
        return fresh


def unexplained_variance(values: np.ndarray) -> float:
    """Population variance of ``values`` (one per epoch) around the better of two smooth fits: the
    least-squares line (a steady rise or decline) and the non-decreasing isotonic fit (scikit-learn's
    ``IsotonicRegression``: a model that learns in steps, e.g. at chance for three epochs, then good).
    What neither explains is swinging up and down: ``[0.5, 0.8, 0.5, 0.8, 0.5]`` gives 0.018;
    ``[0.5, 0.44, 0.5, 0.86]`` (a late start) gives 0.00045."""
    from sklearn.isotonic import IsotonicRegression

    values = np.asarray(values, dtype=float)
    epochs = np.arange(len(values), dtype=float)
    line = np.polyval(np.polyfit(epochs, values, 1), epochs)
    steps = IsotonicRegression(increasing=True).fit_transform(epochs, values)
    return float(min(np.var(values - line), np.var(values - steps)))


def multitask_metrics(logits: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                      task_classes: Mapping[str, list[str]], prefix: str = "val") -> dict[str, float]:
    """One head per task (image + text models): ``<prefix>/<task>/{accuracy,f1_macro,auc,balanced_accuracy}``
    from the softmax of each head's logits ``(N, K_t)``, ``<prefix>/loss`` = Σ_t mean cross-entropy,
    and ``<prefix>/mean_{accuracy,f1_macro,balanced_accuracy}`` over the tasks."""
    from scipy.special import log_softmax

    out: dict[str, float] = {}
    loss = 0.0
    for task, classes in task_classes.items():
        log_p = log_softmax(np.asarray(logits[task], dtype=np.float64), axis=1)
        y = np.asarray(labels[task])
        loss += float(-log_p[np.arange(len(y)), y].mean())
        m = classification_metrics(y, np.exp(log_p), classes)
        for key in ("accuracy", "f1_macro", "auc", "balanced_accuracy"):
            out[f"{prefix}/{task}/{key}"] = float(m[key])
    out[f"{prefix}/loss"] = loss
    for key in ("accuracy", "f1_macro", "balanced_accuracy"):
        out[f"{prefix}/mean_{key}"] = float(np.mean([out[f"{prefix}/{t}/{key}"] for t in task_classes]))
    return out
