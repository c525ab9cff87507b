"""The segmentation task: voxel-wise losses on a MONAI network, its cache, patch loaders and its step.

:class:`SegmentationStep` owns what is particular to segmentation in the engine's one loop
(:func:`losslab.engine.loop.fit`): batch -> forward -> loss (the boundary distance maps go to the loss
terms that take ``dist_maps``), sliding-window inference (MONAI ``sliding_window_inference``; in 2D
slice by slice), discrete predictions (sigmoid > 0.5 per region, or argmax over classes) and the
validation metrics:

* ``val/dice_<name>`` and ``val/mean_dice`` (MONAI ``DiceMetric``; a case whose ground truth is empty
  for a region does not count for that region), ``val/hd95_<name>`` (MONAI
  ``HausdorffDistanceMetric(percentile=95)`` in the units of the voxel spacing; NaN when undefined),
  ``val/loss`` (the loss on whole volumes).

So segmentation gets what every task gets from the loop: AdamW/Adam/SGD with cosine warm-up (learnable
loss weights train too), bf16 autocast on CUDA, clipping, ``loss.on_epoch_start`` (α schedules),
``train/loss``, ``train/loss_<term>``, ``loss_weight/<term>``, EMA, SWA, early stopping, the alarms,
atomic best/last checkpoints, ``--resume`` and torchrun (the training patients sharded over the ranks;
rank 0 validates on every validation volume, so the metrics are those of one process).

Shapes: ``image (B, C, *spatial)``, ``label (B, R or 1, *spatial)``, ``dist (B, R or K, *spatial)``,
logits ``(B, R or K, *spatial)``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from losslab.engine.steps import Step, StepOutput, autocast
from losslab.tasks.base import FoldSetup, Task, TaskError, register_task


@register_task
class SegmentationTask(Task):
    """Voxel-wise segmentation with the segmentation losses (dice, tversky, boundary, compound of them)
    by a MONAI network (``model.kind: segmentation``). Its cache holds volumes, targets and distance maps;
    training draws patches (:func:`losslab.data.transforms.segmentation_train_transforms`) of the training volumes,
    validation runs sliding windows over whole volumes (:class:`SegmentationStep`)."""

    name = "segmentation"
    model_kinds = ("segmentation",)
    loss_tasks = ("segmentation",)
    entry_points = ("train", "evaluate", "sweep")
    headline_metric = "val/mean_dice"
    default_monitor = ("val/mean_dice", "max")
    default_tiebreak = ("val/loss",)
    default_model_name = "losslab-seg"

    def convolves_volumes(self, cfg):
        return cfg.model.spatial_dims == 3

    def check_settings(self, cfg, where=lambda key: ""):
        super().check_settings(cfg, where)
        if cfg.train.mixup_alpha:
            raise TaskError(f"train.mixup_alpha={cfg.train.mixup_alpha}{where('train.mixup_alpha')}: mixup of whole "
                            f"volumes and their masks is not supported for model.kind=segmentation; set it to 0")

    # ------------------------------------------------------------------ the cache
    def build_cache(self, cfg, force=False):
        """The segmentation cache of ``cfg``, refused (one line, before any training) when ``seg.patch_size``
        does not fit its smallest volume."""
        from losslab.data.cache import SegmentationEncoder, build_cache
        from losslab.data.transforms import check_patch_fits

        info = build_cache(cfg.data, force=force, encoder=SegmentationEncoder.from_config(cfg.seg))
        check_patch_fits(cfg.seg.patch_size, cfg.model.spatial_dims, info)
        return info

    def cache_summary(self, info):
        lines = [f"{'reused' if info.reused else 'wrote'} the segmentation cache at {info.cache_dir} "
                 f"(fingerprint {info.fingerprint[:12]})"]
        lines += [f"skipped {item['item']}: {item['reason']}" for item in info.report["skipped"]]
        return lines + [f"note: {note}" for note in info.report["notes"]], {}

    def load_cache(self, cfg):
        """The segmentation cache of ``cfg.data`` a trained model is scored on: read as it is when it was
        built (the raw files may be gone), else built."""
        from pathlib import Path

        from losslab.data.cache import SegmentationEncoder, load_cache

        if (Path(cfg.data.cache_dir) / "index.parquet").is_file():
            return load_cache(cfg.data.cache_dir, encoder=SegmentationEncoder.from_config(cfg.seg))
        return self.build_cache(cfg)

    def output_names(self, cfg, info=None):
        """The output channels (the regions, or the classes with background first): the cache's when
        given, else the ones ``seg.regions`` / ``seg.classes`` name, else the cache's (read or built)."""
        if info is not None:
            return list(info.channel_names)
        configured = cfg.seg.regions if cfg.seg.labels == "regions" else cfg.seg.classes
        return [str(name) for name in configured] if configured else list(self.load_cache(cfg).channel_names)

    # ------------------------------------------------------------------ loaders
    def fold_loaders(self, cfg: Any, info: Any, fold: int) -> tuple[Any, Any]:
        """Patches of the training volumes (``data.batch_size`` cases a batch, crops reseeded from
        ``train.seed + fold``; under torchrun each rank draws its share of the patients) and whole
        validation volumes (batch size 1, every one on every rank).

        Raises:
            ValueError: the fold has no validation or no training case (names the fold and the folds there are).
        """
        from losslab.data.datasets import SegVolumeDataset
        from losslab.data.transforms import segmentation_train_transforms
        from losslab.engine import distributed as ddp

        train_rows, val_rows = info.cases(fold, train=True), info.cases(fold, train=False)
        if not val_rows or not train_rows:
            folds = sorted({r["fold"] for r in info.index})
            raise ValueError(f"data.fold={fold}: {len(train_rows)} training and {len(val_rows)} validation cases; "
                             f"the segmentation cache has folds {folds}")
        seed = cfg.train.seed + fold
        transform = segmentation_train_transforms(cfg.seg, cfg.model.spatial_dims)
        transform.set_random_state(seed=seed)
        train_ds = SegVolumeDataset(info, train_rows, transform)
        sampler = None
        if ddp.world_size() > 1:
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(train_ds, ddp.world_size(), ddp.rank(), shuffle=True, seed=seed)
        device = ddp.distributed_device(cfg.train.device)
        train = _volume_loader(train_ds, cfg, True, sampler=sampler, device=device,
                               generator=torch.Generator().manual_seed(seed))
        return train, _volume_loader(SegVolumeDataset(info, val_rows), cfg, False, device=device)

    def test_loader(self, cfg, info, normalizer=None):
        """Whole volumes of the held-out test patients (fold -1), batch size 1; None without them."""
        from losslab.data.datasets import SegVolumeDataset
        from losslab.data.splits import TEST_FOLD

        rows = [r for r in info.index if r["fold"] == TEST_FOLD]
        return _volume_loader(SegVolumeDataset(info, rows), cfg, False, num_workers=0) if rows else None

    # ------------------------------------------------------------------ model, step and fold
    def build(self, cfg, names, class_counts=None, fractions=None):
        """``(loss, model)``: the loss (refused unless it is a segmentation loss, ``sigmoid`` for regions)
        and the network, whose output bias starts at the channels' voxel ``fractions`` in the training
        volumes when given (:meth:`SegCacheInfo.voxel_fractions`; a model about to load weights needs none)."""
        from losslab.losses import build_loss
        from losslab.models import build_model

        self.check_settings(cfg)
        _check_segmentation_loss(cfg.loss.name)
        loss_fn = build_loss(cfg.loss.name, **_seg_loss_params(cfg), num_classes=len(names))
        if getattr(loss_fn, "family", None) != "segmentation":
            raise TaskError(f"loss.name={cfg.loss.name!r}: its terms are {loss_fn.family} losses, not segmentation losses")
        model = build_model(cfg.model, num_outputs=len(names))
        if fractions is not None:
            model.init_output_bias(fractions, sigmoid=cfg.seg.labels == "regions")
        return loss_fn, model

    def step(self, cfg, loss_fn, names):
        """The :class:`SegmentationStep` of ``loss_fn`` over the output channels ``names``."""
        seg = cfg.seg
        return SegmentationStep(loss_fn, names, seg.labels == "regions", seg.patch_size, seg.sw_batch_size,
                                seg.overlap, seg.hd95)

    def setup_fold(self, cfg, info, fold):
        """The network with its output bias at the fold's voxel fractions, patch and volume loaders; the
        training crops are reseeded every epoch (so a resumed run draws what the uninterrupted one drew)."""
        from losslab.data.sources.channels import mapping_text, modality_params
        from losslab.engine.callbacks import ReseedEachEpoch

        fractions = info.voxel_fractions(fold)
        loss_fn, model = self.build(cfg, info.channel_names, fractions=fractions)
        step = self.step(cfg, loss_fn, info.channel_names)
        train_loader, val_loader = self.fold_loaders(cfg, info, fold)
        prior = ",".join(f"{n}={f:.5g}" for n, f in zip(info.channel_names, fractions))
        params = {"data.n_train": len(train_loader.dataset), "data.n_val": len(val_loader.dataset),
                  "seg.channels": ",".join(info.channel_names), "seg.output_bias_prior": prior,
                  "seg.mapping": mapping_text(info.report["mapping"])} | modality_params(info.report)
        data_settings = {"seg.mapping": params["seg.mapping"]} | modality_params(info.report)  # the data trained on
        return FoldSetup(train_loader, val_loader, loss_fn, model, step, step.metric_names,
                         self.spec(cfg, info.channel_names), params, hashed_params=data_settings,
                         tags={"losslab.split_fingerprint": info.split_fingerprint},
                         callbacks=[ReseedEachEpoch(train_loader, cfg.train.seed + fold)])

    def input_example(self, cfg, val_loader):
        """One training-sized patch ``(1, C, *patch)`` of the first validation volume."""
        volume = val_loader.dataset[0]["image"][None].numpy()  # (1, C, X, Y, Z)
        patch = tuple(slice(0, s) for s in cfg.seg.patch_size)
        return volume[(slice(None), slice(None)) + patch + ((0,) if cfg.model.spatial_dims == 2 else ())]

    def rebuild(self, cfg, run_tags, run_params):
        """``(loss, model, channel names)``: the channels the run recorded (``seg.channels``), else
        :meth:`output_names` of ``cfg``."""
        channels = run_params.get("seg.channels")
        names = channels.split(",") if channels else self.output_names(cfg)
        loss_fn, model = self.build(cfg, names)
        return loss_fn, model, names

    def spec(self, cfg, names, class_counts=None):
        """The ``model``, ``loss`` and ``seg`` sections and the output channel names."""
        return {"kind": "segmentation", "task": self.name, "model": cfg.model.model_dump(mode="json"),
                "loss": cfg.loss.model_dump(mode="json"), "seg": cfg.seg.model_dump(mode="json"),
                "channel_names": list(names)}

    # ------------------------------------------------------------------ reporting
    def split_summary(self, outputs, dataset, names, prefix, intervals=None):
        return {f"{prefix}/n_cases": float(len(dataset))}

    def epoch_figures(self, state, final, names):
        """The learning curves (losses, mean Dice, each region's Dice; ``plots/curves.png``) and a prediction
        overlay of the first validation volume (``plots/overlay_epoch_<k>.png``, ``plots/overlay.png`` at the end)."""
        from losslab import plots

        hist = state.history
        keys = [k for k in ("train/loss", "val/loss", "val/mean_dice") if k in hist]
        keys += [f"val/dice_{name}" for name in names if f"val/dice_{name}" in hist]
        out = {"plots/curves.png": plots.plot_curves(hist, keys)}
        overlay = state.last_val_outputs
        if overlay:
            name = "plots/overlay.png" if final else f"plots/overlay_epoch_{state.epoch:03d}.png"
            out[name] = plot_segmentation_overlay(overlay["image"], overlay["truth"], overlay["pred"], overlay["names"],
                                                  f"epoch {state.epoch}")
        return out


