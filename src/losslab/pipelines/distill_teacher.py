"""The teacher of a distill invocation: trained and registered here, or loaded from the registry and
scored, or kept from a finished run on a resume; and its outputs on every case, cached on disk.

The teacher's outputs (per-task logits and the fused feature) are computed once for every case of the
cache and stored in ``<distill.cache_dir>/<key>.npz``; the key hashes the teacher's weights and origin,
its preprocessing and the data fingerprint, so a second run with the same teacher and data reuses
the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from losslab.config import ExperimentConfig
from losslab.schema import DistillConfig
from losslab.data.cache import CacheInfo
from losslab.data.text import ImageTextDataset, collate_image_text
from losslab.engine.loop import seed_everything
from losslab.losses.multitask import LabelsOnly
from losslab.pipelines.distill_data import DistillData, distill_loaders, distill_test_loader
from losslab.pipelines.distill_fit import (Fitted, fit_run, log_distilled_model, run_latency, run_summary, run_tags,
                                           score_test)
from losslab.pipelines.distill_resume import PreviousRuns
from losslab.pipelines.registry import load_registered_model
from losslab.tasks import MultitaskStep
from losslab.tracking import log_metrics_batch, managed_run

log = logging.getLogger(__name__)


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
    outputs = MultitaskStep(task_classes).predict(teacher.to(device), loader, device)
    arrays = {"case_id": np.asarray(index["case_id"].tolist()), "features": outputs["features"].astype(np.float32)}
    arrays.update({f"logits/{t}": v.astype(np.float32) for t, v in outputs["logits"].items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    (path.with_suffix(".json")).write_text(json.dumps(fingerprint, indent=2, sort_keys=True, default=str))
    return arrays, key, False


def _resolve_model_uri(uri: str) -> str:
    """``models:/name@alias`` or ``models:/name/version`` -> a stable ``name/version/run_id`` origin."""
    from losslab.pipelines.scoring import model_version

    if not uri.startswith("models:/"):
        return uri
    mv = model_version(uri)
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


def _teacher_from_registry(uri: str, allow_pickle: bool, d: DistillData, s: DistillConfig, cfg: ExperimentConfig,
                           run_id: str):
    """A registered teacher, checked against the data's tasks and scored on the validation split and the
    held-out test split."""
    origin = _resolve_model_uri(uri)
    mlflow.set_tag("losslab.teacher_uri", origin)
    teacher = load_registered_model(uri, allow_pickle=allow_pickle).model
    _check_teacher_tasks(teacher, d.task_classes, uri)
    teacher_prep = getattr(teacher, "preprocessing", d.preprocessing)
    _, val_loader = distill_loaders(cfg, teacher, d, d.train_df, d.batch_size, teacher_prep)
    step = MultitaskStep(d.task_classes)
    fitted = Fitted(step.metrics(step.predict(teacher.to(d.device), val_loader, d.device), []), -1,
                    score_test(teacher, step, distill_test_loader(cfg, teacher, d, d.batch_size, teacher_prep), d.device))
    log_metrics_batch(run_id, fitted.best_metrics, step=0)
    return teacher, fitted, val_loader, origin


def _finished_teacher(done, d: DistillData, all_metrics: dict):
    """A teacher run that finished before the resume: its registered model and its logged summary."""
    uri = done.data.tags.get("losslab.teacher_uri")
    if not uri:
        raise ValueError(f"teacher run {done.info.run_id} finished without a registered teacher "
                         f"(losslab.teacher_uri); start a new distill run")
    teacher = load_registered_model(uri).model
    _check_teacher_tasks(teacher, d.task_classes, uri)
    all_metrics["teacher"] = {k: v for k, v in done.data.metrics.items()
                              if k.startswith(("best_", "test/", "latency/"))}
    origin = done.data.tags.get("losslab.teacher_origin") or f"{uri} (run {done.info.run_id})"
    return teacher, done.info.run_id, uri, origin


def run_teacher(cfg: ExperimentConfig, s: DistillConfig, d: DistillData, all_metrics: dict,
                 previous: PreviousRuns | None = None):
    """The teacher run: registered (``distill.teacher.model_uri``) or trained and registered here; on a
    resume, a finished teacher run is reused and an unfinished one continues from its last checkpoint.
    Returns ``(teacher, its run id, its registry uri or None, the origin string for the output cache)``."""
    from losslab.models.multimodal import build_multimodal_model

    t, previous = s.teacher, previous or PreviousRuns()
    if previous.finished("teacher") is not None:
        return _finished_teacher(previous.finished("teacher"), d, all_metrics)
    resume_id = previous.unfinished_id("teacher")
    with managed_run(run_name="teacher", tags=run_tags(cfg, "teacher", "teacher"), nested=True, run_id=resume_id) as run:
        teacher_run = run.info.run_id
        if t.model_uri:
            teacher_uri = str(t.model_uri)
            teacher, fitted, val_loader, origin = _teacher_from_registry(teacher_uri, t.allow_pickle, d, s, cfg, teacher_run)
        else:
            seed_everything(cfg.train.seed + cfg.data.fold, cfg.train.deterministic)  # as train_fold
            spec = t.model
            teacher = build_multimodal_model(spec, d.task_classes, texts=d.texts, in_chans=d.in_chans)
            teacher.preprocessing = d.preprocessing
            train_loader, val_loader = distill_loaders(cfg, teacher, d, d.train_df, d.batch_size)
            epochs, lr = int(t.epochs or cfg.train.epochs), float(t.lr or cfg.optim.lr)
            mlflow.log_params({"model.spec": json.dumps(spec)[:6000], "epochs": epochs, "lr": lr})
            fitted = fit_run(cfg, teacher, LabelsOnly(d.tasks), MultitaskStep(d.task_classes),
                             (train_loader, val_loader), epochs, lr, s.monitor, teacher_run, resume_id is not None, previous.callbacks,
                             distill_test_loader(cfg, teacher, d, d.batch_size))
            teacher_uri = None
        latency = run_latency(teacher, MultitaskStep(d.task_classes), val_loader, cfg)
        summary = run_summary(fitted, latency)
        log_metrics_batch(teacher_run, summary, step=max(fitted.best_epoch, 0))
        all_metrics["teacher"] = summary
        if not t.model_uri:
            teacher_uri = log_distilled_model(teacher, t.registered_model_name, t.alias,
                                              {"role": "teacher", "run_id": teacher_run, "tasks": ",".join(d.tasks)}, d.in_chans)
            origin = f"{teacher_uri} (run {teacher_run})" if teacher_uri else f"run {teacher_run}"
            if teacher_uri:
                mlflow.set_tags({"losslab.teacher_uri": teacher_uri, "losslab.teacher_origin": origin})
    return teacher, teacher_run, teacher_uri, origin


def teacher_train_outputs(teacher, d: DistillData, s: DistillConfig, origin: str):
    """The teacher's outputs on every case, computed once per teacher and data (or reused), then
    the training rows as tensors. Returns ``(outputs, cache key, 'reused'|'computed')``."""
    full_index = d.info.index.reset_index(drop=True)  # every case (test fold included)
    cache_dir = Path(s.cache_dir or Path(d.info.cache_dir) / "teacher_outputs")
    arrays, key, reused = teacher_outputs(teacher, d.info, full_index, d.task_classes, cache_dir, origin,
                                          d.batch_size, d.device)
    cache_tag = "reused" if reused else "computed"
    mlflow.set_tags({"losslab.teacher_cache": cache_tag, "losslab.teacher_cache_key": key})
    position = {cid: i for i, cid in enumerate(arrays["case_id"])}
    rows = np.asarray([position[c] for c in d.train_df["case_id"]])
    teacher.cpu()
    return {k: torch.as_tensor(v[rows]) for k, v in arrays.items() if k != "case_id"}, key, cache_tag
