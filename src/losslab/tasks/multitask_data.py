"""The data of the ``multitask`` task (image + text, one head per task): the cache, the tasks, the splits,
the preprocessing, the loaders, and a teacher's outputs on every case, cached on disk.

Every ``data.*`` key the other tasks honour is honoured here or refused when the config loads
(:func:`losslab.data.text.check_distill_data`):

* the cache (``source``, ``root``, ``generate``, ``*_kwargs``, ``cache_dir``, ``cache_dtype``,
  ``preprocess_workers``, ``class_names``, ``num_folds``, ``test_fraction``, ``salt``, ``seed``):
  :func:`losslab.data.cache.build_cache`, as for every task;
* the training cases of ``data.fold``: :func:`losslab.data.splits.training_rows`, as for the
  classification tasks (the other folds, never the test split, then ``data.imbalance`` and
  ``data.train_cases`` on the cache's ``label``, the manifest's main class);
* ``data.sampler`` on that ``label`` (:func:`losslab.data.samplers.build_sampler`),
  ``data.augment`` on the training images (:func:`losslab.data.transforms.build_transforms`),
  ``data.num_workers``: the loaders are :func:`losslab.data.loaders.build_loader`'s; the batch size is
  ``distill.batch_size``, default ``data.batch_size``;
* ``data.normalize``: ``dataset`` or null (the default of this task) — the training cases' per-channel
  mean and standard deviation; ``none`` — mean 0, std 1; ``{fixed: {mean, std}}`` — those. The result
  is the models' ``preprocessing`` (stored with a registered model).

The teacher's outputs (per-task logits and the fused feature) are computed once for every case of the
cache and stored in ``<cache_dir>/<key>.npz`` (:func:`teacher_outputs`); the key hashes the teacher's
weights and origin, its preprocessing and the data fingerprint, so a second run with the same teacher and
data reuses the file. A student's config names that file (``distill.run.teacher_outputs``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from losslab.data.cache import CacheInfo, build_cache
from losslab.data.splits import TEST_FOLD
from losslab.data.text import (ImageTextDataset, check_image_text_manifest, collate_image_text, index_meta,
                               task_classes_from_index)
from losslab.engine.loop import resolve_device

log = logging.getLogger(__name__)


@dataclass
class MultitaskData:
    """A fold's data: the splits, tasks, captions and preprocessing every run of one invocation shares."""

    info: CacheInfo
    tasks: list[str]
    task_classes: dict[str, list[str]]
    train_df: pd.DataFrame
    val_df: pd.DataFrame
    test_df: pd.DataFrame  # the held-out test cases (fold -1; empty without data.test_fraction)
    texts: list[str]
    preprocessing: dict[str, Any]
    in_chans: int
    device: torch.device
    batch_size: int  # distill.batch_size, default data.batch_size


def prepare_multitask_data(cfg: Any, info: CacheInfo | None = None) -> MultitaskData:
    """The cache (built when not given), the tasks (``distill.tasks``, default every ``task_*`` column),
    the training, validation and held-out test cases of ``data.fold`` and the image preprocessing."""
    if info is None:
        check_manifest(cfg)
        info = build_cache(cfg.data)
    tasks = task_names(cfg, info)
    task_classes = task_classes_from_index(info.index, tasks)
    train_df, val_df = fold_splits(cfg, info)
    probe = ImageTextDataset(train_df, info.cache_dir, task_classes)  # checks captions and task values
    mean, std = image_preprocessing(cfg.data.normalize, probe)
    test_df = info.index[info.index["fold"] == TEST_FOLD].reset_index(drop=True)
    return MultitaskData(info, tasks, task_classes, train_df, val_df, test_df, probe.texts,
                         {"image_mean": mean, "image_std": std}, len(mean), resolve_device(cfg.train.device),
                         batch_size_of(cfg))


def task_names(cfg: Any, info: CacheInfo) -> list[str]:
    """The heads: ``distill.tasks``, default every ``task_*`` column of the cache."""
    tasks = cfg.distill.tasks if cfg.distill is not None else None
    tasks = tasks or sorted({k[len("task_"):] for m in index_meta(info.index) for k in m if k.startswith("task_")})
    if not tasks:
        raise ValueError("distill.tasks is not set and the cache has no task columns (manifest columns besides "
                         "path,label,patient_id,text)")
    return list(tasks)


