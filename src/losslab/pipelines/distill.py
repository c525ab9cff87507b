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

Every run logs per epoch ``train/loss``, ``train/<term>``, ``val/loss``, ``val/<task>/accuracy``,
``val/<task>/f1_macro``, ``val/<task>/auc``, ``val/<task>/balanced_accuracy``, ``val/mean_accuracy``,
``val/mean_f1_macro``; at the end the best epoch's (by ``distill.monitor``) ``best_val/<task>/…``,
``best_epoch`` and ``latency_ms_per_sample`` (model forward on the validation set, batch
``data.batch_size``, after one warm-up batch). :func:`distillation_table` reads them back as one
row per run.

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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from losslab.config import ExperimentConfig, section_dict
from losslab.data.cache import CacheInfo, build_cache
from losslab.data.text import (ImageTextDataset, check_image_text_manifest, collate_image_text, index_meta,
                               task_classes_from_index)
from losslab.engine.loop import cosine_with_warmup, resolve_device, seed_everything
from losslab.engine.metrics import classification_metrics
from losslab.pipelines.registry import load_registered_model
from losslab.tracking import log_and_register_model, log_config, log_metrics_batch, managed_run, setup_tracking

log = logging.getLogger(__name__)

__all__ = [
    "DISTILL_LOSSES",
    "DistillResult",
    "MultiTaskDistillation",
    "distillation_table",
    "measure_latency",
    "run_distill",
    "teacher_outputs",
]

#: Loss names ``distill.losses`` accepts (``vanilla`` is ``kd``).
DISTILL_LOSSES = ("vanilla", "kd", "combined", "crd", "rkd", "mmd")
_PER_TASK = ("kd", "combined")
_DEFAULT_TEACHER = {"fusion": "cross_attention", "fusion_dim": 64, "fusion_layers": 2,
                    "image": {"backbone": "vit_tiny_patch16_224", "kwargs": {"img_size": 64, "patch_size": 8}},
                    "text": {"name": "small_transformer", "dim": 64, "depth": 2, "max_length": 32}}
_DEFAULT_STUDENT = {"fusion": "cross_attention", "fusion_dim": 32, "fusion_layers": 1,
                    "image": {"backbone": "test_vit", "kwargs": {"img_size": 64, "patch_size": 8}},
                    "text": {"name": "small_transformer", "dim": 32, "depth": 1, "max_length": 32}}


# ------------------------------------------------------------------------------------ the objective
UNLABELLED = -100  # a label the students do not see (``F.cross_entropy``'s ignore_index)


def labelled_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE over the cases whose target is not :data:`UNLABELLED`; ``0`` when a batch has none."""
    labelled = target != UNLABELLED
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled], target[labelled])


def labelled_subset(labels: Sequence, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask ``(N,)``: ``round(fraction · n_c)`` cases of each class ``c`` of ``labels``
    (at least one), drawn with ``seed``; all ``True`` for ``fraction = 1``."""
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    for value in pd.unique(labels):
        members = np.flatnonzero(labels == value)
        keep = max(1, int(round(fraction * len(members))))
        mask[rng.choice(members, size=keep, replace=False)] = True
    return mask

