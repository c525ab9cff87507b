"""train: one fold (or k folds as child runs of one parent) of any task, logged to MLflow.

Run naming: ``<loss>-f<fold>``; tags ``losslab.loss``, ``losslab.fold``, ``losslab.dataset``,
``losslab.entry_point``. Every epoch: ``train/loss``, ``val/loss``, ``val/auc``, ``val/f1_macro``,
``val/balanced_accuracy``, ``val/recall_<class>``, ``val/pred_count_<class>`` (and more). The best
model is logged with a signature and registered with an alias.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from losslab.config import ExperimentConfig
from losslab.data.cache import CacheInfo
from losslab.engine import distributed as ddp
from losslab.engine.checkpoint import loss_spec
from losslab.engine.metrics import dead_class_names, pred_counts
from losslab.engine.monitor import BestModelRule
from losslab.engine.loop import fit, resolve_device, seed_everything
from losslab.likeness import config_hash
from losslab.pipelines.checks import check_checkpoint_dir, check_config
from losslab.pipelines.common import base_tags
from losslab.pipelines.scoring import load_evaluation_weights, score_test_split
from losslab.tasks import task_of
from losslab.tracking import (MLflowCallback, config_params, clear_error_tags, log_and_register_model, log_config, log_metrics_batch,
                              managed_run, setup_tracking)

log = logging.getLogger(__name__)


@dataclass
class FoldResult:
    fold: int
    run_id: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    model_version: str | None = None
    error: str | None = None
    seed: int | None = None


@dataclass
class TrainResult:
    folds: list[FoldResult]
    parent_run_id: str | None = None
    class_names: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.parent_run_id or self.folds[0].run_id


def build_components(cfg: ExperimentConfig, class_counts: list[int]):
    """The loss and the model of a classification task for ``cfg`` (:meth:`losslab.tasks.Task.build`;
    the classes are named by their index here)."""
    return task_of(cfg).build(cfg, [str(c) for c in range(len(class_counts))], list(class_counts))


def make_datasets(cfg: ExperimentConfig, info: CacheInfo, fold: int):
    """The task's training and validation datasets of ``fold`` (:meth:`losslab.tasks.Task.fold_datasets`)."""
    return task_of(cfg).fold_datasets(cfg, info, fold)


def make_loaders(cfg: ExperimentConfig, train_ds, val_ds):
    """The task's training and validation loaders (:meth:`losslab.tasks.Task.loaders`)."""
    return task_of(cfg).loaders(cfg, train_ds, val_ds)


def _checkpoint_dir(cfg: ExperimentConfig, run_id: str) -> Path:
    return Path(cfg.train.checkpoint_dir) / run_id


def fold_config(cfg: ExperimentConfig, fold: int, seed: int | None = None) -> ExperimentConfig:
    """The config of one (seed, fold) run, as its params and ``config.yaml`` record it: its own
    ``data.fold`` and ``train.seed``, and no ``cv`` section (re-running it trains that one run)."""
    from losslab.config import CVConfig

    seed = cfg.train.seed if seed is None else seed
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"fold": fold}),
                                  "train": cfg.train.model_copy(update={"seed": seed}), "cv": CVConfig()})


