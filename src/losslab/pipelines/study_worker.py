"""A study worker: claims the study's cells one at a time from its Optuna storage and runs them.

Cells are Optuna trials **enqueued** with the cell in their user attributes (``cell``, ``variant``,
``fold``, ``seed``); a worker claims one by moving a WAITING trial to RUNNING through the storage (a
row-locked update: two workers never get the same trial). A cell enqueued twice (two workers adding the
same seed at the same time) runs once: the lowest-numbered live trial of a cell is the one that runs,
any other is closed PRUNED with ``duplicate_of``. While a worker runs a cell it records Optuna
heartbeats; a worker that stops sending them (killed, machine lost) has its cell failed by any live
worker (or, on the same machine, at once when its process is gone), its RUNNING MLflow runs marked
FAILED with the reason, and the cell queued again (``max_retry`` times).

Running a cell: a FINISHED train run of the same cell, config fingerprint and split fingerprint is
reused (nothing trains twice); else a train run of the cell that stopped with a checkpoint is resumed
(``train --resume`` semantics: same run, last checkpoint); else a new ``train`` run, a child of the
study's parent run. Then ``evaluate`` where the study asks for it. A cell whose run fails is FAIL with
the reason (a re-run of the command queues it again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from losslab.config import ConfigError, ExperimentConfig
from losslab.config.study import LoadedStudy, load_study, validate_study
from losslab.engine.callbacks import Callback
from losslab.likeness import config_hash, differing_keys, signature
from losslab.pipelines.study_plan import Cell, required_cells
from losslab.pipelines.study_store import (CELL_CONFIG_TAG, CELL_TAG, ROLE_TAG, TRAIN_RUN_TAG, VARIANT_TAG, cell_filter,
                                           cells_frame, search)
from losslab.redaction import redact_text
from losslab.tracking import STUDY_TAG, config_params, resolve_tracking_uri, setup_tracking

log = logging.getLogger(__name__)
STORAGE_ENV = "LOSSLAB_STUDY_STORAGE"
FINGERPRINT_ATTR, SIGNATURES_ATTR = "split_fingerprint", "variant_signatures"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ------------------------------------------------------------------------------------------ storage
def default_storage(tracking_uri: str) -> str:
    """A SQLite file next to a SQLite MLflow store (``<dir>/studies.db``), else ``./studies.db``."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).resolve().parent / 'studies.db'}"
    return "sqlite:///studies.db"


def resolve_storage(loaded: LoadedStudy, cli: str | None, tracking_uri: str) -> str:
    """``--storage``, else ``$LOSSLAB_STUDY_STORAGE``, else the first line of ``storage_file``, else
    ``storage``, else :func:`default_storage` (a URL with a password belongs in the variable or the file)."""
    from losslab.pipelines.sweep import storage_url

    spec = loaded.spec
    url = cli or os.environ.get(STORAGE_ENV, "").strip() or None
    if url is None and spec.storage_file:
        file = Path(spec.storage_file).expanduser()
        lines = [x.strip() for x in file.read_text().splitlines() if x.strip()] if file.is_file() else []
        if not lines:
            raise ConfigError(f"{loaded.path}: storage_file = {spec.storage_file!r}: no such file, or it is empty")
        url = lines[0]
    return storage_url(url or spec.storage or default_storage(tracking_uri))


class DeadCellHandler:
    """For a cell whose worker died: its RUNNING MLflow runs become FAILED with the reason, then the
    cell is queued again with the same attributes (Optuna's ``RetryFailedTrialCallback``)."""

    def __init__(self, name: str, experiment_id: str, max_retry: int) -> None:
        import optuna
        from optuna.storages import RetryFailedTrialCallback

        self.name, self.experiment_id = name, experiment_id
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryFailedTrialCallback(max_retry=max_retry)

    def __call__(self, study: Any, trial: Any) -> None:
        reason = f"study worker {trial.user_attrs.get('worker', '?')} stopped (cell {trial.user_attrs.get('cell')})"
        client = MlflowClient()
        for role in ("cell", "evaluate"):
            with contextlib.suppress(Exception):
                for run in search(self.experiment_id, self.name, role, cell_filter(trial.user_attrs["cell"]), "RUNNING"):
                    client.set_tag(run.info.run_id, "losslab.error", reason)
                    client.set_terminated(run.info.run_id, "FAILED")
        self.retry(study, trial)
        log.warning("%s: queued again", reason)


