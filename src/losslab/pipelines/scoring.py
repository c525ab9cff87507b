"""scoring: a trained model, with the weights its run validated with, scored on a split.

:func:`load_source` turns a source into the model ``train`` chose::

    models:/<name>@<alias>      a registered version (safetensors weights + spec, rebuilt by the task;
    models:/<name>/<version>    a pickle-format model only with ``allow_pickle``)
    <run id> | runs:/<run id>   a train run: its ``config.yaml`` + ``checkpoints/best.pt`` artifacts
    <path>.pt                   a checkpoint file, rebuilt from the *given* config (its training class
                                counts from the cache, after data.imbalance and data.train_cases)

A checkpoint's weights are its evaluation weights (:func:`losslab.engine.checkpoint.evaluation_weights`:
the SWA average, else the EMA, else the trained weights — what validation scored and the registry
holds), and the loss is restored as it was at that validation (its learned weights, its epoch's
schedule: :func:`losslab.engine.checkpoint.restore_loss`), so the three forms give the same numbers. :func:`split_metrics` scores a model on a loader
through its task (the metrics of training's validation, renamed ``<prefix>/*``);
:func:`score_test_split` is ``train``'s one score on the held-out test split. Every model a task
trains goes through these functions: ``train``'s ``test/*`` and ``evaluate`` for all tasks.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from losslab.config import ExperimentConfig, load_config
from losslab.engine.checkpoint import restore_loss
from losslab.engine.checkpoint import evaluation_weights, load_checkpoint
from losslab.engine.steps import Step
from losslab.pipelines.registry import load_registered_model
from losslab.tasks import Task, task_of

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class SourceNotFoundError(LookupError):
    """The model, alias, version, run, experiment or checkpoint to score does not exist."""

    def __str__(self) -> str:  # LookupError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


@dataclass
class LoadedSource:
    """What a source resolved to: the model (evaluation weights, eval mode), its loss, task and the task's
    step for that loss and those outputs, the run's config, the output names and provenance tags."""

    cfg: ExperimentConfig
    model: nn.Module
    loss_fn: nn.Module
    task: Task
    class_names: list[str]
    run_id: str | None
    experiment_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    step: Step | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.task is not None:
            self.step = self.task.step(self.cfg, self.loss_fn, self.class_names)


# --------------------------------------------------------------------------- the tracking store
def client_call(what: str, fn, *args):
    """``fn(*args)``; a missing entity raises :class:`SourceNotFoundError` naming ``what`` and the store."""
    try:
        return fn(*args)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower() \
                or "does not exist" in str(exc).lower():
            raise SourceNotFoundError(f"{what} not found in the tracking store {mlflow.get_tracking_uri()}: "
                                      f"{exc.message}") from None
        raise


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3")."""
    body = uri[len("models:/"):].strip("/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ValueError(f"model URI {uri!r} is neither models:/<name>@<alias> nor models:/<name>/<version>")


def model_version(uri: str, client: MlflowClient | None = None):
    """The registry's ``ModelVersion`` behind ``models:/name@alias`` or ``models:/name/version``
    (SourceNotFoundError naming the missing model, alias or version)."""
    client = client or MlflowClient()
    name, alias, version = parse_model_uri(uri)
    client_call(f"registered model {name!r}", client.get_registered_model, name)
    if alias is not None:
        return client_call(f"alias {alias!r} of registered model {name!r}", client.get_model_version_by_alias,
                           name, alias)
    return client_call(f"version {version} of registered model {name!r}", client.get_model_version, name, version)


def run_config(run_id: str) -> ExperimentConfig:
    """The run's ``config.yaml`` artifact, loaded."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml", dst_path=tmp)
        except (MlflowException, OSError) as exc:
            raise SourceNotFoundError(f"run {run_id} has no config.yaml artifact: {exc}") from None
        return load_config(path)


def download_best_checkpoint(run_id: str, dst_dir: str | Path) -> Path:
    """The run's ``checkpoints/best.pt`` artifact, downloaded into ``dst_dir``."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/best.pt",
                                                        dst_path=str(dst_dir)))
    except (MlflowException, OSError) as exc:
        raise SourceNotFoundError(f"run {run_id} has no checkpoints/best.pt artifact: {exc}") from None