def train_fold(cfg: ExperimentConfig, info: CacheInfo, fold: int, nested: bool = False,
               resume_run_id: str | None = None, extra_callbacks: list | None = None,
               extra_tags: dict[str, str] | None = None, seed: int | None = None,
               set_alias: bool = False) -> FoldResult:
    """Train one fold (with training seed ``seed``, default ``train.seed``) in its own MLflow run;
    the run is FAILED (with the reason) on any error, including a fold that cannot be built (e.g. no
    validation cases). The best epoch is chosen on validation; the best model is then scored once
    on the held-out test split (``test/*`` with patient-bootstrap intervals), if the cache has one.

    With ``resume_run_id`` the same run continues from its last checkpoint (a local
    ``<checkpoint_dir>/<run_id>/last.pt``, else the run's ``checkpoints/last.pt`` artifact) and ends
    FINISHED; a run left RUNNING by a killed process can be resumed this way.

    Under torchrun only rank 0 opens the run, logs, checkpoints and registers the model; the other
    ranks train their shard (:func:`_train_fold_replica`) and never call MLflow.

    ``set_alias``: point ``tracking.alias`` at the registered version (a single-fold train, also
    under ``mlflow run``); cross-validation folds and sweep trials leave the alias alone."""
    cfg = fold_config(cfg, fold, seed)
    task = task_of(cfg)
    seed_everything(cfg.train.seed + fold, cfg.train.deterministic)
    if not ddp.is_main_process():
        return _train_fold_replica(cfg, task, info, fold)
    run_name = cfg.tracking.run_name or f"{cfg.loss.name}-f{fold}" + (f"-s{seed}" if seed is not None else "")
    tags = base_tags(cfg, "train", fold) | {"losslab.seed": str(cfg.train.seed), "losslab.task": task.name}
    tags |= extra_tags or {}
    with managed_run(run_name=run_name, tags=tags, nested=nested, run_id=resume_run_id) as run:
        run_id = run.info.run_id
        setup = task.setup_fold(cfg, info, fold)
        if resume_run_id is None:
            _log_fold_setup(cfg, setup)
            resume_from = None
        else:
            resume_from = resume_checkpoint(cfg, run_id)
        # every rank resumes from the same file (a local path: one machine, or a shared disk)
        ddp.broadcast_object(str(resume_from) if resume_from is not None else None)
        train_cfg = cfg.train.model_copy(update={"checkpoint_dir": str(_checkpoint_dir(cfg, run_id))})
        # async metric batches (flushed at the end; epochs lost to a kill are re-logged on resume)
        tracker = MLflowCallback(run_id, setup.names, plot_every=cfg.train.plot_every, synchronous=False,
                                 checkpoint_every=cfg.train.upload_checkpoint_every,
                                 figures=task.epoch_figures)
        callbacks = setup.callbacks + [tracker] + list(extra_callbacks or [])
        state = fit(setup.model, setup.loss_fn, setup.train_loader, setup.val_loader, train_cfg, cfg.optim, setup.names,
                    callbacks=callbacks, resume_from=resume_from, step=setup.step)
        _tag_fit_outcome(state)
        best_metrics = _score_best_model(cfg, info, run_id, task, setup, state, Path(train_cfg.checkpoint_dir) / "best.pt")
        version = None
        if cfg.tracking.log_model:
            mv = log_and_register_model(setup.model, task.input_example(cfg, setup.val_loader),
                                        cfg.tracking.registered_model_name, cfg.tracking.alias if set_alias else None,
                                        version_tags={"fold": fold, "seed": cfg.train.seed, "loss": cfg.loss.name,
                                                      "run_id": run_id},
                                        spec=setup.spec | loss_spec(setup.loss_fn, state.best_epoch))
            version = f"{mv.version}" if mv is not None else None
        tracker.remove_uploaded_checkpoints()  # the run's artifacts are the copies that stay
        return FoldResult(fold, run_id, "FINISHED", best_metrics, version, seed=cfg.train.seed)


def _log_fold_setup(cfg: ExperimentConfig, setup) -> None:
    """A new run: its config, the fold's data sizes and the task's params, the names its metrics are
    reported for and the config fingerprint with the resolved settings (e.g. the normalisation)."""
    log_config(cfg)
    mlflow.log_params(setup.params | {"loss.formula": str(setup.loss_fn)[:6000], "ddp.world_size": ddp.world_size(),
                                      "data.effective_batch_size": ddp.world_size() * cfg.data.batch_size})
    mlflow.set_tags(setup.tags | {"losslab.class_names": ",".join(setup.names),
                                  "losslab.config_hash": config_hash(config_params(cfg) | setup.hashed_params)})