def check_manifest(cfg: Any) -> None:
    """Before the cache is built: a manifest's captions and ``distill.tasks`` columns (one clear error)."""
    tasks = cfg.distill.tasks if cfg.distill is not None else None
    if cfg.data.source == "manifest":
        from losslab.data.cache import ensure_raw_data
        from losslab.data.sources.manifest import manifest_path

        ensure_raw_data(cfg.data)
        if tasks:
            manifest = manifest_path(cfg.data.root, cfg.data.source_kwargs.get("manifest", "manifest.csv"))
            check_image_text_manifest(manifest, list(tasks))


def fold_splits(cfg: Any, info: CacheInfo) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(training cases, validation cases)`` of ``data.fold``: the training cases as
    :func:`losslab.data.splits.training_rows` gives them (``data.imbalance``, ``data.train_cases``)."""
    from losslab.data.splits import training_rows

    index = info.index
    val = index[index["fold"] == cfg.data.fold].reset_index(drop=True)
    train = training_rows(cfg.data, index, cfg.data.fold, len(info.class_names)).reset_index(drop=True)
    if len(val) == 0 or len(train) == 0:
        raise ValueError(f"data.fold={cfg.data.fold}: {len(train)} training and {len(val)} validation cases")
    return train, val


def image_preprocessing(normalize: Any, train_images: ImageTextDataset) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)`` for ``data.normalize`` (module docstring); ``train_images``
    gives the statistics and the number of channels."""
    if normalize is None or normalize == "dataset":
        return train_images.channel_statistics()
    channels = int(train_images.load_image(0).shape[0])
    if normalize == "none":
        return [0.0] * channels, [1.0] * channels
    if hasattr(normalize, "fixed"):
        return _per_channel(normalize.fixed.mean, channels, "mean"), _per_channel(normalize.fixed.std, channels, "std")
    raise ValueError(f"data.normalize={normalize!r}: distill takes dataset, none or {{fixed: {{mean, std}}}}")


def _per_channel(value: float | list[float], channels: int, name: str) -> list[float]:
    values = [float(value)] * channels if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != channels:
        raise ValueError(f"data.normalize.fixed.{name} has {len(values)} values; the images have {channels} channels")
    return values


@dataclass
class InputPrep:
    """How a model's inputs are prepared: its tokenizer (None: image only), caption length and the image
    preprocessing. The validation dataset carries it as its ``normalizer`` (what the held-out test split is
    prepared with: :meth:`losslab.tasks.MultitaskTask.test_loader`)."""

    tokenizer: Any
    max_length: int
    preprocessing: dict[str, Any]

    @classmethod
    def of(cls, model: nn.Module, preprocessing: dict[str, Any]) -> "InputPrep":
        """``model``'s tokenizer and caption length with ``preprocessing`` (a registered teacher brings its own)."""
        return cls(model.tokenizer if model.text_encoder is not None else None, model.max_length, preprocessing)

    def dataset(self, cases: pd.DataFrame, cache_dir: str | Path, task_classes: dict[str, list[str]],
                transform: Any = None) -> ImageTextDataset:
        """``cases`` of the cache at ``cache_dir`` as image + caption items, prepared this way."""
        return ImageTextDataset(cases, cache_dir, task_classes, self.tokenizer, self.max_length,
                                self.preprocessing.get("image_mean"), self.preprocessing.get("image_std"),
                                transform=transform)