def open_storage(url: str, loaded: LoadedStudy, experiment_id: str) -> Any:
    import optuna

    spec = loaded.spec
    kwargs: dict[str, Any] = {"engine_kwargs": {"connect_args": {"timeout": 120}} if url.startswith("sqlite")
                              else {"pool_pre_ping": True}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=spec.heartbeat_interval,
                                          grace_period=spec.grace_period or 2 * spec.heartbeat_interval,
                                          heartbeat_stale_trial_callback=DeadCellHandler(spec.name, experiment_id,
                                                                                         spec.max_retry), **kwargs)


def open_study(storage: Any, loaded: LoadedStudy) -> tuple[Any, bool]:
    """Create the study's Optuna study, or load it; ``(study, created)``."""
    import optuna

    spec = loaded.spec
    direction = "maximize" if spec.primary.higher_is_better else "minimize"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.create_study(study_name=spec.name, storage=storage, direction=direction), True
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(study_name=spec.name, storage=storage), False


def set_if_absent(storage: Any, study: Any, key: str, value: Any) -> Any:
    """The study's user attribute ``key``: set to ``value`` unless a worker set it first; the value it holds.

    Atomic on an RDB storage: one INSERT into Optuna's ``study_user_attributes`` table, whose
    ``(study_id, key)`` is unique, so of two workers racing the second insert fails and that worker reads the
    first one's value (``set_user_attr`` updates an existing row: a check-then-set lets the later writer
    win). Written here because Optuna has no insert-if-absent."""
    import sqlalchemy

    engine = getattr(storage, "engine", None)
    if engine is None:  # an in-memory storage lives in one process
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
        return study.user_attrs.get(key, value)
    study_id = study_id_of(storage, study)
    insert = sqlalchemy.text("INSERT INTO study_user_attributes (study_id, key, value_json) VALUES (:s, :k, :v)")
    with contextlib.suppress(sqlalchemy.exc.IntegrityError), engine.begin() as connection:
        connection.execute(insert, {"s": study_id, "k": key, "v": json.dumps(value)})
    return storage.get_study_user_attrs(study_id)[key]


# ------------------------------------------------------------------------------------------ trials
LIVE = ("WAITING", "RUNNING", "COMPLETE")


def trials_by_cell(study: Any) -> dict[str, list]:
    out: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False):
        if "cell" in t.user_attrs and not t.user_attrs.get("duplicate_of"):
            out.setdefault(t.user_attrs["cell"], []).append(t)
    return out


def cell_state(trials: list) -> str:
    """``done`` (a COMPLETE trial), ``live`` (WAITING or RUNNING), ``failed`` (only FAIL) or ``none``."""
    states = {t.state.name for t in trials}
    if "COMPLETE" in states:
        return "done"
    return "live" if states & {"WAITING", "RUNNING"} else ("failed" if "FAIL" in states else "none")


def enqueue(study: Any, cells: list[Cell], retry_failed: bool = False) -> int:
    """Queue the cells that have no trial (and, with ``retry_failed``, those whose trials all failed)."""
    existing, added = trials_by_cell(study), 0
    for cell in cells:
        state = cell_state(existing.get(cell.key, []))
        if state == "none" or (retry_failed and state == "failed"):
            study.enqueue_trial({}, user_attrs={"cell": cell.key, "variant": cell.variant, "fold": cell.fold,
                                                "seed": cell.seed})
            added += 1
    return added


def data_key(cfg: ExperimentConfig) -> str:
    """The data settings that decide a cache's folds, as a fingerprint: the config's ``data.*`` params
    minus paths, salt and bookkeeping (:data:`losslab.likeness.IGNORED`), so two machines with the same
    settings share it whatever their folders."""
    return config_hash({k: v for k, v in config_params(cfg).items() if k.startswith("data.")})


def study_id_of(storage: Any, study: Any) -> int:
    return storage.get_study_id_from_name(study.study_name)


