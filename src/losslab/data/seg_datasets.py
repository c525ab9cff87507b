"""Segmentation datasets and MONAI dictionary transforms built from the ``seg`` config section.

Items are dicts ``image (C, X, Y, Z)``, ``label`` (the target: ``(R, X, Y, Z)`` multi-hot or
``(1, X, Y, Z)`` class indices) and ``dist`` (signed distance maps ``(R or K, X, Y, Z)``) plus
``spacing`` ``(3,)``. Training crops ``seg.samples_per_case`` patches per case with
``RandCropByPosNegLabeld`` (foreground = any region / any non-background class, ``seg.pos`` :
``seg.neg``), flips each spatial axis with ``seg.flip_prob`` and jitters intensities
(``RandScaleIntensityd`` / ``RandShiftIntensityd``); in 2D (``model.spatial_dims: 2``) a patch is
``(h, w, 1)`` and the last axis is squeezed. Validation items are whole volumes (batch size 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from losslab.data.seg_cache import SegCacheInfo

KEYS = ("image", "label", "dist")


def train_transforms(seg_cfg: Any, spatial_dims: int):
    """The MONAI ``Compose`` of random crops by label, flips and intensity jitter."""
    from monai import transforms as T

    size = list(seg_cfg.patch_size) + ([1] if spatial_dims == 2 else [])
    chain = [
        T.RandCropByPosNegLabeld(keys=KEYS, label_key="label", spatial_size=size, pos=seg_cfg.pos, neg=seg_cfg.neg,
                                 num_samples=seg_cfg.samples_per_case, allow_smaller=False),
    ]
    if spatial_dims == 2:
        chain.append(T.SqueezeDimd(keys=KEYS, dim=-1))
    chain += [T.RandFlipd(keys=KEYS, prob=seg_cfg.flip_prob, spatial_axis=axis) for axis in range(spatial_dims)
              if seg_cfg.flip_prob > 0]
    if seg_cfg.intensity_scale > 0:
        chain.append(T.RandScaleIntensityd(keys="image", factors=seg_cfg.intensity_scale, prob=seg_cfg.intensity_prob))
    if seg_cfg.intensity_shift > 0:
        chain.append(T.RandShiftIntensityd(keys="image", offsets=seg_cfg.intensity_shift, prob=seg_cfg.intensity_prob))
    chain.append(T.EnsureTyped(keys=KEYS, track_meta=False))
    return T.Compose(chain)


def check_patch_fits(patch_size: list[int], spatial_dims: int, info: SegCacheInfo) -> None:
    """Refuse a training patch larger than the smallest volume of the cache (``RandCropByPosNegLabeld``
    would fail mid-epoch): compared per axis with the smallest extent among the cached cases; in 2D the
    patch is ``(h, w)`` of the first two axes.

    Raises:
        ValueError: names ``seg.patch_size``, the smallest extents and the cache.
    """
    shapes = np.array([row["shape"] for row in info.index], dtype=np.int64)
    smallest = shapes.min(axis=0)[: len(patch_size)] if len(shapes) else None
    if smallest is None or all(int(p) <= int(s) for p, s in zip(patch_size, smallest)):
        return
    fitting = [min(int(p), int(s)) for p, s in zip(patch_size, smallest)]
    raise ValueError(f"seg.patch_size={list(patch_size)} is larger than the smallest volume in the segmentation "
                     f"cache {info.cache_dir} ({' x '.join(str(int(s)) for s in shapes.min(axis=0))} voxels per "
                     f"axis, over {len(shapes)} cases); set seg.patch_size to at most {fitting}")


class SegVolumeDataset(torch.utils.data.Dataset):
    """Cached cases as dicts of tensors, through ``transform`` (a MONAI Compose, or None for whole volumes)."""

    def __init__(self, info: SegCacheInfo, rows: list[dict[str, Any]], transform=None) -> None:
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


def make_seg_loaders(info: SegCacheInfo, fold: int, seg_cfg: Any, spatial_dims: int, batch_size: int,
                     num_workers: int | str = 0, seed: int = 0):
    """``(train_loader, val_loader)`` for ``fold``; MONAI's ``DataLoader`` flattens the crops of a case;
    ``num_workers`` as ``data.num_workers`` (``auto``: :func:`losslab.data.loaders.resolve_num_workers`).

    Raises:
        ValueError: the fold has no validation or no training case (names the fold and the folds there are).
    """
    from monai.data import DataLoader

    from losslab.data.loaders import resolve_num_workers

    num_workers = resolve_num_workers(num_workers)
    train_rows, val_rows = info.cases(fold, train=True), info.cases(fold, train=False)
    if not val_rows or not train_rows:
        folds = sorted({r["fold"] for r in info.index})
        raise ValueError(f"data.fold={fold}: {len(train_rows)} training and {len(val_rows)} validation cases; "
                         f"the segmentation cache has folds {folds}")
    transform = train_transforms(seg_cfg, spatial_dims)
    transform.set_random_state(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(SegVolumeDataset(info, train_rows, transform), batch_size=batch_size, shuffle=True,
                       num_workers=num_workers, generator=generator)
    val = DataLoader(SegVolumeDataset(info, val_rows), batch_size=1, shuffle=False, num_workers=num_workers)
    return train, val


def make_seg_test_loader(info: SegCacheInfo, num_workers: int = 0):
    """Whole volumes of the held-out test patients (fold -1, ``data.test_fraction``), batch size 1;
    None when the cache has none."""
    from monai.data import DataLoader

    from losslab.data.splits import TEST_FOLD

    rows = [r for r in info.index if r["fold"] == TEST_FOLD]
    if not rows:
        return None
    return DataLoader(SegVolumeDataset(info, rows), batch_size=1, shuffle=False, num_workers=num_workers)
