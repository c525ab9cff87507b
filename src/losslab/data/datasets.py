"""Torch datasets over the case cache.

* :class:`BagDataset` — MIL bags of 2D instances (slices). Item: ``image (N, C, H, W)`` float32,
  ``mask (N,)`` bool (False = padding), ``label`` long, ``index`` (row in the index table) and
  ``instance_index (N,)`` (position of each instance in the case, -1 for padding).
  Bag sampling: ``random`` (a new sorted subset every epoch; reproducible from the torch RNG),
  ``evenly_spaced`` (deterministic: for validation), ``all`` (every instance; padded per batch).
* :class:`SliceStackDataset` — 2.5D stacks ``(S, C, H, W)`` with their ``level`` index.
* :class:`VolumeDataset` — whole volumes ``(C, D, H, W)`` for 3D models (resampled once with MONAI).
* :class:`ImageDataset` — one 2D image per case. Item: ``image (C, H, W)`` float32, ``label``,
  ``index``; the cached array must be ``(1, C, H, W)``.
* :class:`SegVolumeDataset` — the segmentation cache's cases. Item: ``image (C, X, Y, Z)``, ``label``
  (the target: ``(R, X, Y, Z)`` multi-hot or ``(1, X, Y, Z)`` class indices), ``dist`` (signed distance
  maps ``(R or K, X, Y, Z)``), ``spacing (3,)`` and ``index``; through its training transform
  (:func:`losslab.data.transforms.segmentation_train_transforms`) a list of patches instead.

Every case is read once (``np.load(mmap_mode="r")``) and normalised by a
:class:`~losslab.data.normalization.Normalizer` (default: z-score per case and channel over non-zero
voxels with the statistics stored in the index; background stays 0) when the dataset is built, and
volumes are resampled then too; an item only samples, augments and copies (``_CaseArrays``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from losslab.data.normalization import Normalizer

logger = logging.getLogger(__name__)

PER_CASE_ZSCORE = Normalizer("per_case_nonzero_zscore")


def _evenly_spaced(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


class _CaseArrays(Dataset):
    """Case arrays of ``index`` rows, prepared once.

    The deterministic part of an item (reading the case, normalising it and, for volumes,
    resampling it: :meth:`_prepare`) is done for every case at construction and kept in memory as
    float32, so an epoch only does the random part (bag sampling, augmentation) and copies. Memory,
    not a memmap under the cache folder: the prepared values depend on the run (the normaliser's
    training-fold statistics, the volume shape), the cache folder is shared by every run, and
    forked loader workers read the parent's arrays without copying them. A split whose prepared
    arrays would exceed ``preload_budget_bytes`` (estimated from the index's ``shape``) is prepared
    per item instead, with a warning naming its size."""

    preload_budget_bytes = 8 * 2**30

    def __init__(self, index: pd.DataFrame, cache_dir: str | Path, normalizer: Normalizer = PER_CASE_ZSCORE,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.index = index.reset_index(drop=True)
        self.cache_dir = Path(cache_dir)
        self.normalizer = normalizer
        self.transform = transform
        self.labels = self.index["label"].to_numpy().astype(np.int64)
        self._paths = [self.cache_dir / p for p in self.index["array_path"]]
        self._prepared: list[np.ndarray] | None = None
        estimate = self._prepared_bytes()
        if estimate <= self.preload_budget_bytes:
            self._prepared = [self._prepare(i) for i in range(len(self.index))]
            for arr in self._prepared:
                arr.setflags(write=False)  # items copy out of it; the prepared case never changes
        else:
            logger.warning("dataset of %d cases: prepared arrays would take %.1f GiB (> %.1f GiB); each item is "
                           "read and normalised when it is drawn", len(self.index), estimate / 2**30,
                           self.preload_budget_bytes / 2**30)

    def __len__(self) -> int:
        return len(self.index)

    def _prepared_bytes(self) -> int:
        """Estimated float32 bytes of every prepared case (from the cached shapes)."""
        if "shape" not in self.index.columns:
            return 0
        return int(sum(4 * np.prod([int(v) for v in shape]) for shape in self.index["shape"]))

    def _load(self, i: int) -> np.ndarray:
        return np.load(self._paths[i], mmap_mode="r")

    def _normalise(self, i: int, arr: np.ndarray) -> np.ndarray:
        row = self.index.iloc[i] if self.normalizer.mode == "per_case_nonzero_zscore" else None
        return self.normalizer(arr, row)

    def _prepare(self, i: int) -> np.ndarray:
        """The deterministic part of case ``i``: its cached array ``(N, C, H, W)``, normalised (float32)."""
        return self._normalise(i, self._load(i))

    def _case(self, i: int) -> np.ndarray:
        """Case ``i`` as :meth:`_prepare` returns it (prepared at construction when it fitted); read-only."""
        return self._prepared[i] if self._prepared is not None else self._prepare(i)

    def prepared_cases(self) -> list[np.ndarray]:
        """Every case as prepared at construction (read-only).

        Raises:
            ValueError: the split was too large to prepare in memory (names ``data.train_data_on_device``)."""
        if self._prepared is None:
            raise ValueError(f"data.train_data_on_device: the training split ({len(self)} cases) was too large to "
                             "prepare in memory; set data.train_data_on_device=false")
        return self._prepared

    def device_arrays(self) -> dict[str, np.ndarray]:
        """What :class:`losslab.data.loaders.DeviceBatchLoader` keeps on the device: ``cases (N, ...)`` as
        the items are (or, for bags, ``instances``) and ``labels (N,)``; refused by a dataset whose items it
        cannot gather."""
        self.prepared_cases()
        raise ValueError(f"data.train_data_on_device supports model.kind mil, image and volume3d, not "
                         f"{type(self).__name__}")

    def _stacked_cases(self) -> np.ndarray:
        """The prepared cases stacked ``(N, ...)``; refused when their shapes differ."""
        prepared = self.prepared_cases()
        shapes = {p.shape for p in prepared}
        if len(shapes) != 1:
            raise ValueError(f"data.train_data_on_device needs one item shape; the cases have {sorted(shapes)}")
        return np.stack(prepared)


class BagDataset(_CaseArrays):
    """MIL bags of instances from the cache (shapes in the module docstring)."""

    def __init__(self, index: pd.DataFrame, cache_dir: str | Path, bag_size: int = 16,
                 sampling: str = "random", normalizer: Normalizer = PER_CASE_ZSCORE,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        if sampling not in ("random", "evenly_spaced", "all"):
            raise ValueError(f"bag sampling {sampling!r} not in random, evenly_spaced, all")
        super().__init__(index, cache_dir, normalizer, transform)
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

    def instance_rows(self, sizes: list[int]) -> np.ndarray:
        """``(B, width)``: the instances drawn for cases of ``sizes`` instances, one case after another
        (random sampling draws from torch's RNG), padded with -1 to the bag size (``all``: the largest)."""
        chosen = [self._choose(n) for n in sizes]
        width = max(len(rows) for rows in chosen) if self.sampling == "all" else self.bag_size
        instance_index = np.full((len(sizes), width), -1, dtype=np.int64)
        for row, rows in enumerate(chosen):
            instance_index[row, : len(rows)] = rows
        return instance_index

    def device_arrays(self) -> dict[str, np.ndarray]:
        """``instances (I + 1, C, H, W)``: every case's instances in order, then a row of zeros (padding)."""
        prepared = self.prepared_cases()
        blank = np.zeros((1,) + prepared[0].shape[1:], dtype=np.float32)
        return {"instances": np.concatenate(list(prepared) + [blank]), "labels": self.labels}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> "BagItems":
        """The bags of ``indices`` written straight into one ``(B, N, C, H, W)`` array (one copy
        of the chosen slices, no stacking afterwards); the items are views of it, and
        :func:`collate_padded` returns the stacked arrays as they are (the DataLoader hands a
        batch's indices here)."""
        instance_index = self.instance_rows([self._case(i).shape[0] for i in indices])
        image = np.empty(instance_index.shape + self._case(indices[0]).shape[1:], dtype=np.float32)
        for row, i in enumerate(indices):
            rows = instance_index[row][instance_index[row] >= 0]
            np.take(self._case(i), rows, axis=0, out=image[row, : len(rows)])
            image[row, len(rows):] = 0
            if self.transform is not None:
                image[row, : len(rows)] = self.transform(image[row, : len(rows)])
        stacked = {"image": torch.from_numpy(image), "mask": torch.from_numpy(instance_index >= 0),
                   "label": torch.from_numpy(self.labels[indices]), "index": torch.as_tensor(indices, dtype=torch.int64),
                   "instance_index": torch.from_numpy(instance_index)}
        return BagItems([{key: value[row] for key, value in stacked.items()} for row in range(len(indices))],
                        stacked)


class BagItems(list):
    """The items of one batch of bags (views) with ``stacked``, the batch they were cut from."""

    def __init__(self, items: list[dict[str, Any]], stacked: dict[str, Any]) -> None:
        super().__init__(items)
        self.stacked = stacked


class SliceStackDataset(_CaseArrays):
    """2.5D stacks ``(S, C, H, W)`` with ``level`` (from the case's meta, default 0)."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self._case(i)
        image = self.transform(image) if self.transform is not None else image
        meta = json.loads(self.index.iloc[i]["meta"] or "{}")
        return {
            "image": torch.from_numpy(np.array(image, dtype=np.float32, order="C")),
            "mask": torch.ones(image.shape[0], dtype=torch.bool),
            "level": torch.tensor(int(meta.get("level", 0))),
            "label": torch.tensor(self.labels[i]),
            "index": torch.tensor(i),
        }


class VolumeDataset(_CaseArrays):
    """Whole volumes for 3D models: the cached slices ``(D, C, H, W)`` of a case, normalised,
    transposed to ``(C, D, H, W)`` and resampled with MONAI's ``Resize`` (trilinear) to ``depth``
    slices and, when ``size = (H, W)`` is given, to that in-plane size (else H and W are kept), so
    every case of a batch has the same shape. This is done once per case, at construction; the
    augmentation (``transform``, on ``(D, C, H, W)``) then runs on the resampled volume of each item.
    Item: ``image (C, depth, H, W)`` float32, ``label``, ``index``."""

    def __init__(self, index: pd.DataFrame, cache_dir: str | Path, depth: int = 32,
                 size: tuple[int, int] | list[int] | None = None, **kwargs: Any) -> None:
        from monai.transforms import Resize

        if int(depth) < 1:
            raise ValueError(f"data.volume_depth must be >= 1, got {depth}")
        if size is not None and (len(size) != 2 or min(int(v) for v in size) < 1):
            raise ValueError(f"data.volume_size must be [H, W] with H, W >= 1, got {list(size)}")
        self.depth = int(depth)
        self.size = tuple(int(v) for v in size) if size is not None else None
        self.resize = Resize(spatial_size=(self.depth,) + (self.size or (-1, -1)), mode="trilinear",
                             align_corners=False)
        super().__init__(index, cache_dir, **kwargs)

    def output_shape(self, height_width: tuple[int, int]) -> tuple[int, int, int]:
        """``(D, H, W)`` of the items for cached slices of ``height_width`` ``(H0, W0)``."""
        return (self.depth,) + (self.size or tuple(int(v) for v in height_width))

    def _prepared_bytes(self) -> int:
        if "shape" not in self.index.columns:
            return 0
        voxels = [np.prod(self.output_shape(tuple(shape)[2:])) * int(shape[1]) for shape in self.index["shape"]]
        return int(4 * sum(voxels))

    def device_arrays(self) -> dict[str, np.ndarray]:
        return {"cases": self._stacked_cases(), "labels": self.labels}

    def _prepare(self, i: int) -> np.ndarray:
        """Case ``i`` normalised, as ``(C, depth, H, W)`` float32, resampled when its shape differs."""
        slices = super()._prepare(i)  # (D, C, H, W)
        volume = torch.from_numpy(np.ascontiguousarray(np.transpose(slices, (1, 0, 2, 3))))  # (C, D, H, W)
        if tuple(volume.shape[1:]) != self.output_shape(tuple(volume.shape[2:])):
            volume = torch.as_tensor(self.resize(volume)).float()
        return np.ascontiguousarray(volume.numpy(), dtype=np.float32)

    def __getitem__(self, i: int) -> dict[str, Any]:
        volume = self._case(i)  # (C, D, H, W)
        if self.transform is not None:
            volume = np.transpose(self.transform(np.transpose(volume, (1, 0, 2, 3))), (1, 0, 2, 3))
        image = torch.from_numpy(np.array(volume, dtype=np.float32, order="C"))
        return {"image": image, "label": torch.tensor(self.labels[i]), "index": torch.tensor(i)}


class ImageDataset(_CaseArrays):
    """One 2D image per case: ``image (C, H, W)`` (the cached ``(1, C, H, W)`` array), ``label``, ``index``."""

    def device_arrays(self) -> dict[str, np.ndarray]:
        cases = self._stacked_cases()
        if cases.shape[1] != 1:
            raise ValueError(f"model.kind=image needs one image per case; the cases have {cases.shape[1]}")
        return {"cases": cases[:, 0], "labels": self.labels}

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self._case(i)
        if image.shape[0] != 1:
            raise ValueError(f"model.kind=image needs one image per case; case {self.index.iloc[i]['case_id']} "
                             f"has {image.shape[0]} instances (use model.kind=mil for bags)")
        image = self.transform(image) if self.transform is not None else image
        return {
            "image": torch.from_numpy(np.array(image[0], dtype=np.float32, order="C")),
            "label": torch.tensor(self.labels[i]),
            "index": torch.tensor(i),
        }


class SegVolumeDataset(Dataset):
    """Cached segmentation cases (rows of the cache ``info``, read with ``info.arrays(row)``) as dicts of
    tensors, through ``transform`` (a MONAI Compose, or None for whole volumes)."""

    def __init__(self, info: Any, rows: list[dict[str, Any]], transform: Callable | None = None) -> None:
        self.info = info
        self.rows = list(rows)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        item = {k: np.array(v, dtype=np.float32) for k, v in self.info.arrays(row).items()}
        if self.transform is not None:
            return self.transform(item)
        out: dict[str, Any] = {k: torch.from_numpy(v) for k, v in item.items()}
        out["spacing"] = torch.tensor(row["spacing"], dtype=torch.float64)
        out["index"] = i
        return out


def collate_padded(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items, padding the instance axis to the longest bag of the batch (mask = False); the
    :class:`BagItems` of :meth:`BagDataset.__getitems__` are stacked already."""
    if isinstance(batch, BagItems):
        return dict(batch.stacked)
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