class MultiTaskDistillation(nn.Module):
    """``L = ce_weight · Σ_t CE(s_t, y_t) + distill_weight · D`` with D from the loss library.

    Args:
        name: one of :data:`DISTILL_LOSSES` (see the module docstring for D).
        params: the loss's own parameters (``temperature``, ``hint_weight``, ``mode``, ...); ``alpha``
            (kd/combined) and the loss's own ``ce_weight`` are set here and may not be given.
        tasks: task names, in head order.
        student_dim / teacher_dim: fused feature sizes ``D_s``, ``D_t``.
        num_data: training-set size (``crd`` memory bank).
        ce_weight, distill_weight: ≥ 0.

    ``forward(student_logits {t: (B, K_t)}, teacher_logits {t: (B, K_t)}, labels {t: (B,)},
    student_features (B, D_s), teacher_features (B, D_t), index (B,)) -> scalar``; :meth:`terms`
    returns the last unweighted terms (``ce/<task>``, ``kd/<task>``, ``hint``, ``crd``, ...).

    Raises:
        ValueError: unknown name, a reserved parameter, a negative weight.
    """

    def __init__(self, name: str, params: dict[str, Any], tasks: Sequence[str], student_dim: int, teacher_dim: int,
                 num_data: int | None = None, ce_weight: float = 1.0, distill_weight: float = 1.0) -> None:
        super().__init__()
        from losslab.losses import build_loss
        from losslab.losses.registry import accepted_params, get_loss_class

        if name not in DISTILL_LOSSES:
            raise ValueError(f"distill loss {name!r} is not supported; expected one of {', '.join(DISTILL_LOSSES)}")
        for what, value in (("ce_weight", ce_weight), ("distill_weight", distill_weight)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"distill loss {name!r}: {what} must be a number >= 0, got {value!r}")
        self.name = name
        self.registry_name = "kd" if name == "vanilla" else name
        self.tasks = list(tasks)
        self.ce_weight = float(ce_weight)
        self.distill_weight = float(distill_weight)
        params = dict(params)
        reserved = "alpha" if self.registry_name in _PER_TASK else "ce_weight"
        if reserved in params:
            raise ValueError(f"distill loss {name!r}: {reserved!r} is set by the distill pipeline; weight the terms "
                             f"with distill.ce_weight and distill.distill_weight (or per loss) instead")
        names, _ = accepted_params(get_loss_class(self.registry_name))
        auto = {"student_dim": student_dim, "teacher_dim": teacher_dim}
        if self.registry_name == "crd" and params.get("mode") == "memory_bank":
            auto["num_data"] = num_data
        params = {k: v for k, v in auto.items() if k in names and k not in params} | params
        if self.registry_name in _PER_TASK:
            losses = {}
            for i, task in enumerate(self.tasks):
                task_params = dict(params, alpha=1.0)
                if self.registry_name == "combined" and i > 0:
                    task_params["hint_weight"] = 0.0  # one hint on the shared fused features
                losses[task] = build_loss(self.registry_name, **task_params)
            self.losses = nn.ModuleDict(losses)
        else:
            self.losses = nn.ModuleDict({"features": build_loss(self.registry_name, **params, ce_weight=0.0)})
        self._terms: dict[str, float] = {}

    def forward(self, student_logits, teacher_logits, labels, student_features, teacher_features, index=None):
        terms: dict[str, torch.Tensor] = {}
        ce = student_features.new_zeros(())
        for task in self.tasks:
            ce_t = labelled_cross_entropy(student_logits[task].float(), labels[task])
            terms[f"ce/{task}"] = ce_t.detach()
            ce = ce + ce_t
        distill = student_features.new_zeros(())
        if self.registry_name in _PER_TASK:
            for task in self.tasks:
                loss = self.losses[task]
                distill = distill + loss(student_logits[task].float(), teacher_logits[task].float(), labels[task],
                                         student_features.float(), teacher_features.float(), index)
                for k, v in loss.terms().items():
                    if k != "ce":
                        terms[k if k == "hint" else f"{k}/{task}"] = torch.tensor(v)
        else:
            first = self.tasks[0]
            loss = self.losses["features"]
            distill = loss(student_logits[first].float(), teacher_logits[first].float(), labels[first],
                           student_features.float(), teacher_features.float(), index)
            terms.update({k: torch.tensor(v) for k, v in loss.terms().items() if k != "ce"})
        self._terms = {k: float(v) for k, v in terms.items()}
        return self.ce_weight * ce + self.distill_weight * distill

    def terms(self) -> dict[str, float]:
        return dict(self._terms)


class _LabelsOnly(nn.Module):
    """``Σ_t CE(s_t, y_t)`` (teacher and student alone)."""

    def __init__(self, tasks: Sequence[str], ce_weight: float = 1.0) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.ce_weight = float(ce_weight)
        self._terms: dict[str, float] = {}

    def forward(self, student_logits, teacher_logits, labels, student_features, teacher_features, index=None):
        total = student_features.new_zeros(())
        for task in self.tasks:
            ce = F.cross_entropy(student_logits[task].float(), labels[task])
            self._terms[f"ce/{task}"] = float(ce.detach())
            total = total + ce
        return self.ce_weight * total

    def terms(self) -> dict[str, float]:
        return dict(self._terms)


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
def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(batch)
    for key in ("image", "input_ids", "attention_mask", "index"):
        out[key] = batch[key].to(device)
    out["labels"] = {t: v.to(device) for t, v in batch["labels"].items()}
    return out