def _tag_fit_outcome(state) -> None:
    """Tags on the active run: how a tie on the monitored metric was broken, and the classes the
    last epoch never predicted on validation."""
    if state.best_tiebreak:
        mlflow.set_tag("losslab.best_tiebreak", f"epoch {state.best_epoch}: {state.best_tiebreak}")
    dead = dead_class_names(pred_counts({k: v[-1] for k, v in state.history.items() if v}))
    if dead:
        log.warning("dead class(es) on validation at the last epoch: %s", ", ".join(dead))
        mlflow.set_tag("losslab.dead_classes", ",".join(dead))


def _score_best_model(cfg: ExperimentConfig, info: CacheInfo, run_id: str, task, setup, state,
                      best_path: Path) -> dict[str, float]:
    """Load the best weights (EMA/SWA when those were validated) into the fold's model; log ``best_val/*``
    and ``best_epoch``, then the one score on the held-out test split (``test/*``); return ``val/*``
    and ``test/*``."""
    device = resolve_device(cfg.train.device)
    model, loss_fn, step, val_loader = setup.model, setup.loss_fn, setup.step, setup.val_loader
    load_evaluation_weights(model, best_path, loss_fn).to(device)
    best_metrics = step.metrics(step.predict(model, val_loader, device, loss_fn, cfg.train.amp), info.class_names,
                                loss_fn)
    summary = {f"best_{k}": v for k, v in best_metrics.items()}
    summary["best_epoch"] = float(state.best_epoch if state.best_epoch is not None else -1)
    test_metrics = score_test_split(cfg, info, task, step, model, loss_fn, device,
                                    getattr(val_loader.dataset, "normalizer", None))
    # at the best epoch's step: these numbers describe that epoch's weights
    step = int(state.best_epoch if state.best_epoch is not None else state.epoch)
    log_metrics_batch(run_id, summary | test_metrics, step=step)
    return best_metrics | test_metrics


def _train_fold_replica(cfg: ExperimentConfig, task, info: CacheInfo, fold: int) -> FoldResult:
    """A rank > 0 of a torchrun job: the same datasets, model and collectives as rank 0, no MLflow,
    no callbacks, no checkpoints (rank 0 writes them); resumes from the checkpoint rank 0 names."""
    setup = task.setup_fold(cfg, info, fold)
    resume_from = ddp.broadcast_object(None)
    fit(setup.model, setup.loss_fn, setup.train_loader, setup.val_loader, cfg.train, cfg.optim, setup.names,
        callbacks=setup.callbacks, resume_from=resume_from, step=setup.step)
    return FoldResult(fold, "", "FINISHED")


def resume_checkpoint(cfg: ExperimentConfig, run_id: str) -> Path:
    """The ``last.pt`` a resumed run continues from (:func:`_find_resume_checkpoint`), recorded on the
    run (tag ``losslab.resumed_from``); the kill or failure resumed from is no longer the run's state
    (its error tags are cleared). Shared by train, segmentation and distill."""
    resume_from = _find_resume_checkpoint(cfg, run_id)
    mlflow.tracking.MlflowClient().set_tag(run_id, "losslab.resumed_from", str(resume_from))
    clear_error_tags(run_id)
    return resume_from


def _find_resume_checkpoint(cfg: ExperimentConfig, run_id: str) -> Path:
    """The run's ``last.pt``: the local copy, else its artifact, downloaded into the local checkpoint
    folder together with ``best.pt`` (so a best epoch before the kill is kept and re-uploaded)."""
    folder = _checkpoint_dir(cfg, run_id)
    local = folder / "last.pt"
    for name in ("last.pt", "best.pt"):
        if (folder / name).is_file():
            continue
        try:
            _download_checkpoint(run_id, name, folder)
        except Exception as exc:
            if name == "last.pt":
                raise FileNotFoundError(f"run {run_id} has no last checkpoint locally ({local}) or as an "
                                        f"artifact: {exc}") from exc
    return local


def _download_checkpoint(run_id: str, name: str, folder: Path) -> None:
    import shutil
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoints/{name}", dst_path=tmp)
        shutil.move(path, folder / name)