def _pid_gone(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return Path(f"/proc/{pid}/status").is_file() and "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def _fail_running(storage: Any, study: Any, trial: Any) -> None:
    """FAIL a RUNNING trial of a dead worker (once: the storage refuses a second update) and run the
    dead-cell handler."""
    import optuna

    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id_of(storage, study), trial.number)
    try:
        changed = storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return
    callback = storage.get_heartbeat_stale_trial_callback()
    if changed and callback is not None:
        callback(study, storage.get_trial(trial_id))


class _Heartbeat(threading.Thread):
    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        super().__init__(daemon=True, name=f"study-heartbeat-{trial_id}")
        self.storage, self.trial_id, self.interval, self.stop = storage, trial_id, interval, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed beat is retried at the next interval
                self.storage.record_heartbeat(self.trial_id)


class CellProgress(Callback):
    """Engine callback: the cell's epoch in the trial (for the progress display) and its run's parent."""

    def __init__(self, storage: Any, trial_id: int, parent_id: str) -> None:
        self.storage, self.trial_id, self.parent_id = storage, trial_id, parent_id

    def on_fit_start(self, state) -> None:
        run = mlflow.active_run()
        with contextlib.suppress(Exception):
            if run is not None:  # nested under whatever run was active: the study's parent is its parent
                MlflowClient().set_tag(run.info.run_id, "mlflow.parentRunId", self.parent_id)
            self.storage.set_trial_user_attr(self.trial_id, "epoch", int(state.epoch))

    def on_epoch_end(self, state, metrics) -> None:
        with contextlib.suppress(Exception):
            self.storage.set_trial_user_attr(self.trial_id, "epoch", int(metrics.get("epoch", state.epoch)) + 1)


