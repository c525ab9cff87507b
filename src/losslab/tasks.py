"""Tasks: what differs between kinds of experiment, behind one training loop.

A task owns the dataset and collate of its model kind, batch → forward → loss (including a model's
extra outputs), the predictions and its validation diagnostics (:class:`losslab.engine.steps.ClassificationStep`
is the part the engine calls); the loop owns time. It also builds what the pipelines ask of it, so
that they never branch on the kind: its cache (:meth:`Task.build_cache`), a fold's loaders, loss and
model (:meth:`Task.setup_fold`), the registry spec and the model back from it (:meth:`Task.spec`,
:func:`build_from_spec`), the model of a run (:meth:`Task.rebuild`) and the held-out test loader.
One registry, keyed by name:

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

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from losslab.engine.segmentation import SegmentationStep
from losslab.engine.steps import ClassificationStep, StepOutput

_TASKS: dict[str, type["Task"]] = {}


class TaskError(ValueError):
    """An impossible pairing of task, model kind and loss; the message names the keys."""


@dataclass
class FoldSetup:
    """What a task builds to train one fold: loaders, loss and model, and what the run records."""

    train_loader: Any
    val_loader: Any
    loss_fn: nn.Module
    model: nn.Module
    names: list[str]  # the names its metrics are reported for
    spec: dict[str, Any]  # what the registry rebuilds the model from (:func:`build_from_spec`)
    params: dict[str, Any]  # logged once, on a new run
    hashed_params: dict[str, Any] = field(default_factory=dict)  # resolved settings in the config fingerprint
    tags: dict[str, str] = field(default_factory=dict)
    callbacks: list = field(default_factory=list)  # engine callbacks the task needs (e.g. reseeded crops)
    figures: Callable[[Any, bool], dict[str, Any]] | None = None  # per-epoch figures, when not the classifier's


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
    #: what ``losslab train`` prints for each fold
    headline_metric: ClassVar[str] = "val/balanced_accuracy"
    #: one probability vector per case: ``evaluate`` calibrates, averages TTA passes, bootstraps intervals
    per_case_probabilities: ClassVar[bool] = True
    #: trains under torchrun (DDP) too
    distributed: ClassVar[bool] = True
    #: its loss is built from the training class counts (checked with them when the classes are known)
    loss_takes_class_counts: ClassVar[bool] = True

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

    def convolves_volumes(self, cfg: Any) -> bool:
        """Whether the model convolves volumes (``train.channels_last``, a 2D memory format, is refused)."""
        return False

    #: the model kinds whose training split ``data.train_data_on_device`` can hold on the device
    device_batch_kinds: ClassVar[tuple[str, ...]] = ("mil", "image", "volume3d")

    def check_settings(self, cfg: Any, where: Callable[[str], str] = lambda key: "") -> None:
        """Refuse settings this task cannot train with (when the config is loaded)."""
        if not cfg.data.train_data_on_device:
            return
        key = "data.train_data_on_device"
        if cfg.model.kind not in self.device_batch_kinds:
            raise TaskError(f"{key}=true{where(key)}: the training split is kept on the device for model.kind "
                            f"{', '.join(self.device_batch_kinds) or 'none'} of task {self.name!r}, not "
                            f"model.kind={cfg.model.kind}; set it to false")
        if cfg.data.augment:
            raise TaskError(f"{key}=true{where(key)}: a batch gathered on the device is not augmented; "
                            f"data.augment={cfg.data.augment} is set: drop one of them")

    # ------------------------------------------------------------------ data, model and scores of a run
    def build_cache(self, cfg: Any, force: bool = False) -> Any:
        """The case cache of ``cfg.data`` (built, or reused when its inputs are unchanged)."""
        from losslab.data.cache import build_cache

        return build_cache(cfg.data, force=force)

    def cache_summary(self, info: Any) -> tuple[list[str], dict[str, float]]:
        """What ``preprocess`` prints about a cache, and its metrics beside ``cases`` and ``skipped``."""
        line = (f"{'reused' if info.reused else 'wrote'} the cache at {info.cache_dir} "
                f"({'inputs unchanged, ' if info.reused else ''}fingerprint {info.fingerprint[:12]})")
        if info.resumed_tasks:
            line += f"; resumed an interrupted build: {info.resumed_tasks} of {info.total_tasks} tasks were done"
        counts = info.report.get("class_counts", {})
        return [line], {"resumed_tasks": float(info.resumed_tasks)} | {
            f"class_count_{k}": float(v) for k, v in counts.items()}

    def load_cache(self, cfg: Any) -> Any:
        """The cache of ``cfg.data`` a trained model is scored on: read as it is when its index exists
        (the raw files may be gone), else built."""
        from pathlib import Path

        from losslab.data.cache import load_cache

        if (Path(cfg.data.cache_dir) / "index.parquet").is_file():
            return load_cache(cfg.data.cache_dir)
        return self.build_cache(cfg)

    def output_names(self, cfg: Any, info: Any = None) -> list[str]:
        """The names of the model's outputs (the class names), from ``data.class_names`` or the cache."""
        return list(cfg.data.class_names or (info or self.load_cache(cfg)).class_names)

    def fold_datasets(self, cfg: Any, info: Any, fold: int) -> tuple[Any, Any]:
        """Training cases (every fold but ``fold``, never the held-out test split, then ``data.imbalance``
        and ``data.train_cases``: :func:`losslab.data.splits.training_rows`) and validation cases, both
        normalised by ``data.normalize`` (or the source's default) with statistics from the training cases."""
        from losslab.data.normalization import build_normalizer
        from losslab.data.sources import default_normalization
        from losslab.data.splits import training_rows

        index = info.index
        val_df = index[index["fold"] == fold]
        if fold < 0 or len(val_df) == 0:
            raise ValueError(f"data.fold={fold} has no cases; the cache has folds "
                             f"{sorted(f for f in index['fold'].unique().tolist() if f >= 0)}")
        train_df = training_rows(cfg.data, index, fold, len(info.class_names))
        spec = cfg.data.normalize if cfg.data.normalize is not None else default_normalization(cfg.data.source)
        normalizer = build_normalizer(spec, train_df, info.cache_dir)
        transform = None
        if cfg.data.augment:
            from losslab.data.transforms import build_transforms

            transform = build_transforms(cfg.data.augment, train=True)
        return (self.make_dataset(cfg, info, train_df, train=True, transform=transform, normalizer=normalizer),
                self.make_dataset(cfg, info, val_df, train=False, normalizer=normalizer))

    def loaders(self, cfg: Any, train_ds: Any, val_ds: Any) -> tuple[Any, Any]:
        """Train and validation loaders. Under torchrun the training data is sharded over the ranks with
        the same class sampling strategy (:func:`losslab.data.samplers.build_distributed_sampler`) and
        ``data.batch_size`` is per rank; validation stays whole (rank 0 validates)."""
        from losslab.data.loaders import build_loader
        from losslab.data.samplers import build_distributed_sampler, build_sampler
        from losslab.engine import distributed as ddp

        batch_size = cfg.data.batch_size
        if ddp.world_size() > 1:
            sampler, batch_sampler = build_distributed_sampler(cfg.data.sampler, train_ds.labels, batch_size,
                                                               ddp.world_size(), ddp.rank(), seed=cfg.train.seed)
        else:
            sampler, batch_sampler = build_sampler(cfg.data.sampler, train_ds.labels, batch_size)
        device = ddp.distributed_device(cfg.train.device)
        train_loader = build_loader(train_ds, cfg.data, True, self.collate, sampler, batch_sampler, device)
        return train_loader, build_loader(val_ds, cfg.data, False, self.collate, device=device)

    def fold_loaders(self, cfg: Any, info: Any, fold: int) -> tuple[Any, Any]:
        """:meth:`loaders` of :meth:`fold_datasets`."""
        return self.loaders(cfg, *self.fold_datasets(cfg, info, fold))

    def build(self, cfg: Any, names: list[str], class_counts: list[int] | None = None,
              fractions: list[float] | None = None) -> tuple[nn.Module, nn.Module]:
        """``(loss, model)`` for ``cfg``: the loss decides the output size (e.g. K-1 for CORAL); the
        classifier's bias starts at the log of the class distribution the batches are drawn from
        (uniform under a balancing sampler), floored so that a class absent from the training fold gets
        a finite bias. ``class_counts``: the training cases per class of ``names`` (required)."""
        from losslab.data.samplers import sampled_class_distribution
        from losslab.losses import build_loss
        from losslab.models import build_model

        if class_counts is None or len(class_counts) != len(names):
            raise TaskError(f"task {self.name!r} builds its model from the training class counts of {names}; "
                            f"got {class_counts}")
        num_classes = len(class_counts)
        loss_fn = build_loss(cfg.loss.name, **cfg.loss.params, class_counts=list(class_counts), num_classes=num_classes)
        num_outputs = loss_fn.output_dim(num_classes) if hasattr(loss_fn, "output_dim") else num_classes
        priors = [float(p) for p in sampled_class_distribution(cfg.data.sampler, [max(c, 1) for c in class_counts])]
        model = build_model(cfg.model, num_outputs=num_outputs,
                            class_priors=priors if num_outputs == num_classes else None)
        if getattr(loss_fn, "head", "linear") == "normed_linear":
            _use_cosine_classifier(model, cfg.loss.name)
        return loss_fn, model

    def setup_fold(self, cfg: Any, info: Any, fold: int) -> FoldSetup:
        """The datasets of ``fold``, the loss and model built from its training class counts, the loaders."""
        import numpy as np

        from losslab.data.splits import TEST_FOLD, split_fingerprint

        names = list(info.class_names)
        train_ds, val_ds = self.fold_datasets(cfg, info, fold)
        counts = np.bincount(train_ds.labels, minlength=len(names)).tolist()
        loss_fn, model = self.build(cfg, names, counts)
        train_loader, val_loader = self.loaders(cfg, train_ds, val_ds)
        normalization = train_ds.normalizer.params()
        params = {"data.class_counts_train": str(counts), "data.n_train": len(train_ds), "data.n_val": len(val_ds),
                  "data.n_test": int((info.index["fold"] == TEST_FOLD).sum())} | normalization
        return FoldSetup(train_loader, val_loader, loss_fn, model, names, self.spec(cfg, names, counts), params,
                         normalization, {"losslab.split_fingerprint": split_fingerprint(info.index)})

    def input_example(self, cfg: Any, val_loader: Any) -> Any:
        """One validation input ``(1, ...)`` as numpy: the signature of the registered model."""
        return val_loader.dataset[0]["image"].unsqueeze(0).numpy()

    def rebuild(self, cfg: Any, run_tags: dict[str, str], run_params: dict[str, str]
                ) -> tuple[nn.Module, nn.Module, list[str]]:
        """``(loss, model, output names)`` of the model a run of this task trained (random weights, no
        pretrained download): the class names from the run's tag ``losslab.class_names`` and the
        training class counts from its param ``data.class_counts_train``, else both from the cache of
        ``cfg.data`` (every fold but ``data.fold``, never the test split)."""
        import ast

        import numpy as np

        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": False})})
        tagged = run_tags.get("losslab.class_names")
        info = None if tagged and "data.class_counts_train" in run_params else self.load_cache(cfg)
        names = tagged.split(",") if tagged else self.output_names(cfg, info)
        if "data.class_counts_train" in run_params:
            counts = [int(c) for c in ast.literal_eval(run_params["data.class_counts_train"])]
        else:
            index = info.index
            train = index[(index["fold"] != cfg.data.fold) & (index["fold"] >= 0)]
            counts = np.bincount(train["label"].to_numpy(), minlength=len(names)).tolist()
        loss_fn, model = self.build(cfg, names, counts)
        return loss_fn, model, names

    def spec(self, cfg: Any, names: list[str], class_counts: list[int] | None = None) -> dict[str, Any]:
        """What :func:`build_from_spec` needs to rebuild the model a run registers: the ``model`` and
        ``loss`` sections, the class names and the training class counts."""
        return {"kind": "classifier", "task": self.name, "model": cfg.model.model_dump(mode="json"),
                "loss": cfg.loss.model_dump(mode="json"), "class_names": list(names),
                "class_counts": [int(c) for c in class_counts or []]}

    def test_loader(self, cfg: Any, info: Any, normalizer: Any = None):
        """A loader over the cache's held-out test cases (fold -1), or None when it has none;
        ``normalizer``: the training run's (from its training cases)."""
        from torch.utils.data import DataLoader

        from losslab.data.splits import TEST_FOLD

        rows = info.index[info.index["fold"] == TEST_FOLD]
        if len(rows) == 0:
            return None
        dataset = self.make_dataset(cfg, info, rows, train=False, normalizer=normalizer)
        return DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=False, num_workers=0, collate_fn=self.collate)

    def split_summary(self, outputs: dict[str, Any], dataset: Any, names: list[str], prefix: str,
                      intervals: Any = None) -> dict[str, float]:
        """Numbers beside a split's metrics: patient-bootstrap intervals (``<prefix>/<metric>_ci_low``,
        ``_ci_high``; cases without a patient id each their own) as ``intervals`` (``enabled``,
        ``n_resamples``, ``confidence``, ``seed``; default 1000 resamples, 95 %, seed 0) says."""
        import numpy as np

        from losslab.engine.intervals import interval_metrics

        if intervals is not None and not intervals.enabled:
            return {}
        settings = {} if intervals is None else {"n_resamples": intervals.n_resamples,
                                                 "confidence": intervals.confidence, "seed": intervals.seed}
        rows = dataset.index
        order = np.asarray(outputs["index"], dtype=int)
        groups = (rows["patient_id"] if "patient_id" in rows else rows["case_id"]).to_numpy()[order]
        return interval_metrics(outputs, groups, names, prefix, **settings)


