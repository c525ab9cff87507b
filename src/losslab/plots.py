"""Matplotlib figures for runs and comparisons. Every function returns a ``Figure`` and never
shows it; the caller logs it (``mlflow.log_figure``) and may ``plt.close(fig)``.

Figures are built as ``matplotlib.figure.Figure`` objects with an Agg canvas attached, not
through ``pyplot``: nothing is registered in pyplot's global figure list (so a figure nobody
closes is simply garbage-collected), and the process-wide backend is left alone (calling
``matplotlib.use("Agg")`` on import would switch a notebook's inline backend off).
``plt.close(fig)`` on these figures is a harmless no-op.

Inputs may be numpy arrays, lists or torch tensors.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_curve,
)

from losslab.engine.metrics import expected_calibration_error, to_numpy

__all__ = [
    "plot_attention",
    "plot_confusion_matrix",
    "plot_curves",
    "plot_metric_bars",
    "plot_per_class_recall",
    "plot_precision_recall",
    "plot_recall_heatmap",
    "plot_reliability",
    "plot_roc",
]


def _figure(width: float = 6.0, height: float = 4.5) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # an Agg canvas, without touching pyplot's global state
    return figure


def _binary_or_per_class(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    y = to_numpy(y_true).astype(np.int64).ravel()
    p = to_numpy(probs).astype(np.float64)
    if p.ndim == 1:  # scores of class 1
        p = np.stack([1 - p, p], axis=1)
    if p.ndim != 2 or p.shape[0] != len(y):
        raise ValueError(f"probs must have shape (N, K) with N={len(y)}, got {p.shape}")
    return y, p


def _classes_to_draw(y: np.ndarray, k: int) -> list[int]:
    """Binary: class 1 only. K > 2: every class with both positives and negatives in y."""
    if k == 2:
        return [1] if len(np.unique(y)) == 2 else []
    return [c for c in range(k) if 0 < np.sum(y == c) < len(y)]


# --------------------------------------------------------------------------- training curves
def plot_curves(history: dict[str, Sequence[float]], keys: Sequence[str] | None = None) -> Figure:
    """Metric curves over epochs, one axes per metric name.

    Keys that share the part after the split prefix are drawn on the same axes
    (``train/loss`` and ``val/loss`` → one ``loss`` panel with two lines).

    Args:
        history: ``{metric key: [value per epoch]}``.
        keys: keys to draw, in order; default all keys with at least one value.

    Raises:
        KeyError: if a requested key is missing from ``history``.
    """
    if keys is None:
        keys = [key for key, values in history.items() if len(values)]
    missing = [key for key in keys if key not in history]
    if missing:
        raise KeyError(f"keys not in history: {missing}; available: {sorted(history)}")
    panels: dict[str, list[str]] = {}
    for key in keys:
        panels.setdefault(key.split("/", 1)[-1], []).append(key)
    figure = _figure(4.5 * max(1, min(len(panels), 3)), 3.5 * max(1, -(-len(panels) // 3)))
    if not panels:
        figure.add_subplot().set_title("no metrics")
        return figure
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    for index, (name, panel_keys) in enumerate(panels.items()):
        ax = figure.add_subplot(rows, columns, index + 1)
        for key in panel_keys:
            values = np.asarray(history[key], dtype=np.float64)
            ax.plot(np.arange(len(values)), values, marker="o", markersize=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return figure


def plot_per_class_recall(history: dict[str, Sequence[float]], class_names: Sequence[str]) -> Figure:
    """One line per class: ``val/recall_<class>`` over epochs (classes without a key skipped)."""
    figure = _figure()
    ax = figure.add_subplot()
    for name in class_names:
        values = history.get(f"val/recall_{name}")
        if values is not None and len(values):
            ax.plot(np.arange(len(values)), np.asarray(values, dtype=np.float64),
                    marker="o", markersize=3, label=str(name))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation recall")
    ax.set_title("per-class recall")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    return figure


# --------------------------------------------------------------------------- evaluation plots
def plot_confusion_matrix(cm: Any, class_names: Sequence[str], normalize: bool = False) -> Figure:
    """Confusion matrix (rows true, columns predicted) via ``ConfusionMatrixDisplay``.

    Args:
        cm: ``(K, K)`` counts.
        class_names: ``K`` names.
        normalize: divide each row by its total (per-class recall on the diagonal); rows with
            no samples stay 0.
    """
    matrix = to_numpy(cm).astype(np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(class_names):
        raise ValueError(f"cm must be (K, K) with K={len(class_names)}, got {matrix.shape}")
    if normalize:
        totals = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    figure = _figure(1.2 * len(class_names) + 3, 1.0 * len(class_names) + 2.5)
    ax = figure.add_subplot()
    display = ConfusionMatrixDisplay(matrix, display_labels=list(class_names))
    display.plot(ax=ax, values_format=".2f" if normalize else ".0f", cmap="Blues", colorbar=True)
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalize else ""))
    return figure


def plot_roc(y_true: Any, probs: Any, class_names: Sequence[str]) -> Figure:
    """ROC curves (``sklearn.metrics.roc_curve``): class 1 for binary, one-vs-rest per class for
    K > 2 (classes absent from ``y_true`` skipped), plus the chance diagonal."""
    y, p = _binary_or_per_class(y_true, probs)
    figure = _figure()
    ax = figure.add_subplot()
    for c in _classes_to_draw(y, p.shape[1]):
        fpr, tpr, _ = roc_curve(y == c, p[:, c])
        ax.plot(fpr, tpr, label=f"{class_names[c]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    ax.legend(fontsize="small", loc="lower right")
    return figure


def plot_precision_recall(y_true: Any, probs: Any, class_names: Sequence[str]) -> Figure:
    """Precision-recall curves (``precision_recall_curve``), same classes as :func:`plot_roc`,
    each with its average precision and a dotted prevalence baseline."""
    y, p = _binary_or_per_class(y_true, probs)
    figure = _figure()
    ax = figure.add_subplot()
    for c in _classes_to_draw(y, p.shape[1]):
        precision, recall, _ = precision_recall_curve(y == c, p[:, c])
        line = ax.plot(
            recall, precision,
            label=f"{class_names[c]} (AP {average_precision_score(y == c, p[:, c]):.3f})",
        )[0]
        ax.axhline(np.mean(y == c), linestyle=":", color=line.get_color(), linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("precision-recall")
    ax.legend(fontsize="small")
    return figure


def plot_reliability(y_true: Any, probs: Any, n_bins: int = 15) -> Figure:
    """Top-label reliability diagram: accuracy against confidence (max probability) in
    ``n_bins`` equal-width bins (``sklearn.calibration.calibration_curve``), the diagonal,
    and a histogram of confidences below; the title gives the ECE."""
    y, p = _binary_or_per_class(y_true, probs)
    confidence = p.max(axis=1) / np.maximum(p.sum(axis=1), 1e-12)
    correct = (p.argmax(axis=1) == y).astype(int)
    figure = _figure(5.5, 6.0)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    if len(y):
        accuracy, mean_confidence = calibration_curve(
            correct, confidence, n_bins=n_bins, strategy="uniform"
        )
        top.plot(mean_confidence, accuracy, marker="o", label="model")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1.02)
    ece = expected_calibration_error(y, p, n_bins=n_bins) if len(y) else float("nan")
    top.set_title(f"reliability (ECE {ece:.3f}, {n_bins} bins)")
    top.legend(fontsize="small", loc="upper left")
    bottom.hist(confidence, bins=np.linspace(0, 1, n_bins + 1), color="grey")
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("count")
    bottom.set_xlim(0, 1)
    return figure


# --------------------------------------------------------------------------- MIL attention
def plot_attention(attentions: Sequence[Any], titles: Sequence[str]) -> Figure:
    """Bar plots of attention over the slices of a few bags, one row per bag.

    Args:
        attentions: per bag a ``(n_slices,)`` array of weights (valid slices only).
        titles: one title per bag.
    """
    if len(attentions) != len(titles):
        raise ValueError(f"{len(attentions)} attention arrays but {len(titles)} titles")
    rows = max(len(attentions), 1)
    figure = _figure(7.0, 1.9 * rows + 0.5)
    if not attentions:
        figure.add_subplot().set_title("no bags")
        return figure
    axes = figure.subplots(rows, 1, squeeze=False)[:, 0]
    for ax, attention, title in zip(axes, attentions, titles):
        weights = to_numpy(attention).astype(np.float64).ravel()
        ax.bar(np.arange(len(weights)), weights, color="tab:blue")
        if len(weights):
            ax.axhline(1.0 / len(weights), linestyle="--", color="grey", linewidth=1)
        ax.set_title(str(title), fontsize="small")
        ax.set_ylabel("attention")
    axes[-1].set_xlabel("slice")
    return figure


# --------------------------------------------------------------------------- comparisons
def plot_group_curves(curves: Any, key: str, group_column: str) -> Figure:
    """Mean over runs per epoch of one metric, one line per group, with the min–max band over runs.

    Args:
        curves: ``pandas.DataFrame`` with columns ``group_column``, ``step`` and ``value`` (one row
            per run and epoch, e.g. :func:`losslab.pipelines.compare.epoch_curves`).
        key: the metric's name, for the axis label.
        group_column: the column naming each row's group.
    """
    figure = _figure(6.5, 4.0)
    ax = figure.add_subplot()
    for group, frame in curves.groupby(group_column, sort=True):
        summary = frame.groupby("step")["value"].agg(["mean", "min", "max", "size"])
        steps = summary.index.to_numpy()
        line = ax.plot(steps, summary["mean"], marker="o", markersize=3, label=f"{group} (n = {summary['size'].max()})")
        ax.fill_between(steps, summary["min"], summary["max"], alpha=0.15, color=line[0].get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{key} (mean over runs; band: min–max)")
    ax.grid(alpha=0.3)
    if len(ax.lines):
        ax.legend(fontsize="small")
    return figure


def plot_metric_bars(table: Any, metric: str, error: str | None = None) -> Figure:
    """Horizontal bar per row of ``table`` (e.g. one per loss) for the column ``metric``.

    Args:
        table: ``pandas.DataFrame`` whose index names the bars (e.g. the loss name).
        metric: the column to draw.
        error: optional column of error-bar half-widths (e.g. the standard deviation over
            folds).

    Raises:
        KeyError: if ``metric`` or ``error`` is not a column.
    """
    for column in [metric] + ([error] if error else []):
        if column not in table.columns:
            raise KeyError(f"column {column!r} not in table; columns: {list(table.columns)}")
    labels = [str(label) for label in table.index]
    values = table[metric].to_numpy(dtype=np.float64)
    errors = table[error].to_numpy(dtype=np.float64) if error else None
    figure = _figure(6.0, 0.45 * len(labels) + 1.5)
    ax = figure.add_subplot()
    positions = np.arange(len(labels))
    ax.barh(positions, values, xerr=errors, capsize=3 if error else 0, color="tab:blue")
    ax.set_yticks(positions, labels)
    ax.invert_yaxis()  # first row on top
    ax.set_xlabel(metric + (f" (± {error})" if error else ""))
    ax.grid(axis="x", alpha=0.3)
    return figure


def plot_recall_heatmap(
    matrix: Any, row_names: Sequence[str], class_names: Sequence[str]
) -> Figure:
    """Heatmap of per-class recall, rows = losses (or runs), columns = classes, annotated."""
    values = to_numpy(matrix).astype(np.float64)
    if values.shape != (len(row_names), len(class_names)):
        raise ValueError(
            f"matrix must be ({len(row_names)}, {len(class_names)}) "
            f"(rows x classes), got {values.shape}"
        )
    figure = _figure(1.1 * len(class_names) + 3, 0.5 * len(row_names) + 2)
    ax = figure.add_subplot()
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(np.arange(len(class_names)), [str(c) for c in class_names])
    ax.set_yticks(np.arange(len(row_names)), [str(r) for r in row_names])
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            value = values[i, j]
            ax.text(j, i, "nan" if np.isnan(value) else f"{value:.2f}", ha="center",
                    va="center", color="white" if value < 0.5 else "black", fontsize="small")
    figure.colorbar(image, ax=ax, label="recall")
    ax.set_xlabel("class")
    ax.set_title("per-class recall")
    return figure
