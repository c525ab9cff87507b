"""Experiment configuration schema: the pydantic sections of an experiment (``extra="forbid"``).

Sections keep the ``name`` + parameters shape: ``loss: {name: focal, gamma: 2.0}``. Loss parameters
are free-form here (the loss registry checks them against the loss's signature when the pipeline
builds it, before any run starts); every other section forbids unknown keys. Reading YAML,
composing ``defaults:`` and applying overrides is :mod:`losslab.config.loading`.

This module imports nothing of losslab: every layer (tasks, models, data, engine) may import it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_serializer, field_validator,
                      model_validator)

CONFIG_ROOT_ENV = "LOSSLAB_CONFIG_ROOT"
SECTIONS = ("data", "model", "loss", "optim", "train", "tracking", "sweep", "cv", "evaluate", "distill", "seg")


class ConfigError(ValueError):
    """A configuration problem; the message names the key, the value and the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FixedStats(_Strict):
    """``data.normalize: {fixed: {mean, std}}``: one number for every channel, or one per channel."""

    mean: float | list[float]
    std: float | list[float]

    @field_validator("std")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        if not values or any(v <= 0 for v in values):
            raise ValueError(f"std must be > 0, got {value!r}")
        return value


class FixedNormalization(_Strict):
    fixed: FixedStats


class ImbalanceConfig(_Strict):
    """``data.imbalance``: long-tailed subsampling of the training folds (validation and test untouched).

    ``exponential``: ``n_i = floor(n_max * ratio ** (-i / (K - 1)))`` for class ``i`` (Cao et al., 2019);
    ``step``: the first ``ceil(K / 2)`` classes keep ``n_max``, the others ``floor(n_max / ratio)``.
    """

    profile: Literal["exponential", "step"] = "exponential"
    ratio: float = Field(100.0, ge=1.0)
    seed: int | None = None  # default: data.seed


class DataConfig(_Strict):
    """Where the data comes from, how it is cached, split, bagged and sampled."""

    source: str = "brats"
    root: str = "data/embedded_brats"
    # a missing `root` is generated only when it is a generator's default location (data/<generator>,
    # e.g. data/embedded_brats) or when `generate` names a generator explicitly; otherwise an error
    generate: str | None = None
    generator_kwargs: dict[str, Any] = Field(default_factory=dict)
    source_kwargs: dict[str, Any] = Field(default_factory=dict)
    cache_dir: str = "cache/embedded_brats"
    # arrays on disk: auto = float16 when the source's cases lie in [0, 1] (windowed), else float32
    cache_dtype: Literal["auto", "float16", "float32"] = "auto"
    preprocess_workers: int | None = Field(None, ge=1)  # null: one per CPU from 1,000 raw files, else 1
    class_names: list[str] | None = None  # default: the source's class names
    num_folds: int = Field(5, ge=2)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    fold: int = Field(0, ge=0)
    image_size: int = Field(64, ge=8)
    bag_size: int = Field(16, ge=1)
    bag_sampling: Literal["random", "evenly_spaced", "all"] = "random"
    volume_depth: int = Field(32, ge=1)  # model.kind=volume3d: slices per volume after resampling (D)
    volume_size: list[int] | None = None  # model.kind=volume3d: [H, W] after resampling; null keeps the cache's
    sampler: Literal["none", "weighted_random", "sqrt_weighted_random", "class_balanced_batch"] = "none"
    batch_size: int = Field(4, ge=1)
    # loader processes; auto: from the usable cores (losslab.data.loaders.resolve_num_workers)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = 0
    # keep the training split on the training device; a batch is an index gather there (no augment)
    train_data_on_device: bool = False
    augment: dict[str, Any] = Field(default_factory=dict)
    # none | per_case_nonzero_zscore | dataset | {fixed: {mean, std}}; null = the source's default
    normalize: Literal["none", "per_case_nonzero_zscore", "dataset"] | FixedNormalization | None = None
    imbalance: ImbalanceConfig | None = None  # long-tailed training folds
    train_cases: int | None = Field(None, ge=1)  # stratified subsample of the training folds to N cases
    salt: str | None = None  # salt for patient hashes; default: $LOSSLAB_SALT or a per-cache random salt
    seed: int = 0


class ModelConfig(_Strict):
    """A model: a 2D backbone shared over the instances of a bag plus a MIL head, and friends."""

    kind: Literal["mil", "slices25d", "volume3d", "multimodal", "image", "segmentation"] = "mil"
    backbone: str = "resnet18"
    spatial_dims: Literal[2, 3] = 3  # segmentation models: 2D (axial slices) or 3D
    in_chans: int = Field(4, ge=1)
    pretrained: bool = False
    weights_path: str | None = None  # local weights file (no download at run time)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    head: str = "attention"
    head_kwargs: dict[str, Any] = Field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)


