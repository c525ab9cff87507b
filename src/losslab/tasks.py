"""Tasks: what differs between kinds of experiment, behind one training loop.

A task owns the dataset and collate of its model kind, batch → forward → loss (including a model's
extra outputs), the predictions and its validation diagnostics (:class:`losslab.engine.steps.ClassificationStep`
is the part the engine calls); the loop owns time. One registry, keyed by name:

============================  =====================  =====================================================
task                          model.kind             losses (``task`` of the loss class)
============================  =====================  =====================================================
``bag_classification``        mil, slices25d         classification, ordinal
``image_classification``      image                  classification, ordinal
``volume_classification``     volume3d               classification, ordinal
``multitask``                 multimodal             classification (one head per task; ``losslab distill``)
``segmentation``              segmentation           segmentation
============================  =====================  =====================================================

The experiment names its task with the top-level key ``task``; when absent it is inferred from
``model.kind``. :func:`check_task` refuses an impossible pairing (a segmentation loss on a
classifier, a distillation loss outside ``losslab distill``, an ordinal loss on a segmentation task,
a model kind the task cannot train) when the config is loaded, before any MLflow run opens, naming
the keys and the file that set them.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

from losslab.engine.steps import ClassificationStep, StepOutput

_TASKS: dict[str, type["Task"]] = {}


class TaskError(ValueError):
    """An impossible pairing of task, model kind and loss; the message names the keys."""


def register_task(cls: type["Task"]) -> type["Task"]:
    """Class decorator: register ``cls`` under ``cls.name`` (a duplicate name raises)."""
    if cls.name in _TASKS:
        raise ValueError(f"task {cls.name!r} is already registered by {_TASKS[cls.name].__name__}")
    _TASKS[cls.name] = cls
    return cls


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> "Task":
    """A new instance of the task registered under ``name``; raises :class:`TaskError` listing the names."""
    try:
        return _TASKS[name]()
    except KeyError:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}") from None


class Task(ClassificationStep):
    """Base task: a classifier step plus the pairing rules and the datasets."""

    name: ClassVar[str] = ""
    model_kinds: ClassVar[tuple[str, ...]] = ()
    loss_tasks: ClassVar[tuple[str, ...]] = ("classification", "ordinal")
    entry_points: ClassVar[tuple[str, ...]] = ("train", "evaluate", "sweep")

    def make_dataset(self, cfg: Any, info: Any, rows: Any, train: bool, transform: Callable | None = None,
                     normalizer: Any = None):
        """The dataset over the cache rows ``rows`` (training when ``train``, else evaluation);
        ``normalizer`` (:class:`losslab.data.normalization.Normalizer`) defaults to the per-case z-score."""
        raise TaskError(f"task {self.name!r} has no dataset yet")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        from losslab.data.datasets import collate_padded

        return collate_padded(items)

    def check_entry_point(self, entry_point: str) -> None:
        """Refuse an entry point that cannot run this task (before any MLflow run opens)."""
        if entry_point not in self.entry_points:
            raise TaskError(f"task {self.name!r} does not run through `losslab {entry_point}`; "
                            f"it runs through: {', '.join(self.entry_points) or 'none yet'}")


def _normalizer_kwargs(normalizer: Any) -> dict[str, Any]:
    return {} if normalizer is None else {"normalizer": normalizer}


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
    model_kinds = ("volume3d",)

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


@register_task
class MultitaskTask(Task):
    """Image + text → one head per task (``model.kind: multimodal``); trained by ``losslab distill``
    through the same :func:`losslab.engine.loop.fit` as the other tasks.

    The model returns ``({task: logits (B, K_t)}, fused features (B, D))``; the objective is one of
    :mod:`losslab.losses.multitask`. A student distils from ``teacher``: the teacher's outputs on the
    training cases (``logits/<task> (N, K_t)``, ``features (N, D_t)``), looked up by the batch's
    ``index`` (the row of the training set); ``labelled (N,)`` bool hides the labels of the other
    training cases from the objective (:data:`losslab.losses.multitask.UNLABELLED`). Validation
    scores every head (:func:`losslab.engine.metrics.multitask_metrics`)."""

    name = "multitask"
    model_kinds = ("multimodal",)
    entry_points = ("distill",)

    def __init__(self, task_classes: dict[str, list[str]] | None = None, teacher: dict[str, torch.Tensor] | None = None,
                 labelled: torch.Tensor | None = None) -> None:
        self.task_classes = dict(task_classes or {})
        self.teacher = teacher
        self.labelled = labelled
        self._on_device: dict[str, Any] = {}

    def _lookups(self, device: torch.device) -> dict[str, Any]:
        """The teacher's outputs and the labelled mask on ``device``, moved there once (not per batch)."""
        if self._on_device.get("device") != device:
            teacher = {k: v.to(device) for k, v in (self.teacher or {}).items()}
            labelled = self.labelled.to(device) if self.labelled is not None else None
            self._on_device = {"device": device, "teacher": teacher, "labelled": labelled}
        return self._on_device

    def forward(self, model, batch, device):
        text = getattr(model, "module", model).text_encoder is not None  # DDP wraps the model
        image = batch["image"].to(device, non_blocking=True)
        ids = batch["input_ids"].to(device, non_blocking=True) if text else None
        attention_mask = batch["attention_mask"].to(device, non_blocking=True) if text else None
        logits, features = model(image, ids, attention_mask)
        return StepOutput(logits, aux={"features": features, "index": batch["index"].to(device, non_blocking=True)})

    def target(self, batch, device):
        return {t: y.to(device, non_blocking=True) for t, y in batch["labels"].items()}

    def size(self, target):
        return len(next(iter(target.values())))

    def loss(self, loss_fn, out, target):
        from losslab.losses.multitask import UNLABELLED

        index, features = out.aux["index"], out.aux["features"].float()
        logits = {t: z.float() for t, z in out.logits.items()}
        lookups = self._lookups(index.device)
        if lookups["labelled"] is not None:
            seen = lookups["labelled"][index]
            target = {t: torch.where(seen, y, UNLABELLED) for t, y in target.items()}
        if self.teacher is None:
            return loss_fn(logits, logits, target, features, features, index)
        teacher = lookups["teacher"]
        t_logits = {t: teacher[f"logits/{t}"][index] for t in self.task_classes}
        return loss_fn(logits, t_logits, target, features, teacher["features"][index], index)

    @torch.no_grad()
    def predict(self, model, loader, device, loss_fn=None, amp=False):
        """``{"logits": {task: (N, K_t)}, "labels": {task: (N,)}, "features": (N, D)}`` as arrays."""
        from losslab.engine.loop import autocast

        model.eval()
        logits: dict[str, list] = {}
        labels: dict[str, list] = {}
        features = []
        for batch in loader:
            with autocast(device, amp):
                out = self.forward(model, batch, device)
            for task, value in out.logits.items():
                logits.setdefault(task, []).append(value.float().cpu())
                labels.setdefault(task, []).append(batch["labels"][task])
            features.append(out.aux["features"].float().cpu())
        return {"logits": {t: torch.cat(v).numpy() for t, v in logits.items()},
                "labels": {t: torch.cat(v).numpy() for t, v in labels.items()},
                "features": torch.cat(features).numpy()}

    def metrics(self, outputs, class_names, loss_fn=None):
        from losslab.engine.metrics import multitask_metrics

        return multitask_metrics(outputs["logits"], outputs["labels"], self.task_classes)

    def collate(self, items):
        from losslab.data.text import collate_image_text

        return collate_image_text(items)