def run_train(cfg: ExperimentConfig, resume_run_id: str | None = None, info: CacheInfo | None = None,
              extra_callbacks: list | None = None) -> TrainResult:
    """Train ``data.fold``, or every fold in ``cv.folds`` as children of one parent run.

    Under ``torchrun`` (``WORLD_SIZE > 1``) this initialises the process group (nccl on CUDA, gloo on
    CPU) and destroys it at the end, also on error; each rank trains ``data.batch_size`` samples per
    step (effective batch ``world_size × data.batch_size``, learning rate not scaled) and only rank 0
    builds the cache first, opens the MLflow run and logs. ``extra_callbacks`` run on rank 0 only.
    ``cv.folds`` is refused under torchrun (run one torchrun job per ``data.fold``)."""
    check_config(cfg)  # before any run opens or the cache is built
    task = task_of(cfg)
    task.check_entry_point("train")  # before any run opens
    if resume_run_id is not None and cfg.cv.is_multi_run:
        raise ValueError("--resume continues one run: resume each fold run by its own id (without cv.folds)")
    if ddp.is_main_process():
        check_checkpoint_dir(cfg)
    with ddp.distributed_context(cfg.train.device) as distributed:
        if distributed and cfg.cv.is_multi_run:
            raise ValueError("cv.folds/cv.repeats/cv.seeds are not supported under torchrun/DDP; run one torchrun "
                             "job per fold and seed with -o data.fold=<k> -o train.seed=<s> (and cv.folds=null)")
        main = ddp.is_main_process()
        if main:
            setup_tracking(cfg.tracking)
            info = info or task.build_cache(cfg)
        ddp.barrier()  # the other ranks read the cache rank 0 built
        if not main:
            info = info or task.build_cache(cfg)
            result = train_fold(cfg, info, cfg.data.fold)
            return TrainResult([result], None, info.class_names)
        nested = mlflow.active_run() is not None
        if not cfg.cv.is_multi_run:
            result = train_fold(cfg, info, cfg.data.fold, nested=nested, resume_run_id=resume_run_id,
                                extra_callbacks=extra_callbacks, set_alias=True)
            return TrainResult([result], None, info.class_names)
        return run_cv(cfg, info, extra_callbacks)


def run_cv(cfg: ExperimentConfig, info: CacheInfo, extra_callbacks: list | None = None) -> TrainResult:
    """k folds (``cv.folds``) × R training seeds (``cv.repeats`` / ``cv.seeds``): one parent run, one
    child run per (seed, fold) tagged ``losslab.fold`` and ``losslab.seed``, so the spread has both
    sources (the folds stay those of the cache; only the training seed changes). The parent logs mean
    ± std of every validation (and test) metric over all children and a per-run table; a failing
    child is FAILED alone and named by the parent. Each child's best model is a registered version
    tagged with its fold and seed; the alias ``champion`` goes to the best child by the monitored
    metric."""
    folds = cfg.cv.folds
    fold_list = [cfg.data.fold] if folds is None else list(range(folds)) if isinstance(folds, int) else list(folds)
    seeds = cfg.cv.seed_list(cfg.train.seed)
    repeated = len(seeds) > 1 or cfg.cv.seeds is not None
    tags = base_tags(cfg, "train") | {"losslab.cv": "true", "losslab.fold": ",".join(str(f) for f in fold_list),
                                      "losslab.seed": ",".join(str(s) for s in seeds)}
    results: list[FoldResult] = []
    nested = mlflow.active_run() is not None
    with managed_run(run_name=cfg.tracking.run_name or f"{cfg.loss.name}-cv", tags=tags, nested=nested) as parent:
        log_config(cfg)
        for seed in seeds:
            for fold in fold_list:
                child_seed = seed if repeated else None
                try:
                    results.append(train_fold(cfg, info, fold, nested=True, extra_callbacks=extra_callbacks,
                                              seed=child_seed))
                except Exception as exc:  # the child's run is already FAILED with its reason
                    log.error("fold %d (seed %d) failed: %s", fold, seed, exc)
                    results.append(FoldResult(fold, _child_run_id(parent.info.run_id, fold, seed), "FAILED",
                                              error=f"{type(exc).__name__}: {exc}", seed=seed))
        _log_cv_summary(cfg, results)
        ok = [r for r in results if r.status == "FINISHED"]
        _tag_failures([r for r in results if r.status != "FINISHED"], repeated)
        if ok and cfg.tracking.registered_model_name and cfg.tracking.log_model:
            _set_champion(cfg, ok, repeated)
        if not ok:
            raise RuntimeError(f"every fold failed: {[r.error for r in results]}")
    return TrainResult(results, parent.info.run_id, info.class_names)


