"""sweep: Optuna drives ``train`` over a search space of config overrides; everything lands in MLflow.

A trial samples values for dotted config keys (``loss.gamma``, ``optim.lr``, ``data.bag_size``) or a
whole section (``loss`` -> ``loss=<choice>`` selects ``configs/loss/<choice>.yaml``), trains the
resulting config on one fold (``data.fold``) or on several (``sweep.folds``) and returns the mean of the
monitored metric at each fold's best epoch. Every epoch reports to Optuna the best monitored value
so far in the fold (``sweep.report: best``, the objective if the trial stopped there; or ``epoch``)
at step = fold position x ``train.epochs`` + epoch, so a pruner can stop a poor trial early.

Settings live in the config's ``sweep`` section (``configs/sweep/*.yaml``, selected with
``-o sweep=<name>``); see :class:`SweepSettings`. The search space::

    space:
      loss: {type: categorical, choices: [ce, focal]}                # section override loss=<choice>
      loss.gamma: {type: float, low: 0.0, high: 5.0, when: {loss: focal}}   # conditional
      optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      data.bag_size: {type: categorical, choices: [8, 16, 24, 32]}

MLflow: one parent run per study (shared by all workers; its id is the study's user attribute
``mlflow_parent_run_id``), one child run per trial, the trial's train run(s) under it; trial states
map to run states as described in :mod:`losslab.tracking` (PRUNED -> KILLED + tag
``losslab.trial_state=PRUNED``). Storage: any Optuna RDB URL (SQLite by default, PostgreSQL for many
machines); the same command re-run continues the study; a trial whose worker dies is failed by the
heartbeat check of another worker (or of the next run) and retried with the same params.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from losslab.config import (SECTIONS, ConfigError, ExperimentConfig, SpaceParam, SweepConfig, apply_overrides, dump_yaml,
                            section_dict, validate_config)
from losslab.engine.callbacks import Callback
from losslab.redaction import redact_text

log = logging.getLogger(__name__)
PARENT_ATTR = "mlflow_parent_run_id"


STORAGE_ENV = "LOSSLAB_SWEEP_STORAGE"  # the storage URL, kept off command lines and out of configs


class SweepSettings(SweepConfig):
    """The ``sweep`` section (:class:`losslab.config.SweepConfig`) with the command-line options on top."""


def sweep_settings(cfg: ExperimentConfig, **cli: Any) -> SweepSettings:
    """``cfg.sweep`` validated, with non-None command-line values on top; errors name the key.

    The storage URL comes from ``--storage``, else ``$LOSSLAB_SWEEP_STORAGE``, else the file
    ``sweep.storage_file``, else ``sweep.storage``: a URL with a password belongs in the variable or
    the file, never on a command line (``mlflow run`` logs and prints its parameters)."""
    data = section_dict(cfg.sweep) | {k: v for k, v in cli.items() if v is not None}
    if cli.get("storage") is None:
        if os.environ.get(STORAGE_ENV, "").strip():
            data["storage"] = os.environ[STORAGE_ENV].strip()
        elif data.get("storage_file"):
            data["storage"] = _read_storage_file(str(data["storage_file"]))
    try:
        settings = SweepSettings.model_validate(data)
    except ValidationError as exc:
        lines = [redact_text(f"sweep.{'.'.join(str(p) for p in e['loc'])} = {e.get('input')!r}: {e['msg']}")
                 for e in exc.errors()]
        raise ConfigError("invalid sweep settings:\n  " + "\n  ".join(lines)) from None
    if not settings.space:
        raise ConfigError("sweep.space is empty: nothing to search (e.g. -o sweep=focal_gamma)")
    return settings


def _read_storage_file(path: str) -> str:
    """The storage URL in ``sweep.storage_file`` (first non-empty line; its text is never echoed)."""
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"sweep.storage_file: {file} does not exist")
    lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"sweep.storage_file: {file} is empty (expected one storage URL)")
    return lines[0]


def study_name(cfg: ExperimentConfig, settings: SweepSettings) -> str:
    return settings.study or f"{cfg.tracking.experiment}-sweep"


def metric_and_direction(cfg: ExperimentConfig, settings: SweepSettings) -> tuple[str, str]:
    """``(objective metric, Optuna direction)``: ``sweep.metric`` (default ``train.monitor``) and
    ``sweep.direction``, else the metric's own direction (:func:`losslab.engine.monitor.metric_mode`:
    losses, ECE, HD95 minimised, rates and Dice maximised), else ``train.monitor_mode`` when the metric
    is the monitor and that mode was set.

    Raises:
        ConfigError: the direction is not set and the metric's name does not say which way is better.
    """
    from losslab.engine.monitor import metric_mode

    metric = settings.metric or cfg.train.monitor
    if settings.direction:
        return metric, settings.direction
    mode = metric_mode(metric)
    if mode is None and metric == cfg.train.monitor and "monitor_mode" in cfg.train.model_fields_set:
        mode = cfg.train.monitor_mode
    if mode is None:
        raise ConfigError(f"sweep.metric={metric}: its name does not say whether higher or lower is better; "
                          "set sweep.direction (maximize | minimize)")
    return metric, "maximize" if mode == "max" else "minimize"


# ---------------------------------------------------------------------------------- overrides
def format_override(key: str, value: Any) -> str:
    """``key=value`` with the value written so that ``parse_override`` reads it back unchanged."""
    if isinstance(value, str) and yaml.safe_load(value) == value:
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


def _ordered(overrides: dict[str, Any]) -> list[str]:
    """Section selections (``loss=focal``) first, so that dotted keys (``loss.gamma``) apply on top."""
    sections = [format_override(k, v) for k, v in overrides.items() if k in SECTIONS]
    dotted = [format_override(k, v) for k, v in overrides.items() if k not in SECTIONS]
    return sections + dotted


def apply_trial_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    return validate_config(apply_overrides(cfg.to_dict(), overrides, {}), {}, "sweep overrides")


def _active(param: SpaceParam, sampled: dict[str, Any]) -> bool:
    for key, wanted in (param.when or {}).items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if key not in sampled or sampled[key] not in allowed:
            return False
    return True


def sample_params(trial: Any, space: dict[str, SpaceParam]) -> dict[str, Any]:
    """Define-by-run sampling of the space (conditional params only when their ``when`` holds)."""
    sampled: dict[str, Any] = {}
    for key, p in space.items():
        if not _active(p, sampled):
            continue
        if p.type == "categorical":
            sampled[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            sampled[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            sampled[key] = trial.suggest_float(key, float(p.low), float(p.high), step=p.step, log=p.log)
    return sampled


def check_space(cfg: ExperimentConfig, settings: SweepSettings, info: Any) -> None:
    """Fail before any trial runs if a space key or value makes an invalid config, loss or model: each
    choice and each bound is applied (with the values its ``when`` needs) and the trial's task builds
    its loss and model as training does (:meth:`losslab.tasks.Task.build`, random weights, for the
    task's output names: a segmentation loss gets every channel, background included)."""
    for key, p in settings.space.items():
        values = p.choices if p.type == "categorical" else [p.low, p.high]
        if p.type == "int":
            values = [int(v) for v in values]
        conditions = {k: (v[0] if isinstance(v, list) else v) for k, v in (p.when or {}).items()}
        for value in values:
            overrides = _ordered(conditions | {key: value})
            try:
                _build_trial(apply_trial_overrides(cfg, overrides), info)
            except Exception as exc:
                raise ConfigError(f"sweep.space.{key} = {value!r} (with {overrides}) makes an invalid config: {exc}") from None


def _build_trial(trial_cfg: ExperimentConfig, info: Any) -> None:
    """The trial's loss and model, built by its task as training builds them (no pretrained download)."""
    from losslab.tasks import task_of

    task = task_of(trial_cfg)
    unpretrained = trial_cfg.model_copy(update={"model": trial_cfg.model.model_copy(update={"pretrained": False})})
    names = task.output_names(unpretrained, info)
    task.build(unpretrained, names, [1] * len(names))


# ---------------------------------------------------------------------------------- Optuna objects
_SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "gp": "GPSampler", "qmc": "QMCSampler"}
_PRUNERS = {"median": "MedianPruner", "hyperband": "HyperbandPruner", "threshold": "ThresholdPruner",
            "percentile": "PercentilePruner", "successive_halving": "SuccessiveHalvingPruner", "none": "NopPruner"}