class LossConfig(BaseModel):
    """A loss from the registry: ``name`` plus that loss's own parameters (checked at build time)."""

    model_config = ConfigDict(extra="allow")
    name: str = "ce"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimConfig(_Strict):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    backbone_lr: float | None = None  # default: same as lr
    momentum: float = 0.9
    scheduler: Literal["cosine", "none"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)


class TiebreakMetric(_Strict):
    """A tie-break metric for the best checkpoint; ``mode`` defaults to ``min`` for losses/ECE."""

    metric: str
    mode: Literal["max", "min"] | None = None


class TrainConfig(_Strict):
    epochs: int = Field(3, ge=1)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    grad_clip: float | None = 1.0
    monitor: str = "val/balanced_accuracy"
    monitor_mode: Literal["max", "min"] = "max"
    # when two epochs tie on `monitor` (e.g. balanced accuracy 0.5 of a one-class model), the
    # first of these that differs decides; a string's mode is min for losses/ECE, else max
    monitor_tiebreak: list[str | TiebreakMetric] = Field(default_factory=lambda: ["val/auc", "val/loss"])
    early_stopping_patience: int | None = None
    checkpoint_dir: str = "outputs/checkpoints"
    dead_class_patience: int = Field(2, ge=1)  # alarm after this many epochs with 0 predictions of a class
    loss_gap_threshold: float = Field(0.5, gt=0)  # overfitting alarm: val/loss - train/loss above this
    bal_acc_var_window: int = Field(5, ge=2)  # unstable alarm: window of epochs ...
    bal_acc_var_threshold: float = Field(0.01, gt=0)  # ... whose val/balanced_accuracy variance around its trend (line or isotonic) exceeds this
    max_train_batches: int | None = None  # for smoke tests
    ema_decay: float | None = Field(None, ge=0.0, le=1.0)  # EMA of the weights; validation and best.pt use it
    swa_epochs: int = Field(0, ge=0)  # SWA over the last N epochs (constant swa_lr, BN re-estimated)
    swa_lr: float | None = Field(None, gt=0)  # default: half of optim.lr
    freeze_backbone_epochs: int = Field(0, ge=0)  # backbone frozen (no grad, eval-mode BN) for the first N epochs
    mixup_alpha: float = Field(0.0, ge=0.0)  # 0 = off; lambda ~ Beta(alpha, alpha), whole bags mixed
    plot_every: int = Field(0, ge=0)  # figures every N epochs; 0 = only at the end
    upload_checkpoint_every: int = Field(5, ge=0)  # checkpoints to MLflow every N epochs; 0 = at the end/failure only
    progress: bool = True  # progress bars (only when stderr is a terminal)
    deterministic: bool = True
    # the training step reads the NaN/inf flag of its loss every N steps (and at the epoch end): a
    # non-finite loss stops the fit within N steps, naming its epoch and first bad batch
    finite_check_every: int = Field(20, ge=1)
    compile: bool = False  # torch.compile the training forward (validation runs the plain module)
    channels_last: bool = False  # channels-last memory format for 2D backbones (refused for 3D models)

    def tiebreak_rules(self) -> list[tuple[str, str | None]]:
        """``train.monitor_tiebreak`` as ``(metric, mode)`` pairs (mode None: the metric's default)."""
        return [(item, None) if isinstance(item, str) else (item.metric, item.mode) for item in self.monitor_tiebreak]


class TrackingConfig(_Strict):
    experiment: str = "losslab"
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    artifact_location: str | None = None  # default: ./mlartifacts next to a sqlite store
    registered_model_name: str | None = "losslab-mil"
    alias: str = "candidate"
    log_model: bool = True
    run_name: str | None = None


class SegConfig(_Strict):
    """Segmentation targets, patches and validation (``model.kind: segmentation``); see
    :mod:`losslab.data.cache.segmentation` and :mod:`losslab.tasks.segmentation`."""

    labels: Literal["regions", "classes"] = "regions"  # overlapping sigmoid regions | exclusive softmax classes
    regions: dict[str, list[int]] | None = None  # region -> raw labels; default: the source's (BraTS WT/TC/ET)
    classes: dict[str, list[int]] | None = None  # class -> raw labels (background first); default: the source's
    patch_size: list[int] = Field(default_factory=lambda: [32, 32, 32], min_length=2, max_length=3)
    samples_per_case: int = Field(2, ge=1)  # RandCropByPosNegLabeld num_samples
    pos: float = Field(1.0, ge=0)
    neg: float = Field(1.0, ge=0)
    flip_prob: float = Field(0.5, ge=0, le=1)  # per spatial axis
    intensity_shift: float = Field(0.1, ge=0)  # RandShiftIntensityd offsets (z-scored intensities)
    intensity_scale: float = Field(0.1, ge=0)  # RandScaleIntensityd factors
    intensity_prob: float = Field(0.5, ge=0, le=1)
    sw_batch_size: int = Field(4, ge=1)
    overlap: float = Field(0.25, ge=0, lt=1)
    hd95: bool = True