def _child_label(result: FoldResult, repeated: bool) -> str:
    """``2`` for fold 2, ``2-s1`` for fold 2 with seed 1 when seeds are repeated."""
    return f"{result.fold}-s{result.seed}" if repeated else str(result.fold)


def _tag_failures(failed: list[FoldResult], repeated: bool) -> None:
    if failed:
        mlflow.set_tag("losslab.failed_folds", ",".join(_child_label(r, repeated) for r in failed))
        for r in failed:
            mlflow.set_tag(f"losslab.fold_{_child_label(r, repeated)}_error", (r.error or "")[:5000])


def _set_champion(cfg: ExperimentConfig, ok: list[FoldResult], repeated: bool) -> None:
    """The alias ``champion`` on the registered version of the best child by ``train.monitor`` (and
    its tie-breaks)."""
    rule, best = BestModelRule.from_config(cfg.train), None
    for r in ok:  # the monitored metric, then the tie-breaks; NaN never wins
        if rule.compare(r.metrics, best.metrics if best is not None else None)[0]:
            best = r
    if best is not None:
        client = mlflow.tracking.MlflowClient()
        client.set_registered_model_alias(cfg.tracking.registered_model_name, "champion", f"{best.model_version}")
        mlflow.set_tag("losslab.champion_fold", str(best.fold))
        if repeated:
            mlflow.set_tag("losslab.champion_seed", str(best.seed))


def _child_run_id(parent_run_id: str, fold: int, seed: int) -> str:
    """The run id of the (``fold``, ``seed``) child run under ``parent_run_id`` ('' if none was created)."""
    client = mlflow.tracking.MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`losslab.fold` = '{fold}' "
                              f"and tags.`losslab.seed` = '{seed}'", max_results=1)
    return runs[0].info.run_id if runs else ""


def _log_cv_summary(cfg: ExperimentConfig, results: list[FoldResult]) -> None:
    """On the parent: ``cv/<metric>_mean`` and ``_std`` (over every finished child, all seeds and
    folds; std only with two or more) of the validation metrics, ``cv_test/<metric>_*`` of the test
    metrics, ``cv/n_runs``, and the per-run table ``cv_folds.csv``/``.md`` (fold, seed, status, run)."""
    from losslab.tracking import log_table_artifacts

    ok = [r for r in results if r.status == "FINISHED"]
    rows = [{"fold": r.fold, "seed": r.seed if r.seed is not None else cfg.train.seed, "status": r.status,
             "run_id": r.run_id, **r.metrics} for r in results]
    summary = {"cv/n_runs": float(len(ok))}
    for k in sorted({k for r in ok for k in r.metrics if "_ci_" not in k}):
        values = np.array([r.metrics.get(k, np.nan) for r in ok], dtype=float)
        values = values[~np.isnan(values)]
        name = k.replace("val/", "cv/", 1) if k.startswith("val/") else k.replace("test/", "cv_test/", 1)
        if len(values):
            summary[f"{name}_mean"] = float(values.mean())
        if len(values) > 1:
            summary[f"{name}_std"] = float(values.std(ddof=1))
    mlflow.log_metrics(summary)
    log_table_artifacts(pd.DataFrame(rows), "cv_folds")