@register_task
class SegmentationTask(Task):
    """Voxel-wise segmentation with the segmentation losses (dice, tversky, boundary, compound of them)
    by a MONAI network (``model.kind: segmentation``). Its own cache (volumes, targets, distance maps:
    :mod:`losslab.data.seg_cache`), patch datasets (:mod:`losslab.data.seg_datasets`), batch → loss,
    sliding-window validation and metrics (:class:`losslab.engine.segmentation.SegmentationTask`, the
    step the engine's :func:`losslab.engine.loop.fit` trains with) live in those modules; the pipelines
    route this task to :mod:`losslab.pipelines.seg_train` / ``seg_evaluate``."""

    name = "segmentation"
    model_kinds = ("segmentation",)
    loss_tasks = ("segmentation",)
    entry_points = ("train", "evaluate", "sweep")

    def make_dataset(self, cfg, info, rows, train, transform=None):
        from losslab.data.seg_datasets import SegVolumeDataset, train_transforms

        return SegVolumeDataset(info, rows, train_transforms(cfg.seg, cfg.model.spatial_dims) if train else None)


#: model.kind -> task when the config names none
TASK_OF_KIND = {kind: cls.name for cls in _TASKS.values() for kind in cls.model_kinds}


def task_name(cfg: Any) -> str:
    """The config's ``task``, else the one :data:`TASK_OF_KIND` gives ``model.kind``."""
    explicit = getattr(cfg, "task", None)
    if explicit:
        return explicit
    try:
        return TASK_OF_KIND[cfg.model.kind]
    except KeyError:
        raise TaskError(f"model.kind={cfg.model.kind!r} belongs to no task; name one with `task:` "
                        f"({', '.join(list_tasks())})") from None


def task_of(cfg: Any) -> Task:
    return get_task(task_name(cfg))


def loss_tasks_of(name: str, params: dict[str, Any]) -> dict[str, str]:
    """``{loss name: task}`` for ``loss.name`` and, for a compound loss, each of its terms."""
    from losslab.losses.registry import get_loss_class

    out = {name: getattr(get_loss_class(name), "task", "classification")}
    terms = params.get("terms")
    if isinstance(terms, list) and terms:
        out = {}
        for term in terms:
            if isinstance(term, dict) and isinstance(term.get("name"), str):
                out[term["name"]] = getattr(get_loss_class(term["name"]), "task", "classification")
    return out


def check_task(cfg: Any, where: Callable[[str], str] = lambda key: "") -> Task:
    """Refuse an impossible pairing of task, ``model.kind`` and ``loss``; return the task.

    ``where(key)`` names the file that set a key (`` in <file>``) for the messages."""
    task = task_of(cfg)
    for loss, loss_task in loss_tasks_of(cfg.loss.name, cfg.loss.params).items():
        if loss_task == "distillation":
            raise TaskError(f"loss.name={loss!r}{where('loss.name')} is a distillation loss: it runs only in "
                            f"`losslab distill` (set it in distill.losses, and loss.name to a task loss)")
        if loss_task not in task.loss_tasks:
            raise TaskError(f"loss.name={loss!r}{where('loss.name')} is a {loss_task} loss; task {task.name!r} "
                            f"(model.kind={cfg.model.kind!r}{where('model.kind')}) takes "
                            f"{' or '.join(task.loss_tasks)} losses")
    if cfg.model.kind not in task.model_kinds:
        kinds = ", ".join(task.model_kinds) or "none yet"
        raise TaskError(f"task={task.name!r}{where('task')} cannot train model.kind={cfg.model.kind!r}"
                        f"{where('model.kind')}; its model kinds: {kinds}")
    return task