def load_evaluation_weights(model: nn.Module, checkpoint: str | Path, loss_fn: nn.Module | None = None) -> nn.Module:
    """``model`` with the weights ``checkpoint`` was validated with (SWA, EMA or the trained weights);
    ``loss_fn``, when given, as it was at that validation (:func:`losslab.engine.checkpoint.restore_loss`:
    its epoch's schedule and its learned state), so that ``test/loss`` is the loss the run validated with."""
    ckpt = load_checkpoint(checkpoint)
    model.load_state_dict(evaluation_weights(ckpt))
    if loss_fn is not None:
        restore_loss(loss_fn, ckpt)
    return model


# --------------------------------------------------------------------------- the source
def load_source(source: str, cfg: ExperimentConfig, allow_pickle: bool = False) -> LoadedSource:
    """Resolve ``source`` (see the module docstring) into a model in eval mode plus its config.

    Raises:
        SourceNotFoundError: the registered model, alias, version, run or checkpoint file is missing.
        UnsafeModelError: a pickle-format registered model without ``allow_pickle``.
        ValueError: ``source`` is none of the accepted forms.
    """
    if source.startswith("models:/"):
        return _registered_source(source, allow_pickle)
    path = Path(source)
    if source.endswith((".pt", ".pth")) or path.is_file():
        if not path.is_file():
            raise SourceNotFoundError(f"checkpoint file {source} not found")
        task = task_of(cfg)
        loss_fn, model, names = task.rebuild(cfg, {}, {})
        tags = {"losslab.source_checkpoint": str(path.resolve()), "losslab.loss": cfg.loss.name,
                "losslab.dataset": cfg.data.source}
        return LoadedSource(cfg, load_evaluation_weights(model, path, loss_fn).eval(), loss_fn, task, names, None, None,
                            tags)
    run_id = source[len("runs:/"):].strip("/").split("/")[0] if source.startswith("runs:/") else source
    if not _RUN_ID.match(run_id):
        raise ValueError(f"evaluate.source {source!r} is not a models:/ URI, a run id or an existing checkpoint file")
    run = client_call(f"run {run_id}", MlflowClient().get_run, run_id)
    run_cfg = with_run_fold(run, run_config(run_id))
    task = task_of(run_cfg)
    loss_fn, model, names = task.rebuild(run_cfg, run.data.tags, run.data.params)
    with tempfile.TemporaryDirectory() as tmp:
        load_evaluation_weights(model, download_best_checkpoint(run_id, tmp), loss_fn)
    return LoadedSource(run_cfg, model.eval(), loss_fn, task, names, run_id, run.info.experiment_id,
                        {"losslab.source_run_id": run_id} | _provenance(run))


def _registered_source(source: str, allow_pickle: bool) -> LoadedSource:
    """A registered version: the registry's weights (the evaluation weights ``train`` registered) and
    spec; the config of the run that logged it."""
    client = MlflowClient()
    mv = model_version(source, client)
    name = mv.name
    if not mv.run_id:
        raise SourceNotFoundError(f"model version {name}/{mv.version} has no source run")
    run = client_call(f"run {mv.run_id} (source of {name}/{mv.version})", client.get_run, mv.run_id)
    run_cfg = with_run_fold(run, run_config(mv.run_id))
    registered = load_registered_model(f"models:/{name}/{mv.version}", allow_pickle=allow_pickle)
    task, loss_fn = registered.task, registered.loss_fn
    if registered.spec is not None:
        names = list(registered.spec.get("class_names") or registered.spec["channel_names"])
    else:  # an opted-in pickle model carries no spec: the loss and the task from the run's config
        task = task_of(run_cfg)
        loss_fn, _, names = task.rebuild(run_cfg, run.data.tags, run.data.params)
    tags = {"losslab.source_model": source, "losslab.source_model_name": name,
            "losslab.source_model_version": f"{mv.version}", "losslab.source_run_id": mv.run_id}
    return LoadedSource(run_cfg, registered.model, loss_fn, task, names, mv.run_id, run.info.experiment_id,
                        tags | _provenance(run))


