"""The segmentation step of the training loop. Knows nothing of MLflow; reports through callbacks.

:class:`SegmentationStep` owns what is particular to segmentation: batch -> forward -> loss (the
boundary distance maps go to the loss terms that take ``dist_maps``), sliding-window inference
(MONAI ``sliding_window_inference``; in 2D slice by slice), discrete predictions (sigmoid > 0.5 per
region, or argmax over classes) and the validation metrics:

* ``val/dice_<name>`` and ``val/mean_dice`` (MONAI ``DiceMetric``; a case whose ground truth is empty
  for a region does not count for that region), ``val/hd95_<name>`` (MONAI
  ``HausdorffDistanceMetric(percentile=95)`` in the units of the voxel spacing; NaN when undefined),
  ``val/loss`` (the loss on whole volumes).

The step is the segmentation task's part of the engine's one loop (:func:`losslab.engine.loop.fit`, through
:class:`losslab.engine.steps.ClassificationStep`'s seam: ``forward``, ``target``, ``loss``,
``predict``, ``metrics``), so segmentation gets what every task gets there: AdamW/Adam/SGD with
cosine warm-up (learnable loss weights train too), bf16 autocast on CUDA, clipping,
``loss.on_epoch_start`` (α schedules), ``train/loss``, ``train/loss_<term>``, ``loss_weight/<term>``,
EMA, SWA, early stopping, the alarms, atomic best/last checkpoints and ``--resume``.

Shapes: ``image (B, C, *spatial)``, ``label (B, R or 1, *spatial)``, ``dist (B, R or K, *spatial)``,
logits ``(B, R or K, *spatial)``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from losslab.engine.steps import autocast
from losslab.engine.steps import ClassificationStep, StepOutput


def _takes_dist_maps(loss_fn: nn.Module) -> bool:
    from losslab.losses.compound import _forward_kwargs

    accepted = _forward_kwargs(loss_fn)
    return accepted is None or "dist_maps" in accepted


class SegmentationStep(ClassificationStep):
    """Batch -> loss, volume -> logits -> prediction, validation metrics.

    Args:
        loss_fn: a segmentation loss (``sigmoid`` mode for regions).
        names: the region names, or the class names with background first.
        sigmoid: regions (True) or exclusive classes (False).
        roi_size: the sliding-window size (the training patch size), 2 or 3 entries.
        sw_batch_size / overlap: ``sliding_window_inference`` arguments.
        hd95: compute ``val/hd95_<name>``.
    """

    def __init__(self, loss_fn: nn.Module, names: Sequence[str], sigmoid: bool, roi_size: Sequence[int],
                 sw_batch_size: int = 4, overlap: float = 0.25, hd95: bool = True) -> None:
        self.loss_fn = loss_fn
        self.names = list(names)
        self.sigmoid = bool(sigmoid)
        self.roi_size = [int(s) for s in roi_size]
        self.spatial_dims = len(self.roi_size)
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = float(overlap)
        self.hd95 = bool(hd95)
        self.pass_dist = _takes_dist_maps(loss_fn)

    @property
    def metric_names(self) -> list[str]:
        """Names the metrics are reported for (regions, or classes without background)."""
        return self.names if self.sigmoid else self.names[1:]

    def _output(self, logits: torch.Tensor, batch: dict[str, Any]) -> StepOutput:
        """The logits with the batch's distance maps, when the loss takes them."""
        return StepOutput(logits, aux={"dist": batch["dist"]} if self.pass_dist else {})

    def batch_loss(self, logits: torch.Tensor, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        """The loss of ``logits`` against the batch's target (and distance maps, when the loss takes them)."""
        return self.loss(self.loss_fn, self._output(logits, batch), self.target(batch, device))

    # ------------------------------------------------------------------ the step of engine.loop.fit
    def forward(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> StepOutput:
        return self._output(model(batch["image"].to(device, non_blocking=True)), batch)

    def target(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        target = batch["label"].to(device, non_blocking=True)
        return target if self.sigmoid else target.long()

    def loss(self, loss_fn: nn.Module, out: StepOutput, target: torch.Tensor) -> torch.Tensor:
        if self.pass_dist:
            return loss_fn(out.logits.float(), target, dist_maps=out.aux["dist"].to(target.device, non_blocking=True))
        return loss_fn(out.logits.float(), target)

    def predict(self, model: nn.Module, loader, device: torch.device, loss_fn: nn.Module | None = None,
                amp: bool = False) -> dict[str, Any]:
        """:meth:`validate`'s overlay (``image``, ``truth``, ``pred``, ``names``) with its ``metrics``."""
        metrics, overlay = self.validate(model, loader, device, amp)
        return dict(overlay, metrics=metrics)

    def metrics(self, outputs: dict[str, Any], class_names: list[str], loss_fn: nn.Module | None = None) -> dict[str, float]:
        return dict(outputs["metrics"])

    def infer(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(1, R or K, X, Y, Z)`` of a volume ``(1, C, X, Y, Z)`` by sliding windows."""
        from monai.inferers import sliding_window_inference

        if self.spatial_dims == 3:
            return sliding_window_inference(image, self.roi_size, self.sw_batch_size, model, overlap=self.overlap)
        slices = image[0].permute(3, 0, 1, 2)  # (Z, C, X, Y): axial slices as a batch
        logits = sliding_window_inference(slices, self.roi_size, self.sw_batch_size, model, overlap=self.overlap)
        return logits.permute(1, 2, 3, 0).unsqueeze(0)

    def discretise(self, logits: torch.Tensor) -> torch.Tensor:
        """One binary channel per metric name ``(B, R or K-1, *spatial)`` from logits (bool for regions: MONAI's
        metrics take it as it is, without a float copy)."""
        if self.sigmoid:
            return torch.sigmoid(logits) > 0.5
        return self.one_hot(logits.argmax(dim=1, keepdim=True))

    def one_hot(self, target: torch.Tensor) -> torch.Tensor:
        """Binary foreground channels of a target (regions as they are; classes one-hot without background)."""
        if self.sigmoid:
            return target.float()
        k = len(self.names)
        return torch.nn.functional.one_hot(target[:, 0].long(), k).movedim(-1, 1)[:, 1:].float()

    @torch.inference_mode()  # no autograd bookkeeping at all: the whole-volume loss costs ~30 % less than under no_grad
    def validate(self, model: nn.Module, loader, device: torch.device, amp: bool = False) -> tuple[dict[str, float], dict]:
        """``(metrics, overlay)``: the ``val/*`` metrics over the loader's volumes and, for the overlay plot,
        the first volume's image, ground truth and prediction (numpy, ``(C or R, X, Y, Z)``)."""
        from monai.metrics import DiceMetric, HausdorffDistanceMetric

        model.eval()
        self.loss_fn.eval()
        dice = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True)
        hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="mean_batch")
        loss_sum, n, overlay = 0.0, 0, {}
        for batch in loader:
            image = batch["image"].to(device)
            with autocast(device, amp):
                logits = self.infer(model, image)
            logits = logits.float()
            loss_sum += float(self.batch_loss(logits, batch, device))
            pred, truth = self.discretise(logits), self.one_hot(batch["label"].to(device))
            dice(pred, truth)
            if self.hd95:
                hd95(pred, truth, spacing=[float(s) for s in batch["spacing"][0]])
            n += 1
            if not overlay:
                overlay = {"image": image[0].cpu().numpy(), "truth": truth[0].cpu().numpy(),
                           "pred": pred[0].float().cpu().numpy(), "names": self.metric_names}
        return self._metrics(dice, hd95 if self.hd95 else None, loss_sum / max(n, 1)), overlay

    def _metrics(self, dice, hd95, loss: float) -> dict[str, float]:
        per_region = dice.aggregate().cpu().numpy().astype(float)
        out = {f"val/dice_{name}": float(v) for name, v in zip(self.metric_names, per_region)}
        finite = per_region[np.isfinite(per_region)]
        out["val/mean_dice"] = float(finite.mean()) if finite.size else float("nan")
        if hd95 is not None:
            values = hd95.aggregate().cpu().numpy().astype(float)
            out.update({f"val/hd95_{name}": float(v) if math.isfinite(v) else float("nan")
                        for name, v in zip(self.metric_names, values)})
        out["val/loss"] = float(loss)
        return out
