"""distill: image + text teacher/student distillation with several tasks per sample, logged to MLflow.

One ``losslab distill`` (``mlflow run . -e distill``) opens a parent run ``distill`` and, nested in it:

* a **teacher** run (tag ``losslab.role=teacher``, ``losslab.loss=teacher``): the teacher is trained
  here and registered (``distill.teacher.registered_model_name``, alias ``distill.teacher.alias``), or
  loaded from the registry (``distill.teacher.model_uri: models:/name/1`` or ``models:/name@alias``)
  and only evaluated (loaded as safetensors weights + spec, rebuilt by our code; see
  :mod:`losslab.pipelines.registry`);
* one **student** run per loss in ``distill.losses`` (``losslab.role=student``, ``losslab.loss=<loss>``);
* a **student alone** run (``losslab.role=student_alone``, ``losslab.loss=none``): the same student,
  the same initial weights and batch order, trained on the labels only (``distill.student_alone``).

Each of them is a fold run of the ``multitask`` task (``losslab.entry_point=train``, ``losslab.task=multitask``,
``losslab.fold``, ``losslab.seed``; the loss settings as ``loss.*`` params), so ``compare`` reads them as any
runs: ``losslab compare -e <experiment> --group-by losslab.loss --metric mean_accuracy`` with a ``--filter`` on
``tags.losslab.role`` or on the parent (``tags.mlflow.parentRunId``).

The trained teacher and every student are ``train_fold`` runs (:mod:`losslab.pipelines.train`) of the
``multitask`` task (:class:`losslab.tasks.MultitaskTask`), each with its own config (:func:`run_config`:
``distill.run`` says which run it is, its epochs, learning rate and monitor are the section's); this module
orchestrates them the way cross-validation orchestrates its folds (a parent run, child train runs) and reads
them back (:mod:`~losslab.pipelines.distill_tables`). The data are :mod:`losslab.tasks.multitask_data`'s:
every ``data.*`` key the other tasks honour (the training cases with ``data.imbalance`` and
``data.train_cases``, ``data.sampler``, ``data.augment``, ``data.normalize``, ``data.num_workers``) is
honoured there or refused when the config loads; the ``distill:`` section is
:class:`losslab.schema.DistillConfig` (its defaults and checks live there only).

The teacher's outputs (per-task logits and the fused feature) are computed once for every case of the
cache and stored in ``<distill.cache_dir>/<key>.npz``; the key hashes the teacher's weights and origin,
its preprocessing and the data fingerprint, so a second run with the same teacher and data reuses
the file (the parent and student runs carry the tag ``losslab.teacher_cache`` = ``reused`` or
``computed``); a student's config names that file (``distill.run.teacher_outputs``), an input of its task.

The teacher and every student train through ``train_fold`` (the engine's :func:`losslab.engine.loop.fit`):
``train.*`` works as in ``losslab train``
(bf16 autocast on CUDA, clipping, EMA, SWA, early stopping, the alarms, atomic ``best``/``last``
checkpoints in ``<train.checkpoint_dir>/<run id>`` uploaded to the run's ``checkpoints/``); the
objectives are :mod:`losslab.losses.multitask`. Every run logs per epoch ``train/loss``,
``train/loss_<term>`` (``ce/<task>``, ``kd/<task>``, ``hint``, ``crd``, ...), ``train/lr``,
``val/loss`` (Σ_t cross-entropy), ``val/<task>/{accuracy,f1_macro,auc,balanced_accuracy}``,
``val/mean_{accuracy,f1_macro,balanced_accuracy}``; at the end the best epoch's (by
``distill.monitor``) weights are scored again on the validation split that picked them as
``best_val/<task>/…``, with ``best_epoch``, and on the held-out test split (fold −1, ``data.test_fraction``)
as ``test/<task>/…`` and ``test/mean_…`` (as ``train_fold`` scores every run), with the latency ``evaluate`` reports (``latency/p50_ms``,
``latency/p95_ms``, ``latency/throughput_per_s``: :func:`losslab.engine.latency.measure_latency`,
warm-up and repeats from ``evaluate.latency``; measured here once the run ends, on the validation cases). :func:`distillation_table` reads them back as one row
per run: the test split's scores when the runs have them, else (no test split) the validation split's,
its ``split`` column saying which.

``distill:`` keys (all optional; ``configs/experiment/distill_*.yaml`` are complete examples)::

    tasks: [modality, location]     # manifest columns; or {task: [class names]}; default all task_* columns
    losses: [vanilla, crd, {name: rkd, distance_weight: 25.0}]   # a name or {name, loss params...}
                                    # vanilla = kd; per loss also ce_weight / distill_weight (below)
    student_alone: true             # also train the student on the labels only
    student_label_fraction: 1.0     # in (0, 1]: the students see the labels of only this fraction of the
                                    # training cases (drawn per class with data.seed; logged as
                                    # data.n_train_labelled); the distillation term still covers every
                                    # training case, and the student alone trains on the labelled ones
    ce_weight: 1.0                  # weight of Σ_task CE(student, labels)
    distill_weight: 1.0             # weight of the distillation term
    monitor: val/mean_accuracy      # picks the best epoch (max)
    cache_dir: null                 # teacher outputs; default <data.cache_dir>/teacher_outputs
    batch_size: null                # default data.batch_size
    teacher:
      model_uri: null               # models:/... to reuse a registered teacher instead of training one
      allow_pickle: false           # true: also load a pickle-format teacher (unpickling runs its code)
      model: {image: {...}, text: {...}, fusion: cross_attention, ...}  # build spec, see
                                    # losslab.models.multimodal.build_multimodal_model
      epochs: null                  # default train.epochs
      lr: null                      # default optim.lr
      registered_model_name: losslab-distill-teacher
      alias: teacher
    student:
      model: {...}                  # same keys as teacher.model
      epochs: null                  # default train.epochs
      lr: null                      # default optim.lr
      registered_model_name: null   # register each student when set (and tracking.log_model)

The distillation term per loss (the loss library's classes; their own CE is switched off, the
pipeline adds ``ce_weight · Σ_t CE_t``):

* ``vanilla``/``kd``: ``Σ_t T² KL(σ(t_t/T) ‖ σ(s_t/T))`` (one ``KDLoss(alpha=1)`` per task);
* ``combined``: the same KD sum plus one FitNets hint on the fused features (``hint_weight``);
* ``crd``, ``rkd``, ``mmd``: one term on the fused features (student ``D_s``, teacher ``D_t``;
  projections are learned with the student); ``crd`` in ``memory_bank`` mode gets ``num_data``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn

from losslab.config import ExperimentConfig
from losslab.schema import DistillConfig, DistillRunConfig
from losslab.data.cache import CacheInfo
from losslab.data.text import check_distill_data
from losslab.engine.callbacks import Callback
from losslab.engine.loop import resolve_device
from losslab.losses.multitask import DISTILL_LOSSES, MultiTaskDistillation, labelled_subset
from losslab.pipelines.distill_tables import ROLE_ORDER, distillation_table
from losslab.pipelines.registry import load_registered_model
from losslab.pipelines.train import train_fold
from losslab.tasks import MultitaskStep
from losslab.tasks.multitask_data import (InputPrep, MultitaskData, case_loader, prepare_multitask_data,
                                          teacher_outputs)
from losslab.tracking import log_config, log_metrics_batch, log_table_artifacts, managed_run, setup_tracking

log = logging.getLogger(__name__)

__all__ = [
    "DISTILL_LOSSES",
    "DistillResult",
    "MultiTaskDistillation",
    "distillation_table",
    "run_distill",
    "teacher_outputs",
]

#: what a finished run's summary holds (kept on a resume)
SUMMARY_PREFIXES = ("best_", "test/", "latency/")


@dataclass
class DistillResult:
    parent_run_id: str
    teacher_run_id: str
    student_run_ids: dict[str, str]
    teacher_cache_key: str
    teacher_cache_reused: bool
    teacher_model_uri: str | None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def distill_section(cfg: ExperimentConfig) -> DistillConfig:
    """The ``distill:`` section as the schema validated it (its defaults when the config has none)."""
    section = cfg.distill
    return section if isinstance(section, DistillConfig) else DistillConfig.model_validate(section or {})


def run_config(cfg: ExperimentConfig, run: DistillRunConfig) -> ExperimentConfig:
    """The config of one child run, a ``train_fold`` run of the ``multitask`` task: ``distill.run`` says
    which; its epochs and learning rate are the teacher's or student's (default ``train.epochs``,
    ``optim.lr``), ``distill.monitor`` picks its best epoch; the teacher is always logged (and registered
    as ``distill.teacher.registered_model_name``), a student with ``tracking.log_model``."""
    from losslab.engine.monitor import default_mode

    s = distill_section(cfg)
    teacher = run.role == "teacher"
    part = s.teacher if teacher else s.student
    name = {"teacher": "teacher", "student": f"student-{run.loss}", "student_alone": "student-alone"}[run.role]
    tracking = {"run_name": name, "log_model": teacher or cfg.tracking.log_model,
                "registered_model_name": part.registered_model_name, "alias": s.teacher.alias if teacher else None}
    train = {"epochs": int(part.epochs or cfg.train.epochs), "monitor": s.monitor, "monitor_mode": default_mode(s.monitor)}
    return cfg.model_copy(update={
        "task": "multitask", "model": cfg.model.model_copy(update={"kind": "multimodal"}),
        "train": cfg.train.model_copy(update=train),
        "optim": cfg.optim.model_copy(update={"lr": float(part.lr or cfg.optim.lr)}),
        "tracking": cfg.tracking.model_copy(update=tracking), "distill": s.model_copy(update={"run": run})})


def run_tags(cfg: ExperimentConfig, role: str, loss: str) -> dict[str, str]:
    """The tags of a teacher or student run beside a train run's: its role in the distillation and its loss
    (``teacher``, a loss name, ``none``)."""
    return {"losslab.entry_point": "train", "losslab.task": "multitask", "losslab.role": role, "losslab.loss": loss,
            "losslab.dataset": cfg.data.source, "losslab.fold": str(cfg.data.fold), "losslab.seed": str(cfg.train.seed)}


class FittedModel(Callback):
    """The model a ``train_fold`` run fits (once it returns: the best epoch's evaluation weights, which
    ``train_fold`` loads back into it) and the best epoch."""

    model: nn.Module | None = None
    best_epoch: int = 0

    def setup(self, run: Any) -> None:
        self.model = getattr(run.model, "module", run.model)

    def on_fit_end(self, state: Any) -> None:
        self.best_epoch = int(state.best_epoch if state.best_epoch is not None else state.epoch)


def run_latency(model: nn.Module, step: MultitaskStep, val_loader, cfg: ExperimentConfig) -> dict[str, float]:
    """``latency/*`` of :func:`losslab.engine.latency.measure_latency` (the one ``evaluate`` reports),
    with the evaluate section's warm-up and repeats, at the distill batch size."""
    from losslab.engine.latency import measure_latency

    latency = cfg.evaluate.latency
    return measure_latency(model, val_loader.dataset, resolve_device(cfg.train.device), val_loader.batch_size,
                           latency.warmup, latency.repeats, step=step, collate=val_loader.collate_fn)


def _val_loader(cfg: ExperimentConfig, d: MultitaskData, model: nn.Module, preprocessing: dict | None = None):
    prep = InputPrep.of(model, d.preprocessing if preprocessing is None else preprocessing)
    return case_loader(cfg, prep.dataset(d.val_df, d.info.cache_dir, d.task_classes))


def _train_child(cfg: ExperimentConfig, d: MultitaskData, run: DistillRunConfig, label: str,
                 previous: "PreviousRuns", extra_tags: dict[str, str]) -> tuple[str, dict[str, float], Any, str | None]:
    """One child run trained by ``train_fold`` (continued from its last checkpoint when a resumed
    invocation left it unfinished), then timed on the validation cases. Returns ``(run id, summary,
    the fitted model, its registered version or None)``."""
    fitted = FittedModel()
    child_cfg = run_config(cfg, run)
    result = train_fold(child_cfg, d.info, cfg.data.fold, nested=True, resume_run_id=previous.unfinished_id(label),
                        extra_callbacks=[*previous.callbacks, fitted], set_alias=run.role == "teacher",
                        extra_tags=extra_tags | {"losslab.role": run.role, "losslab.loss": label,
                                                 "losslab.model": "multimodal"})
    latency = run_latency(fitted.model, MultitaskStep(d.task_classes), _val_loader(cfg, d, fitted.model), cfg)
    log_metrics_batch(result.run_id, latency, step=fitted.best_epoch)
    summary = {(f"best_{k}" if k.startswith("val/") else k): v for k, v in result.metrics.items()}
    return result.run_id, summary | {"best_epoch": float(fitted.best_epoch)} | latency, fitted.model, \
        result.model_version


def _run_student(cfg: ExperimentConfig, d: MultitaskData, run: DistillRunConfig, cache_tag: str,
                 previous: "PreviousRuns") -> tuple[str, str, dict]:
    """One student run (a distillation loss, or the student alone on the labelled cases only); on a
    resume a finished one is kept. Returns ``(label, run id, summary metrics)``."""
    label = run.loss if run.role == "student" else "none"
    done = previous.finished(label)
    if done is not None:
        return label, done.info.run_id, {k: v for k, v in done.data.metrics.items() if k.startswith(SUMMARY_PREFIXES)}
    run_id, summary, _, _ = _train_child(cfg, d, run, label, previous, {"losslab.teacher_cache": cache_tag})
    return label, run_id, summary


def _check_teacher_tasks(teacher: nn.Module, task_classes: dict[str, list[str]], uri: str) -> None:
    have = getattr(teacher, "task_classes", None)
    if have is None:
        raise TypeError(f"teacher {uri}: not a multimodal classifier (no task_classes); got {type(teacher).__name__}")
    for task, classes in task_classes.items():
        if task not in have:
            raise ValueError(f"teacher {uri} has no head for task {task!r} (its tasks: {list(have)})")
        if list(have[task]) != list(classes):
            raise ValueError(f"teacher {uri}: task {task!r} classes {have[task]} differ from the data's {classes}")


def _resolve_model_uri(uri: str) -> str:
    """``models:/name@alias`` or ``models:/name/version`` -> a stable ``name/version/run_id`` origin."""
    from losslab.pipelines.scoring import model_version

    if not uri.startswith("models:/"):
        return uri
    mv = model_version(uri)
    return f"models:/{mv.name}/{mv.version} (run {mv.run_id})"


def _score(model: nn.Module, step: MultitaskStep, loader, device, prefix: str) -> dict[str, float]:
    return {f"{prefix}/" + k.split("/", 1)[1]: v for k, v in step.metrics(step.predict(model, loader, device), []).items()}


def _teacher_from_registry(cfg: ExperimentConfig, d: MultitaskData, all_metrics: dict):
    """A registered teacher (``distill.teacher.model_uri``), checked against the data's tasks and scored in
    a run of its own on the validation split and the held-out test split (it is not trained)."""
    t = distill_section(cfg).teacher
    uri = str(t.model_uri)
    with managed_run(run_name="teacher", tags=run_tags(cfg, "teacher", "teacher"), nested=True) as run:
        origin = _resolve_model_uri(uri)
        mlflow.set_tag("losslab.teacher_uri", origin)
        teacher = load_registered_model(uri, allow_pickle=t.allow_pickle).model
        _check_teacher_tasks(teacher, d.task_classes, uri)
        prep = InputPrep.of(teacher, getattr(teacher, "preprocessing", d.preprocessing))
        step, val_loader = MultitaskStep(d.task_classes), _val_loader(cfg, d, teacher, prep.preprocessing)
        teacher.to(d.device)
        summary = _score(teacher, step, val_loader, d.device, "best_val") | {"best_epoch": -1.0}
        if len(d.test_df):
            test_loader = case_loader(cfg, prep.dataset(d.test_df, d.info.cache_dir, d.task_classes))
            summary |= _score(teacher, step, test_loader, d.device, "test")
        log_metrics_batch(run.info.run_id, {"val/" + k[len("best_val/"):]: v for k, v in summary.items()
                                            if k.startswith("best_val/")}, step=0)
        summary |= run_latency(teacher, step, val_loader, cfg)
        log_metrics_batch(run.info.run_id, summary, step=0)
    all_metrics["teacher"] = summary
    return teacher, run.info.run_id, uri, origin


def _finished_teacher(done, d: MultitaskData, all_metrics: dict):
    """A teacher run that finished before the resume: its registered model and its logged summary."""
    uri = done.data.tags.get("losslab.teacher_uri")
    if not uri:
        raise ValueError(f"teacher run {done.info.run_id} finished without a registered teacher "
                         f"(losslab.teacher_uri); start a new distill run")
    teacher = load_registered_model(uri).model
    _check_teacher_tasks(teacher, d.task_classes, uri)
    all_metrics["teacher"] = {k: v for k, v in done.data.metrics.items() if k.startswith(SUMMARY_PREFIXES)}
    origin = done.data.tags.get("losslab.teacher_origin") or f"{uri} (run {done.info.run_id})"
    return teacher, done.info.run_id, uri, origin


def run_teacher(cfg: ExperimentConfig, d: MultitaskData, all_metrics: dict, previous: "PreviousRuns"):
    """The teacher run: registered (``distill.teacher.model_uri``) or trained here as a ``train_fold`` run
    and registered; on a resume, a finished teacher run is reused and an unfinished one continues from its
    last checkpoint. Returns ``(teacher, its run id, its registry uri or None, the origin string for the
    output cache)``."""
    t = distill_section(cfg).teacher
    if previous.finished("teacher") is not None:
        return _finished_teacher(previous.finished("teacher"), d, all_metrics)
    if t.model_uri:
        return _teacher_from_registry(cfg, d, all_metrics)
    run_id, all_metrics["teacher"], teacher, version = _train_child(cfg, d, DistillRunConfig(role="teacher"),
                                                                    "teacher", previous, {})
    uri = f"models:/{t.registered_model_name}/{version}" if version is not None else None
    origin = f"{uri} (run {run_id})" if uri else f"run {run_id}"
    if uri:
        client = mlflow.tracking.MlflowClient()
        client.set_tag(run_id, "losslab.teacher_uri", uri)
        client.set_tag(run_id, "losslab.teacher_origin", origin)
    return teacher, run_id, uri, origin


def _teacher_outputs_file(cfg: ExperimentConfig, teacher: nn.Module, d: MultitaskData, origin: str) -> tuple[Path, str]:
    """The teacher's outputs on every case, computed once per teacher and data (or reused), tagged on the
    parent. Returns ``(their file, 'reused'|'computed')``."""
    s = distill_section(cfg)
    cache_dir = Path(s.cache_dir or Path(d.info.cache_dir) / "teacher_outputs")
    _, path, reused = teacher_outputs(cfg, teacher, d, cache_dir, origin, MultitaskStep(d.task_classes))
    cache_tag = "reused" if reused else "computed"
    mlflow.set_tags({"losslab.teacher_cache": cache_tag, "losslab.teacher_cache_key": path.stem})
    teacher.cpu()
    return path, cache_tag


@dataclass
class PreviousRuns:
    """The child runs of a resumed distill parent, by label (``teacher``, a loss name, ``none``), and
    extra engine callbacks (tests)."""

    runs: dict[str, Any] = field(default_factory=dict)
    callbacks: list = field(default_factory=list)

    def finished(self, label: str):
        run = self.runs.get(label)
        return run if run is not None and run.info.status == "FINISHED" else None

    def unfinished_id(self, label: str) -> str | None:
        run = self.runs.get(label)
        return run.info.run_id if run is not None and run.info.status != "FINISHED" else None


def previous_runs(parent_id: str) -> dict[str, Any]:
    """The child runs of the distill parent ``parent_id`` by label (the latest run of a label wins)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_id)
    if parent.data.tags.get("losslab.distill_parent") != "true":
        raise ValueError(f"--resume {parent_id}: not a distill run (resume the distill parent run)")
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  max_results=1000)
    out: dict[str, Any] = {}
    for run in sorted(children, key=lambda r: r.info.start_time):
        role = run.data.tags.get("losslab.role")
        if role in ROLE_ORDER:
            out["teacher" if role == "teacher" else run.data.tags.get("losslab.loss", "")] = run
    return out


def run_distill(cfg: ExperimentConfig, info: CacheInfo | None = None, resume_run_id: str | None = None,
                extra_callbacks: list | None = None) -> DistillResult:
    """Teacher (trained or from the registry), teacher-output cache, one student per loss, student alone.

    ``resume_run_id``: a distill parent run that was stopped or killed (same config): its finished
    teacher and students are kept, an unfinished one continues from its last checkpoint (and ends with
    the metrics of an uninterrupted run), the missing ones run. ``extra_callbacks`` go to every fit."""
    check_distill_data(cfg)  # as when the config loaded: a config built in code skips that
    s = distill_section(cfg)
    setup_tracking(cfg.tracking)
    previous = PreviousRuns(previous_runs(resume_run_id) if resume_run_id else {}, list(extra_callbacks or []))
    d = prepare_multitask_data(cfg, info)
    nested = mlflow.active_run() is not None
    with managed_run(run_name=cfg.tracking.run_name or "distill",
                     tags={"losslab.entry_point": "distill", "losslab.distill_parent": "true",
                           "losslab.dataset": cfg.data.source}, nested=nested, run_id=resume_run_id) as parent:
        parent_id = parent.info.run_id
        if resume_run_id is None:
            labelled = labelled_subset(d.train_df["label"], s.student_label_fraction, cfg.data.seed)
            log_config(cfg)
            mlflow.log_params({"distill.task_classes": json.dumps(d.task_classes), "data.n_train": len(d.train_df),
                               "data.n_val": len(d.val_df), "data.n_test": len(d.test_df),
                               "data.n_train_labelled": int(labelled.sum())})
        all_metrics: dict[str, dict[str, float]] = {}
        teacher, teacher_run, teacher_uri, origin = run_teacher(cfg, d, all_metrics, previous)
        outputs, cache_tag = _teacher_outputs_file(cfg, teacher, d, origin)
        plan = [DistillRunConfig(role="student", loss=name) for name, _ in s.loss_specs()]
        plan += [DistillRunConfig(role="student_alone")] if s.student_alone else []
        runs: dict[str, str] = {}
        for run in plan:
            run = run.model_copy(update={"teacher_outputs": str(outputs), "teacher_uri": teacher_uri})
            label, run_id, summary = _run_student(cfg, d, run, cache_tag, previous)
            runs[label], all_metrics[label] = run_id, summary
        log_table_artifacts(distillation_table(cfg.tracking.experiment, parent_run_id=parent_id), "distillation_table")
    return DistillResult(parent_id, teacher_run, runs, outputs.stem, cache_tag == "reused", teacher_uri, all_metrics)
