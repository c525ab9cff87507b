"""Image + caption datasets with several task labels, read from the case cache.

A cache built from the ``manifest`` source keeps the caption in ``meta["text"]`` and each extra
column ``c`` in ``meta["task_<c>"]`` (:mod:`losslab.data.sources.manifest`). :class:`ImageTextDataset`
turns its rows into::

    {"image": (C, H, W) float32, "input_ids": (L,) long, "attention_mask": (L,) long,
     "labels": {task: () long}, "index": () long, "case_id": str}

and :func:`collate_image_text` stacks them into ``image (B, C, H, W)``, ``input_ids (B, L)``,
``attention_mask (B, L)``, ``labels {task: (B,)}``, ``index (B,)``, ``case_id [B]``.

The ``data.*`` keys this path cannot honour are refused when an experiment with a ``distill``
section is loaded (:func:`refused_data_key`); the others are honoured by the cache
(``source``, ``root``, ``cache_*``, ``class_names``, ``image_size`` through ``source_kwargs``, folds,
``test_fraction``, ``salt``, ``seed``) or by :mod:`losslab.tasks.multitask_data` (``fold``,
``imbalance``, ``train_cases``, ``sampler``, ``augment``, ``normalize``, ``batch_size``,
``num_workers``).

Problems are errors that name where they come from: :func:`check_image_text_manifest` checks the CSV
itself (missing ``text`` or task column: the file and the column; an empty caption or task value:
the file, the row and the column); the dataset checks the cache rows (the case id and the key).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from losslab.data.sources.base import shown_columns
from losslab.data.sources.manifest import sorted_labels

__all__ = [
    "ImageTextDataset",
    "MissingTextError",
    "check_image_text_manifest",
    "check_distill_data",
    "collate_image_text",
    "index_meta",
    "refused_data_key",
    "task_classes_from_index",
]

Tokenizer = Callable[[Sequence[str], int], tuple[torch.Tensor, torch.Tensor]]


class MissingTextError(ValueError):
    """A sample without a caption, or without a value for a task (the message says which)."""


def check_image_text_manifest(path: str | Path, tasks: Sequence[str], text_column: str = "text") -> int:
    """Check an image + text manifest CSV before it is cached; return its number of rows.

    Raises:
        FileNotFoundError: no such file.
        MissingTextError: no ``text`` column or no column for a task (names the file and the column,
            lists the columns found); an empty caption or task value (names the file, the row — 1 is
            the header — the image path and the column).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        for column in (text_column, *tasks):
            if column not in header:
                what = "the captions" if column == text_column else f"the labels of task {column!r}"
                raise MissingTextError(f"{path}: missing column {column!r} ({what}; found columns: "
                                       f"{shown_columns(header)})")
        rows = 0
        for line, row in enumerate(reader, start=2):
            rows += 1
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            for column in (text_column, *tasks):
                if not row.get(column):
                    what = "caption" if column == text_column else "task value"
                    raise MissingTextError(f"{path}: row {line} (path {row.get('path', '')!r}): empty {what} in "
                                           f"column {column!r}")
    return rows


def index_meta(index: pd.DataFrame) -> list[dict[str, Any]]:
    """The ``meta`` column of a cache index, decoded (one dict per row)."""
    return [json.loads(m) if isinstance(m, str) and m else {} for m in index["meta"]]


def _task_value(meta: dict[str, Any], task: str, case_id: str) -> str:
    key = f"task_{task}"
    if key not in meta or meta[key] is None or str(meta[key]).strip() == "":
        found = sorted(k[len("task_"):] for k in meta if k.startswith("task_"))
        raise MissingTextError(f"case {case_id}: no value for task {task!r} (meta key {key!r}); the cache has tasks "
                               f"{found} — is {task!r} a column of the manifest?")
    return str(meta[key])


def task_classes_from_index(index: pd.DataFrame, tasks: Sequence[str] | dict[str, Sequence[str]]) -> dict[str, list[str]]:
    """``{task: class names}``: given explicitly (a dict), else the sorted values found in the index."""
    if isinstance(tasks, dict):
        return {str(t): [str(c) for c in cs] for t, cs in tasks.items()}
    metas = index_meta(index)
    out = {}
    for task in tasks:
        out[str(task)] = sorted_labels([_task_value(m, task, cid) for m, cid in zip(metas, index["case_id"])])
    return out