def _build(kind: str, table: dict[str, str], spec: dict[str, Any], module: Any) -> Any:
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in table:
        raise ConfigError(f"sweep.{kind}.name = {name!r}: expected one of {sorted(table)}")
    try:
        return getattr(module, table[name])(**spec)
    except TypeError as exc:
        raise ConfigError(f"sweep.{kind} = {dict(name=name, **spec)!r}: {exc}") from None


def build_sampler(spec: dict[str, Any]) -> Any:
    import optuna

    return _build("sampler", _SAMPLERS, spec, optuna.samplers)


def build_pruner(spec: dict[str, Any]) -> Any:
    """``median`` (default: ``MedianPruner``), ``hyperband``, ``threshold``, ``percentile``,
    ``successive_halving`` or ``none``; other keys are the pruner's keyword arguments."""
    import optuna

    return _build("pruner", _PRUNERS, spec, optuna.pruners)


class _StaleTrialHandler:
    """Called by Optuna in a live worker for a trial whose worker stopped sending heartbeats: end the
    trial's MLflow runs FAILED, then queue a retry with the same params (``max_retry`` times)."""

    def __init__(self, name: str, max_retry: int | None) -> None:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        self.name = name
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: Any, trial: Any) -> None:
        from losslab.tracking import fail_dead_trial_runs

        reason = f"worker {trial.user_attrs.get('worker', '?')} stopped sending heartbeats (trial {trial.number})"
        try:
            fail_dead_trial_runs(self.name, trial.number, reason)
        except Exception as exc:  # the retry matters more than the bookkeeping
            log.warning("could not mark the MLflow runs of dead trial %d: %s", trial.number, exc)
        self.retry(study, trial)
        log.warning("trial %d: %s; retry queued", trial.number, reason)


