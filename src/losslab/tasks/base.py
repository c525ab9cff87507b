"""The Task contract (an abstract base every kind implements in full), its registry and the pairing rules
(see :mod:`losslab.tasks`)."""


from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import nn

from losslab.engine.steps import Step

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
    step: Step  # the task's step for this loss and these names (:meth:`Task.step`)
    names: list[str]  # the names its metrics are reported for
    spec: dict[str, Any]  # what the registry rebuilds the model from (:func:`build_from_spec`)
    params: dict[str, Any]  # logged once, on a new run
    hashed_params: dict[str, Any] = field(default_factory=dict)  # resolved settings in the config fingerprint
    tags: dict[str, str] = field(default_factory=dict)
    callbacks: list = field(default_factory=list)  # engine callbacks the task needs (e.g. reseeded crops)


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


class Task(abc.ABC):
    """The contract every kind of problem implements in full (a LightningModule + DataModule in one
    object; MONAI's ``prepare_batch`` + handlers): its cache, a fold's loaders, loss, model and step,
    the model a run or the registry rebuilds, the numbers and figures beside its metrics. The pipelines
    call only these methods, so that they never branch on the kind; the classification, segmentation
    and multitask kinds are peers (none inherits another's data or step).

    Class attributes name the pairing rules (:func:`check_task`) and the defaults that follow the task
    (:meth:`config_defaults`). A task instance holds no state that a call sets for a later one: the
    step (:meth:`step`) is a new object built from the loss and the output names."""

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

    # ------------------------------------------------------------------ settings (shared)
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
    device_batch_kinds: ClassVar[tuple[str, ...]] = ()

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

    def check_loss(self, cfg: Any, num_classes: int | None) -> None:
        """Build ``cfg.loss`` once when the config loads, where it can be built from the config alone
        (``num_classes``: known from ``data.class_names`` or the source, else None); errors name the
        parameter. By default nothing: a task that sets its loss up itself (segmentation: channels and
        activation) has it checked by name and parameters only, and built with the fold."""

    # ------------------------------------------------------------------ evaluate
    def check_evaluate(self, source: str, split: str, explicit: dict[str, Any]) -> None:
        """Refuse, in one line, the ``evaluate`` settings this task's scoring (:meth:`score_evaluation`) would
        drop. By default a model is scored on its held-out test split or its validation fold only: another
        cache, and any ``explicit`` setting (set in the config or on the command line) other than
        :data:`SPLIT_SETTINGS` that asks for something (a section with ``enabled: false``, or ``rsna_metric``
        false or auto, asks for nothing), are refused."""
        if split == "cache":
            raise ValueError(f"evaluate.split=cache: {source} is a {self.name} model, scored on its own held-out "
                             "test split or its validation fold only; use --split test or --split val")
        asked = sorted(k for k, v in explicit.items() if k not in SPLIT_SETTINGS and not _asks_for_nothing(k, v))
        if asked:
            raise ValueError(f"evaluate.{', evaluate.'.join(asked)}: {source} is a {self.name} model, which has no "
                             "per-case probabilities to calibrate, augment, time or bootstrap; evaluate takes only "
                             f"{', '.join(SPLIT_SETTINGS)} for it")

    def score_evaluation(self, scorers: Any, *args: Any) -> Any:
        """How ``evaluate`` scores a model of this task: one of its ``scorers`` called with ``args`` —
        ``scorers.split`` (the default: the step's metrics on the test split or the validation fold) or
        ``scorers.cases`` (per-case probabilities: calibrated, with TTA, latency, intervals, predictions)."""
        return scorers.split(*args)

    # ------------------------------------------------------------------ data
    @abc.abstractmethod
    def build_cache(self, cfg: Any, force: bool = False) -> Any:
        """The case cache of ``cfg.data`` (built, or reused when its inputs are unchanged)."""

    @abc.abstractmethod
    def load_cache(self, cfg: Any) -> Any:
        """The cache a trained model is scored on: read as it is when it was built (the raw files may be
        gone), else built."""

    @abc.abstractmethod
    def cache_summary(self, info: Any) -> tuple[list[str], dict[str, float]]:
        """What ``preprocess`` prints about a cache, and its metrics beside ``cases`` and ``skipped``."""

    def dataset_input(self, info: Any) -> tuple[Any, str] | None:
        """``(table of the cases, its target column)`` that ``preprocess`` logs as the run's MLflow dataset
        input, or None (the default) to log none."""
        return None

    @abc.abstractmethod
    def output_names(self, cfg: Any, info: Any = None) -> list[str]:
        """The names of the model's outputs (classes, channels), from ``info`` when given."""

    @abc.abstractmethod
    def test_loader(self, cfg: Any, info: Any, normalizer: Any = None) -> Any:
        """A loader over the cache's held-out test cases (fold -1), or None when it has none;
        ``normalizer``: the training run's, when the task normalises with training statistics."""

    # ------------------------------------------------------------------ model and step
    @abc.abstractmethod
    def build(self, cfg: Any, names: list[str], class_counts: list[int] | None = None,
              fractions: list[float] | None = None) -> tuple[nn.Module, nn.Module]:
        """``(loss, model)`` for ``cfg`` and the output ``names`` (random or pretrained weights)."""

    @abc.abstractmethod
    def step(self, cfg: Any, loss_fn: nn.Module, names: list[str]) -> Step:
        """A new :class:`losslab.engine.steps.Step` (batch → forward → loss, validation outputs and
        metrics) for ``loss_fn`` and the output ``names``."""

    @abc.abstractmethod
    def setup_fold(self, cfg: Any, info: Any, fold: int) -> FoldSetup:
        """Everything one fold trains with (:class:`FoldSetup`)."""

    @abc.abstractmethod
    def rebuild(self, cfg: Any, run_tags: dict[str, str], run_params: dict[str, str]
                ) -> tuple[nn.Module, nn.Module, list[str]]:
        """``(loss, model, output names)`` of the model a run of this task trained (random weights,
        no pretrained download)."""

    @abc.abstractmethod
    def spec(self, cfg: Any, names: list[str], class_counts: list[int] | None = None) -> dict[str, Any]:
        """What :func:`build_from_spec` rebuilds the registered model from (``task``: this task's name)."""

    @abc.abstractmethod
    def input_example(self, cfg: Any, val_loader: Any) -> Any:
        """One input ``(1, ...)`` as numpy: the signature of the registered model."""

    # ------------------------------------------------------------------ reporting
    @abc.abstractmethod
    def split_summary(self, outputs: dict[str, Any], dataset: Any, names: list[str], prefix: str,
                      intervals: Any = None) -> dict[str, float]:
        """Numbers beside a split's metrics (``<prefix>/...``: intervals, case counts)."""

    @abc.abstractmethod
    def epoch_figures(self, state: Any, final: bool, names: list[str]) -> dict[str, Any]:
        """``{artifact path: figure}`` of a fit so far (``state``: :class:`losslab.engine.loop.FitState`),
        drawn every ``train.plot_every`` epochs and when it ends (``final``)."""


