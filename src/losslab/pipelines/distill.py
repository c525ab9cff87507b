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

The teacher's outputs (per-task logits and the fused feature) are computed once for every case of the
cache and stored in ``<distill.cache_dir>/<key>.npz``; the key hashes the teacher's weights and origin,
its preprocessing and the data fingerprint, so a second run with the same teacher and data reuses
the file (the parent and student runs carry the tag ``losslab.teacher_cache`` = ``reused`` or
``computed``).

The teacher and every student train through the engine's :func:`losslab.engine.loop.fit` with the
``multitask`` task (:class:`losslab.tasks.MultitaskTask`): ``train.*`` works as in ``losslab train``
(bf16 autocast on CUDA, clipping, EMA, SWA, early stopping, the alarms, atomic ``best``/``last``
checkpoints in ``<train.checkpoint_dir>/<run id>`` uploaded to the run's ``checkpoints/``); the
objectives are :mod:`losslab.losses.multitask`. Every run logs per epoch ``train/loss``,
``train/loss_<term>`` (``ce/<task>``, ``kd/<task>``, ``hint``, ``crd``, ...), ``train/lr``,
``val/loss`` (Σ_t cross-entropy), ``val/<task>/{accuracy,f1_macro,auc,balanced_accuracy}``,
``val/mean_{accuracy,f1_macro,balanced_accuracy}``; at the end the best epoch's (by
``distill.monitor``) weights are scored again as ``best_val/<task>/…`` with ``best_epoch`` and the
latency ``evaluate`` reports (``latency/p50_ms``, ``latency/p95_ms``, ``latency/throughput_per_s``:
:func:`losslab.engine.latency.measure_latency`, warm-up and repeats from ``evaluate.latency``).
:func:`distillation_table` reads them back as one row per run.

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

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from losslab.config import ExperimentConfig, section_dict
from losslab.data.cache import CacheInfo
from losslab.data.text import ImageTextDataset, check_distill_data, collate_image_text
from losslab.engine.loop import resolve_device, seed_everything
from losslab.losses.multitask import DISTILL_LOSSES, LabelsOnly, MultiTaskDistillation, labelled_subset
from losslab.pipelines.distill_data import DistillData, distill_loaders, prepare_distill_data
from losslab.pipelines.registry import load_registered_model
from losslab.tasks import MultitaskTask
from losslab.tracking import log_and_register_model, log_config, log_metrics_batch, managed_run, setup_tracking

log = logging.getLogger(__name__)

__all__ = [
    "DISTILL_LOSSES",
    "DistillResult",
    "MultiTaskDistillation",
    "distillation_table",
    "run_distill",
    "teacher_outputs",
]

_DEFAULT_TEACHER = {"fusion": "cross_attention", "fusion_dim": 64, "fusion_layers": 2,
                    "image": {"backbone": "vit_tiny_patch16_224", "kwargs": {"img_size": 64, "patch_size": 8}},
                    "text": {"name": "small_transformer", "dim": 64, "depth": 2, "max_length": 32}}
_DEFAULT_STUDENT = {"fusion": "cross_attention", "fusion_dim": 32, "fusion_layers": 1,
                    "image": {"backbone": "test_vit", "kwargs": {"img_size": 64, "patch_size": 8}},
                    "text": {"name": "small_transformer", "dim": 32, "depth": 1, "max_length": 32}}


# ------------------------------------------------------------------------------------ settings
@dataclass
class _Settings:
    tasks: Any
    losses: list[tuple[str, dict[str, Any]]]
    student_alone: bool
    student_label_fraction: float
    ce_weight: float
    distill_weight: float
    monitor: str
    cache_dir: Path
    batch_size: int
    teacher: dict[str, Any]
    student: dict[str, Any]


_TOP_KEYS = {"tasks", "losses", "student_alone", "student_label_fraction", "ce_weight", "distill_weight", "monitor", "cache_dir", "batch_size",
             "teacher", "student"}
_TEACHER_KEYS = {"model_uri", "allow_pickle", "model", "epochs", "lr", "registered_model_name", "alias"}
_STUDENT_KEYS = {"model", "epochs", "lr", "registered_model_name"}


