"""The segmentation task: voxel-wise losses on a MONAI network, its own cache and sliding-window validation."""

from __future__ import annotations

from typing import Any

from losslab.engine.segmentation import SegmentationStep
from losslab.tasks.base import FoldSetup, Task, TaskError, register_task

@register_task
class SegmentationTask(SegmentationStep, Task):
    """Voxel-wise segmentation with the segmentation losses (dice, tversky, boundary, compound of them)
    by a MONAI network (``model.kind: segmentation``). Its own cache (volumes, targets, distance maps:
    :mod:`losslab.data.seg_cache`) and patch datasets (:mod:`losslab.data.seg_datasets`); batch → loss,
    sliding-window validation and metrics are :class:`losslab.engine.segmentation.SegmentationStep`'s,
    set up by :meth:`build` (the loss, the output channels, the sliding-window settings)."""

    name = "segmentation"
    model_kinds = ("segmentation",)
    loss_tasks = ("segmentation",)
    entry_points = ("train", "evaluate", "sweep")
    headline_metric = "val/mean_dice"
    default_monitor = ("val/mean_dice", "max")
    default_tiebreak = ("val/loss",)
    default_model_name = "losslab-seg"
    per_case_probabilities = False

    def convolves_volumes(self, cfg):
        return cfg.model.spatial_dims == 3
    distributed = False
    loss_takes_class_counts = False

    def __init__(self) -> None:  # the step is set up by build(), once the loss and channels are known
        self.names: list[str] = []

    def make_dataset(self, cfg, info, rows, train, transform=None, normalizer=None):
        from losslab.data.seg_datasets import SegVolumeDataset, train_transforms

        return SegVolumeDataset(info, rows, train_transforms(cfg.seg, cfg.model.spatial_dims) if train else None)

    device_batch_kinds = ()

    def check_settings(self, cfg, where=lambda key: ""):
        super().check_settings(cfg, where)
        if cfg.train.mixup_alpha:
            raise TaskError(f"train.mixup_alpha={cfg.train.mixup_alpha}{where('train.mixup_alpha')}: mixup of whole "
                            f"volumes and their masks is not supported for model.kind=segmentation; set it to 0")

    def build_cache(self, cfg, force=False):
        """The segmentation cache of ``cfg``, refused (one line, before any training) when ``seg.patch_size``
        does not fit its smallest volume."""
        from losslab.data.seg_cache import build_seg_cache
        from losslab.data.seg_datasets import check_patch_fits

        info = build_seg_cache(cfg.data, cfg.seg, force=force)
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

        from losslab.data.seg_cache import load_seg_cache

        if (Path(cfg.data.cache_dir) / "report.json").is_file():
            return load_seg_cache(cfg.data.cache_dir)
        return self.build_cache(cfg)

    def output_names(self, cfg, info=None):
        """The output channels: the regions, or the classes with background first."""
        return list((info or self.load_cache(cfg)).channel_names)

    def build(self, cfg, names, class_counts=None, fractions=None):
        """``(loss, model)``: the loss (refused unless it is a segmentation loss, ``sigmoid`` for regions)
        and the network, whose output bias starts at the channels' voxel ``fractions`` in the training
        volumes when given (:meth:`SegCacheInfo.voxel_fractions`; a model about to load weights needs
        none). Sets this task's step up for that loss and those channels."""
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
        SegmentationStep.__init__(self, loss_fn, names, cfg.seg.labels == "regions", cfg.seg.patch_size,
                                  cfg.seg.sw_batch_size, cfg.seg.overlap, cfg.seg.hd95)
        return loss_fn, model

    def fold_loaders(self, cfg, info, fold):
        """Patches of the training volumes (``data.batch_size`` cases a batch, reseeded from
        ``train.seed + fold``) and whole validation volumes (batch size 1)."""
        from losslab.data.seg_datasets import make_seg_loaders

        return make_seg_loaders(info, fold, cfg.seg, cfg.model.spatial_dims, cfg.data.batch_size,
                                cfg.data.num_workers, seed=cfg.train.seed + fold)

    def setup_fold(self, cfg, info, fold):
        """The network with its output bias at the fold's voxel fractions, patch and volume loaders; the
        training crops are reseeded every epoch (so a resumed run draws what the uninterrupted one drew)."""
        from losslab.data.sources.channels import mapping_text, modality_params
        from losslab.engine.callbacks import ReseedEachEpoch

        fractions = info.voxel_fractions(fold)
        loss_fn, model = self.build(cfg, info.channel_names, fractions=fractions)
        train_loader, val_loader = self.fold_loaders(cfg, info, fold)
        prior = ",".join(f"{n}={f:.5g}" for n, f in zip(info.channel_names, fractions))
        params = {"data.n_train": len(train_loader.dataset), "data.n_val": len(val_loader.dataset),
                  "seg.channels": ",".join(info.channel_names), "seg.output_bias_prior": prior,
                  "seg.mapping": mapping_text(info.report["mapping"])} | modality_params(info.report)
        data_settings = {"seg.mapping": params["seg.mapping"]} | modality_params(info.report)  # the data trained on
        return FoldSetup(train_loader, val_loader, loss_fn, model, self.metric_names,
                         self.spec(cfg, info.channel_names), params, hashed_params=data_settings,
                         tags={"losslab.split_fingerprint": info.split_fingerprint},
                         callbacks=[ReseedEachEpoch(train_loader, cfg.train.seed + fold)], figures=self.epoch_figures)

    def epoch_figures(self, state, final):
        """The learning curves (losses, mean Dice, each region's Dice; ``plots/curves.png``) and a prediction
        overlay of the first validation volume (``plots/overlay_epoch_<k>.png``, ``plots/overlay.png`` at the end)."""
        from losslab import plots

        hist = state.history
        keys = [k for k in ("train/loss", "val/loss", "val/mean_dice") if k in hist]
        keys += [f"val/dice_{name}" for name in self.metric_names if f"val/dice_{name}" in hist]
        out = {"plots/curves.png": plots.plot_curves(hist, keys)}
        overlay = state.last_val_outputs
        if overlay:
            name = "plots/overlay.png" if final else f"plots/overlay_epoch_{state.epoch:03d}.png"
            out[name] = plot_segmentation_overlay(overlay["image"], overlay["truth"], overlay["pred"], overlay["names"],
                                                  f"epoch {state.epoch}")
        return out

    def input_example(self, cfg, val_loader):
        """One training-sized patch ``(1, C, *patch)`` of the first validation volume."""
        volume = val_loader.dataset[0]["image"][None].numpy()  # (1, C, X, Y, Z)
        patch = tuple(slice(0, s) for s in cfg.seg.patch_size)
        return volume[(slice(None), slice(None)) + patch + ((0,) if cfg.model.spatial_dims == 2 else ())]

    def rebuild(self, cfg, run_tags, run_params):
        """``(loss, model, channel names)``: the channels from the segmentation cache of ``cfg``."""
        names = self.output_names(cfg)
        loss_fn, model = self.build(cfg, names)
        return loss_fn, model, names

    def spec(self, cfg, names, class_counts=None):
        """The ``model``, ``loss`` and ``seg`` sections and the output channel names."""
        return {"kind": "segmentation", "task": self.name, "model": cfg.model.model_dump(mode="json"),
                "loss": cfg.loss.model_dump(mode="json"), "seg": cfg.seg.model_dump(mode="json"),
                "channel_names": list(names)}

    def test_loader(self, cfg, info, normalizer=None):
        """Whole volumes of the held-out test patients (fold -1), batch size 1; None without them."""
        from losslab.data.seg_datasets import make_seg_test_loader

        return make_seg_test_loader(info)

    def split_summary(self, outputs, dataset, names, prefix, intervals=None):
        return {f"{prefix}/n_cases": float(len(dataset))}


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

