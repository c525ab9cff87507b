"""The data of a ``distill`` invocation: the cache, the tasks, the splits, the preprocessing, the loaders.

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
  ``data.num_workers`` (:func:`losslab.data.loaders.resolve_num_workers`); the batch size is
  ``distill.batch_size``, default ``data.batch_size``;
* ``data.normalize``: ``dataset`` or null (the default here) — the training cases' per-channel mean
  and standard deviation; ``none`` — mean 0, std 1; ``{fixed: {mean, std}}`` — those. The result is
  the models' ``preprocessing`` (stored with a registered model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from losslab.config import ExperimentConfig
from losslab.data.cache import CacheInfo, build_cache
from losslab.data.splits import TEST_FOLD
from losslab.data.text import (ImageTextDataset, check_image_text_manifest, collate_image_text, index_meta,
                               task_classes_from_index)
from losslab.engine.loop import resolve_device


@dataclass
class DistillData:
    """What every phase of a distill invocation shares: the splits, tasks, captions and preprocessing."""

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


def prepare_distill_data(cfg: ExperimentConfig, tasks: Any, info: CacheInfo | None) -> DistillData:
    """The cache (built when not given), the tasks (``distill.tasks``, default every ``task_*`` column),
    the training, validation and held-out test cases and the image preprocessing."""
    if info is None:
        info = _build_checked_cache(cfg, tasks)
    tasks = tasks or sorted({k[len("task_"):] for m in index_meta(info.index) for k in m if k.startswith("task_")})
    if not tasks:
        raise ValueError("distill.tasks is not set and the cache has no task columns (manifest columns besides "
                         "path,label,patient_id,text)")
    task_classes = task_classes_from_index(info.index, tasks)
    train_df, val_df = distill_splits(cfg, info)
    probe = ImageTextDataset(train_df, info.cache_dir, task_classes)  # checks captions and task values
    mean, std = image_preprocessing(cfg.data.normalize, probe)
    test_df = info.index[info.index["fold"] == TEST_FOLD].reset_index(drop=True)
    batch_size = (cfg.distill.batch_size if cfg.distill is not None else None) or cfg.data.batch_size
    return DistillData(info, list(tasks), task_classes, train_df, val_df, test_df, probe.texts,
                       {"image_mean": mean, "image_std": std}, len(mean), resolve_device(cfg.train.device), batch_size)


def _build_checked_cache(cfg: ExperimentConfig, tasks: Any) -> CacheInfo:
    """:func:`build_cache`; a manifest is first checked for its captions and task columns."""
    if cfg.data.source == "manifest":
        from losslab.data.cache import ensure_raw_data
        from losslab.data.sources.manifest import manifest_path

        ensure_raw_data(cfg.data)
        if tasks:
            manifest = manifest_path(cfg.data.root, cfg.data.source_kwargs.get("manifest", "manifest.csv"))
            check_image_text_manifest(manifest, list(tasks))
    return build_cache(cfg.data)


def distill_splits(cfg: ExperimentConfig, info: CacheInfo) -> tuple[pd.DataFrame, pd.DataFrame]:
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


def distill_loaders(cfg: ExperimentConfig, model: Any, d: DistillData, train_df: pd.DataFrame, batch_size: int,
                    preprocessing: dict[str, Any] | None = None) -> tuple[DataLoader, DataLoader]:
    """Training loader of ``train_df`` (``data.sampler`` on its ``label``, ``data.augment``) and the
    validation loader, both with ``model``'s tokenizer and ``preprocessing`` (default
    ``d.preprocessing``; a registered teacher brings its own). The shuffle (and a weighted sampler's
    draw) uses the loader's own generator seeded by ``train.seed``."""
    from losslab.data.loaders import resolve_num_workers
    from losslab.data.samplers import build_sampler
    from losslab.data.transforms import build_transforms

    tokenizer = model.tokenizer if model.text_encoder is not None else None
    preprocessing = d.preprocessing if preprocessing is None else preprocessing
    mean, std = preprocessing["image_mean"], preprocessing["image_std"]
    transform = build_transforms(cfg.data.augment, train=True) if cfg.data.augment else None
    train_ds = ImageTextDataset(train_df, d.info.cache_dir, d.task_classes, tokenizer, model.max_length, mean, std,
                                transform=transform)
    val_ds = ImageTextDataset(d.val_df, d.info.cache_dir, d.task_classes, tokenizer, model.max_length, mean, std)
    options = dict(collate_fn=collate_image_text, num_workers=resolve_num_workers(cfg.data.num_workers),
                   generator=torch.Generator().manual_seed(int(cfg.train.seed)))
    sampler, batch_sampler = build_sampler(cfg.data.sampler, np.asarray(train_df["label"]), batch_size)
    if hasattr(sampler, "generator"):  # reseeded with the loader's (ReseedEachEpoch): a resume draws the same
        sampler.generator = options["generator"]
    if batch_sampler is not None:
        train_loader = DataLoader(train_ds, batch_sampler=batch_sampler, **options)
    else:
        train_loader = DataLoader(train_ds, batch_size=batch_size, sampler=sampler, shuffle=sampler is None, **options)
    val_loader = DataLoader(val_ds, batch_size=batch_size, shuffle=False, collate_fn=collate_image_text,
                            num_workers=options["num_workers"])
    return train_loader, val_loader


def distill_test_loader(cfg: ExperimentConfig, model: Any, d: DistillData, batch_size: int,
                        preprocessing: dict[str, Any] | None = None) -> DataLoader | None:
    """The held-out test cases (``d.test_df``) as :func:`distill_loaders` builds its validation loader
    (``model``'s tokenizer and ``preprocessing``, default ``d.preprocessing``); None without test cases."""
    from losslab.data.loaders import resolve_num_workers

    if len(d.test_df) == 0:
        return None
    tokenizer = model.tokenizer if model.text_encoder is not None else None
    preprocessing = d.preprocessing if preprocessing is None else preprocessing
    test_ds = ImageTextDataset(d.test_df, d.info.cache_dir, d.task_classes, tokenizer, model.max_length,
                               preprocessing["image_mean"], preprocessing["image_std"])
    return DataLoader(test_ds, batch_size=batch_size, shuffle=False, collate_fn=collate_image_text,
                      num_workers=resolve_num_workers(cfg.data.num_workers))