class CVConfig(_Strict):
    """Cross-validation and repeats: every (seed, fold) pair is one child run of one parent run."""

    folds: int | list[int] | None = None  # None: train one fold (data.fold)
    repeats: int = Field(1, ge=1)  # training seeds train.seed, train.seed+1, ... (the folds stay fixed)
    seeds: list[int] | None = None  # explicit training seeds instead of `repeats`

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError(f"cv.seeds must be a non-empty list of distinct seeds, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_way_to_repeat(self) -> "CVConfig":
        if self.seeds is not None and self.repeats not in (1, len(self.seeds)):
            raise ValueError(f"cv.repeats={self.repeats} and cv.seeds={self.seeds!r} disagree; set one of them")
        return self

    def seed_list(self, base_seed: int) -> list[int]:
        """The training seeds of the repeats: ``seeds``, else ``base_seed .. base_seed + repeats - 1``."""
        return list(self.seeds) if self.seeds is not None else [base_seed + r for r in range(self.repeats)]

    @property
    def is_multi_run(self) -> bool:
        """True when training opens a parent run with children (k folds and/or several seeds)."""
        return self.folds is not None or self.repeats > 1 or self.seeds is not None


class SpaceParam(BaseModel):
    """One searched config key: ``float``/``int`` in ``[low, high]`` (``log``, ``step``) or
    ``categorical`` over ``choices``; ``when`` samples it only if earlier params have given values
    (``{loss: focal}`` or ``{loss: [focal, ldam]}``)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list[Any] | None = None
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> "SpaceParam":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            bad = [c for c in self.choices if not (c is None or isinstance(c, (bool, int, float, str)))]
            if bad:
                raise ValueError(f"choices must be None/bool/int/float/str, got {bad!r}")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"{self.type} needs 'low' and 'high'")
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) > high ({self.high})")
            if self.log and (self.low <= 0 or self.step is not None):
                raise ValueError("log=true needs low > 0 and no step")
        return self


class SweepConfig(BaseModel):
    """The ``sweep:`` section (see :mod:`losslab.pipelines.sweep`); command-line options override it."""

    model_config = ConfigDict(extra="forbid")
    study: str | None = None  # default: "<tracking.experiment>-sweep"
    storage: str = "sqlite:///optuna.db"  # any SQLAlchemy URL Optuna takes: postgresql://user:pw@host/db
    # a file holding the storage URL (keeps a password off the command line and out of the YAML);
    # $LOSSLAB_SWEEP_STORAGE wins over it, --storage over both
    storage_file: str | None = None
    n_trials: int | None = Field(20, ge=1)  # trials this worker runs (Optuna's n_trials)
    max_trials: int | None = Field(None, ge=1)  # stop when the study has this many COMPLETE+PRUNED trials
    timeout: float | None = Field(None, gt=0)  # seconds for this worker
    metric: str | None = None  # default: train.monitor
    direction: Literal["maximize", "minimize"] | None = None  # default: the metric's own (engine.monitor.metric_mode)
    folds: int | list[int] | None = None  # None: data.fold; k: folds 0..k-1; or a list
    sampler: dict[str, Any] = Field(default_factory=lambda: {"name": "tpe"})  # name + kwargs (seed, ...)
    pruner: dict[str, Any] = Field(default_factory=lambda: {"name": "median"})  # median|hyperband|threshold|none
    # what each epoch reports to the pruner: "best" = the best monitored value so far in this fold, i.e.
    # the trial's objective if it stopped now (steadier than one epoch's value on a small validation
    # set); "epoch" = that epoch's value
    report: Literal["best", "epoch"] = "best"
    heartbeat_interval: int | None = Field(60, ge=1)  # seconds; None disables the dead-worker check
    grace_period: int | None = Field(None, ge=1)  # seconds without heartbeat -> FAIL; default 2 x interval
    max_retry: int | None = Field(2, ge=0)  # retries of a trial whose worker died
    catch_errors: bool = True  # a trial that raises is FAIL and the sweep goes on
    log_model: bool = False  # log/register the model of every trial (off: a registry entry per trial is noise)
    num_threads: int | None = Field(None, ge=1)  # torch.set_num_threads in this worker
    parent_wait_s: float = Field(30.0, ge=0)  # how long a worker waits for the study creator's parent run
    space: dict[str, SpaceParam] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_when(self) -> "SweepConfig":
        seen: list[str] = []
        for key, param in self.space.items():
            for cond in (param.when or {}):
                if cond not in seen:
                    raise ValueError(f"space.{key}.when refers to {cond!r}, which is not a space key listed before it")
            seen.append(key)
        return self


class CalibrationConfig(_Strict):
    enabled: bool = True
    threshold_method: Literal["youden", "f1"] = "youden"
    objective: Literal["balanced_accuracy", "f1_macro"] = "balanced_accuracy"


class TTAConfig(_Strict):
    enabled: bool = True
    passes: int = Field(4, ge=1)
    seed: int = 0
    augment: dict[str, Any] = Field(default_factory=lambda: {"brightness": 0.1, "scale": 0.1, "prob": 1.0})


class LatencyConfig(_Strict):
    enabled: bool = True
    warmup: int = Field(5, ge=0)
    repeats: int = Field(30, ge=2)


class IntervalConfig(_Strict):
    """Patient-bootstrap intervals of the evaluated split's metrics (:mod:`losslab.engine.intervals`)."""

    enabled: bool = True
    n_resamples: int = Field(1000, ge=1)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class EvaluateConfig(_Strict):
    """The ``evaluate:`` section (see :mod:`losslab.pipelines.evaluate`)."""

    source: str | None = None
    split: Literal["val", "test", "cache"] = "test"
    fold: int | None = Field(None, ge=0)
    cache_dir: str | None = None
    experiment: str | None = None
    batch_size: int | None = Field(None, ge=1)
    device: str = "auto"
    run_name: str | None = None
    rsna_metric: bool | Literal["auto"] = "auto"
    allow_pickle: bool = False
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    tta: TTAConfig = Field(default_factory=TTAConfig)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    intervals: IntervalConfig = Field(default_factory=IntervalConfig)

#: the loss names ``distill.losses`` accepts (``vanilla`` is ``kd``; :class:`losslab.losses.multitask.MultiTaskDistillation`)
DISTILL_LOSSES = ("vanilla", "kd", "combined", "crd", "rkd", "mmd")
#: the teacher and the student trained when ``distill.teacher.model`` / ``distill.student.model`` are not set
#: (the build spec of :func:`losslab.models.multimodal.build_multimodal_model`)
DEFAULT_TEACHER_MODEL = {"fusion": "cross_attention", "fusion_dim": 64, "fusion_layers": 2,
                         "image": {"backbone": "vit_tiny_patch16_224", "kwargs": {"img_size": 64, "patch_size": 8}},
                         "text": {"name": "small_transformer", "dim": 64, "depth": 2, "max_length": 32}}
DEFAULT_STUDENT_MODEL = {"fusion": "cross_attention", "fusion_dim": 32, "fusion_layers": 1,
                         "image": {"backbone": "test_vit", "kwargs": {"img_size": 64, "patch_size": 8}},
                         "text": {"name": "small_transformer", "dim": 32, "depth": 1, "max_length": 32}}


class DistillTeacherConfig(_Strict):
    """``distill.teacher``: a registered teacher (``model_uri``) or one to train (``model``, ...);
    ``epochs`` and ``lr`` default to ``train.epochs`` and ``optim.lr``."""

    model_uri: str | None = None
    allow_pickle: bool = False
    model: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_TEACHER_MODEL))
    epochs: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    registered_model_name: str | None = "losslab-distill-teacher"
    alias: str | None = "teacher"


