"""A study file: which variants (losses, samplers, anything) to compare on which folds and seeds, on which
metric, and how sure to be before saying which is better (``losslab study -c configs/study/<name>.yaml``).

Keys (every other key is refused, naming the file)::

    name: demo                                # the study: Optuna study name, MLflow parent run `study-<name>`
    config: configs/experiment/demo.yaml      # the base experiment (null: the built-in defaults)
    overrides: [train.epochs=3]               # on the base, for every variant
    variants:                                 # name -> overrides of that variant (as `-o KEY=VALUE`)
      ce: [loss=ce]
      focal: [loss=focal, loss.gamma=2.0]
    reference: ce                             # the variant the others are compared with
    planned: null                             # [[A, B], ...] read A − B; default: every variant − reference
    folds: 3                                  # folds 0..2, or a list [0, 2]
    seeds: 1                                  # training seeds to start with: 0..n-1, or a list
    budget_seeds: 3                           # add seeds, one at a time, up to this many while a planned
                                              #   pair is undecided (default: the seeds to start with)
    metrics: [balanced_accuracy]              # the first decides; {name, direction} for a direction
    split: test                               # test | val | test_calibrated (evaluate's calibration)
    evaluate: false                           # also run `evaluate` on every cell (implied by test_calibrated)
    alpha: 0.05                               # over the planned pairs (Bonferroni), spent over the looks
    storage: null                             # Optuna RDB URL; default a SQLite file next to the MLflow store
    storage_file: null                        # a file whose first line is the URL (keeps a password out)
    heartbeat_interval: 20                    # seconds between a worker's heartbeats
    grace_period: null                        # seconds without one before its cell is retried (2 x interval)
    max_retry: 3                              # retries of a cell whose worker died
    workers: 1                                # worker processes on this machine (--workers wins)

An override may contain ``{seed}`` or ``{fold}``, replaced by the cell's seed and fold (e.g.
``data.imbalance.seed={seed}``). :func:`load_study` validates the file and every variant's config
against the experiment schema (each variant's config is loaded, so a typo in a variant fails here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from losslab.config.loading import load_config
from losslab.schema import ConfigError, ExperimentConfig

SPLITS = ("test", "val", "test_calibrated")
METRIC_PREFIX = {"test": "test/", "val": "best_val/", "test_calibrated": "test_calibrated/"}
_LOWER_IS_BETTER = ("loss", "ece", "latency", "dead_class", "_ms", "hd95")


class StudyMetric(BaseModel):
    """One metric of the study: a bare name (``balanced_accuracy``: read on the study's split) or a
    full key (``test/rsna_score``), and whether higher or lower is better."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    direction: Literal["maximize", "minimize"] | None = None  # default: minimize losses, ECE, HD95

    @property
    def higher_is_better(self) -> bool:
        if self.direction is not None:
            return self.direction == "maximize"
        return not any(word in self.name for word in _LOWER_IS_BETTER)

    def key(self, split: str) -> str:
        return self.name if "/" in self.name else f"{METRIC_PREFIX[split]}{self.name}"


class StudyConfig(BaseModel):
    """The validated study file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    config: str | None
    overrides: list[str] = Field(default_factory=list)
    variants: dict[str, list[str]] = Field(min_length=2)
    reference: str
    planned: list[tuple[str, str]] | None = None
    folds: int | list[int] = 3
    seeds: int | list[int] = 1
    budget_seeds: int | None = Field(None, ge=1)
    metrics: list[StudyMetric] = Field(min_length=1)
    split: Literal["test", "val", "test_calibrated"] = "test"
    evaluate: bool = False
    alpha: float = Field(0.05, gt=0, lt=1)
    storage: str | None = None
    storage_file: str | None = None
    heartbeat_interval: int = Field(20, ge=1)
    grace_period: int | None = Field(None, ge=1)
    max_retry: int = Field(3, ge=0)
    workers: int = Field(1, ge=1)

    @field_validator("metrics", mode="before")
    @classmethod
    def _metric_names(cls, value: Any) -> Any:
        return [{"name": m} if isinstance(m, str) else m for m in value] if isinstance(value, list) else value

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name in value:
            if not name.strip() or "|" in name or "'" in name:
                raise ValueError(f"variant name {name!r}: must be non-empty, without '|' or quotes")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "StudyConfig":
        if self.reference not in self.variants:
            raise ValueError(f"reference {self.reference!r} is not a variant ({sorted(self.variants)})")
        for a, b in self.planned or []:
            if a not in self.variants or b not in self.variants or a == b:
                raise ValueError(f"planned pair [{a}, {b}]: needs two different variants of {sorted(self.variants)}")
        if self.planned is not None and not self.planned:
            raise ValueError("planned is empty: name at least one pair, or leave it out (each variant − reference)")
        if len(set(self.fold_list)) != len(self.fold_list) or min(self.fold_list) < 0:
            raise ValueError(f"folds {self.folds!r}: need distinct fold numbers >= 0 (or a count >= 1)")
        seeds = self.seed_list
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"seeds {self.seeds!r}: need distinct seeds >= 0 (or a count >= 1)")
        if self.budget_seeds is not None and self.budget_seeds < len(seeds):
            raise ValueError(f"budget_seeds {self.budget_seeds} is below the {len(seeds)} seed(s) to start with")
        return self

    @property
    def fold_list(self) -> list[int]:
        return list(range(self.folds)) if isinstance(self.folds, int) else list(self.folds)

    @property
    def seed_list(self) -> list[int]:
        """The seeds to start with."""
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def budget(self) -> int:
        return self.budget_seeds or len(self.seed_list)

    @property
    def all_seeds(self) -> list[int]:
        """Every seed the budget allows, in the order they are added: the first ones, then max + 1, ..."""
        seeds = self.seed_list
        while len(seeds) < self.budget:
            seeds.append(max(seeds) + 1)
        return seeds

    @property
    def planned_pairs(self) -> list[tuple[str, str]]:
        """``(A, B)`` read A − B: the planned pairs, or each variant against the reference."""
        if self.planned:
            return [tuple(p) for p in self.planned]
        return [(v, self.reference) for v in self.variants if v != self.reference]

    @property
    def primary(self) -> StudyMetric:
        return self.metrics[0]

    @property
    def needs_evaluate(self) -> bool:
        return self.evaluate or self.split == "test_calibrated"


class LoadedStudy:
    """A study file, validated, with each variant's experiment config (on its last fold and first seed)."""

    def __init__(self, spec: StudyConfig, path: str, variants: dict[str, ExperimentConfig],
                 overrides: list[str]) -> None:
        self.spec, self.path, self.variants, self.overrides = spec, path, variants, list(overrides)

    def variant_overrides(self, variant: str, fold: int | None = None, seed: int | None = None) -> list[str]:
        """The overrides of ``variant``'s config: the study's, the command line's, the variant's, and
        for a cell its fold and seed (``{seed}``/``{fold}`` replaced)."""
        items = [*self.spec.overrides, *self.overrides, *self.spec.variants[variant]]
        if fold is None:
            return items
        items = [o.replace("{seed}", str(seed)).replace("{fold}", str(fold)) for o in items]
        return items + [f"data.fold={fold}", f"train.seed={seed}", "cv.folds=null", "cv.repeats=1", "cv.seeds=null"]

    def cell_config(self, variant: str, fold: int, seed: int) -> ExperimentConfig:
        return load_config(self.spec.config, self.variant_overrides(variant, fold, seed))


def _one_line(exc: ValidationError, path: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key {loc!r} (value {err.get('input')!r})"
    if loc == "(top level)":
        return f"{path}: {err['msg'].removeprefix('Value error, ')}"
    return f"{path}: {loc} = {err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}"


def read_study_file(path: str | Path) -> StudyConfig:
    """The study file validated against :class:`StudyConfig`; a problem is one line naming the file and key."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read study file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a study file is a mapping of keys (name, config, variants, ...), got {data!r}")
    return validate_study(data, str(path))


def validate_study(data: dict[str, Any], path: str) -> StudyConfig:
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, path)) from None


def _resolve_config(spec: StudyConfig, path: str) -> StudyConfig:
    """``config`` as given (from the working folder, or under the configs root as ``load_config`` looks),
    else next to the study file, else from the folder holding the configs root (``configs/experiment/x.yaml``
    from anywhere)."""
    from losslab.config.loading import config_root

    if spec.config is None or Path(spec.config).is_file():
        return spec
    for candidate in (Path(path).parent / spec.config, config_root().parent / spec.config):
        if candidate.is_file():
            return spec.model_copy(update={"config": str(candidate.resolve())})
    return spec


def load_study(path: str | Path | None, overrides: list[str] | None = None,
               spec: StudyConfig | None = None) -> LoadedStudy:
    """Read (or take ``spec``), then load every variant's config on the first fold and seed: an error
    names the study file, the variant and the experiment key."""
    shown = str(path) if path is not None else "<study>"
    spec = _resolve_config(spec or read_study_file(shown), shown)
    loaded = LoadedStudy(spec, shown, {}, overrides or [])
    for variant in spec.variants:
        try:
            # on its last fold and first seed: the folds exist, `{seed}` and `{fold}` fill in
            loaded.variants[variant] = loaded.cell_config(variant, max(spec.fold_list), spec.seed_list[0])
        except ConfigError as exc:
            raise ConfigError(f"{shown}: variants.{variant} = {spec.variants[variant]!r}: "
                              f"{' '.join(str(exc).split())}") from None
    return loaded


__all__ = ["LoadedStudy", "METRIC_PREFIX", "SPLITS", "StudyConfig", "StudyMetric", "load_study", "read_study_file",
           "validate_study"]