def _use_cosine_classifier(model: nn.Module, loss_name: str) -> None:
    """Losses such as LDAM expect cosine logits in [-1, 1]: swap the model's linear classifier for
    :class:`losslab.losses.NormedLinear` of the same size."""
    from losslab.losses import NormedLinear

    owner = getattr(model, "head", model)
    if hasattr(owner, "use_cosine_classifiers"):  # a head with several classifiers (dual-stream MIL)
        owner.use_cosine_classifiers()
        return
    classifier = getattr(owner, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f"loss {loss_name!r} needs a cosine (normed_linear) classifier, but model "
                         f"{type(model).__name__} has no linear `classifier` to replace")
    owner.classifier = NormedLinear(classifier.in_features, classifier.out_features)


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
        from losslab.data.seg_cache import build_seg_cache

        return build_seg_cache(cfg.data, cfg.seg, force=force)

    def cache_summary(self, info):
        lines = [f"{'reused' if info.reused else 'wrote'} the segmentation cache at {info.cache_dir} "
                 f"(fingerprint {info.fingerprint[:12]})"]
        lines += [f"skipped {item['item']}: {item['reason']}" for item in info.report["skipped"]]
        return lines + [f"note: {note}" for note in info.report["notes"]], {}

    def load_cache(self, cfg):
        return self.build_cache(cfg)

    def output_names(self, cfg, info=None):
        """The output channels: the regions, or the classes with background first."""
        return list((info or self.build_cache(cfg)).channel_names)

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
        if getattr(loss_fn, "task", None) != "segmentation":
            raise TaskError(f"loss.name={cfg.loss.name!r}: its terms are {loss_fn.task} losses, not segmentation losses")
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
        from losslab.engine.callbacks import ReseedEachEpoch

        fractions = info.voxel_fractions(fold)
        loss_fn, model = self.build(cfg, info.channel_names, fractions=fractions)
        train_loader, val_loader = self.fold_loaders(cfg, info, fold)
        prior = ",".join(f"{n}={f:.5g}" for n, f in zip(info.channel_names, fractions))
        params = {"data.n_train": len(train_loader.dataset), "data.n_val": len(val_loader.dataset),
                  "seg.channels": ",".join(info.channel_names), "seg.output_bias_prior": prior}
        return FoldSetup(train_loader, val_loader, loss_fn, model, self.metric_names,
                         self.spec(cfg, info.channel_names), params,
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

    if getattr(get_loss_class(name), "task", None) != "segmentation" and name != "compound":
        seg = [n for n in list_losses() if getattr(get_loss_class(n), "task", None) == "segmentation"]
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


def build_from_spec(spec: dict[str, Any]) -> tuple[nn.Module, nn.Module | None, "Task | None"]:
    """``(model, loss or None, task or None)`` with random weights, shaped as a registered model's ``spec`` says
    (:meth:`Task.spec`); no pretrained weights are read (the registered state dict replaces them)."""
    from losslab.config.schema import ExperimentConfig
    from losslab.models.export import ModelFormatError, build_multimodal_from_spec

    kind = spec.get("kind")
    if kind == "multimodal":  # a distilled model: its spec is the multimodal builder's own
        return build_multimodal_from_spec(spec), None, None
    if kind not in ("classifier", "segmentation"):
        raise ModelFormatError(f"unknown model kind {kind!r} in the model's spec")
    sections = {"model": {**spec["model"], "pretrained": False, "weights_path": None}, "loss": spec["loss"]}
    if "seg" in spec:
        sections["seg"] = spec["seg"]
    cfg = ExperimentConfig.model_validate(sections)
    names = list(spec.get("class_names") or spec["channel_names"])
    task = get_task(spec["task"]) if spec.get("task") else task_of(cfg)  # without a task name: its model kind's
    loss_fn, model = task.build(cfg, names, spec.get("class_counts"))
    return model, loss_fn, task


def build_task_model(cfg: Any, names: list[str], class_counts: list[int] | None = None,
                     fractions: list[float] | None = None) -> tuple[Task, nn.Module]:
    """``(task, model)``: the task of ``cfg`` set up by :meth:`Task.build` for ``names``, and its model."""
    task = task_of(cfg)
    _, model = task.build(cfg, names, class_counts, fractions)
    return task, model


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
    task.check_settings(cfg, where)
    return task
