"""The task base class, its registry and the pairing rules (see :mod:`losslab.tasks`)."""


from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import nn

from losslab.engine.steps import ClassificationStep

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
    #: settings whose default follows the task, filled in when a config leaves them unset
    #: (:meth:`config_defaults`): the metric that picks the best epoch, its tie-breaks, the registry name
    default_monitor: ClassVar[tuple[str, str]] = ("val/balanced_accuracy", "max")
    default_tiebreak: ClassVar[tuple[str, ...]] = ("val/auc", "val/loss")
    default_model_name: ClassVar[str] = "losslab-mil"
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

    def config_defaults(self) -> dict[tuple[str, str], Any]:
        """``{(section, key): value}`` of the settings whose default is this task's: the config loader
        fills each one the config does not set (so a segmentation config that names no monitor picks
        its best epoch by mean Dice, not by a balanced accuracy it never logs)."""
        metric, mode = self.default_monitor
        return {("train", "monitor"): metric, ("train", "monitor_mode"): mode,
                ("train", "monitor_tiebreak"): list(self.default_tiebreak),
                ("tracking", "registered_model_name"): self.default_model_name}

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
        return FoldSetup(train_loader, val_loader, loss_fn, model, names, self.spec(cfg, names, counts), params,
                         normalization | modality_params(info.report),
                         {"losslab.split_fingerprint": info.split_fingerprint})

    def input_example(self, cfg: Any, val_loader: Any) -> Any:
        """One validation input ``(1, ...)`` as numpy: the signature of the registered model."""
        return val_loader.dataset[0]["image"].unsqueeze(0).numpy()

    def rebuild(self, cfg: Any, run_tags: dict[str, str], run_params: dict[str, str]
                ) -> tuple[nn.Module, nn.Module, list[str]]:
        """``(loss, model, output names)`` of the model a run of this task trained (random weights, no
        pretrained download): the class names from the run's tag ``losslab.class_names`` and the
        training class counts from its param ``data.class_counts_train``, else both from the cache of
        ``cfg.data`` (:func:`losslab.data.splits.training_rows`: every fold but ``data.fold``, never the test
        split, then ``data.imbalance`` and ``data.train_cases``)."""
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


def task_of_kind() -> dict[str, str]:
    """``model.kind`` -> the first registered task that trains it (a later task that also trains a
    kind is chosen only by naming it with ``task:``)."""
    kinds: dict[str, str] = {}
    for cls in _TASKS.values():
        for kind in cls.model_kinds:
            kinds.setdefault(kind, cls.name)
    return kinds

def task_name(cfg: Any) -> str:
    """The config's ``task``, else the first registered task that trains ``model.kind``."""
    explicit = getattr(cfg, "task", None)
    if explicit:
        return explicit
    try:
        return task_of_kind()[cfg.model.kind]
    except KeyError:
        raise TaskError(f"model.kind={cfg.model.kind!r} belongs to no task; name one with `task:` "
                        f"({', '.join(list_tasks())})") from None


def task_of(cfg: Any) -> Task:
    return get_task(task_name(cfg))


def build_from_spec(spec: dict[str, Any]) -> tuple[nn.Module, nn.Module | None, "Task | None"]:
    """``(model, loss or None, task or None)`` with random weights, shaped as a registered model's ``spec`` says
    (:meth:`Task.spec`); no pretrained weights are read (the registered state dict replaces them)."""
    from losslab.schema import ExperimentConfig
    from losslab.engine.checkpoint import loss_from_spec
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
    return model, loss_from_spec(loss_fn, spec), task


def build_task_model(cfg: Any, names: list[str], class_counts: list[int] | None = None,
                     fractions: list[float] | None = None) -> tuple[Task, nn.Module]:
    """``(task, model)``: the task of ``cfg`` set up by :meth:`Task.build` for ``names``, and its model."""
    task = task_of(cfg)
    _, model = task.build(cfg, names, class_counts, fractions)
    return task, model


def loss_tasks_of(name: str, params: dict[str, Any]) -> dict[str, str]:
    """``{loss name: its family}`` (``LossBase.family``) for ``loss.name`` and, for a compound loss, each
    of its terms."""
    from losslab.losses.registry import get_loss_class

    out = {name: getattr(get_loss_class(name), "family", "classification")}
    terms = params.get("terms")
    if isinstance(terms, list) and terms:
        out = {}
        for term in terms:
            if isinstance(term, dict) and isinstance(term.get("name"), str):
                out[term["name"]] = getattr(get_loss_class(term["name"]), "family", "classification")
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