def storage_url(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; without it installed, use psycopg2
    (the ``postgres`` extra) so that the plain URL works."""
    import importlib.util

    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix) and importlib.util.find_spec("psycopg") is None:
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def make_storage(settings: SweepSettings, name: str) -> Any:
    import optuna

    kwargs: dict[str, Any] = {"engine_kwargs": {"pool_pre_ping": True}} if not settings.storage.startswith("sqlite") else {}
    if settings.heartbeat_interval:
        kwargs.update(heartbeat_interval=settings.heartbeat_interval,
                      grace_period=settings.grace_period or 2 * settings.heartbeat_interval,
                      heartbeat_stale_trial_callback=_StaleTrialHandler(name, settings.max_retry))
    url = storage_url(settings.storage)
    return _retry(lambda: optuna.storages.RDBStorage(url, **kwargs), "open the Optuna storage")


def _retry(fn, what: str, attempts: int = 4):
    """Workers that start together race to create the same tables / experiment: the loser of
    such a race only has to try again (the second time the object exists)."""
    import warnings

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*experimental.*")
                return fn()
        except Exception as exc:
            if attempt == attempts - 1:
                raise
            log.info("could not %s (%s); retrying", what, exc)
            time.sleep(0.5 + attempt)


def open_study(cfg: ExperimentConfig, settings: SweepSettings, load_only: bool = False) -> tuple[Any, bool]:
    """Create the study, or load it if it exists (``load_if_exists`` semantics, but we learn which
    happened: only the creator opens the MLflow parent run). Returns ``(study, created)``."""
    import optuna

    name = study_name(cfg, settings)
    storage = make_storage(settings, name)
    sampler = build_sampler(settings.sampler)
    pruner = build_pruner(settings.pruner)
    _, direction = metric_and_direction(cfg, settings)
    if not load_only:
        try:
            return optuna.create_study(study_name=name, storage=storage, direction=direction, sampler=sampler,
                                       pruner=pruner, load_if_exists=False), True
        except optuna.exceptions.DuplicatedStudyError:
            pass
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        raise ConfigError(f"no study {name!r} in {redact(settings.storage)}") from None
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {name!r} optimises {study.direction.name.lower()}, the config says {direction}")
    return study, False


def redact(url: str) -> str:
    """A storage URL without its password (for logs and params): :func:`losslab.redaction.redact_text`."""
    return redact_text(url)


# ---------------------------------------------------------------------------------- the objective
class OptunaReporter(Callback):
    """Engine callback: every epoch, log the epoch's metrics to the trial run, report the monitored
    metric to Optuna and raise ``optuna.TrialPruned`` when the pruner says so.

    ``report="best"`` reports the best value so far in this fold (direction-aware): the objective is
    the best epoch's value, so this is the objective the trial would have if it stopped at this step,
    and one noisy epoch neither prunes a trial nor props up a poor one. ``"epoch"`` reports each
    epoch's own value."""

    def __init__(self, trial: Any, metric: str, step_offset: int, trial_run_id: str,
                 direction: str = "maximize", report: str = "best") -> None:
        self.trial = trial
        self.metric = metric
        self.step_offset = step_offset
        self.trial_run_id = trial_run_id
        self.direction = direction
        self.report = report
        self.best: float | None = None
        self.fold_run_id: str | None = None
        self.epochs_run = 0

    def on_fit_start(self, state):
        import mlflow

        run = mlflow.active_run()
        self.fold_run_id = run.info.run_id if run else None

    def value_to_report(self, value: float) -> float:
        if self.report == "epoch":
            return value
        better = max if self.direction == "maximize" else min
        self.best = value if self.best is None else better(self.best, value)
        return self.best

    def on_epoch_end(self, state, metrics):
        import optuna

        from losslab.tracking import log_metrics_batch

        step = self.step_offset + int(metrics.get("epoch", state.epoch))
        self.epochs_run += 1
        log_metrics_batch(self.trial_run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step)
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        reported = self.value_to_report(float(value))
        self.trial.report(reported, step)
        if self.trial.should_prune():
            exc = optuna.TrialPruned(f"pruned at step {step} ({self.metric}={float(value):.4f}, reported {reported:.4f})")
            exc.step = step
            raise exc


def _fold_list(cfg: ExperimentConfig, settings: SweepSettings) -> list[int]:
    if settings.folds is None:
        return [cfg.data.fold]
    return list(range(settings.folds)) if isinstance(settings.folds, int) else list(settings.folds)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def make_objective(cfg: ExperimentConfig, settings: SweepSettings, info: Any, name: str):
    import mlflow
    import optuna

    from losslab.pipelines.train import train_fold
    from losslab.tracking import mark_trial_run, trial_run

    metric, direction = metric_and_direction(cfg, settings)
    folds = _fold_list(cfg, settings)

    def objective(trial: optuna.Trial) -> float:
        sampled = sample_params(trial, settings.space)
        overrides = _ordered(sampled)
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("worker", worker_id())
        forced = [f"tracking.log_model={str(settings.log_model).lower()}"]
        epochs_run = 0
        with trial_run(trial.number, name, sampled, tags={"losslab.worker": worker_id()},
                       pruned=(optuna.TrialPruned,)) as run:
            run_id = run.info.run_id
            trial.set_user_attr("mlflow_run_id", run_id)
            mlflow.log_param("overrides", " ".join(overrides)[:6000])
            trial_cfg = apply_trial_overrides(cfg, overrides + forced)  # inside: a bad combination is a FAILED run
            values = []
            try:
                for position, fold in enumerate(folds):
                    reporter = OptunaReporter(trial, metric, position * trial_cfg.train.epochs, run_id, direction,
                                              settings.report)
                    try:
                        result = train_fold(trial_cfg, info, fold, nested=True, extra_callbacks=[reporter],
                                            extra_tags={"losslab.sweep_role": "fold", "losslab.study": name})
                    except optuna.TrialPruned as exc:
                        if reporter.fold_run_id:  # managed_run ended it FAILED; pruning is not a failure
                            mark_trial_run(reporter.fold_run_id, "PRUNED", step=getattr(exc, "step", None))
                        raise
                    finally:
                        epochs_run += reporter.epochs_run
                    values.append(float(result.metrics.get(metric, float("nan"))))
            finally:
                trial.set_user_attr("epochs_run", epochs_run)
            value = float(sum(values) / len(values))
            if not math.isfinite(value):
                raise ValueError(f"objective {metric} is {value} (per fold: {values})")
            mlflow.log_metric("objective", value)
            for fold, v in zip(folds, values):
                mlflow.log_metric(f"objective_fold{fold}", v)
        return value

    return objective


# ---------------------------------------------------------------------------------- the pipeline
@dataclass
class SweepResult:
    study_name: str
    parent_run_id: str
    trials_run: int
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)