# ------------------------------------------------------------------------------------------ the worker
@dataclass
class Worker:
    loaded: LoadedStudy
    storage: Any
    study: Any
    parent_id: str
    experiment_id: str
    created: bool = False  # this process created the Optuna study
    infos: dict = field(default_factory=dict)
    cells_run: int = 0
    _frame_key: Any = None
    _frame: Any = None

    @property
    def spec(self):
        return self.loaded.spec

    @property
    def study_id(self) -> int:
        return study_id_of(self.storage, self.study)

    # ------------------------------------------------------------------ same splits, same configs
    def cache(self, cfg: ExperimentConfig) -> Any:
        from losslab.tasks import task_of

        key = json.dumps(cfg.data.model_dump(mode="json", exclude={"fold"}), sort_keys=True, default=str)
        if key not in self.infos:
            self.infos[key] = task_of(cfg).build_cache(cfg)
        return self.infos[key]

    def check_split(self, cfg: ExperimentConfig, info: Any) -> str:
        """The cache's split fingerprint against the one the study recorded for the same data settings
        (:func:`data_key`; the first worker to build such a cache records it): refused in one line when
        the folds differ. Returns the fingerprint."""
        key, mine = data_key(cfg), info.split_fingerprint
        older = self.study.user_attrs.get(FINGERPRINT_ATTR)  # one attribute for every data setting (before)
        if older is not None and not isinstance(older, dict):  # one fingerprint for the whole study (before f04cd57)
            raise ConfigError(f"study {self.spec.name} was created by an older losslab (one split fingerprint, "
                              f"{older}, for every data setting); give the study a new name to start it again")
        recorded = (older or {}).get(key) or set_if_absent(self.storage, self.study, f"{FINGERPRINT_ATTR}:{key}", mine)
        if recorded != mine:
            raise ConfigError(f"study {self.spec.name}: this worker's folds differ from the study's (split fingerprint "
                              f"{mine} of its cache {getattr(info, 'cache_dir', '')}, the study's {recorded}): refusing to train; "
                              "build the cache from the same data with the same data.seed, data.num_folds and "
                              "data.test_fraction")
        return mine

    def check(self) -> str:
        """Refuse, in one line and before training, a worker whose folds or variant configs differ from
        the study's (the first worker records both in the study). Returns the split fingerprint."""
        spec, fingerprints = self.spec, {}
        for variant, cfg in self.loaded.variants.items():
            fingerprints[variant] = self.check_split(cfg, self.cache(cfg))
        if len(set(fingerprints.values())) > 1:
            raise ConfigError(f"{self.loaded.path}: the variants' caches have different folds {fingerprints}: "
                              "a study pairs variants on the same folds (the variants may not change them)")
        mine = next(iter(fingerprints.values()))
        sigs = {v: dict(signature(config_params(cfg))) for v, cfg in self.loaded.variants.items()}
        recorded = set_if_absent(self.storage, self.study, SIGNATURES_ATTR, sigs)
        if set(sigs) - set(recorded):  # a variant new to the study: recorded from now on
            recorded = {**sigs, **recorded}
            self.study.set_user_attr(SIGNATURES_ATTR, recorded)
        for variant, sig in sigs.items():
            diff = differing_keys(sig, recorded.get(variant, {}))
            if diff:
                shown = "; ".join(f"{k}: {a!r} here, {b!r} in the study" for k, a, b in
                                  [(k, *v) for k, v in list(diff.items())[:3]])
                raise ConfigError(f"study {spec.name}: variant {variant!r} differs from the study's config ({shown}): "
                                  "run the same study file with the same overrides, or name a new study")
        return mine

    # ------------------------------------------------------------------ claiming
    def release_dead(self) -> None:
        """Fail the cells of dead workers: stale heartbeats (Optuna), a gone process on this machine,
        or a claim that never sent a heartbeat; each is queued again by the dead-cell handler."""
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        grace = self.spec.grace_period or 2 * self.spec.heartbeat_interval
        now = time.time()
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            worker = t.user_attrs.get("claimed_by")
            orphan = worker is None and t.datetime_start and now - t.datetime_start.timestamp() > grace + 30
            if (worker and _pid_gone(worker)) or orphan:
                _fail_running(self.storage, self.study, t)

    def claim(self) -> tuple[Any, int] | None:
        """Move the first WAITING cell to RUNNING (atomic in the storage); ``(trial, trial_id)`` or None."""
        import optuna

        waiting = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        study_id = self.study_id if waiting else None
        for t in sorted(waiting, key=lambda t: t.number):
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            try:
                if not self.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING):
                    continue
            except Exception:  # finished meanwhile, or the database was busy: try the next one
                continue
            self.storage.record_heartbeat(trial_id)
            for key, value in {"claimed_by": worker_id(), "worker": worker_id(), "epoch": 0}.items():
                self.storage.set_trial_user_attr(trial_id, key, value)
            first = self._first_live(t)
            if first is not None and first < t.number:  # the cell's other trial runs it
                self.storage.set_trial_user_attr(trial_id, "duplicate_of", first)
                self.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.PRUNED)
                continue
            return self.storage.get_trial(trial_id), trial_id
        return None

    def _first_live(self, trial: Any) -> int | None:
        live = [t.number for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get("cell") ==
                trial.user_attrs.get("cell") and t.state.name in LIVE and not t.user_attrs.get("duplicate_of")]
        return min(live) if live else None

    # ------------------------------------------------------------------ the plan
    def advance(self) -> bool:
        """Queue the cells the plan needs now (looks replayed from the store); True when the study is
        complete (every needed cell finished, every planned pair decided or the budget spent)."""
        by_cell = trials_by_cell(self.study)
        states = {key: cell_state(trials) for key, trials in by_cell.items()}
        finished = {k for k, s in states.items() if s in ("done", "failed")}
        if self._frame_key != frozenset(finished):
            self._frame, self._frame_key = cells_frame(self.spec, self.experiment_id), frozenset(finished)
        cells, complete = required_cells(self.spec, self._frame, finished)
        enqueue(self.study, cells)
        return complete and all(states.get(c.key) in ("done", "failed") for c in cells)

    def run(self, poll: float = 1.0) -> int:
        """Claim and run cells until the study is complete; returns the cells this worker ran."""
        while True:
            self.release_dead()
            claimed = self.claim()
            if claimed is not None:
                self.run_cell(*claimed)
                continue
            if self.advance():
                return self.cells_run
            time.sleep(poll)

    # ------------------------------------------------------------------ one cell
    def cell_config(self, cell: Cell) -> ExperimentConfig:
        cfg = self.loaded.cell_config(cell.variant, cell.fold, cell.seed)
        name = f"{cell.variant}-f{cell.fold}-s{cell.seed}"
        return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_name": name})})

    def run_cell(self, trial: Any, trial_id: int) -> None:
        """Run (or reuse) one cell and close its trial: COMPLETE with the primary metric, or FAIL with
        the reason; on SIGTERM or Ctrl-C the cell is queued again before the worker stops."""
        import optuna

        cell = Cell(trial.user_attrs["variant"], int(trial.user_attrs["fold"]), int(trial.user_attrs["seed"]))
        beat = _Heartbeat(self.storage, trial_id, self.spec.heartbeat_interval)
        beat.start()
        try:
            value, attrs = self._run(cell, trial_id)
        except ConfigError:  # this worker cannot run the study (its folds differ): the cell goes to another
            _fail_running(self.storage, self.study, trial)
            raise
        except Exception as exc:
            log.error("study %s: cell %s failed: %s", self.spec.name, cell.label, exc)
            self.storage.set_trial_user_attr(trial_id, "error", redact_text(f"{type(exc).__name__}: {exc}")[:2000])
            self.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
            return
        except BaseException:
            _fail_running(self.storage, self.study, trial)  # queued again now, not after the grace period
            raise
        finally:
            beat.stop.set()
        for key, value_ in attrs.items():
            self.storage.set_trial_user_attr(trial_id, key, value_)
        self.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.COMPLETE, values=[value])
        self.cells_run += 1

    def _run(self, cell: Cell, trial_id: int) -> tuple[float, dict]:
        cfg = self.cell_config(cell)
        info = self.cache(cfg)
        self.check_split(cfg, info)  # a cell's own cache (`{seed}` in data.*) is checked too
        cell_hash = config_hash(config_params(cfg))
        self.storage.set_trial_user_attr(trial_id, "epochs", int(cfg.train.epochs))
        reused = self._finished_run(cell, cell_hash, info.split_fingerprint)
        run_id = reused or self._train(cell, cfg, info, cell_hash, trial_id)
        eval_id = self._evaluate(cell, cfg, run_id) if self.spec.needs_evaluate else None
        metrics = MlflowClient().get_run(eval_id).data.metrics if eval_id else {}
        metrics = {**metrics, **MlflowClient().get_run(run_id).data.metrics} \
            if not self.spec.primary.key(self.spec.split).startswith("test_calibrated/") else metrics
        value = float(metrics.get(self.spec.primary.key(self.spec.split), math.nan))
        if not math.isfinite(value):  # not logged: the cell is done, its value missing (worst for Optuna)
            value = -math.inf if self.spec.primary.higher_is_better else math.inf
        return value, {"run_id": run_id, "eval_run_id": eval_id or "", "reused": bool(reused)}

    def _finished_run(self, cell: Cell, cell_hash: str, fingerprint: str) -> str | None:
        extra = (f"{cell_filter(cell.key)} and tags.`{CELL_CONFIG_TAG}` = '{cell_hash}' "
                 f"and tags.`losslab.split_fingerprint` = '{fingerprint}'")
        runs = search(self.experiment_id, self.spec.name, "cell", extra)
        return runs[-1].info.run_id if runs else None

    def _resumable(self, cell: Cell, cfg: ExperimentConfig, cell_hash: str) -> str | None:
        """The newest stopped train run of this cell (same config) that left a last checkpoint."""
        client = MlflowClient()
        runs = search(self.experiment_id, self.spec.name, "cell",
                      f"{cell_filter(cell.key)} and tags.`{CELL_CONFIG_TAG}` = '{cell_hash}'", status=None)
        for run in reversed(runs):
            if run.info.status == "FINISHED":
                continue
            local = Path(cfg.train.checkpoint_dir) / run.info.run_id / "last.pt"
            with contextlib.suppress(Exception):
                if local.is_file() or any(a.path.endswith("last.pt") for a in client.list_artifacts(run.info.run_id,
                                                                                                    "checkpoints")):
                    return run.info.run_id
        return None

    def _train(self, cell: Cell, cfg: ExperimentConfig, info: Any, cell_hash: str, trial_id: int) -> str:
        from losslab.pipelines.train import train_fold

        tags = {STUDY_TAG: self.spec.name, ROLE_TAG: "cell", VARIANT_TAG: cell.variant, CELL_TAG: cell.key,
                CELL_CONFIG_TAG: cell_hash, "losslab.worker": worker_id(), "mlflow.parentRunId": self.parent_id}
        resume = self._resumable(cell, cfg, cell_hash)
        if resume:
            log.info("study %s: %s resumes run %s from its last checkpoint", self.spec.name, cell.label, resume)
        result = train_fold(cfg, info, cell.fold, nested=mlflow.active_run() is not None, resume_run_id=resume,
                            extra_callbacks=[CellProgress(self.storage, trial_id, self.parent_id)], extra_tags=tags,
                            seed=cell.seed)
        return result.run_id

    def _evaluate(self, cell: Cell, cfg: ExperimentConfig, train_run_id: str) -> str:
        """The cell's evaluate run on the held-out test split (calibration fitted on its validation fold;
        no TTA, no latency): the finished one of this train run, else a new one."""
        from losslab.pipelines.evaluate import run_evaluate

        done = search(self.experiment_id, self.spec.name, "evaluate",
                      f"{cell_filter(cell.key)} and tags.`{TRAIN_RUN_TAG}` = '{train_run_id}'")
        if done:
            return done[-1].info.run_id
        result = run_evaluate(cfg, source=train_run_id, split="test", tta={"enabled": False},
                              latency={"enabled": False}, run_name=f"eval-{cell.variant}-f{cell.fold}-s{cell.seed}")
        client = MlflowClient()
        for key, value in {STUDY_TAG: self.spec.name, ROLE_TAG: "evaluate", VARIANT_TAG: cell.variant,
                           CELL_TAG: cell.key, TRAIN_RUN_TAG: train_run_id, "losslab.seed": str(cell.seed),
                           "mlflow.parentRunId": self.parent_id}.items():
            client.set_tag(result.run_id, key, value)
        return result.run_id