def fold_loaders(cfg: Any, d: MultitaskData, cases: pd.DataFrame, prep: InputPrep) -> tuple[Any, Any]:
    """The training loader of ``cases`` (``data.sampler`` on their ``label``, ``data.augment``) and the
    validation loader, both prepared by ``prep``. The shuffle (and a weighted sampler's draw) uses the
    loader's own generator seeded by ``train.seed`` and reseeded each epoch (non-persistent workers, so
    that they see it)."""
    from losslab.data.loaders import build_loader
    from losslab.data.samplers import build_sampler
    from losslab.data.transforms import build_transforms

    transform = build_transforms(cfg.data.augment, train=True) if cfg.data.augment else None
    train_ds = prep.dataset(cases, d.info.cache_dir, d.task_classes, transform)
    val_ds = prep.dataset(d.val_df, d.info.cache_dir, d.task_classes)
    val_ds.normalizer = prep
    generator = torch.Generator().manual_seed(int(cfg.train.seed))
    sampler, batch_sampler = build_sampler(cfg.data.sampler, np.asarray(cases["label"]), d.batch_size)
    if hasattr(sampler, "generator"):  # reseeded with the loader's (ReseedEachEpoch): a resume draws the same
        sampler.generator = generator
    train_loader = build_loader(train_ds, cfg.data, True, collate_image_text, sampler, batch_sampler, d.device,
                                batch_size=d.batch_size, generator=generator, persistent_workers=False)
    return train_loader, case_loader(cfg, val_ds)


def batch_size_of(cfg: Any) -> int:
    """``distill.batch_size``, default ``data.batch_size``."""
    return (cfg.distill.batch_size if cfg.distill is not None else None) or cfg.data.batch_size


def case_loader(cfg: Any, dataset: ImageTextDataset) -> Any:
    """An evaluation loader (in order) of ``dataset`` (:func:`batch_size_of`, ``data.num_workers``)."""
    from losslab.data.loaders import build_loader

    return build_loader(dataset, cfg.data, False, collate_image_text, device=resolve_device(cfg.train.device),
                        batch_size=batch_size_of(cfg))


def weights_hash(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def teacher_outputs(cfg: Any, teacher: nn.Module, d: MultitaskData, cache_dir: Path, origin: str,
                    step: Any) -> tuple[dict[str, np.ndarray], Path, bool]:
    """The teacher's logits and fused features for every case of the cache (the test fold included), from
    the cache file if present, else predicted by ``step`` (the task's :class:`~losslab.tasks.MultitaskStep`).

    Returns ``(arrays, path, reused)``: ``arrays`` has ``case_id (N,)``, ``logits/<task> (N, K)`` and
    ``features (N, D_t)`` in index order; ``path`` is the file ``<cache_dir>/<key>.npz``."""
    index = d.info.index.reset_index(drop=True)
    preprocessing = getattr(teacher, "preprocessing", {})
    fingerprint = {"weights": weights_hash(teacher), "origin": origin, "data": d.info.fingerprint,
                   "cases": hashlib.sha256("\n".join(index["case_id"]).encode()).hexdigest(),
                   "tasks": d.task_classes, "preprocessing": preprocessing, "max_length": teacher.max_length}
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        arrays = read_teacher_outputs(path)
        if list(arrays["case_id"]) == list(index["case_id"]):
            return arrays, path, True
        log.warning("teacher cache %s does not match the cases; recomputing", path)
    loader = case_loader(cfg, InputPrep.of(teacher, preprocessing).dataset(index, d.info.cache_dir, d.task_classes))
    outputs = step.predict(teacher.to(d.device), loader, d.device)
    arrays = {"case_id": np.asarray(index["case_id"].tolist()), "features": outputs["features"].astype(np.float32)}
    arrays.update({f"logits/{t}": v.astype(np.float32) for t, v in outputs["logits"].items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    (path.with_suffix(".json")).write_text(json.dumps(fingerprint, indent=2, sort_keys=True, default=str))
    return arrays, path, False


def read_teacher_outputs(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def teacher_rows(path: str | Path, cases: pd.DataFrame) -> dict[str, torch.Tensor]:
    """The teacher's outputs (the file :func:`teacher_outputs` wrote) on ``cases``, in their order."""
    arrays = read_teacher_outputs(path)
    position = {cid: i for i, cid in enumerate(arrays["case_id"])}
    missing = [c for c in cases["case_id"] if c not in position]
    if missing:
        raise ValueError(f"the teacher outputs {path} have no row for {len(missing)} training case(s), e.g. "
                         f"{missing[0]!r}: they were computed on another cache")
    rows = np.asarray([position[c] for c in cases["case_id"]])
    return {k: torch.as_tensor(v[rows]) for k, v in arrays.items() if k != "case_id"}