def _forward(model, batch):
    text = model.text_encoder is not None
    return model(batch["image"], batch["input_ids"] if text else None, batch["attention_mask"] if text else None)


@torch.no_grad()
def _predict(model: nn.Module, loader, device: torch.device) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """``({task: logits (N, K)}, features (N, D), {task: labels (N,)})`` over a loader."""
    model.eval()
    logits: dict[str, list] = {}
    labels: dict[str, list] = {}
    features = []
    for batch in loader:
        batch = _to_device(batch, device)
        out, feats = _forward(model, batch)
        for task, value in out.items():
            logits.setdefault(task, []).append(value.float().cpu())
            labels.setdefault(task, []).append(batch["labels"][task].cpu())
        features.append(feats.float().cpu())
    return ({t: torch.cat(v).numpy() for t, v in logits.items()}, torch.cat(features).numpy(),
            {t: torch.cat(v).numpy() for t, v in labels.items()})


def task_metrics(logits: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                 task_classes: dict[str, list[str]], prefix: str = "val") -> dict[str, float]:
    """``<prefix>/<task>/{accuracy,f1_macro,auc,balanced_accuracy}``, ``<prefix>/loss`` (Σ CE) and means."""
    out: dict[str, float] = {}
    loss = 0.0
    for task, classes in task_classes.items():
        z = torch.as_tensor(logits[task])
        y = torch.as_tensor(labels[task])
        loss += float(F.cross_entropy(z, y))
        m = classification_metrics(labels[task], torch.softmax(z, 1).numpy(), classes)
        for key in ("accuracy", "f1_macro", "auc", "balanced_accuracy"):
            out[f"{prefix}/{task}/{key}"] = float(m[key])
    out[f"{prefix}/loss"] = loss
    for key in ("accuracy", "f1_macro"):
        out[f"{prefix}/mean_{key}"] = float(np.mean([out[f"{prefix}/{t}/{key}"] for t in task_classes]))
    return out


@dataclass
class _Fitted:
    best_metrics: dict[str, float]
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def _fit(model: nn.Module, objective: nn.Module, train_loader, val_loader, task_classes, epochs: int, lr: float,
         cfg: ExperimentConfig, monitor: str, teacher_train: dict[str, torch.Tensor] | None,
         on_epoch: Callable[[int, dict[str, float]], None], labelled: torch.Tensor | None = None) -> _Fitted:
    """Train ``model``; keep (and restore) the weights of the best epoch by ``monitor`` (max).
    ``labelled`` ``(N_train,)`` bool: the training cases whose labels the objective sees (the others
    get :data:`UNLABELLED`)."""
    device = resolve_device(cfg.train.device)
    model.to(device)
    objective.to(device)
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    optim_cfg = cfg.optim
    if optim_cfg.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)
    else:
        cls = torch.optim.AdamW if optim_cfg.name == "adamw" else torch.optim.Adam
        optimizer = cls(params, lr=lr, weight_decay=optim_cfg.weight_decay)
    steps = epochs * len(train_loader)
    scheduler = None
    if optim_cfg.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(
            steps, optim_cfg.warmup_epochs * len(train_loader), optim_cfg.min_lr_ratio))
    best, best_epoch, best_state, history = -math.inf, -1, None, []
    for epoch in range(epochs):
        model.train()
        objective.train()
        loss_sum, n, term_sums = 0.0, 0, {}
        for batch in train_loader:
            batch = _to_device(batch, device)
            if labelled is not None:
                seen = labelled.to(device)[batch["index"]]
                batch["labels"] = {t: torch.where(seen, y, UNLABELLED) for t, y in batch["labels"].items()}
            logits, features = _forward(model, batch)
            if teacher_train is not None:
                idx = batch["index"]
                t_logits = {t: teacher_train[f"logits/{t}"].to(device)[idx] for t in task_classes}
                t_features = teacher_train["features"].to(device)[idx]
            else:
                t_logits, t_features = logits, features
            loss = objective(logits, t_logits, batch["labels"], features, t_features, batch["index"])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {float(loss)} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            b = len(batch["index"])
            loss_sum += float(loss.detach()) * b
            n += b
            for k, v in objective.terms().items():
                term_sums[k] = term_sums.get(k, 0.0) + v * b
        val_logits, _, val_labels = _predict(model, val_loader, device)
        metrics = {"train/loss": loss_sum / max(n, 1), **{f"train/{k}": v / max(n, 1) for k, v in term_sums.items()}}
        metrics.update(task_metrics(val_logits, val_labels, task_classes))
        history.append(metrics)
        on_epoch(epoch, metrics)
        score = metrics.get(monitor)
        if score is None:
            raise KeyError(f"distill.monitor {monitor!r} is not a logged metric; e.g. {sorted(metrics)[:8]}")
        if score > best or best_state is None:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    val_logits, _, val_labels = _predict(model, val_loader, device)
    return _Fitted(task_metrics(val_logits, val_labels, task_classes), best_epoch, history)