def with_run_fold(run, cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the fold the run validated on: its ``losslab.fold`` tag when that is one fold.
    Runs of a CV parent logged before each child recorded its own fold carry the parent's
    ``data.fold`` in ``config.yaml``; the tag was right, so it wins (and the mismatch is logged)."""
    tag = run.data.tags.get("losslab.fold", "")
    if not tag.lstrip("-").isdigit() or int(tag) == cfg.data.fold:
        return cfg
    log.warning("run %s: config.yaml says data.fold=%d but the run validated on fold %s (tag losslab.fold); "
                "using fold %s", run.info.run_id, cfg.data.fold, tag, tag)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"fold": int(tag)})})


def _provenance(run) -> dict[str, str]:
    tags = run.data.tags
    out = {k: tags[k] for k in ("losslab.loss", "losslab.dataset", "losslab.model") if k in tags}
    if "losslab.fold" in tags:
        out["losslab.source_fold"] = tags["losslab.fold"]
    if "losslab.split_fingerprint" in tags:
        out["losslab.source_split_fingerprint"] = tags["losslab.split_fingerprint"]
    if "data.modalities" in run.data.params:
        out["losslab.source_modalities"] = run.data.params["data.modalities"]
    return out


def check_modalities(loaded: LoadedSource, report: dict[str, Any], cache_dir: Any) -> None:
    """Refuse data whose channels are in another order than the model's (its run's ``data.modalities``
    against the cache's ``report.json``); a model whose run recorded none is scored with a warning."""
    trained = loaded.tags.get("losslab.source_modalities", "")
    data = ",".join(report.get("modalities") or [])
    if trained and trained != data:
        held = data or "channels in an unrecorded order (a cache built before orders were recorded: rebuild it)"
        raise ValueError(f"the model was trained on channels {trained} (its run's data.modalities) but the cache "
                         f"{cache_dir} holds {held}: refused")
    if not trained and data:
        log.warning("the model's run records no data.modalities: scoring it on %s (channels %s) assumes it was "
                    "trained in that order", cache_dir, data)


# --------------------------------------------------------------------------- the numbers
def check_model_fold(own_fold: int, requested: int | None, use: str = "scored") -> int:
    """The model's validation fold ``own_fold``; a ``requested`` fold (``evaluate.fold``) may only repeat
    it: any other fold was in the model's training set, so it cannot be ``use`` (scored, used for
    calibration)."""
    if requested is not None and int(requested) != own_fold:
        raise ValueError(f"evaluate.fold={requested}: the model trained on fold {requested} (its validation "
                         f"fold is {own_fold}), so it cannot be {use}; leave evaluate.fold unset or set it to "
                         f"{own_fold}")
    return own_fold


def split_metrics(step: Step, outputs: dict[str, Any], class_names: list[str], loss_fn, prefix: str
                  ) -> dict[str, float]:
    """The metrics of training's validation (``step.metrics``) of ``step.predict`` ``outputs``, ``<prefix>/*``."""
    return {f"{prefix}/{k.split('/', 1)[1]}": v for k, v in step.metrics(outputs, class_names, loss_fn).items()}


def score_test_split(cfg: ExperimentConfig, info, task: Task, step: Step, model: nn.Module, loss_fn, device,
                     normalizer=None) -> dict[str, float]:
    """``test/*`` metrics of ``model`` (through the task's ``step``) on the cache's held-out test split
    (fold -1) and the task's summary beside them (patient-bootstrap intervals, case counts); ``{}`` and
    one log line when the cache has no test split. ``normalizer``: the training run's (from its training
    cases)."""
    loader = task.test_loader(cfg, info, normalizer)
    if loader is None:
        log.warning("no held-out test split in the cache %s (data.test_fraction=%s): no test/* metrics",
                    info.cache_dir, cfg.data.test_fraction)
        return {}
    outputs = step.predict(model, loader, device, loss_fn, cfg.train.amp)
    return split_metrics(step, outputs, info.class_names, loss_fn, "test") \
        | task.split_summary(outputs, loader.dataset, info.class_names, "test")


__all__ = ["LoadedSource", "SourceNotFoundError", "check_model_fold", "check_modalities", "client_call", "download_best_checkpoint",
           "load_evaluation_weights", "load_source", "parse_model_uri", "run_config", "score_test_split",
           "split_metrics", "with_run_fold"]
