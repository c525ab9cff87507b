"""Torch datasets over the case cache.

* :class:`BagDataset` — MIL bags of 2D instances (slices). Item: ``image (N, C, H, W)`` float32,
  ``mask (N,)`` bool (False = padding), ``label`` long, ``index`` (row in the index table) and
  ``instance_index (N,)`` (position of each instance in the case, -1 for padding).
  Bag sampling: ``random`` (a new sorted subset every epoch; reproducible from the torch RNG),
  ``evenly_spaced`` (deterministic: for validation), ``all`` (every instance; padded per batch).
* :class:`SliceStackDataset` — 2.5D stacks ``(S, C, H, W)`` with their ``level`` index.
* :class:`VolumeDataset` — whole volumes ``(C, D, H, W)`` for 3D models (depth resampled with MONAI).
* :class:`ImageDataset` — one 2D image per case. Item: ``image (C, H, W)`` float32, ``label``,
  ``index``; the cached array must be ``(1, C, H, W)``.

Arrays are memory-mapped (``np.load(mmap_mode="r")``) and normalised by a
:class:`~losslab.data.normalization.Normalizer` (default: z-score per case and channel over non-zero
voxels with the statistics stored in the index; background stays 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from losslab.data.normalization import Normalizer

PER_CASE_ZSCORE = Normalizer("per_case_nonzero_zscore")


def _evenly_spaced(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


class _CaseArrays(Dataset):
    """Case arrays of ``index`` rows; arrays are kept in memory once read while they fit in
    ``memory_budget_bytes`` (small data such as digits are then read from disk once)."""

    memory_budget_bytes = 256 * 2**20

    def __init__(self, index: pd.DataFrame, cache_dir: str | Path, normalizer: Normalizer = PER_CASE_ZSCORE,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.index = index.reset_index(drop=True)
        self.cache_dir = Path(cache_dir)
        self.normalizer = normalizer
        self.transform = transform
        self.labels = self.index["label"].to_numpy().astype(np.int64)
        self._paths = [self.cache_dir / p for p in self.index["array_path"]]
        self._kept: dict[int, np.ndarray] = {}
        self._kept_bytes = 0

    def __len__(self) -> int:
        return len(self.index)

    def _load(self, i: int) -> np.ndarray:
        if i in self._kept:
            return self._kept[i]
        arr = np.load(self._paths[i], mmap_mode="r")
        if self._kept_bytes + arr.nbytes <= self.memory_budget_bytes:
            arr = np.array(arr)
            self._kept[i] = arr
            self._kept_bytes += arr.nbytes
        return arr

    def _normalise(self, i: int, arr: np.ndarray) -> np.ndarray:
        row = self.index.iloc[i] if self.normalizer.mode == "per_case_nonzero_zscore" else None
        return self.normalizer(arr, row)


class BagDataset(_CaseArrays):
    """MIL bags of instances from the cache (shapes in the module docstring)."""

    def __init__(self, index: pd.DataFrame, cache_dir: str | Path, bag_size: int = 16,
                 sampling: str = "random", normalizer: Normalizer = PER_CASE_ZSCORE,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        super().__init__(index, cache_dir, normalizer, transform)
        if sampling not in ("random", "evenly_spaced", "all"):
            raise ValueError(f"bag sampling {sampling!r} not in random, evenly_spaced, all")
        self.bag_size = int(bag_size)
        self.sampling = sampling

    def _choose(self, n: int) -> np.ndarray:
        if self.sampling == "all" or n <= self.bag_size:
            return np.arange(n)
        if self.sampling == "evenly_spaced":
            return _evenly_spaced(n, self.bag_size)
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # follows torch's (saved) RNG state
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(n, size=self.bag_size, replace=False))

    def __getitem__(self, i: int) -> dict[str, Any]:
        arr = self._load(i)
        chosen = self._choose(arr.shape[0])
        image = self._normalise(i, arr[chosen])
        if self.transform is not None:
            image = self.transform(image)
        size = len(chosen) if self.sampling == "all" else self.bag_size
        out = np.zeros((size,) + image.shape[1:], dtype=np.float32)
        out[: len(chosen)] = image
        mask = np.zeros(size, dtype=bool)
        mask[: len(chosen)] = True
        instance_index = np.full(size, -1, dtype=np.int64)
        instance_index[: len(chosen)] = chosen
        return {
            "image": torch.from_numpy(out),
            "mask": torch.from_numpy(mask),
            "label": torch.tensor(self.labels[i]),
            "index": torch.tensor(i),
            "instance_index": torch.from_numpy(instance_index),
        }


class SliceStackDataset(_CaseArrays):
    """2.5D stacks ``(S, C, H, W)`` with ``level`` (from the case's meta, default 0)."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self._normalise(i, self._load(i))
        if self.transform is not None:
            image = self.transform(image)
        meta = json.loads(self.index.iloc[i]["meta"] or "{}")
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "mask": torch.ones(image.shape[0], dtype=torch.bool),
            "level": torch.tensor(int(meta.get("level", 0))),
            "label": torch.tensor(self.labels[i]),
            "index": torch.tensor(i),
        }


