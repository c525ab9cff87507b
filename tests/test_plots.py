"""Plots: each returns a Figure with the expected axes / lines / bars / values, and renders."""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

from losslab import plots

NAMES = ["normal", "moderate", "severe"]


def render(figure: Figure) -> int:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=40)
    plt.close(figure)  # close-safe on a figure pyplot does not manage
    return len(buffer.getvalue())


def toy(n=120, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    logits = 2.0 * np.eye(k)[y] + rng.normal(size=(n, k))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def test_no_pyplot_figures_leak():
    before = plt.get_fignums()
    y, probs = toy()
    figure = plots.plot_roc(y, probs, NAMES)
    assert isinstance(figure, Figure)
    assert plt.get_fignums() == before
    assert render(figure) > 1000


def test_plot_curves_groups_train_and_val():
    history = {
        "train/loss": [1.0, 0.8, 0.6],
        "val/loss": [1.1, 0.9, 0.95],
        "val/balanced_accuracy": [0.4, 0.5, 0.6],
    }
    figure = plots.plot_curves(history)
    assert len(figure.axes) == 2
    loss_ax = figure.axes[0]
    assert loss_ax.get_title() == "loss"
    assert [line.get_label() for line in loss_ax.lines] == ["train/loss", "val/loss"]
    np.testing.assert_allclose(loss_ax.lines[1].get_ydata(), [1.1, 0.9, 0.95])
    assert len(plots.plot_curves(history, keys=["val/balanced_accuracy"]).axes) == 1
    with pytest.raises(KeyError, match="available"):
        plots.plot_curves(history, keys=["val/auc"])
    render(figure)


def test_plot_per_class_recall_one_line_per_class():
    history = {"val/recall_normal": [0.9, 1.0], "val/recall_moderate": [0.0, 0.2],
               "val/recall_severe": [0.1, 0.3], "val/loss": [1.0, 0.9]}
    figure = plots.plot_per_class_recall(history, NAMES)
    (ax,) = figure.axes
    assert [line.get_label() for line in ax.lines] == NAMES
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.0, 0.2])
    render(figure)


@pytest.mark.parametrize("normalize", [False, True])
def test_plot_confusion_matrix_values(normalize):
    cm = np.array([[3, 1, 0], [1, 2, 0], [0, 0, 0]])
    figure = plots.plot_confusion_matrix(cm, NAMES, normalize=normalize)
    assert len(figure.axes) == 2  # matrix + colorbar
    ax = figure.axes[0]
    shown = ax.images[0].get_array()
    expected = cm / np.array([[4], [3], [1]]) if normalize else cm
    if normalize:
        expected[2] = 0  # an empty row stays 0
    np.testing.assert_allclose(np.asarray(shown), expected)
    texts = sorted(t.get_text() for t in ax.texts)
    assert ("0.75" in texts) if normalize else ("3" in texts)
    render(figure)


def test_plot_roc_curves_and_auc_in_legend():
    y, probs = toy()
    figure = plots.plot_roc(y, torch.tensor(probs), NAMES)
    (ax,) = figure.axes
    assert len(ax.lines) == 4  # three classes + chance
    fpr, tpr, _ = roc_curve(y == 2, probs[:, 2])
    assert f"{auc(fpr, tpr):.3f}" in ax.lines[2].get_label()
    # binary: a single curve for class 1
    binary = plots.plot_roc(y % 2, probs[:, :2] / probs[:, :2].sum(1, keepdims=True), ["a", "b"])
    assert len(binary.axes[0].lines) == 2
    render(figure)


def test_plot_precision_recall():
    y, probs = toy()
    figure = plots.plot_precision_recall(y, probs, NAMES)
    ax = figure.axes[0]
    curves = [line for line in ax.lines if "AP" in line.get_label()]
    assert len(curves) == 3
    render(figure)


def test_plot_reliability():
    y, probs = toy()
    figure = plots.plot_reliability(y, probs, n_bins=10)
    assert len(figure.axes) == 2
    top, bottom = figure.axes
    assert len(top.lines) == 2 and "ECE" in top.get_title()
    assert len(bottom.patches) == 10  # histogram bars
    assert sum(p.get_height() for p in bottom.patches) == len(y)
    render(figure)


def test_plot_attention_bars_per_bag():
    attentions = [np.full(4, 0.25), torch.tensor([0.1, 0.7, 0.2]), np.array([1.0])]
    figure = plots.plot_attention(attentions, ["bag 0", "bag 1", "bag 2"])
    assert len(figure.axes) == 3
    assert [len(ax.patches) for ax in figure.axes] == [4, 3, 1]
    np.testing.assert_allclose([p.get_height() for p in figure.axes[1].patches], [0.1, 0.7, 0.2])
    assert figure.axes[1].get_title() == "bag 1"
    with pytest.raises(ValueError):
        plots.plot_attention(attentions, ["only one"])
    render(figure)


def test_plot_metric_bars_with_error():
    table = pd.DataFrame(
        {"balanced_accuracy": [0.61, 0.72, 0.68], "std": [0.02, 0.03, 0.01]},
        index=["ce", "focal", "ldam"],
    )
    figure = plots.plot_metric_bars(table, "balanced_accuracy", error="std")
    (ax,) = figure.axes
    assert len(ax.patches) == 3
    np.testing.assert_allclose([p.get_width() for p in ax.patches], [0.61, 0.72, 0.68])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ce", "focal", "ldam"]
    with pytest.raises(KeyError):
        plots.plot_metric_bars(table, "auc")
    render(figure)


def test_plot_recall_heatmap():
    matrix = np.array([[0.9, 0.1, 0.0], [0.7, 0.5, 0.4]])
    figure = plots.plot_recall_heatmap(matrix, ["ce", "focal"], NAMES)
    ax = figure.axes[0]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), matrix)
    assert len(ax.texts) == 6 and "0.50" in [t.get_text() for t in ax.texts]
    with pytest.raises(ValueError):
        plots.plot_recall_heatmap(matrix.T, ["ce", "focal"], NAMES)
    render(figure)