class ImageTextDataset(Dataset):
    """Cached images with their captions (tokenized once) and one label per task.

    Args:
        index: rows of the cache index (``case_id``, ``array_path``, ``meta`` JSON with ``text`` and
            ``task_<task>``).
        cache_dir: the cache folder.
        task_classes: ``{task: [class names]}``; a value outside the list is an error.
        tokenizer: ``tokenizer(texts, max_length) -> (input_ids (B, L), attention_mask (B, L))``,
            or ``None`` for image-only models (``input_ids`` is then ``(0,)``).
        max_length: L.
        image_mean / image_std: per-channel normalisation ``(C,)`` (e.g. from the training set);
            default none.
        transform: the training augmentation (:func:`losslab.data.transforms.build_transforms`, on
            ``(N, C, H, W)``), applied to the normalised image as ``(1, C, H, W)``; default none.

    Raises:
        MissingTextError: a row without caption (``meta["text"]`` absent or empty) or without a task
            value; names the case id and the key.
        ValueError: a task value not in ``task_classes``.
    """

    def __init__(self, index: pd.DataFrame, cache_dir: str | Path, task_classes: dict[str, Sequence[str]],
                 tokenizer: Tokenizer | None = None, max_length: int = 64,
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.index = index.reset_index(drop=True)
        self.transform = transform
        self.cache_dir = Path(cache_dir)
        self.task_classes = {t: list(cs) for t, cs in task_classes.items()}
        metas = index_meta(self.index)
        case_ids = self.index["case_id"].tolist()
        texts = []
        for meta, case_id in zip(metas, case_ids):
            text = meta.get("text")
            if not isinstance(text, str) or not text.strip():
                raise MissingTextError(f"case {case_id}: no caption (meta key 'text' is "
                                       f"{'missing' if 'text' not in meta else 'empty'}); every sample needs a "
                                       f"text column value in the manifest")
            texts.append(text)
        self.texts = texts
        self.labels: dict[str, np.ndarray] = {}
        for task, classes in self.task_classes.items():
            lookup = {c: i for i, c in enumerate(classes)}
            values = []
            for meta, case_id in zip(metas, case_ids):
                value = _task_value(meta, task, case_id)
                if value not in lookup:
                    raise ValueError(f"case {case_id}: task {task!r} value {value!r} is not one of {classes}")
                values.append(lookup[value])
            self.labels[task] = np.asarray(values, dtype=np.int64)
        if tokenizer is not None:
            self.input_ids, self.attention_mask = tokenizer(texts, max_length)
        else:
            self.input_ids = torch.zeros(len(texts), 0, dtype=torch.long)
            self.attention_mask = torch.zeros(len(texts), 0, dtype=torch.long)
        self.image_mean = None if image_mean is None else np.asarray(image_mean, np.float32)[:, None, None]
        self.image_std = None if image_std is None else np.asarray(image_std, np.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.index)

    def load_image(self, i: int) -> np.ndarray:
        """The cached array of row ``i`` as ``(C, H, W)`` (the first instance of ``(N, C, H, W)``)."""
        return np.array(np.load(self.cache_dir / self.index.at[i, "array_path"], mmap_mode="r")[0], dtype=np.float32)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.load_image(i)
        if self.image_mean is not None:
            image = (image - self.image_mean) / self.image_std
        if self.transform is not None:
            image = self.transform(image[None])[0]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": {task: torch.tensor(values[i]) for task, values in self.labels.items()},
            "index": torch.tensor(i, dtype=torch.long),
            "case_id": str(self.index.at[i, "case_id"]),
        }

    def channel_statistics(self) -> tuple[list[float], list[float]]:
        """Mean and standard deviation per channel over every image of this dataset."""
        stack = np.stack([self.load_image(i) for i in range(len(self))])
        std = stack.std(axis=(0, 2, 3))
        return stack.mean(axis=(0, 2, 3)).tolist(), np.where(std > 0, std, 1.0).tolist()


def collate_image_text(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack :class:`ImageTextDataset` items (see the module docstring for the shapes)."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "input_ids": torch.stack([b["input_ids"] for b in batch]),
        "attention_mask": torch.stack([b["attention_mask"] for b in batch]),
        "labels": {task: torch.stack([b["labels"][task] for b in batch]) for task in batch[0]["labels"]},
        "index": torch.stack([b["index"] for b in batch]),
        "case_id": [b["case_id"] for b in batch],
    }


#: ``data.*`` keys of bags and volumes: an image+text case is one image
_BAG_AND_VOLUME_KEYS = ("bag_size", "bag_sampling", "volume_depth", "volume_size")


def refused_data_key(data_cfg: Any) -> tuple[str, str] | None:
    """The first ``data.*`` key (name, reason) the image+text data path of ``distill`` cannot honour,
    else None: a bag or volume key set explicitly, ``train_data_on_device`` and a per-case
    ``normalize`` (the model stores one per-channel mean and std as its preprocessing)."""
    for key in _BAG_AND_VOLUME_KEYS:
        if key in data_cfg.model_fields_set:
            return key, "distill trains on one image per case (no bags, no volumes); remove the key"
    if data_cfg.train_data_on_device:
        return "train_data_on_device", "distill's image+text batches come from a DataLoader; set it to false"
    if data_cfg.normalize == "per_case_nonzero_zscore":
        return "normalize", ("distill normalises every image with one per-channel mean and std stored in the "
                             "model (dataset, none or {fixed: ...}); per-case z-scores are not supported")
    return None


def check_distill_data(cfg: Any) -> None:
    """Refuse, naming the key, its value and the file that set it, a ``data.*`` key of an experiment
    with a ``distill`` section that :func:`refused_data_key` names (a one-line ``ConfigError``)."""
    refused = refused_data_key(cfg.data) if cfg.distill is not None else None
    if refused is not None:
        key, problem = refused
        raise cfg.key_error(f"data.{key}", getattr(cfg.data, key), problem)