class VolumeDataset(_CaseArrays):
    """Whole volumes for 3D models: the cached slices ``(D, C, H, W)`` of a case, normalised,
    optionally augmented like a bag, then transposed to ``(C, D, H, W)`` and resampled with MONAI's
    ``Resize`` (trilinear) to ``depth`` slices and, when ``size = (H, W)`` is given, to that in-plane
    size (else H and W are kept), so every case of a batch has the same shape.
    Item: ``image (C, depth, H, W)`` float32, ``label``, ``index``."""

    def __init__(self, index: pd.DataFrame, cache_dir: str | Path, depth: int = 32,
                 size: tuple[int, int] | list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(index, cache_dir, **kwargs)
        from monai.transforms import Resize

        if int(depth) < 1:
            raise ValueError(f"data.volume_depth must be >= 1, got {depth}")
        if size is not None and (len(size) != 2 or min(int(v) for v in size) < 1):
            raise ValueError(f"data.volume_size must be [H, W] with H, W >= 1, got {list(size)}")
        self.depth = int(depth)
        self.size = tuple(int(v) for v in size) if size is not None else None
        self.resize = Resize(spatial_size=(self.depth,) + (self.size or (-1, -1)), mode="trilinear",
                             align_corners=False)

    def output_shape(self, height_width: tuple[int, int]) -> tuple[int, int, int]:
        """``(D, H, W)`` of the items for cached slices of ``height_width`` ``(H0, W0)``."""
        return (self.depth,) + (self.size or tuple(int(v) for v in height_width))

    def __getitem__(self, i: int) -> dict[str, Any]:
        slices = self._normalise(i, self._load(i))  # (D, C, H, W)
        if self.transform is not None:
            slices = self.transform(slices)
        volume = torch.from_numpy(np.ascontiguousarray(np.transpose(slices, (1, 0, 2, 3))))  # (C, D, H, W)
        if tuple(volume.shape[1:]) != self.output_shape(tuple(volume.shape[2:])):
            volume = torch.as_tensor(self.resize(volume)).float()
        return {"image": volume.contiguous(), "label": torch.tensor(self.labels[i]), "index": torch.tensor(i)}


class ImageDataset(_CaseArrays):
    """One 2D image per case: ``image (C, H, W)`` (the cached ``(1, C, H, W)`` array), ``label``, ``index``."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        arr = self._load(i)
        if arr.shape[0] != 1:
            raise ValueError(f"model.kind=image needs one image per case; case {self.index.iloc[i]['case_id']} "
                             f"has {arr.shape[0]} instances (use model.kind=mil for bags)")
        image = self._normalise(i, arr)
        if self.transform is not None:
            image = self.transform(image)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image[0])),
            "label": torch.tensor(self.labels[i]),
            "index": torch.tensor(i),
        }


def collate_padded(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items, padding the instance axis to the longest bag of the batch (mask = False)."""
    n_max = max(item["image"].shape[0] for item in batch)
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if key in ("image", "mask", "instance_index") and any(v.shape[0] != n_max for v in values):
            fill = -1 if key == "instance_index" else 0
            padded = []
            for v in values:
                pad = torch.full((n_max - v.shape[0],) + tuple(v.shape[1:]), fill, dtype=v.dtype)
                padded.append(torch.cat([v, pad], dim=0))
            values = padded
        out[key] = torch.stack(values)
    return out