def _settings(cfg: ExperimentConfig) -> _Settings:
    d = section_dict(cfg.distill)  # the keys the config set (typed by losslab.config.DistillConfig)
    if cfg.train.mixup_alpha:
        raise ValueError(f"train.mixup_alpha={cfg.train.mixup_alpha}: mixup mixes one label per case and cannot mix "
                         f"the per-task labels and teacher outputs of distill; set it to 0")
    unknown = sorted(set(d) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"distill: unknown key(s) {unknown}; accepted: {', '.join(sorted(_TOP_KEYS))}")
    teacher, student = dict(d.get("teacher") or {}), dict(d.get("student") or {})
    for section, keys, value in (("teacher", _TEACHER_KEYS, teacher), ("student", _STUDENT_KEYS, student)):
        bad = sorted(set(value) - keys)
        if bad:
            raise ValueError(f"distill.{section}: unknown key(s) {bad}; accepted: {', '.join(sorted(keys))}")
    losses = []
    for entry in d.get("losses", ["vanilla"]) or []:
        spec = {"name": entry} if isinstance(entry, str) else dict(entry)
        if "name" not in spec:
            raise ValueError(f"distill.losses: entry {entry!r} has no name")
        name = str(spec.pop("name"))
        if name not in DISTILL_LOSSES:
            raise ValueError(f"distill.losses: unknown loss {name!r}; expected one of {', '.join(DISTILL_LOSSES)}")
        losses.append((name, spec))
    cache_dir = Path(d.get("cache_dir") or Path(cfg.data.cache_dir) / "teacher_outputs")
    fraction = d.get("student_label_fraction", 1.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"distill.student_label_fraction must be a number in (0, 1], got {fraction!r}")
    return _Settings(tasks=d.get("tasks"), losses=losses, student_alone=bool(d.get("student_alone", True)),
                     student_label_fraction=float(fraction),
                     ce_weight=float(d.get("ce_weight", 1.0)), distill_weight=float(d.get("distill_weight", 1.0)),
                     monitor=str(d.get("monitor", "val/mean_accuracy")), cache_dir=cache_dir,
                     batch_size=int(d.get("batch_size") or cfg.data.batch_size), teacher=teacher, student=student)


# ------------------------------------------------------------------------------------ training
@dataclass
class _Fitted:
    best_metrics: dict[str, float]
    best_epoch: int


def _fit(cfg: ExperimentConfig, model: nn.Module, objective: nn.Module, step: MultitaskTask, loaders: tuple,
         epochs: int, lr: float, monitor: str, run_id: str, resume: bool = False,
         extra_callbacks: list | None = None) -> _Fitted:
    """Train through the engine's :func:`losslab.engine.loop.fit` (AMP, clipping, EMA, SWA, the frozen
    phase, checkpoints in ``<train.checkpoint_dir>/<run id>`` uploaded to the run, early stopping,
    alarms, per-epoch metrics logged to ``run_id``), the best epoch by ``monitor`` (its mode by name:
    ``val/loss`` lower, else higher); then load the best epoch's validated weights (EMA/SWA when on)
    back into ``model`` and score them on the validation split. ``resume``: continue the run from its
    ``last.pt`` (a run that was stopped or killed)."""
    from losslab.engine.callbacks import ReseedEachEpoch
    from losslab.engine.loop import evaluation_weights, fit, load_checkpoint
    from losslab.engine.monitor import default_mode
    from losslab.pipelines.train import resume_checkpoint
    from losslab.tracking import MLflowCallback

    train_loader, val_loader = loaders
    train_cfg = cfg.train.model_copy(update={
        "epochs": epochs, "monitor": monitor, "monitor_mode": default_mode(monitor),
        "checkpoint_dir": str(Path(cfg.train.checkpoint_dir) / run_id)})
    tracker = MLflowCallback(run_id, [], plot_every=cfg.train.plot_every, synchronous=False,
                             checkpoint_every=cfg.train.upload_checkpoint_every, per_class_plots=False)
    # the run's last.pt, local or downloaded from its artifacts (as `train --resume`)
    resume_from = resume_checkpoint(cfg, run_id) if resume else None
    reseed = ReseedEachEpoch(train_loader, cfg.train.seed)  # the loader shuffles with its own generator
    state = fit(model, objective, train_loader, val_loader, train_cfg, cfg.optim.model_copy(update={"lr": lr}), [],
                callbacks=[reseed, tracker, *(extra_callbacks or [])], resume_from=resume_from, step=step)
    model.load_state_dict(evaluation_weights(load_checkpoint(Path(train_cfg.checkpoint_dir) / "best.pt")))
    tracker.remove_uploaded_checkpoints()  # the run's checkpoints/ artifacts are the copies that stay
    scored = step.metrics(step.predict(model, val_loader, resolve_device(cfg.train.device)), [])
    return _Fitted(scored, state.best_epoch)