def _volume_loader(dataset: Any, cfg: Any, train: bool, **options: Any) -> Any:
    """:func:`losslab.data.loaders.build_loader` of a segmentation dataset: MONAI's ``DataLoader`` (its
    collate flattens a case's crops into the batch; its seeding of the random transforms is the one the
    crops were always drawn with); validation and test volumes one at a time. Workers are not kept
    between epochs: :class:`~losslab.engine.callbacks.ReseedEachEpoch` reseeds the crops of each epoch."""
    from monai.data import DataLoader, list_data_collate

    from losslab.data.loaders import build_loader

    return build_loader(dataset, cfg.data, train, list_data_collate, batch_size=None if train else 1,
                        loader_class=DataLoader, persistent_workers=False, **options)


def plot_segmentation_overlay(image: Any, truth: Any, pred: Any, names: list[str], title: str = ""):
    """One panel per region: the middle slice (last axis) of ``image[0]`` with the ``truth`` (green) and
    ``pred`` (red) contours. ``image (C, X, Y, Z)``, ``truth`` / ``pred`` ``(R, X, Y, Z)`` binary."""
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


def _check_segmentation_loss(name: str) -> None:
    from losslab.losses import list_losses
    from losslab.losses.registry import get_loss_class

    if getattr(get_loss_class(name), "family", None) != "segmentation" and name != "compound":
        seg = [n for n in list_losses() if getattr(get_loss_class(n), "family", None) == "segmentation"]
        raise TaskError(f"loss.name={name!r} is not a segmentation loss; with model.kind=segmentation use "
                        f"one of {', '.join(seg + ['compound'])}")