@torch.no_grad()
def measure_latency(model: nn.Module, loader, device: torch.device | str = "cpu", warmup_batches: int = 1) -> float:
    """Milliseconds per sample of ``model``'s forward over ``loader`` (after ``warmup_batches``)."""
    device = torch.device(device)
    model.eval().to(device)
    batches = [_to_device(b, device) for b in loader]
    for batch in batches[:warmup_batches]:
        _forward(model, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, n = time.perf_counter(), 0
    for batch in batches:
        _forward(model, batch)
        n += len(batch["index"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000.0 / max(n, 1)


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
    logits, features, _ = _predict(teacher.to(device), loader, device)
    arrays = {"case_id": np.asarray(index["case_id"].tolist()), "features": features.astype(np.float32)}
    arrays.update({f"logits/{t}": v.astype(np.float32) for t, v in logits.items()})
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


def _splits(cfg: ExperimentConfig, info: CacheInfo) -> tuple[pd.DataFrame, pd.DataFrame]:
    index = info.index
    train = index[(index["fold"] != cfg.data.fold) & (index["fold"] >= 0)].reset_index(drop=True)
    val = index[index["fold"] == cfg.data.fold].reset_index(drop=True)
    if len(val) == 0 or len(train) == 0:
        raise ValueError(f"data.fold={cfg.data.fold}: {len(train)} training and {len(val)} validation cases")
    return train, val


def _loaders(model, train_df, val_df, info, task_classes, batch_size, seed, preprocessing):
    tokenizer = model.tokenizer if model.text_encoder is not None else None
    mean, std = preprocessing["image_mean"], preprocessing["image_std"]
    train_ds = ImageTextDataset(train_df, info.cache_dir, task_classes, tokenizer, model.max_length, mean, std)
    val_ds = ImageTextDataset(val_df, info.cache_dir, task_classes, tokenizer, model.max_length, mean, std)
    generator = torch.Generator().manual_seed(int(seed))
    train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=generator,
                              collate_fn=collate_image_text)
    val_loader = DataLoader(val_ds, batch_size=batch_size, shuffle=False, collate_fn=collate_image_text)
    return train_loader, val_loader


def _tags(cfg: ExperimentConfig, role: str, loss: str) -> dict[str, str]:
    return {"losslab.entry_point": "distill", "losslab.role": role, "losslab.loss": loss,
            "losslab.dataset": cfg.data.source, "losslab.fold": str(cfg.data.fold)}


def _log_epoch(run_id: str) -> Callable[[int, dict[str, float]], None]:
    return lambda epoch, metrics: log_metrics_batch(run_id, metrics, step=epoch)


def _summary(fitted_metrics: dict[str, float], best_epoch: int, latency: float) -> dict[str, float]:
    out = {k.replace("val/", "best_val/", 1): v for k, v in fitted_metrics.items()}
    out["best_epoch"] = float(best_epoch)
    out["latency_ms_per_sample"] = float(latency)
    return out


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


@dataclass
class _DistillData:
    """What every phase of a distill invocation shares: the splits, tasks, captions and preprocessing."""

    info: CacheInfo
    tasks: list[str]
    task_classes: dict[str, list[str]]
    train_df: pd.DataFrame
    val_df: pd.DataFrame
    texts: list[str]
    preprocessing: dict[str, Any]
    in_chans: int
    device: torch.device


def _prepare_data(cfg: ExperimentConfig, s: _Settings, info: CacheInfo | None) -> _DistillData:
    """The cache (built when not given), the tasks, the train/validation split and the image statistics."""
    if info is None:
        if cfg.data.source == "manifest":
            from losslab.data.cache import ensure_raw_data
            from losslab.data.sources.manifest import manifest_path

            ensure_raw_data(cfg.data)
            if s.tasks:
                manifest = manifest_path(cfg.data.root, cfg.data.source_kwargs.get("manifest", "manifest.csv"))
                check_image_text_manifest(manifest, list(s.tasks))
        info = build_cache(cfg.data)
    tasks = s.tasks or sorted({k[len("task_"):] for m in index_meta(info.index) for k in m if k.startswith("task_")})
    if not tasks:
        raise ValueError("distill.tasks is not set and the cache has no task columns (manifest columns besides "
                         "path,label,patient_id,text)")
    task_classes = task_classes_from_index(info.index, tasks)
    train_df, val_df = _splits(cfg, info)
    probe = ImageTextDataset(train_df, info.cache_dir, task_classes)  # checks captions and task values
    mean, std = probe.channel_statistics()
    return _DistillData(info, list(tasks), task_classes, train_df, val_df, probe.texts,
                        {"image_mean": mean, "image_std": std}, len(mean), resolve_device(cfg.train.device))


def _teacher_from_registry(uri: str, allow_pickle: bool, d: _DistillData, s: _Settings, cfg: ExperimentConfig,
                           run_id: str):
    """A registered teacher, checked against the data's tasks and scored on the validation split."""
    origin = _resolve_model_uri(uri)
    mlflow.set_tag("losslab.teacher_uri", origin)
    teacher = load_registered_model(uri, allow_pickle=allow_pickle).model
    _check_teacher_tasks(teacher, d.task_classes, uri)
    teacher_prep = getattr(teacher, "preprocessing", d.preprocessing)
    _, val_loader = _loaders(teacher, d.train_df, d.val_df, d.info, d.task_classes, s.batch_size, cfg.train.seed,
                             teacher_prep)
    logits, _, labels = _predict(teacher.to(d.device), val_loader, d.device)
    fitted = _Fitted(task_metrics(logits, labels, d.task_classes), -1)
    log_metrics_batch(run_id, fitted.best_metrics, step=0)
    return teacher, fitted, val_loader, origin


def _run_teacher(cfg: ExperimentConfig, s: _Settings, d: _DistillData, all_metrics: dict):
    """The teacher run: registered (``distill.teacher.model_uri``) or trained and registered here.
    Returns ``(teacher, its run id, its registry uri or None, the origin string for the output cache)``."""
    from losslab.models.multimodal import build_multimodal_model

    t = s.teacher
    with managed_run(run_name="teacher", tags=_tags(cfg, "teacher", "teacher"), nested=True) as run:
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
            train_loader, val_loader = _loaders(teacher, d.train_df, d.val_df, d.info, d.task_classes, s.batch_size,
                                                cfg.train.seed, d.preprocessing)
            epochs, lr = int(t.get("epochs") or cfg.train.epochs), float(t.get("lr") or cfg.optim.lr)
            mlflow.log_params({"model.spec": json.dumps(spec)[:6000], "epochs": epochs, "lr": lr})
            fitted = _fit(teacher, _LabelsOnly(d.tasks), train_loader, val_loader, d.task_classes, epochs, lr, cfg,
                          s.monitor, None, _log_epoch(teacher_run))
            teacher_uri = None
        latency = measure_latency(teacher, val_loader, d.device)
        summary = _summary(fitted.best_metrics, fitted.best_epoch, latency)
        log_metrics_batch(teacher_run, summary, step=max(fitted.best_epoch, 0))
        all_metrics["teacher"] = summary
        if not t.get("model_uri"):
            teacher_uri = _log_model(teacher, t.get("registered_model_name", "losslab-distill-teacher"),
                                     t.get("alias", "teacher"),
                                     {"role": "teacher", "run_id": teacher_run, "tasks": ",".join(d.tasks)}, d.in_chans)
            origin = f"{teacher_uri} (run {teacher_run})" if teacher_uri else f"run {teacher_run}"
            if teacher_uri:
                mlflow.set_tag("losslab.teacher_uri", teacher_uri)
    return teacher, teacher_run, teacher_uri, origin


def _teacher_train_outputs(teacher, d: _DistillData, s: _Settings, origin: str):
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


def _run_student(cfg: ExperimentConfig, s: _Settings, d: _DistillData, plan_item: tuple, teacher_train: dict,
                 labelled: np.ndarray, teacher_uri: str | None, key: str, cache_tag: str) -> tuple[str, str, dict]:
    """One student run (a distillation loss, or the student alone on the labelled cases only).
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
    with managed_run(run_name=f"student-{name}" if distilling else "student-alone",
                     tags=_tags(cfg, role, label) | {"losslab.teacher_cache": cache_tag}, nested=True) as run:
        run_id = run.info.run_id
        seed_everything(cfg.train.seed, cfg.train.deterministic)  # same init and order for every student
        student = build_multimodal_model(student_spec, d.task_classes, texts=d.texts, in_chans=d.in_chans)
        student.preprocessing = d.preprocessing
        cases = d.train_df if distilling else d.train_df[labelled].reset_index(drop=True)
        train_loader, val_loader = _loaders(student, cases, d.val_df, d.info, d.task_classes, s.batch_size,
                                            cfg.train.seed, d.preprocessing)
        if distilling:
            objective = MultiTaskDistillation(name, params, d.tasks, student.feature_dim,
                                              int(teacher_train["features"].shape[1]), num_data=len(d.train_df),
                                              ce_weight=ce_weight, distill_weight=distill_weight)
        else:
            objective = _LabelsOnly(d.tasks, ce_weight=1.0)
        mlflow.log_params({"model.spec": json.dumps(student_spec)[:6000], "epochs": epochs,
                           "lr": lr, "loss.params": json.dumps(params)[:6000],
                           "ce_weight": ce_weight if distilling else 1.0,
                           "distill_weight": distill_weight if distilling else 0.0,
                           "teacher_uri": teacher_uri or "", "teacher_cache_key": key,
                           "student_label_fraction": s.student_label_fraction, "data.n_train_cases": len(cases)})
        fitted = _fit(student, objective, train_loader, val_loader, d.task_classes, epochs, lr,
                      cfg, s.monitor, teacher_train if distilling else None, _log_epoch(run_id),
                      torch.as_tensor(labelled) if distilling and not labelled.all() else None)
        summary = _summary(fitted.best_metrics, fitted.best_epoch, measure_latency(student, val_loader, d.device))
        log_metrics_batch(run_id, summary, step=fitted.best_epoch)
        if cfg.tracking.log_model:
            _log_model(student, st.get("registered_model_name"), None,
                       {"role": role, "loss": label, "run_id": run_id}, d.in_chans)
    return label, run_id, summary


def run_distill(cfg: ExperimentConfig, info: CacheInfo | None = None) -> DistillResult:
    """Teacher (trained or from the registry), teacher-output cache, one student per loss, student alone."""
    s = _settings(cfg)
    setup_tracking(cfg.tracking)
    d = _prepare_data(cfg, s, info)
    nested = mlflow.active_run() is not None
    with managed_run(run_name=cfg.tracking.run_name or "distill",
                     tags={"losslab.entry_point": "distill", "losslab.distill_parent": "true",
                           "losslab.dataset": cfg.data.source}, nested=nested) as parent:
        parent_id = parent.info.run_id
        log_config(cfg)
        labelled = labelled_subset(d.train_df["label"], s.student_label_fraction, cfg.data.seed)
        mlflow.log_params({"distill.task_classes": json.dumps(d.task_classes), "data.n_train": len(d.train_df),
                           "data.n_val": len(d.val_df), "data.n_train_labelled": int(labelled.sum())})
        all_metrics: dict[str, dict[str, float]] = {}
        teacher, teacher_run, teacher_uri, origin = _run_teacher(cfg, s, d, all_metrics)
        teacher_train, key, cache_tag = _teacher_train_outputs(teacher, d, s, origin)
        plan = [(name, params, "student") for name, params in s.losses]
        if s.student_alone:
            plan.append(("none", {}, "student_alone"))
        runs: dict[str, str] = {}
        for item in plan:
            label, run_id, summary = _run_student(cfg, s, d, item, teacher_train, labelled, teacher_uri, key,
                                                  cache_tag)
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
    metrics), ``latency_ms_per_sample`` and ``run_id``. Rows: teacher first, then the students in
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
        row["latency_ms_per_sample"] = r.data.metrics.get("latency_ms_per_sample", float("nan"))
        row["run_id"] = r.info.run_id
        rows.append(row)
    columns = ["loss", "role"] + [f"{t}/{k}" for t in tasks for k in ("accuracy", "f1_macro", "auc")] \
        + ["latency_ms_per_sample", "run_id"]
    return pd.DataFrame(rows, columns=columns)