def _latency(model: nn.Module, step: MultitaskTask, val_loader, cfg: ExperimentConfig) -> dict[str, float]:
    """``latency/*`` of :func:`losslab.engine.latency.measure_latency` (the one ``evaluate`` reports),
    with the evaluate section's warm-up and repeats, at the distill batch size."""
    from losslab.engine.latency import measure_latency

    latency = cfg.evaluate.latency
    return measure_latency(model, val_loader.dataset, resolve_device(cfg.train.device), val_loader.batch_size,
                           latency.warmup, latency.repeats, step=step)


# ------------------------------------------------------------------------------------ teacher cache
def weights_hash(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def teacher_outputs(teacher: nn.Module, info: CacheInfo, index: pd.DataFrame, task_classes: dict[str, list[str]],
                    cache_dir: Path, origin: str, batch_size: int, device: torch.device) -> tuple[dict[str, np.ndarray], str, bool]:
    """The teacher's logits and fused features for every row of ``index``, from the cache file if present.

    Returns ``(arrays, key, reused)``: ``arrays`` has ``case_id (N,)``, ``logits/<task> (N, K)`` and
    ``features (N, D_t)`` in ``index`` order; ``key`` names the file ``<cache_dir>/<key>.npz``.
    """
    preprocessing = getattr(teacher, "preprocessing", {})
    fingerprint = {"weights": weights_hash(teacher), "origin": origin, "data": info.fingerprint,
                   "cases": hashlib.sha256("\n".join(index["case_id"]).encode()).hexdigest(),
                   "tasks": task_classes, "preprocessing": preprocessing, "max_length": teacher.max_length}
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        if list(arrays["case_id"]) == list(index["case_id"]):
            return arrays, key, True
        log.warning("teacher cache %s does not match the cases; recomputing", path)
    tokenizer = teacher.tokenizer if teacher.text_encoder is not None else None
    dataset = ImageTextDataset(index, info.cache_dir, task_classes, tokenizer, teacher.max_length,
                               preprocessing.get("image_mean"), preprocessing.get("image_std"))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_image_text)
    outputs = MultitaskTask(task_classes).predict(teacher.to(device), loader, device)
    arrays = {"case_id": np.asarray(index["case_id"].tolist()), "features": outputs["features"].astype(np.float32)}
    arrays.update({f"logits/{t}": v.astype(np.float32) for t, v in outputs["logits"].items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    (path.with_suffix(".json")).write_text(json.dumps(fingerprint, indent=2, sort_keys=True, default=str))
    return arrays, key, False


# ------------------------------------------------------------------------------------ the pipeline
@dataclass
class DistillResult:
    parent_run_id: str
    teacher_run_id: str
    student_run_ids: dict[str, str]
    teacher_cache_key: str
    teacher_cache_reused: bool
    teacher_model_uri: str | None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def _tags(cfg: ExperimentConfig, role: str, loss: str) -> dict[str, str]:
    return {"losslab.entry_point": "distill", "losslab.role": role, "losslab.loss": loss,
            "losslab.dataset": cfg.data.source, "losslab.fold": str(cfg.data.fold)}


def _summary(fitted_metrics: dict[str, float], best_epoch: int, latency: dict[str, float]) -> dict[str, float]:
    out = {k.replace("val/", "best_val/", 1): v for k, v in fitted_metrics.items()}
    out["best_epoch"] = float(best_epoch)
    return out | latency


def _log_model(model: nn.Module, registered_model_name: str | None, alias: str | None,
               version_tags: dict[str, str], in_chans: int) -> str | None:
    """Log ``model`` in the ``losslab`` flavor (safetensors weights + spec; loaded back by
    :func:`losslab.pipelines.registry.load_registered_model`) and register it; return
    ``models:/name/version`` or None."""
    from losslab.models.export import multimodal_spec

    mv = log_and_register_model(model, None, registered_model_name, alias, version_tags,
                                spec=multimodal_spec(model, in_chans))
    return f"models:/{registered_model_name}/{mv.version}" if mv is not None else None


def _resolve_model_uri(uri: str) -> str:
    """``models:/name@alias`` or ``models:/name/version`` -> a stable ``name/version/run_id`` origin."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("models:/"):
        return uri
    client = MlflowClient()
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, version = rest.rsplit("/", 1)
        mv = client.get_model_version(name, version)
    return f"models:/{mv.name}/{mv.version} (run {mv.run_id})"


def _check_teacher_tasks(teacher: nn.Module, task_classes: dict[str, list[str]], uri: str) -> None:
    have = getattr(teacher, "task_classes", None)
    if have is None:
        raise TypeError(f"teacher {uri}: not a multimodal classifier (no task_classes); got {type(teacher).__name__}")
    for task, classes in task_classes.items():
        if task not in have:
            raise ValueError(f"teacher {uri} has no head for task {task!r} (its tasks: {list(have)})")
        if list(have[task]) != list(classes):
            raise ValueError(f"teacher {uri}: task {task!r} classes {have[task]} differ from the data's {classes}")


def _teacher_from_registry(uri: str, allow_pickle: bool, d: DistillData, s: _Settings, cfg: ExperimentConfig,
                           run_id: str):
    """A registered teacher, checked against the data's tasks and scored on the validation split."""
    origin = _resolve_model_uri(uri)
    mlflow.set_tag("losslab.teacher_uri", origin)
    teacher = load_registered_model(uri, allow_pickle=allow_pickle).model
    _check_teacher_tasks(teacher, d.task_classes, uri)
    teacher_prep = getattr(teacher, "preprocessing", d.preprocessing)
    _, val_loader = distill_loaders(cfg, teacher, d, d.train_df, s.batch_size, teacher_prep)
    step = MultitaskTask(d.task_classes)
    fitted = _Fitted(step.metrics(step.predict(teacher.to(d.device), val_loader, d.device), []), -1)
    log_metrics_batch(run_id, fitted.best_metrics, step=0)
    return teacher, fitted, val_loader, origin


@dataclass
class _Previous:
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


def _previous_runs(parent_id: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_id)
    if parent.data.tags.get("losslab.distill_parent") != "true":
        raise ValueError(f"--resume {parent_id}: not a distill run (resume the distill parent run)")
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  max_results=1000)
    out: dict[str, Any] = {}
    for run in sorted(children, key=lambda r: r.info.start_time):  # the latest run of a label wins
        role = run.data.tags.get("losslab.role")
        if role in _ROLE_ORDER:
            out["teacher" if role == "teacher" else run.data.tags.get("losslab.loss", "")] = run
    return out


def _finished_teacher(done, d: DistillData, all_metrics: dict):
    """A teacher run that finished before the resume: its registered model and its logged summary."""
    uri = done.data.tags.get("losslab.teacher_uri")
    if not uri:
        raise ValueError(f"teacher run {done.info.run_id} finished without a registered teacher "
                         f"(losslab.teacher_uri); start a new distill run")
    teacher = load_registered_model(uri).model
    _check_teacher_tasks(teacher, d.task_classes, uri)
    all_metrics["teacher"] = {k: v for k, v in done.data.metrics.items() if k.startswith(("best_", "latency/"))}
    origin = done.data.tags.get("losslab.teacher_origin") or f"{uri} (run {done.info.run_id})"
    return teacher, done.info.run_id, uri, origin


def _run_teacher(cfg: ExperimentConfig, s: _Settings, d: DistillData, all_metrics: dict,
                 previous: _Previous | None = None):
    """The teacher run: registered (``distill.teacher.model_uri``) or trained and registered here; on a
    resume, a finished teacher run is reused and an unfinished one continues from its last checkpoint.
    Returns ``(teacher, its run id, its registry uri or None, the origin string for the output cache)``."""
    from losslab.models.multimodal import build_multimodal_model

    t, previous = s.teacher, previous or _Previous()
    if previous.finished("teacher") is not None:
        return _finished_teacher(previous.finished("teacher"), d, all_metrics)
    resume_id = previous.unfinished_id("teacher")
    with managed_run(run_name="teacher", tags=_tags(cfg, "teacher", "teacher"), nested=True, run_id=resume_id) as run:
        teacher_run = run.info.run_id
        if t.get("model_uri"):
            teacher_uri = str(t["model_uri"])
            teacher, fitted, val_loader, origin = _teacher_from_registry(
                teacher_uri, bool(t.get("allow_pickle", False)), d, s, cfg, teacher_run)
        else:
            seed_everything(cfg.train.seed, cfg.train.deterministic)
            spec = t.get("model") or _DEFAULT_TEACHER
            teacher = build_multimodal_model(spec, d.task_classes, texts=d.texts, in_chans=d.in_chans)
            teacher.preprocessing = d.preprocessing
            train_loader, val_loader = distill_loaders(cfg, teacher, d, d.train_df, s.batch_size)
            epochs, lr = int(t.get("epochs") or cfg.train.epochs), float(t.get("lr") or cfg.optim.lr)
            mlflow.log_params({"model.spec": json.dumps(spec)[:6000], "epochs": epochs, "lr": lr})
            fitted = _fit(cfg, teacher, LabelsOnly(d.tasks), MultitaskTask(d.task_classes), (train_loader, val_loader),
                          epochs, lr, s.monitor, teacher_run, resume_id is not None, previous.callbacks)
            teacher_uri = None
        latency = _latency(teacher, MultitaskTask(d.task_classes), val_loader, cfg)
        summary = _summary(fitted.best_metrics, fitted.best_epoch, latency)
        log_metrics_batch(teacher_run, summary, step=max(fitted.best_epoch, 0))
        all_metrics["teacher"] = summary
        if not t.get("model_uri"):
            teacher_uri = _log_model(teacher, t.get("registered_model_name", "losslab-distill-teacher"),
                                     t.get("alias", "teacher"),
                                     {"role": "teacher", "run_id": teacher_run, "tasks": ",".join(d.tasks)}, d.in_chans)
            origin = f"{teacher_uri} (run {teacher_run})" if teacher_uri else f"run {teacher_run}"
            if teacher_uri:
                mlflow.set_tags({"losslab.teacher_uri": teacher_uri, "losslab.teacher_origin": origin})
    return teacher, teacher_run, teacher_uri, origin


def _teacher_train_outputs(teacher, d: DistillData, s: _Settings, origin: str):
    """The teacher's outputs on every case, computed once per teacher and data (or reused), then
    the training rows as tensors. Returns ``(outputs, cache key, 'reused'|'computed')``."""
    full_index = d.info.index.reset_index(drop=True)  # every case (test fold included)
    arrays, key, reused = teacher_outputs(teacher, d.info, full_index, d.task_classes, s.cache_dir, origin,
                                          s.batch_size, d.device)
    cache_tag = "reused" if reused else "computed"
    mlflow.set_tags({"losslab.teacher_cache": cache_tag, "losslab.teacher_cache_key": key})
    position = {cid: i for i, cid in enumerate(arrays["case_id"])}
    rows = np.asarray([position[c] for c in d.train_df["case_id"]])
    teacher.cpu()
    return {k: torch.as_tensor(v[rows]) for k, v in arrays.items() if k != "case_id"}, key, cache_tag


def _run_student(cfg: ExperimentConfig, s: _Settings, d: DistillData, plan_item: tuple, teacher_train: dict,
                 labelled: np.ndarray, teacher_uri: str | None, key: str, cache_tag: str,
                 previous: _Previous | None = None) -> tuple[str, str, dict]:
    """One student run (a distillation loss, or the student alone on the labelled cases only); on a
    resume a finished one is kept and an unfinished one continues from its last checkpoint.
    Returns ``(label, run id, summary metrics)``."""
    from losslab.models.multimodal import build_multimodal_model

    name, params, role = plan_item
    st = s.student
    student_spec = st.get("model") or _DEFAULT_STUDENT
    epochs, lr = int(st.get("epochs") or cfg.train.epochs), float(st.get("lr") or cfg.optim.lr)
    params = dict(params)
    ce_weight = float(params.pop("ce_weight", s.ce_weight))
    distill_weight = float(params.pop("distill_weight", s.distill_weight))
    distilling = role == "student"
    label = name if distilling else "none"
    previous = previous or _Previous()
    done = previous.finished(label)
    if done is not None:
        return label, done.info.run_id, {k: v for k, v in done.data.metrics.items() if k.startswith(("best_", "latency/"))}
    resume_id = previous.unfinished_id(label)
    with managed_run(run_name=f"student-{name}" if distilling else "student-alone",
                     tags=_tags(cfg, role, label) | {"losslab.teacher_cache": cache_tag}, nested=True,
                     run_id=resume_id) as run:
        run_id = run.info.run_id
        seed_everything(cfg.train.seed, cfg.train.deterministic)  # same init and order for every student
        student = build_multimodal_model(student_spec, d.task_classes, texts=d.texts, in_chans=d.in_chans)
        student.preprocessing = d.preprocessing
        cases = d.train_df if distilling else d.train_df[labelled].reset_index(drop=True)
        train_loader, val_loader = distill_loaders(cfg, student, d, cases, s.batch_size)
        if distilling:
            objective = MultiTaskDistillation(name, params, d.tasks, student.feature_dim,
                                              int(teacher_train["features"].shape[1]), num_data=len(d.train_df),
                                              ce_weight=ce_weight, distill_weight=distill_weight)
        else:
            objective = LabelsOnly(d.tasks, ce_weight=1.0)
        mlflow.log_params({"model.spec": json.dumps(student_spec)[:6000], "epochs": epochs,
                           "lr": lr, "loss.params": json.dumps(params)[:6000],
                           "ce_weight": ce_weight if distilling else 1.0,
                           "distill_weight": distill_weight if distilling else 0.0,
                           "teacher_uri": teacher_uri or "", "teacher_cache_key": key,
                           "student_label_fraction": s.student_label_fraction, "data.n_train_cases": len(cases)})
        step = MultitaskTask(d.task_classes, teacher_train if distilling else None,
                             torch.as_tensor(labelled) if distilling and not labelled.all() else None)
        fitted = _fit(cfg, student, objective, step, (train_loader, val_loader), epochs, lr, s.monitor, run_id,
                      resume_id is not None, previous.callbacks)
        summary = _summary(fitted.best_metrics, fitted.best_epoch, _latency(student, step, val_loader, cfg))
        log_metrics_batch(run_id, summary, step=fitted.best_epoch)
        if cfg.tracking.log_model:
            _log_model(student, st.get("registered_model_name"), None,
                       {"role": role, "loss": label, "run_id": run_id}, d.in_chans)
    return label, run_id, summary


def run_distill(cfg: ExperimentConfig, info: CacheInfo | None = None, resume_run_id: str | None = None,
                extra_callbacks: list | None = None) -> DistillResult:
    """Teacher (trained or from the registry), teacher-output cache, one student per loss, student alone.

    ``resume_run_id``: a distill parent run that was stopped or killed (same config): its finished
    teacher and students are kept, an unfinished one continues from its last checkpoint (and ends with
    the metrics of an uninterrupted run), the missing ones run. ``extra_callbacks`` go to every fit."""
    check_distill_data(cfg)  # as when the config loaded: a config built in code skips that
    s = _settings(cfg)
    setup_tracking(cfg.tracking)
    previous = _Previous(_previous_runs(resume_run_id) if resume_run_id else {}, list(extra_callbacks or []))
    d = prepare_distill_data(cfg, s.tasks, info)
    nested = mlflow.active_run() is not None
    with managed_run(run_name=cfg.tracking.run_name or "distill",
                     tags={"losslab.entry_point": "distill", "losslab.distill_parent": "true",
                           "losslab.dataset": cfg.data.source}, nested=nested, run_id=resume_run_id) as parent:
        parent_id = parent.info.run_id
        labelled = labelled_subset(d.train_df["label"], s.student_label_fraction, cfg.data.seed)
        if resume_run_id is None:
            log_config(cfg)
            mlflow.log_params({"distill.task_classes": json.dumps(d.task_classes), "data.n_train": len(d.train_df),
                               "data.n_val": len(d.val_df), "data.n_train_labelled": int(labelled.sum())})
        all_metrics: dict[str, dict[str, float]] = {}
        teacher, teacher_run, teacher_uri, origin = _run_teacher(cfg, s, d, all_metrics, previous)
        teacher_train, key, cache_tag = _teacher_train_outputs(teacher, d, s, origin)
        plan = [(name, params, "student") for name, params in s.losses]
        if s.student_alone:
            plan.append(("none", {}, "student_alone"))
        runs: dict[str, str] = {}
        for item in plan:
            label, run_id, summary = _run_student(cfg, s, d, item, teacher_train, labelled, teacher_uri, key,
                                                  cache_tag, previous)
            runs[label], all_metrics[label] = run_id, summary
        from losslab.tracking import log_table_artifacts

        log_table_artifacts(distillation_table(cfg.tracking.experiment, parent_run_id=parent_id), "distillation_table")
    return DistillResult(parent_id, teacher_run, runs, key, cache_tag == "reused", teacher_uri, all_metrics)


# ------------------------------------------------------------------------------------ reading back
_ROLE_ORDER = {"teacher": 0, "student": 1, "student_alone": 2}


def distillation_table(experiment_name: str, parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per run of a distill invocation: the teacher, each student loss, the student alone.

    Columns: ``loss`` (``teacher``, the loss name, ``none``), ``role``, then per task
    ``<task>/accuracy``, ``<task>/f1_macro``, ``<task>/auc`` (the runs' ``best_val/<task>/…``
    metrics), ``latency/p50_ms`` and ``run_id``. Rows: teacher first, then the students in
    run order, then the student alone.

    Args:
        experiment_name: the MLflow experiment (``tracking.experiment``).
        parent_run_id: the ``distill`` parent run; default the most recent one in the experiment.

    Raises:
        ValueError: no such experiment, or no distill run in it.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"no MLflow experiment named {experiment_name!r}")
    if parent_run_id is None:
        parents = client.search_runs([experiment.experiment_id],
                                     "tags.`losslab.distill_parent` = 'true'", order_by=["attributes.start_time DESC"],
                                     max_results=1)
        if not parents:
            raise ValueError(f"experiment {experiment_name!r} has no distill run")
        parent_run_id = parents[0].info.run_id
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  order_by=["attributes.start_time ASC"], max_results=1000)
    children = [r for r in children if r.data.tags.get("losslab.role") in _ROLE_ORDER]
    children.sort(key=lambda r: (_ROLE_ORDER[r.data.tags["losslab.role"]], r.info.start_time))
    tasks: list[str] = []
    for r in children:
        for k in r.data.metrics:
            if k.startswith("best_val/") and k.endswith("/accuracy") and k.count("/") == 2:
                task = k.split("/")[1]
                if task not in tasks:
                    tasks.append(task)
    rows = []
    for r in children:
        row: dict[str, Any] = {"loss": r.data.tags.get("losslab.loss", ""), "role": r.data.tags["losslab.role"]}
        for task in tasks:
            for key in ("accuracy", "f1_macro", "auc"):
                row[f"{task}/{key}"] = r.data.metrics.get(f"best_val/{task}/{key}", float("nan"))
        row["latency/p50_ms"] = r.data.metrics.get("latency/p50_ms", float("nan"))
        row["run_id"] = r.info.run_id
        rows.append(row)
    columns = ["loss", "role"] + [f"{t}/{k}" for t in tasks for k in ("accuracy", "f1_macro", "auc")] \
        + ["latency/p50_ms", "run_id"]
    return pd.DataFrame(rows, columns=columns)