def _parent_run_id(study: Any, created: bool, settings: SweepSettings) -> str | None:
    """The study's parent run id; a worker that did not create the study waits for the creator's."""
    deadline = time.monotonic() + (0 if created or study.get_trials(deepcopy=False) else settings.parent_wait_s)
    while True:
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id or time.monotonic() >= deadline:
            return run_id
        time.sleep(0.5)


def _parent_exists(run_id: str | None) -> bool:
    if not run_id:
        return False
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().get_run(run_id)
        return True
    except Exception:
        return False


def _log_new_parent(cfg: ExperimentConfig, settings: SweepSettings, study, name: str, parent_id: str) -> None:
    """A new parent run: the study points at it; it logs the config (storage redacted) and the space."""
    import mlflow

    from losslab.tracking import log_config

    study.set_user_attr(PARENT_ATTR, parent_id)
    shown = settings.model_dump(mode="json") | {"storage": redact(settings.storage)}
    log_config(cfg.model_copy(update={"sweep": SweepConfig.model_validate(shown)}))  # no password in params
    mlflow.log_params({"sweep.storage_url": redact(settings.storage), "sweep.study_name": name})
    mlflow.log_dict({k: v.model_dump(exclude_none=True) for k, v in settings.space.items()}, "sweep_space.json")