def _seg_loss_params(cfg: Any) -> dict[str, Any]:
    """The loss parameters with ``sigmoid: true`` added (also to every compound term) for regions."""
    import copy

    params = copy.deepcopy(cfg.loss.params)
    if cfg.seg.labels == "regions":
        params["sigmoid"] = True
        if cfg.loss.name == "compound":
            params["terms"] = [dict(t, sigmoid=True) if isinstance(t, dict) else t for t in params.get("terms") or []]
    if cfg.loss.name == "compound":
        params.pop("sigmoid", None)
    return params



def _takes_dist_maps(loss_fn: nn.Module) -> bool:
    from losslab.losses.compound import _forward_kwargs

    accepted = _forward_kwargs(loss_fn)
    return accepted is None or "dist_maps" in accepted


class SegmentationStep(Step):
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
        the first volume's image, ground truth and prediction (numpy, ``(C or R, X, Y, Z)``).

        The per-case values MONAI's metrics return are reduced here (``do_metric_reduction``, what their
        ``aggregate()`` does), not by ``aggregate()``: under torchrun that gathers every rank's buffers,
        and only rank 0 validates (every volume, so the numbers are those of one process)."""
        from monai.metrics import DiceMetric, HausdorffDistanceMetric

        model.eval()
        self.loss_fn.eval()
        dice = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True)
        hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="mean_batch")
        loss_sum, n, overlay, dice_rows, hd95_rows = 0.0, 0, {}, [], []
        for batch in loader:
            image = batch["image"].to(device)
            with autocast(device, amp):
                logits = self.infer(model, image)
            logits = logits.float()
            loss_sum += float(self.batch_loss(logits, batch, device))
            pred, truth = self.discretise(logits), self.one_hot(batch["label"].to(device))
            dice_rows.append(dice(pred, truth))
            if self.hd95:
                hd95_rows.append(hd95(pred, truth, spacing=[float(s) for s in batch["spacing"][0]]))
            n += 1
            if not overlay:
                overlay = {"image": image[0].cpu().numpy(), "truth": truth[0].cpu().numpy(),
                           "pred": pred[0].float().cpu().numpy(), "names": self.metric_names}
        return self._metrics(dice_rows, hd95_rows if self.hd95 else None, loss_sum / max(n, 1)), overlay

    def _metrics(self, dice_rows: list[torch.Tensor], hd95_rows: list[torch.Tensor] | None, loss: float
                 ) -> dict[str, float]:
        """The mean over cases of each channel's Dice (and HD95), NaN (a case without that channel) skipped."""
        from monai.metrics.utils import do_metric_reduction

        per_region = do_metric_reduction(torch.cat(dice_rows), "mean_batch")[0].cpu().numpy().astype(float)
        out = {f"val/dice_{name}": float(v) for name, v in zip(self.metric_names, per_region)}
        finite = per_region[np.isfinite(per_region)]
        out["val/mean_dice"] = float(finite.mean()) if finite.size else float("nan")
        if hd95_rows is not None:
            values = do_metric_reduction(torch.cat(hd95_rows), "mean_batch")[0].cpu().numpy().astype(float)
            out.update({f"val/hd95_{name}": float(v) if math.isfinite(v) else float("nan")
                        for name, v in zip(self.metric_names, values)})
        out["val/loss"] = float(loss)
        return out
