"""Classification tasks: MIL bags and 2.5D stacks, 2D images, 3D volumes.

The three share one cache (:mod:`losslab.data.cache`), one way to split, normalise and load a fold
(:class:`ClassificationTask`) and the classifier's step (:class:`losslab.engine.steps.ClassificationStep`);
each kind adds only its dataset and how a batch reaches its model (:class:`BagStep`, :class:`ImageStep`).
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import torch
from torch import nn

from losslab.engine.steps import ClassificationStep, StepOutput
from losslab.tasks.base import CaseCacheMixin, FoldSetup, Task, TaskError, check_loss_with_counts, register_task


class BagStep(ClassificationStep):
    """Bags ``(B, N, C, H, W)`` + mask ``(B, N)``, and for 2.5D stacks a ``level (B,)`` keyword.
    Dual-stream MIL (Li et al., CVPR 2021) returns ``aux["stream_logits"]``: the loss is the mean of the
    loss on each stream; its ``aux["instance_logits"]`` give ``val/selection_confidence``."""

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


class ImageStep(ClassificationStep):
    """One image or volume per case: ``model(image)``."""

    def inputs(self, batch, device):
        return (batch["image"].to(device, non_blocking=True),), {}


class ClassificationTask(CaseCacheMixin, Task):
    """What every classification kind shares: the case cache, a fold's datasets normalised with training
    statistics, the loaders (class sampling; sharded under torchrun), the loss and model built from the
    training class counts, the registry spec, the per-class figures and patient-bootstrap intervals.
    A kind names its dataset (:meth:`make_dataset`), its step class and, when not the padded one, its collate."""

    step_class: type[ClassificationStep] = ClassificationStep
    device_batch_kinds = ("mil", "image", "volume3d")

    @abc.abstractmethod
    def make_dataset(self, cfg: Any, info: Any, rows: Any, train: bool, transform: Callable | None = None,
                     normalizer: Any = None):
        """The dataset over the cache rows ``rows`` (training when ``train``, else evaluation);
        ``normalizer`` (:class:`losslab.data.normalization.Normalizer`) defaults to the per-case z-score."""

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        from losslab.data.datasets import collate_padded

        return collate_padded(items)

    def step(self, cfg, loss_fn, names):
        return self.step_class()

    def check_loss(self, cfg, num_classes):
        check_loss_with_counts(cfg, num_classes)

    def check_evaluate(self, source, split, explicit):
        """Every ``evaluate`` setting applies to a classifier."""

    def score_evaluation(self, scorers, *args):
        """One probability vector per case: ``scorers.cases`` (calibration, TTA, latency, intervals)."""
        return scorers.cases(*args)

    def output_names(self, cfg, info=None):
        """The class names, from ``data.class_names`` or the cache."""
        return list(cfg.data.class_names or (info or self.load_cache(cfg)).class_names)

    # ------------------------------------------------------------------ a fold's data
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

    def eval_loader(self, cfg: Any, dataset: Any, batch_size: int | None = None) -> Any:
        """A loader over ``dataset`` in order, in this process (``evaluate``, the test split)."""
        from losslab.data.loaders import build_loader

        return build_loader(dataset, cfg.data, False, self.collate, batch_size=batch_size, num_workers=0)

    def test_loader(self, cfg, info, normalizer=None):
        from losslab.data.splits import TEST_FOLD

        rows = info.index[info.index["fold"] == TEST_FOLD]
        if len(rows) == 0:
            return None
        return self.eval_loader(cfg, self.make_dataset(cfg, info, rows, train=False, normalizer=normalizer))

    # ------------------------------------------------------------------ model and fold
    def build(self, cfg, names, class_counts=None, fractions=None):
        """``(loss, model)``: the loss decides the output size (e.g. K-1 for CORAL); the classifier's bias
        starts at the log of the class distribution the batches are drawn from (uniform under a balancing
        sampler), floored so that a class absent from the training fold gets a finite bias.
        ``class_counts``: the training cases per class of ``names`` (required)."""
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

    def setup_fold(self, cfg, info, fold):
        """The datasets of ``fold``, the loss and model built from its training class counts, the loaders."""
        import numpy as np

        from losslab.data.sources.channels import modality_params
        from losslab.data.splits import TEST_FOLD

        names = list(info.class_names)
        train_ds, val_ds = self.fold_datasets(cfg, info, fold)
        counts = np.bincount(train_ds.labels, minlength=len(names)).tolist()
        loss_fn, model = self.build(cfg, names, counts)
        train_loader, val_loader = self.loaders(cfg, train_ds, val_ds)
        normalization = train_ds.normalizer.params()
        params = {"data.class_counts_train": str(counts), "data.n_train": len(train_ds), "data.n_val": len(val_ds),
                  "data.n_test": int((info.index["fold"] == TEST_FOLD).sum())} | normalization \
            | modality_params(info.report)
        return FoldSetup(train_loader, val_loader, loss_fn, model, self.step(cfg, loss_fn, names), names,
                         self.spec(cfg, names, counts), params, normalization | modality_params(info.report),
                         {"losslab.split_fingerprint": info.split_fingerprint})

    def input_example(self, cfg, val_loader):
        return val_loader.dataset[0]["image"].unsqueeze(0).numpy()

    def rebuild(self, cfg, run_tags, run_params):
        """The class names from the run's tag ``losslab.class_names`` and the training class counts from
        its param ``data.class_counts_train``, else both from the cache of ``cfg.data``
        (:func:`losslab.data.splits.training_rows`: every fold but ``data.fold``, never the test split,
        then ``data.imbalance`` and ``data.train_cases``)."""
        import ast

        import numpy as np

        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": False})})
        tagged = run_tags.get("losslab.class_names")
        info = None if tagged and "data.class_counts_train" in run_params else self.load_cache(cfg)
        names = tagged.split(",") if tagged else self.output_names(cfg, info)
        if "data.class_counts_train" in run_params:
            counts = [int(c) for c in ast.literal_eval(run_params["data.class_counts_train"])]
        else:  # the training cases as training chose them (data.imbalance, data.train_cases)
            from losslab.data.splits import training_rows

            train = training_rows(cfg.data, info.index, cfg.data.fold, len(names))
            counts = np.bincount(train["label"].to_numpy(), minlength=len(names)).tolist()
        loss_fn, model = self.build(cfg, names, counts)
        return loss_fn, model, names

    def spec(self, cfg, names, class_counts=None):
        """The ``model`` and ``loss`` sections, the class names and the training class counts."""
        return {"kind": "classifier", "task": self.name, "model": cfg.model.model_dump(mode="json"),
                "loss": cfg.loss.model_dump(mode="json"), "class_names": list(names),
                "class_counts": [int(c) for c in class_counts or []]}

    # ------------------------------------------------------------------ reporting
    def split_summary(self, outputs, dataset, names, prefix, intervals=None):
        """Patient-bootstrap intervals (``<prefix>/<metric>_ci_low``, ``_ci_high``; cases without a patient
        id each their own) as ``intervals`` (``enabled``, ``n_resamples``, ``confidence``, ``seed``;
        default 1000 resamples, 95 %, seed 0) says."""
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

    def epoch_figures(self, state, final, names):
        return classification_figures(state, final, names)


def classification_figures(state: Any, final: bool, names: list[str]) -> dict[str, Any]:
    """The learning curves, per-class recall, the validation confusion matrix (``plots/confusion_matrix
    [_epoch_<k>].png``) and, for attention models, the attention over the first validation bags."""
    from losslab import plots
    from losslab.engine.metrics import confusion_matrix

    hist = state.history
    curves = [k for k in ("train/loss", "val/loss", "val/balanced_accuracy", "val/min_class_recall") if k in hist]
    out = {"plots/curves.png": plots.plot_curves(hist, curves),
           "plots/loss_curves.png": plots.plot_curves(hist, [k for k in ("train/loss", "val/loss") if k in hist]),
           "plots/per_class_recall.png": plots.plot_per_class_recall(hist, names)}
    val = state.last_val_outputs
    if val is None:
        return out
    y_pred = val["pred"] if "pred" in val else val["probs"].argmax(1)
    name = "plots/confusion_matrix.png" if final else f"plots/confusion_matrix_epoch_{state.epoch:03d}.png"
    out[name] = plots.plot_confusion_matrix(confusion_matrix(val["labels"], y_pred, len(names)), names)
    if "attention" in val:
        attention = [a[m] for a, m in zip(val["attention"][:4], val["mask"][:4])]
        out["plots/attention.png"] = plots.plot_attention(
            attention, [f"val bag {i} (label {names[int(l)]})" for i, l in enumerate(val["labels"][:4])])
    return out


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
class BagClassificationTask(ClassificationTask):
    """MIL bags ``(B, N, C, H, W)`` + mask ``(B, N)`` (``mil``) and 2.5D stacks with a ``level (B,)``
    (``slices25d``), through :class:`BagStep`."""

    name = "bag_classification"
    model_kinds = ("mil", "slices25d")
    step_class = BagStep

    def make_dataset(self, cfg, info, rows, train, transform=None, normalizer=None):
        from losslab.data.datasets import BagDataset, SliceStackDataset

        extra = _normalizer_kwargs(normalizer)
        if cfg.model.kind == "slices25d":
            return SliceStackDataset(rows, info.cache_dir, transform=transform, **extra)
        sampling = cfg.data.bag_sampling if train or cfg.data.bag_sampling == "all" else "evenly_spaced"
        return BagDataset(rows, info.cache_dir, cfg.data.bag_size, sampling, transform=transform, **extra)


@register_task
class ImageClassificationTask(ClassificationTask):
    """One 2D image per case ``(B, C, H, W)`` → ``model.kind: image``."""

    name = "image_classification"
    default_model_name = "losslab-image"
    model_kinds = ("image",)
    step_class = ImageStep

    def make_dataset(self, cfg, info, rows, train, transform=None, normalizer=None):
        from losslab.data.datasets import ImageDataset

        return ImageDataset(rows, info.cache_dir, transform=transform, **_normalizer_kwargs(normalizer))


@register_task
class VolumeClassificationTask(ClassificationTask):
    """Whole volumes ``(B, C, D, H, W)`` → a MONAI 3D encoder (``model.kind: volume3d``); the batch goes
    to the model as an image does (:class:`ImageStep`), only the dataset differs."""

    name = "volume_classification"
    default_model_name = "losslab-volume"
    model_kinds = ("volume3d",)
    step_class = ImageStep

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