def _trial_limit(settings: SweepSettings) -> list:
    """``sweep.max_trials``: stop every worker once the study holds that many finished trials."""
    if not settings.max_trials:
        return []
    import optuna
    from optuna.study import MaxTrialsCallback

    return [MaxTrialsCallback(settings.max_trials, states=(optuna.trial.TrialState.COMPLETE,
                                                           optuna.trial.TrialState.PRUNED))]


def run_sweep(cfg: ExperimentConfig, settings: SweepSettings, info: Any = None) -> SweepResult:
    """Run this worker's trials of the study (create it or continue it)."""
    import warnings

    import mlflow
    import optuna

    from losslab.pipelines.common import base_tags
    from losslab.tasks import task_of
    from losslab.tracking import SWEEP_ROLE_TAG, STUDY_TAG, log_sweep_summary, managed_run, setup_tracking

    if settings.num_threads:
        import torch

        torch.set_num_threads(settings.num_threads)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    _retry(lambda: setup_tracking(cfg.tracking), "set up the MLflow experiment")  # two workers may create it at once
    info = info or task_of(cfg).build_cache(cfg)
    metric_and_direction(cfg, settings)  # a metric whose direction is unknown: refused before any trial
    check_space(cfg, settings, info)
    name = study_name(cfg, settings)
    study, created = open_study(cfg, settings)
    parent_id = _parent_run_id(study, created, settings)
    nested = mlflow.active_run() is not None
    tags = base_tags(cfg, "sweep") | {SWEEP_ROLE_TAG: "parent", STUDY_TAG: name}
    if _parent_exists(parent_id):
        ctx = managed_run(run_id=parent_id, nested=nested)
        new_parent = False
    else:
        ctx = managed_run(run_name=f"sweep-{name}", tags=tags, nested=nested)
        new_parent = True
    n_before = len(study.trials)
    with ctx as parent:
        parent_id = parent.info.run_id
        if new_parent:
            _log_new_parent(cfg, settings, study, name, parent_id)
        callbacks = _trial_limit(settings)
        log.info("study %r in %s: %d trials so far; this worker (%s) runs up to %s more", name,
                 redact(settings.storage), n_before, worker_id(), settings.n_trials)
        study.optimize(make_objective(cfg, settings, info, name), n_trials=settings.n_trials, timeout=settings.timeout,
                       catch=(Exception,) if settings.catch_errors else (), callbacks=callbacks, gc_after_trial=True)
        best_yaml = None
        try:
            best_yaml = dump_yaml(best_config(cfg, study), redact=True)
        except ValueError:
            pass
        log_sweep_summary(parent_id, study, best_yaml)
    mine = [t for t in study.trials if t.user_attrs.get("worker") == worker_id()]
    result = SweepResult(name, parent_id, len(mine))
    try:
        result.best_value, result.best_params = study.best_value, study.best_params
    except ValueError:
        pass
    return result


def best_config(cfg: ExperimentConfig, study: Any) -> ExperimentConfig:
    """The base config with the best trial's overrides applied (``sweep`` cleared): ready to ``train``.

    Raises:
        ValueError: the study has no complete trial yet.
    """
    best = study.best_trial
    overrides = best.user_attrs.get("overrides") or _ordered(best.params)
    out = apply_trial_overrides(cfg, list(overrides))
    return out.model_copy(update={"sweep": None})


def best_config_yaml(cfg: ExperimentConfig, settings: SweepSettings) -> str:
    """``losslab sweep --best``: the YAML of :func:`best_config` for the configured study."""
    study, _ = open_study(cfg, settings, load_only=True)
    try:
        best_cfg = best_config(cfg, study)
    except ValueError:
        raise ConfigError(f"study {study.study_name!r} has no complete trial yet") from None
    header = (f"# best trial {study.best_trial.number} of study {study.study_name!r}: "
              f"{metric_and_direction(cfg, settings)[0]} = {study.best_value:.6g}\n")
    return header + dump_yaml(best_cfg, redact=True)