class DistillStudentConfig(_Strict):
    """``distill.student``: the student model spec and its training (``epochs``, ``lr``: as the teacher's)."""

    model: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_STUDENT_MODEL))
    epochs: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    registered_model_name: str | None = None


class DistillRunConfig(_Strict):
    """Which run of a distill invocation a config trains: ``losslab distill`` sets it on the config of each
    of its child runs (a ``train_fold`` run of the ``multitask`` task); a config written by hand leaves it
    unset. ``teacher``: the teacher on the labels; ``student``: the student with the loss ``loss`` (an entry
    of ``losses``) distilling from ``teacher_outputs``; ``student_alone``: the student on the labelled
    training cases only."""

    role: Literal["teacher", "student", "student_alone"] = "teacher"
    loss: str | None = None
    teacher_outputs: str | None = None  # the teacher's cached outputs: <cache_dir>/<key>.npz
    teacher_uri: str | None = None  # the registered teacher they come from (logged with the student)


class DistillConfig(_Strict):
    """The ``distill:`` section (see :mod:`losslab.pipelines.distill`); ``cache_dir`` defaults to
    ``<data.cache_dir>/teacher_outputs`` and ``batch_size`` to ``data.batch_size``."""

    tasks: list[str] | dict[str, Any] | None = None
    # a loss name, or {name: <loss>, <its params>..., ce_weight, distill_weight}
    losses: list[str | dict[str, Any]] = Field(default_factory=lambda: ["vanilla"])
    student_alone: bool = True
    # the students see the labels of only this fraction of the training cases (per class, seeded);
    # distillation still uses every case. Strict: `true` or "half" are refused, not coerced.
    student_label_fraction: float = Field(1.0, gt=0, le=1, strict=True)
    ce_weight: float = Field(1.0, ge=0)
    distill_weight: float = Field(1.0, ge=0)
    monitor: str = "val/mean_accuracy"
    cache_dir: str | None = None
    batch_size: int | None = Field(None, ge=1)
    teacher: DistillTeacherConfig = Field(default_factory=DistillTeacherConfig)
    student: DistillStudentConfig = Field(default_factory=DistillStudentConfig)
    run: DistillRunConfig | None = None  # set by `losslab distill` on each child run's config

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, losses: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        for entry in losses:
            name = entry if isinstance(entry, str) else entry.get("name")
            if name is None:
                raise ValueError(f"entry {entry!r} has no name")
            if name not in DISTILL_LOSSES:
                raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(DISTILL_LOSSES)}")
        return losses

    def loss_specs(self) -> list[tuple[str, dict[str, Any]]]:
        """Each entry of ``losses`` as ``(name, its parameters)``."""
        specs = [{"name": e} if isinstance(e, str) else dict(e) for e in self.losses]
        return [(str(spec.pop("name")), spec) for spec in specs]