# ------------------------------------------------------------------------------------------ opening
def _retry(fn, what: str, attempts: int = 4):
    """Workers starting together race to create the same tables, experiment or study: try again."""
    for attempt in range(attempts):
        try:
            return fn()
        except ConfigError:
            raise
        except Exception as exc:
            if attempt == attempts - 1:
                raise
            log.info("could not %s (%s); retrying", what, exc)
            time.sleep(0.5 + attempt)


def open_worker(loaded: LoadedStudy, storage: str | None = None) -> tuple[Worker, str]:
    """Check the variants, open the experiment and the Optuna study, refuse differing folds or configs."""
    from losslab.pipelines.checks import check_config

    for variant, cfg in loaded.variants.items():
        try:
            check_config(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{loaded.path}: variants.{variant}: {exc}") from None
    experiments = {cfg.tracking.experiment for cfg in loaded.variants.values()}
    if len(experiments) > 1:
        raise ConfigError(f"{loaded.path}: the variants log to different experiments {sorted(experiments)}: "
                          "a study's cells share one (set tracking.experiment in overrides, not in a variant)")
    base = loaded.variants[loaded.spec.reference]
    experiment_id = _retry(lambda: setup_tracking(base.tracking), "set up the MLflow experiment")
    url = resolve_storage(loaded, storage, resolve_tracking_uri(base.tracking.tracking_uri))
    store = _retry(lambda: open_storage(url, loaded, experiment_id), "open the Optuna storage")
    study, created = _retry(lambda: open_study(store, loaded), "open the Optuna study")
    worker = Worker(loaded, store, study, "", experiment_id, created=created)
    worker.check()
    return worker, url


def join_study(payload: dict) -> int:
    """A spawned worker (:mod:`losslab.pipelines.study_spawn`): open the study and run cells until it is complete."""
    import torch

    torch.set_num_threads(int(payload["threads"]))
    os.environ["MLFLOW_TRACKING_URI"] = payload["tracking_uri"]
    mlflow.set_tracking_uri(payload["tracking_uri"])
    loaded = load_study(payload["path"], payload["overrides"], spec=validate_study(payload["spec"], payload["path"]))
    worker, _ = open_worker(loaded, payload["storage"])
    worker.parent_id = payload["parent_id"]
    return worker.run()


__all__ = ["CellProgress", "DeadCellHandler", "STORAGE_ENV", "Worker", "cell_state", "data_key", "default_storage", "enqueue",
           "join_study", "open_storage", "open_study", "open_worker", "resolve_storage", "set_if_absent", "trials_by_cell",
           "worker_id"]