#: the ``evaluate`` settings that apply to every task's models: what to score, where, and where to log it
SPLIT_SETTINGS = ("source", "split", "fold", "experiment", "device", "run_name", "allow_pickle")


def _asks_for_nothing(key: str, value: Any) -> bool:
    if key == "rsna_metric":
        return value in (False, "auto")
    if key in ("calibration", "tta", "latency", "intervals"):
        enabled = value.get("enabled") if isinstance(value, dict) else getattr(value, "enabled", None)
        return enabled is False
    return False


def check_loss_with_counts(cfg: Any, num_classes: int | None) -> None:
    """:meth:`Task.check_loss` of a loss built from the training class counts: built with one case per
    class when the classes are known."""
    from losslab.losses import build_loss

    if num_classes is not None:
        build_loss(cfg.loss.name, **cfg.loss.params, class_counts=[1] * num_classes, num_classes=num_classes)


class CaseCacheMixin:
    """The case cache (:mod:`losslab.data.cache`) for the kinds that read it (classification, multitask):
    :meth:`Task.build_cache`, :meth:`Task.load_cache` and :meth:`Task.cache_summary`."""

    def build_cache(self, cfg: Any, force: bool = False) -> Any:
        from losslab.data.cache import build_cache

        return build_cache(cfg.data, force=force)

    def load_cache(self, cfg: Any) -> Any:
        """Read as it is when its index exists (the raw files may be gone), else built."""
        from pathlib import Path

        from losslab.data.cache import load_cache

        if (Path(cfg.data.cache_dir) / "index.parquet").is_file():
            return load_cache(cfg.data.cache_dir)
        return self.build_cache(cfg)

    def dataset_input(self, info: Any) -> tuple[Any, str] | None:
        """The index's case, patient, label, fold and instance count columns; the label is the target."""
        columns = ["case_id", "patient_id", "label", "class_name", "fold", "split", "n_instances"]
        return info.index[columns], "label"

    def cache_summary(self, info: Any) -> tuple[list[str], dict[str, float]]:
        line = (f"{'reused' if info.reused else 'wrote'} the cache at {info.cache_dir} "
                f"({'inputs unchanged, ' if info.reused else ''}fingerprint {info.fingerprint[:12]})")
        if info.resumed_tasks:
            line += f"; resumed an interrupted build: {info.resumed_tasks} of {info.total_tasks} tasks were done"
        counts = info.report.get("class_counts", {})
        return [line], {"resumed_tasks": float(info.resumed_tasks)} | {
            f"class_count_{k}": float(v) for k, v in counts.items()}


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
