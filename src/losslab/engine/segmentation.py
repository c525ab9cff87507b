"""The segmentation task and its training loop. Knows nothing of MLflow; reports through callbacks.

:class:`SegmentationTask` owns what is particular to segmentation: batch -> forward -> loss (the
boundary distance maps go to the loss terms that take ``dist_maps``), sliding-window inference
(MONAI ``sliding_window_inference``; in 2D slice by slice), discrete predictions (sigmoid > 0.5 per
region, or argmax over classes) and the validation metrics:

* ``val/dice_<name>`` and ``val/mean_dice`` (MONAI ``DiceMetric``; a case whose ground truth is empty
  for a region does not count for that region), ``val/hd95_<name>`` (MONAI
  ``HausdorffDistanceMetric(percentile=95)`` in the units of the voxel spacing; NaN when undefined),
  ``val/loss`` (the loss on whole volumes).

:func:`fit_segmentation` is the loop: epochs, AdamW/Adam/SGD with cosine warm-up
(:func:`losslab.engine.loop.build_optimizer`, so learnable loss weights train too), bf16 autocast on
CUDA, gradient clipping, ``loss.on_epoch_start`` (α schedules), ``train/loss``, ``train/loss_<term>``
and ``loss_weight/<term>`` per epoch, the best (``train.monitor``) and last checkpoints and early
stopping. Shapes: ``image (B, C, *spatial)``, ``label (B, R or 1, *spatial)``, ``dist (B, R or K,
*spatial)``, logits ``(B, R or K, *spatial)``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from losslab.engine.callbacks import CallbackList
from losslab.engine.loop import (FitState, NonFiniteLossError, autocast, build_optimizer, cosine_with_warmup,
                                 resolve_device, save_checkpoint)


def _takes_dist_maps(loss_fn: nn.Module) -> bool:
    from losslab.losses.compound import _forward_kwargs

    accepted = _forward_kwargs(loss_fn)
    return accepted is None or "dist_maps" in accepted


class SegmentationTask:
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

    def loss(self, logits: torch.Tensor, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        target = batch["label"].to(device, non_blocking=True)
        if not self.sigmoid:
            target = target.long()
        if self.pass_dist:
            return self.loss_fn(logits.float(), target, dist_maps=batch["dist"].to(device, non_blocking=True))
        return self.loss_fn(logits.float(), target)

    def infer(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(1, R or K, X, Y, Z)`` of a volume ``(1, C, X, Y, Z)`` by sliding windows."""
        from monai.inferers import sliding_window_inference

        if self.spatial_dims == 3:
            return sliding_window_inference(image, self.roi_size, self.sw_batch_size, model, overlap=self.overlap)
        slices = image[0].permute(3, 0, 1, 2)  # (Z, C, X, Y): axial slices as a batch
        logits = sliding_window_inference(slices, self.roi_size, self.sw_batch_size, model, overlap=self.overlap)
        return logits.permute(1, 2, 3, 0).unsqueeze(0)

    def discretise(self, logits: torch.Tensor) -> torch.Tensor:
        """One binary channel per metric name ``(B, R or K-1, *spatial)`` from logits."""
        if self.sigmoid:
            return (torch.sigmoid(logits) > 0.5).float()
        return self.one_hot(logits.argmax(dim=1, keepdim=True))

    def one_hot(self, target: torch.Tensor) -> torch.Tensor:
        """Binary foreground channels of a target (regions as they are; classes one-hot without background)."""
        if self.sigmoid:
            return target.float()
        k = len(self.names)
        return torch.nn.functional.one_hot(target[:, 0].long(), k).movedim(-1, 1)[:, 1:].float()

    @torch.no_grad()
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
            pred, truth = self.discretise(logits), self.one_hot(batch["label"].to(device))
            dice(pred, truth)
            if self.hd95:
                hd95(pred, truth, spacing=[float(s) for s in batch["spacing"][0]])
            loss_sum += float(self.loss(logits, batch, device))
            n += 1
            if not overlay:
                overlay = {"image": image[0].cpu().numpy(), "truth": truth[0].cpu().numpy(),
                           "pred": pred[0].cpu().numpy(), "names": self.metric_names}
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