def section_dict(value: Any) -> dict[str, Any]:
    """A ``sweep`` / ``evaluate`` / ``distill`` section as a plain dict of the keys that were set
    (a section replaced by a dict through ``model_copy`` is returned as is; None gives ``{}``)."""
    if value is None:
        return {}
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_unset=True)
    return dict(value)


class ExperimentConfig(_Strict):
    # the task (losslab.tasks): bag_classification, image_classification, volume_classification,
    # multitask, segmentation; None = inferred from model.kind
    task: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    seg: SegConfig = Field(default_factory=SegConfig)
    sweep: SweepConfig | None = None
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    distill: DistillConfig | None = None
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)  # dotted key -> file (or override) that set it
    _path: str | None = PrivateAttr(default=None)  # the experiment file loaded

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("distill")
    @classmethod
    def _distill_without_mixup(cls, value: Any, info: ValidationInfo) -> Any:
        train = info.data.get("train")
        if value is not None and train is not None and train.mixup_alpha:
            raise ValueError(f"train.mixup_alpha={train.mixup_alpha}: mixup mixes one label per case and cannot mix "
                             f"the per-task labels and teacher outputs of distill; set it to 0")
        return value

    @model_validator(mode="after")
    def _segmentation_patch(self) -> "ExperimentConfig":
        if self.model.kind == "segmentation" and len(self.seg.patch_size) != self.model.spatial_dims:
            raise ValueError(f"seg.patch_size={self.seg.patch_size} must have model.spatial_dims="
                             f"{self.model.spatial_dims} entries")
        return self

    @field_serializer("sweep", "evaluate", "distill")
    def _dump_section(self, value: Any) -> Any:
        """Sections replaced by plain dicts (``model_copy(update=...)``) dump as they are."""
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        return data

    def origin(self, key: str) -> str:
        """Which file (or command-line override) set the dotted ``key``; the nearest parent key's
        origin, else the experiment file, else ``<defaults>``."""
        return self._origins.get(key) or _nearest_origin(key, self._origins) or self._path or "<defaults>"

    def key_error(self, key: str, value: Any, problem: str) -> "ConfigError":
        """A one-line :class:`ConfigError` naming ``key``, ``value`` and the file that set it."""
        return ConfigError(f"{key} = {value!r} in {self.origin(key)}: {problem}")


def _nearest_origin(loc: str, origins: dict[str, str]) -> str | None:
    """The origin of the nearest parent key of the dotted ``loc`` that has one."""
    parts = loc.split(".")
    while parts:
        parts.pop()
        hit = origins.get(".".join(parts))
        if hit:
            return hit
    return None
