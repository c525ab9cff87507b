"""MLflow logging of segmentation runs: the engine callback with segmentation plots.

:class:`SegmentationMLflowCallback` logs exactly what :class:`losslab.tracking.MLflowCallback` logs
(per-epoch metric batches, checkpoints) and draws, instead of the classification figures, the
learning curves (``plots/curves.png``: losses, mean Dice, each region's Dice) and a prediction
overlay (``plots/overlay_epoch_<k>.png`` every ``train.plot_every`` epochs, ``plots/overlay.png`` at
the end): the middle axial slice of the first validation volume for each region, ground truth in
green and prediction in red (:func:`plot_segmentation_overlay`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from losslab.tracking import MLflowCallback, log_figure


def plot_segmentation_overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, names: list[str],
                              title: str = ""):
    """One panel per region: the middle slice (last axis) of ``image[0]`` with ``truth`` and ``pred``
    contours. ``image (C, X, Y, Z)``, ``truth`` / ``pred`` ``(R, X, Y, Z)`` binary."""
    from losslab.plots import _figure

    z = image.shape[-1] // 2
    figure = _figure(3.2 * len(names), 3.4)
    for r, name in enumerate(names):
        ax = figure.add_subplot(1, len(names), r + 1)
        ax.imshow(image[0, ..., z].T, cmap="gray", origin="lower")
        for mask, colour in ((truth[r, ..., z], "lime"), (pred[r, ..., z], "red")):
            if mask.any() and not mask.all():
                ax.contour(mask.T.astype(float), levels=[0.5], colors=colour, linewidths=1.0, origin="lower")
        ax.set_title(f"{name}: truth (green) / prediction (red)", fontsize=8)
        ax.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


class SegmentationMLflowCallback(MLflowCallback):
    """The MLflow callback of segmentation runs (metrics and checkpoints as for classification)."""

    def _plots(self, state: Any, final: bool) -> None:
        from losslab import plots

        hist = state.history
        keys = [k for k in ("train/loss", "val/loss", "val/mean_dice") if k in hist]
        keys += [f"val/dice_{name}" for name in self.class_names if f"val/dice_{name}" in hist]
        log_figure(plots.plot_curves(hist, keys), "plots/curves.png")
        overlay = state.last_val_outputs
        if overlay:
            name = "plots/overlay.png" if final else f"plots/overlay_epoch_{state.epoch:03d}.png"
            log_figure(plot_segmentation_overlay(overlay["image"], overlay["truth"], overlay["pred"], overlay["names"],
                                                 f"epoch {state.epoch}"), name)