def _train_epoch(model, task: SegmentationTask, loader, optimizer, scheduler, device, train_cfg, epoch: int,
                 cbs: CallbackList, state: FitState) -> dict[str, float]:
    model.train()
    task.loss_fn.train()
    loss_sum, seen, term_sums = 0.0, 0, {}
    lr = optimizer.param_groups[-1]["lr"]
    for b, batch in enumerate(loader):
        if train_cfg.max_train_batches is not None and b >= train_cfg.max_train_batches:
            break
        with autocast(device, train_cfg.amp):
            logits = model(batch["image"].to(device, non_blocking=True))
        loss = task.loss(logits, batch, device)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite training loss ({float(loss.detach())}) at epoch {epoch}, batch {b}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        lr = optimizer.param_groups[-1]["lr"]
        optimizer.step()
        scheduler.step()
        state.global_step += 1
        size = len(batch["image"])
        loss_sum += float(loss.detach()) * size
        seen += size
        for k, v in (task.loss_fn.terms() if hasattr(task.loss_fn, "terms") else {}).items():
            term_sums[k] = term_sums.get(k, 0.0) + float(v) * size
        cbs.on_train_batch_end(state, b, float(loss.detach()))
    out = {"train/loss": loss_sum / max(seen, 1), "train/lr": lr}
    out.update({f"train/loss_{k}": v / max(seen, 1) for k, v in term_sums.items()})
    return out


def fit_segmentation(model: nn.Module, task: SegmentationTask, train_loader, val_loader, train_cfg: Any,
                     optim_cfg: Any, callbacks: list | None = None) -> FitState:
    """Train ``model`` on ``task``; validate every epoch; checkpoint ``best.pt`` and ``last.pt``.

    Raises:
        NonFiniteLossError: the training loss became NaN/inf (epoch and batch named).
        KeyError: ``train.monitor`` is not one of the logged metrics.
    """
    cbs = CallbackList(callbacks)
    device = resolve_device(train_cfg.device)
    model.to(device)
    task.loss_fn.to(device)
    optimizer = build_optimizer(model, task.loss_fn, optim_cfg)
    steps = len(train_loader) if train_cfg.max_train_batches is None else min(len(train_loader), train_cfg.max_train_batches)
    factor = (cosine_with_warmup(steps * train_cfg.epochs, optim_cfg.warmup_epochs * steps, optim_cfg.min_lr_ratio)
              if optim_cfg.scheduler == "cosine" else (lambda step: 1.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    state = FitState(checkpoint_dir=Path(train_cfg.checkpoint_dir))
    patience = train_cfg.early_stopping_patience
    try:
        cbs.on_fit_start(state)
        for epoch in range(train_cfg.epochs):
            state.epoch = epoch
            if hasattr(task.loss_fn, "on_epoch_start"):
                task.loss_fn.on_epoch_start(epoch)
            cbs.on_epoch_start(state)
            t0 = time.perf_counter()
            metrics = _train_epoch(model, task, train_loader, optimizer, scheduler, device, train_cfg, epoch, cbs, state)
            metrics["train/epoch_time_s"] = time.perf_counter() - t0
            if hasattr(task.loss_fn, "weights"):
                metrics.update({f"loss_weight/{k}": float(v) for k, v in task.loss_fn.weights().items()})
            val_metrics, state.last_val_outputs = task.validate(model, val_loader, device, train_cfg.amp)
            metrics.update(val_metrics)
            improved = _checkpoint(state, metrics, model, task.loss_fn, optimizer, scheduler, train_cfg, cbs)
            patience = train_cfg.early_stopping_patience if improved else (None if patience is None else patience - 1)
            metrics["epoch"] = epoch
            cbs.on_epoch_end(state, metrics)
            if patience is not None and patience <= 0:
                state.stopped_early = True
                break
        cbs.on_fit_end(state)
    except BaseException as exc:
        cbs.on_exception(state, exc)
        raise
    return state


def _checkpoint(state: FitState, metrics: dict[str, float], model, loss_fn, optimizer, scheduler, train_cfg,
                cbs: CallbackList) -> bool:
    """Record the epoch's metrics, write ``last.pt`` (and ``best.pt`` when the monitor improved)."""
    for k, v in metrics.items():
        state.history.setdefault(k, []).append(float(v))
    monitored = metrics.get(train_cfg.monitor)
    if monitored is None:
        raise KeyError(f"train.monitor {train_cfg.monitor!r} is not a logged metric; available: {sorted(metrics)}")
    sign = 1.0 if train_cfg.monitor_mode == "max" else -1.0
    improved = monitored == monitored and (state.best_metric is None or sign * monitored > sign * state.best_metric)
    if improved:
        state.best_metric, state.best_epoch = float(monitored), state.epoch
    payload = {"model": model.state_dict(), "loss": loss_fn.state_dict() or None, "eval_source": "model",
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": state.epoch,
               "global_step": state.global_step, "best_metric": state.best_metric, "best_epoch": state.best_epoch,
               "history": state.history}
    best, last = state.checkpoint_dir / "best.pt", state.checkpoint_dir / "last.pt"
    save_checkpoint(last, payload, copies=(best,) if improved else ())
    if improved:
        cbs.on_checkpoint(state, best, "best")
    cbs.on_checkpoint(state, last, "last")
    return improved
