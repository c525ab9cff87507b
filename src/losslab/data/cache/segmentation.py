"""The segmentation encoder of the case cache: image volumes, targets and boundary distance maps, with
voxel spacing; and :class:`SegCacheInfo`, the segmentation task's view of such a cache.

Sources (``data.source``): the registered sources that read masks
(:class:`~losslab.data.sources.base.SegmentationSource`): ``brats`` (the BraTS layout of the embedded
cohort: ``<grade>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``) and ``msd`` (a Medical Segmentation
Decathlon task folder with ``dataset.json``, e.g. ``Task01_BrainTumour``). Raw label values map to
targets by ``seg.labels``:

* ``regions``: overlapping binary channels (sigmoid), ``seg.regions`` = ``{region: [raw labels]}``;
  BraTS default ``wt: [1, 2, 4]``, ``tc: [1, 4]``, ``et: [4]`` (MSD Task01: ``[1, 2, 3]``, ``[2, 3]``,
  ``[3]``; other MSD tasks: one region per non-zero label of ``dataset.json``).
* ``classes``: exclusive classes (softmax), ``seg.classes`` = ``{class: [raw labels]}``, background first;
  BraTS default ``background: [0], necrotic_core: [1], edema: [2], enhancing: [4]`` (MSD: the labels of
  ``dataset.json``).

Arrays of a case (the cache layout itself is :mod:`losslab.data.cache.build`'s)::

    arrays/<case_id>_image.npy   float32 (C, X, Y, Z), z-scored per channel over the non-zero voxels
    arrays/<case_id>_target.npy  uint8 (R, X, Y, Z) multi-hot regions, or (1, X, Y, Z) class indices
    arrays/<case_id>_dist.npy    float32 (R or K, X, Y, Z) signed distance maps with the voxel spacing
                                 (:func:`losslab.losses.signed_distance_map`), for the boundary loss

Index columns beside the common ones: spacing, shape, empty, voxels (foreground voxels per region, or
voxels per class) and the three arrays' ``image_*``, ``target_*``, ``dist_*`` path, bytes and sha256.
``report.json`` adds channel_names, labels, mapping and modalities (the image channels' names: t1,
t1ce, t2, flair for brain MRI from every source, :mod:`losslab.data.sources.channels`).

A mask with a raw label outside the mapping and a mask whose shape differs from its image are skipped
and named in the report; an empty mask (no labelled voxel) is kept (a case without tumour) and named in
the report's notes. Case ids are salted hashes of ``seg:<source>:<item>``; folds are drawn over the
unsalted split keys of the same string, stratified on whether the mask is empty when every fold can
get both.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from losslab.data.cache.base import CacheInfo, CaseEncoder, array_columns
from losslab.data.deid import salted_hash
from losslab.data.integrity import record_file, save_atomic
from losslab.data.sources import ReadJob, SkipReport, Source
from losslab.data.sources.base import SegmentationSource
from losslab.data.splits import split_key

#: the layout of a segmentation cache; 2: voxel counts per channel in the index; 3: array sizes and hashes;
#: 4: folds over split keys (independent of the salt); 5: the one cache layout (arrays/, index.parquet,
#: the shared builder's lock, journal and workers), arrays, case ids and folds unchanged
SEG_CACHE_VERSION = 5
#: the arrays of a case: ``(name in SegCacheInfo.arrays, index key and file suffix)``
ARRAYS = (("image", "image"), ("label", "target"), ("dist", "dist"))


@dataclass
class SegCacheInfo:
    """A built (or reused) segmentation cache: the segmentation task's view of a :class:`CacheInfo`.

    ``index``: one dict per case (``case_id``, ``fold``, ``spacing``, ``shape``, ``empty``, ``voxels``,
    the arrays' paths); ``channel_names``: the region names (``regions``) or class names, background
    first (``classes``); ``class_names``: the names metrics are reported for (regions, or the classes
    without background).
    """

    cache_dir: Path
    index: list[dict[str, Any]]
    report: dict[str, Any]
    reused: bool
    fingerprint: str
    labels: str
    channel_names: list[str] = field(default_factory=list)
    rebuilt_because: str = ""  # the damage found in the previous cache when this build replaced it
    resumed_tasks: int = 0  # cases taken from the journal of an interrupted build
    total_tasks: int = 0

    @classmethod
    def of(cls, info: CacheInfo) -> SegCacheInfo:
        """The view of a segmentation cache's :class:`CacheInfo` (list columns as lists)."""
        rows = [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in row.items()}
                for row in info.index.to_dict("records")]
        return cls(info.cache_dir, rows, info.report, info.reused, info.fingerprint, info.report["labels"],
                   list(info.report["channel_names"]), info.rebuilt_because, info.resumed_tasks, info.total_tasks)

    @property
    def split_fingerprint(self) -> str:
        """The folds and test split of the cache (:func:`losslab.data.splits.split_fingerprint`)."""
        return str(self.report.get("split_fingerprint", ""))

    @property
    def class_names(self) -> list[str]:
        return list(self.channel_names) if self.labels == "regions" else list(self.channel_names[1:])

    def cases(self, fold: int, train: bool) -> list[dict[str, Any]]:
        """The training cases of ``fold`` (every other fold, never the test patients, fold -1) or its
        validation cases."""
        if train:
            return [r for r in self.index if r["fold"] >= 0 and r["fold"] != fold]
        return [r for r in self.index if r["fold"] == fold]

    def voxel_fractions(self, fold: int) -> list[float]:
        """Per channel, the fraction of the training volumes' voxels it covers (regions: foreground;
        classes: that class), over the training cases of ``fold``; a channel absent from them counts one
        voxel, so every fraction is positive."""
        rows = self.cases(fold, train=True)
        size = sum(int(np.prod(r["shape"])) for r in rows)
        counts = np.sum([r["voxels"] for r in rows], axis=0)
        return [float(max(c, 1) / size) for c in counts]

    def arrays(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
        """``image (C, X, Y, Z)``, ``label`` (the target) and ``dist`` arrays of a case, memory-mapped."""
        return {name: np.load(self.cache_dir / row[f"{key}_path"], mmap_mode="r") for name, key in ARRAYS}


@dataclass(frozen=True)
class SegmentationEncoder(CaseEncoder):
    """NIfTI volumes and their masks: per case the z-scored image, the target and its signed distance
    maps (module docstring). Bound: the label mapping (``seg.regions``/``seg.classes``, else the source's
    default), the channels' names and order (:meth:`SegmentationSource.image_channels`) and the source's
    name (part of every case id)."""

    name = "segmentation"
    labels: str = "regions"
    mapping: dict[str, list[int]] | None = None
    source_name: str = ""
    modalities: list[str] = field(default_factory=list)
    channel_order: list[int] = field(default_factory=list)

    @classmethod
    def from_config(cls, seg_cfg: Any) -> SegmentationEncoder:
        """The encoder of a ``seg`` config section (``labels``, and ``regions`` or ``classes``)."""
        configured = seg_cfg.regions if seg_cfg.labels == "regions" else seg_cfg.classes
        return cls(labels=seg_cfg.labels, mapping=configured or None)

    def check_source(self, source_name: str) -> None:
        """A ValueError naming the sources that read masks, unless ``source_name`` is one of them."""
        from losslab.data.sources import get_source_class, list_sources, segmentation_sources

        source_class = get_source_class(source_name) if source_name in list_sources() else None
        if not (isinstance(source_class, type) and issubclass(source_class, SegmentationSource)):
            raise ValueError(f"data.source={source_name!r} has no segmentation reader; use one of "
                             f"{', '.join(segmentation_sources())}")

    def bind(self, data_cfg: Any, source: Source) -> SegmentationEncoder:
        mapping = self.mapping or source.default_segmentation_mapping(self.labels)
        modalities, order = source.image_channels()
        return replace(self, mapping={str(k): [int(v) for v in vs] for k, vs in mapping.items()},
                       source_name=data_cfg.source, modalities=list(modalities), channel_order=list(order))

    def settings(self) -> dict[str, Any]:
        return {"encoder": self.name, "encoder_version": SEG_CACHE_VERSION, "labels": self.labels,
                "mapping": self.mapping, "modalities": self.modalities}

    def read_jobs(self, source: Source) -> list[ReadJob]:
        """One job per case of :meth:`SegmentationSource.segmentation_items`, its payload
        ``(item, image files, mask file)``."""
        return [ReadJob(files=sum(f is not None for f in files) + (mask is not None), payload=(item, files, mask))
                for item, files, mask in source.segmentation_items()]

    def encode(self, source: Source, job: ReadJob, arrays: Path, report: SkipReport) -> list[dict[str, Any]]:
        item, files, mask_file = job.payload
        allowed = {0} | {v for values in self.mapping.values() for v in values}
        read, reason = _read_case(files, mask_file, allowed, self.channel_order)
        if read is None:
            report.skip(item, reason)
            return []
        image, mask, spacing = read
        target = encode_target(mask, self.mapping, self.labels)
        empty = not bool((mask != 0).any())
        if empty:
            report.notes.append(f"{item}: empty mask (no labelled voxel); kept as a case without tumour")
        case_id = salted_hash(f"seg:{self.source_name}:{item}", source.salt)
        row = {"case_id": case_id, "patient_id": case_id, "split_key": split_key(f"seg:{self.source_name}:{item}"),
               "spacing": spacing, "shape": list(mask.shape), "empty": empty,
               "voxels": channel_voxels(target, self.labels, len(self.mapping))}
        volumes = {"image": _zscore(image), "target": target,
                   "dist": distance_maps(target, self.labels, len(self.mapping), spacing).astype(np.float32)}
        for key, array in volumes.items():
            path = arrays / f"{case_id}_{key}.npy"
            save_atomic(path, array)
            row |= array_columns(key, record_file(arrays.parent, path))
        report.read += 1
        return [row]

    def fold_strata(self, index: pd.DataFrame, num_folds: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Whether the mask is empty, when each fold can get both kinds; else one stratum."""
        strata = index["empty"].astype(np.int64).to_numpy()
        if min(int((strata == 0).sum()), int((strata == 1).sum()) or num_folds) < num_folds:
            strata = np.zeros(len(index), dtype=np.int64)
        return strata, None

    def report(self, index: pd.DataFrame, source: Source) -> dict[str, Any]:
        return {"channel_names": list(self.mapping), "labels": self.labels, "mapping": self.mapping,
                "modalities": list(self.modalities)}

    def view(self, info: CacheInfo) -> SegCacheInfo:
        return SegCacheInfo.of(info)


# ------------------------------------------------------------------------------------- one case
def _zscore(image: np.ndarray) -> np.ndarray:
    """Per channel over the non-zero voxels of ``(C, X, Y, Z)`` (MONAI ``NormalizeIntensity(nonzero=True,
    channel_wise=True)``; a constant channel keeps std 1, the background stays 0)."""
    from monai.transforms import NormalizeIntensity

    # NormalizeIntensity writes into a float32 numpy input: it gets a copy, the caller's image is kept
    return np.asarray(NormalizeIntensity(nonzero=True, channel_wise=True, dtype=np.float32)(image.astype(np.float32)))


def encode_target(mask: np.ndarray, mapping: dict[str, list[int]], labels: str) -> np.ndarray:
    """Raw label map ``(X, Y, Z)`` -> ``uint8`` target: ``(R, X, Y, Z)`` multi-hot or ``(1, X, Y, Z)`` indices."""
    if labels == "regions":
        return np.stack([np.isin(mask, values) for values in mapping.values()]).astype(np.uint8)
    out = np.zeros((1,) + mask.shape, dtype=np.uint8)
    for index, values in enumerate(mapping.values()):
        out[0][np.isin(mask, values)] = index
    return out


def channel_voxels(target: np.ndarray, labels: str, num_channels: int) -> list[int]:
    """Foreground voxels per region of a multi-hot target ``(R, ...)``, or voxels per class of a class
    map ``(1, ...)``."""
    if labels == "regions":
        return [int(c) for c in target.reshape(target.shape[0], -1).sum(axis=1, dtype=np.int64)]
    return [int(c) for c in np.bincount(target.reshape(-1).astype(np.int64), minlength=num_channels)]


def distance_maps(target: np.ndarray, labels: str, num_channels: int, spacing: list[float]) -> np.ndarray:
    """Signed distance maps ``(R or K, X, Y, Z)`` float32 of a target, with the voxel spacing."""
    from losslab.losses import signed_distance_map

    if labels == "regions":
        return np.stack([signed_distance_map(t.astype(np.int64), 2, spacing)[1] for t in target])
    return signed_distance_map(target[0].astype(np.int64), num_channels, spacing)


def _read_case(files: list[Path | None], seg: Path | None, allowed: set[int],
               channel_order: list[int] | None = None) -> tuple[Any, str]:
    """``((image (C, X, Y, Z), mask (X, Y, Z), spacing), "")`` or ``(None, reason)``; the image's channels
    put in ``channel_order`` (the source's :meth:`~losslab.data.sources.base.SegmentationSource.image_channels`)
    when given."""
    import nibabel as nib

    if seg is None:
        return None, "no mask (*_seg.nii.gz / label map) found"
    if any(f is None for f in files):
        return None, "missing image file(s)"
    try:
        vols = [np.asarray(nib.load(str(f)).dataobj, dtype=np.float32) for f in files]
        nifti = nib.load(str(seg))
        mask = np.rint(np.asarray(nifti.dataobj)).astype(np.int64)
        spacing = [float(z) for z in nib.load(str(files[0])).header.get_zooms()[:3]]
    except Exception as exc:  # noqa: BLE001 - a corrupt file is reported, not fatal
        return None, f"cannot read NIfTI: {type(exc).__name__}: {exc}"
    image = np.moveaxis(vols[0], -1, 0) if len(vols) == 1 and vols[0].ndim == 4 else np.stack(vols)
    if channel_order:
        if image.shape[0] != len(channel_order):
            return None, f"image has {image.shape[0]} channel(s); the source names {len(channel_order)}"
        image = image[channel_order]
    if image.ndim != 4 or not np.isfinite(image).all():
        return None, f"image is not a finite (C, X, Y, Z) volume: shape {image.shape}"
    if mask.shape != image.shape[1:]:
        return None, f"mask shape {mask.shape} differs from the image {image.shape[1:]}"
    unknown = sorted(set(np.unique(mask).tolist()) - allowed)
    if unknown:
        return None, f"mask has label(s) {unknown} not in the mapping (known: {sorted(allowed)})"
    return (image, mask, spacing), ""
