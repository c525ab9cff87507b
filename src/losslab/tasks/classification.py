"""Classification tasks: MIL bags and 2.5D stacks, 2D images, 3D volumes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from losslab.engine.steps import StepOutput
from losslab.tasks.base import Task, TaskError, _normalizer_kwargs, register_task

@register_task
class BagClassificationTask(Task):
    """MIL bags ``(B, N, C, H, W)`` + mask ``(B, N)`` (``mil``) and 2.5D stacks with a ``level (B,)``
    (``slices25d``). Dual-stream MIL (Li et al., CVPR 2021) returns ``aux["stream_logits"]``: the loss
    is the mean of the loss on each stream; its ``aux["instance_logits"]`` give ``val/selection_confidence``."""

    name = "bag_classification"
    model_kinds = ("mil", "slices25d")

    def inputs(self, batch, device):
        args, kwargs = super().inputs(batch, device)
        if "level" in batch:
            kwargs["level"] = batch["level"].to(device, non_blocking=True)
        return args, kwargs

    def loss(self, loss_fn: nn.Module, out: StepOutput, target: torch.Tensor) -> torch.Tensor:
        streams = out.aux.get("stream_logits")
        if streams:
            return sum(loss_fn(s.float(), target) for s in streams) / len(streams)
        return super().loss(loss_fn, out, target)

    def batch_diagnostics(self, out: StepOutput, batch: dict[str, Any]) -> dict[str, float]:
        instance_logits = out.aux.get("instance_logits")
        if instance_logits is None:
            return {}
        from losslab.engine.diagnostics import selection_confidence

        probs = torch.softmax(instance_logits.float(), dim=-1).cpu()
        return {"selection_confidence": selection_confidence(probs, batch.get("mask"))}

    def make_dataset(self, cfg, info, rows, train, transform=None, normalizer=None):
        from losslab.data.datasets import BagDataset, SliceStackDataset

        extra = _normalizer_kwargs(normalizer)
        if cfg.model.kind == "slices25d":
            return SliceStackDataset(rows, info.cache_dir, transform=transform, **extra)
        sampling = cfg.data.bag_sampling if train or cfg.data.bag_sampling == "all" else "evenly_spaced"
        return BagDataset(rows, info.cache_dir, cfg.data.bag_size, sampling, transform=transform, **extra)


@register_task
class ImageClassificationTask(Task):
    """One 2D image per case ``(B, C, H, W)`` → ``model.kind: image``."""

    name = "image_classification"
    default_model_name = "losslab-image"
    model_kinds = ("image",)

    def inputs(self, batch, device):
        return (batch["image"].to(device, non_blocking=True),), {}

    def make_dataset(self, cfg, info, rows, train, transform=None, normalizer=None):
        from losslab.data.datasets import ImageDataset

        return ImageDataset(rows, info.cache_dir, transform=transform, **_normalizer_kwargs(normalizer))


@register_task
class VolumeClassificationTask(ImageClassificationTask):
    """Whole volumes ``(B, C, D, H, W)`` → a MONAI 3D encoder (``model.kind: volume3d``); the batch
    goes to the model as an image does, only the dataset differs."""

    name = "volume_classification"
    default_model_name = "losslab-volume"
    model_kinds = ("volume3d",)

    def convolves_volumes(self, cfg):
        return True

    def make_dataset(self, cfg, info, rows, train, transform=None, normalizer=None):
        from losslab.data.datasets import VolumeDataset

        dataset = VolumeDataset(rows, info.cache_dir, depth=cfg.data.volume_depth, size=cfg.data.volume_size,
                                transform=transform, **_normalizer_kwargs(normalizer))
        if len(rows):
            from losslab.models.volumes import input_shape_problem

            shape = dataset.output_shape(tuple(rows.iloc[0]["shape"])[2:])  # cached (D0, C, H0, W0)
            problem = input_shape_problem(cfg.model.backbone, shape)
            if problem:
                raise TaskError(f"model.backbone={cfg.model.backbone} cannot take the volumes (D, H, W) = {shape}: "
                                f"{problem}; set data.volume_depth and data.volume_size")
        return dataset

    def collate(self, items):
        from torch.utils.data import default_collate

        return default_collate(items)

