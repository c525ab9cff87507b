"""The segmentation cache: image volumes, targets and boundary distance maps, with voxel spacing.

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

Layout under ``data.cache_dir``::

    cases/<case_id>_image.npy   float32 (C, X, Y, Z), z-scored per channel over the non-zero voxels
    cases/<case_id>_target.npy  uint8 (R, X, Y, Z) multi-hot regions, or (1, X, Y, Z) class indices
    cases/<case_id>_dist.npy    float32 (R or K, X, Y, Z) signed distance maps with the voxel spacing
                                (:func:`losslab.losses.signed_distance_map`), for the boundary loss
    index.json                  one row per case: case_id, patient_id, fold, spacing, shape, empty,
                                voxels (foreground voxels per region, or voxels per class), arrays
                                (path, bytes and sha256 of each of the case's three files)
    report.json                 read / skipped (item + reason) / notes, channel names, fingerprint,
                                modalities (the image channels' names: t1, t1ce, t2, flair for brain MRI
                                from every source, :mod:`losslab.data.sources.channels`)

A mask with a raw label outside the mapping and a mask whose shape differs from its image are skipped
and named in the report; an empty mask (no labelled voxel) is kept (a case without tumour) and named in
the report's notes. Case ids are salted hashes; the salt never reaches the cache.

Opening the cache (:func:`load_seg_cache`, and a build that would reuse it) checks every array file
against its recorded size and hash (:mod:`losslab.data.integrity`); a build rebuilds a damaged cache
from the raw data, or refuses, naming the file, when the raw data is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from losslab.data.deid import resolve_salt, salted_hash
from losslab.data.integrity import (ArrayRecord, CacheIntegrityError, exclusive, record_file, save_atomic,
                                    verify_arrays)
from losslab.data.raw_data import ensure_raw_data_to_rebuild, hash_files
from losslab.data.sources.base import SegmentationItem, SegmentationSource, SkipReport
from losslab.data.splits import assign_folds, split_fingerprint, split_key

SEG_CACHE_VERSION = 4  # 2: voxel counts per channel in the index; 3: array sizes and hashes;
# 4: folds over split keys (independent of the salt), the split fingerprint in report.json

log = logging.getLogger(__name__)


@dataclass
class SegCacheInfo:
    """A built (or reused) segmentation cache.

    ``channel_names``: the region names (``regions``) or class names, background first (``classes``);
    ``class_names``: the names metrics are reported for (regions, or the classes without background).
    """

    cache_dir: Path
    index: list[dict[str, Any]]
    report: dict[str, Any]
    reused: bool
    fingerprint: str
    labels: str
    channel_names: list[str] = field(default_factory=list)
    rebuilt_because: str = ""  # the damage found in the previous cache when this build replaced it

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
        """``image``, ``label`` (the target) and ``dist`` arrays of a case, memory-mapped."""
        base = self.cache_dir / "cases" / row["case_id"]
        return {key: np.load(f"{base}_{suffix}.npy", mmap_mode="r")
                for key, suffix in (("image", "image"), ("label", "target"), ("dist", "dist"))}


def load_seg_cache(cache_dir: str | Path, check_hashes: bool | None = None) -> SegCacheInfo:
    """Open a built segmentation cache after checking its arrays against the index
    (:func:`~losslab.data.integrity.verify_arrays`).

    Raises:
        FileNotFoundError: no ``report.json`` (never built, or a build did not finish).
        CacheIntegrityError: an array is missing, truncated or altered (named), or the index predates
            array hashes.
    """
    cache_dir = Path(cache_dir)
    if not (cache_dir / "report.json").is_file():
        raise FileNotFoundError(f"no segmentation cache at {cache_dir} (missing report.json); run `losslab preprocess` first")
    index = json.loads((cache_dir / "index.json").read_text())
    if any("arrays" not in row for row in index):
        raise CacheIntegrityError(f"{cache_dir / 'index.json'} has no array sizes and hashes (a cache older than "
                                  f"version {SEG_CACHE_VERSION}); rebuild it with `losslab preprocess`")
    verify_arrays(cache_dir, (ArrayRecord(**record) for row in index for record in row["arrays"]), check_hashes)
    report = json.loads((cache_dir / "report.json").read_text())
    return SegCacheInfo(cache_dir, index, report, True, report["fingerprint"], report["labels"],
                        report["channel_names"])


def _reusable(cache_dir: Path, fingerprint: str) -> SegCacheInfo | str | None:
    """The cache at ``cache_dir`` when it is intact and was built from the same inputs; its integrity
    error (a str) when it was built from them but an array is damaged; else None."""
    if not (cache_dir / "report.json").is_file():
        return None
    if json.loads((cache_dir / "report.json").read_text()).get("fingerprint") != fingerprint:
        return None
    try:
        return load_seg_cache(cache_dir, check_hashes=True)
    except CacheIntegrityError as exc:
        log.warning("%s; rebuilding the segmentation cache from the raw data", exc)
        return str(exc)


# ------------------------------------------------------------------------------------- one case
def _zscore(image: np.ndarray) -> np.ndarray:
    """Per channel over the non-zero voxels (MONAI ``NormalizeIntensity(nonzero=True, channel_wise=True)``;
    a constant channel keeps std 1, the background stays 0)."""
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
    """``((image, mask, spacing), "")`` or ``(None, reason)``; the image's channels put in ``channel_order``
    (the source's :meth:`~losslab.data.sources.base.SegmentationSource.image_channels`) when given."""
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


# ------------------------------------------------------------------------------------- build
def _settings(data_cfg: Any, seg_cfg: Any, mapping: dict[str, list[int]], salt: str) -> dict[str, Any]:
    return {"version": SEG_CACHE_VERSION, "source": data_cfg.source, "labels": seg_cfg.labels, "mapping": mapping,
            "num_folds": data_cfg.num_folds, "test_fraction": data_cfg.test_fraction, "seed": data_cfg.seed,
            "salt": hashlib.sha256(salt.encode()).hexdigest()}


def build_seg_cache(data_cfg: Any, seg_cfg: Any, force: bool = False) -> SegCacheInfo:
    """Build (or reuse, when the raw files and settings are unchanged and every array is intact) the
    segmentation cache.

    Raises:
        ValueError: an unknown ``data.source``, or no usable case (the first reasons are named).
        FileNotFoundError: ``data.root`` missing and no generator, or no ``dataset.json`` (msd).
        CacheIntegrityError: a damaged cache array (named) whose raw data is gone.
    """
    root, cache_dir = Path(data_cfg.root), Path(data_cfg.cache_dir)
    source_class = _segmentation_source(data_cfg.source)
    with exclusive(cache_dir / ".preprocess.lock"):  # one builder per cache folder; the salt is resolved under it
        ensure_raw_data_to_rebuild(data_cfg, lambda: load_seg_cache(cache_dir, check_hashes=True))
        salt = resolve_salt(data_cfg.salt, cache_dir)
        source = source_class(root=str(root), salt=salt, report=SkipReport())  # masks need no source_kwargs
        configured = seg_cfg.regions if seg_cfg.labels == "regions" else seg_cfg.classes
        mapping = {str(k): [int(v) for v in vs]
                   for k, vs in (configured or source.default_segmentation_mapping(seg_cfg.labels)).items()}
        files = sorted(str(p) for p in root.rglob("*") if p.is_file())
        settings = _settings(data_cfg, seg_cfg, mapping, salt) | {"modalities": source.image_channels()[0]}
        fingerprint = hashlib.sha256((hash_files(files, str(root)) + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
        found = None if force else _reusable(cache_dir, fingerprint)
        if isinstance(found, SegCacheInfo):
            return found  # unchanged inputs, or another process built it while this one waited
        info = _build(data_cfg, seg_cfg, source, mapping, fingerprint, salt)
        info.rebuilt_because = found or ""
        return info


def _build(data_cfg: Any, seg_cfg: Any, source: SegmentationSource, mapping: dict[str, list[int]],
           fingerprint: str, salt: str) -> SegCacheInfo:
    """Write every case, draw the folds over the cases' split keys, then the index and the report (the
    commit mark: removed first, written last)."""
    cache_dir = Path(data_cfg.cache_dir)
    (cache_dir / "report.json").unlink(missing_ok=True)
    modalities, channel_order = source.image_channels()
    report, rows = _write_cases(source.segmentation_items(), cache_dir, mapping, seg_cfg.labels, salt,
                                data_cfg.source, channel_order)
    report.skipped += source.report.skipped  # what the source itself refused or noted (e.g. a known quirk)
    report.notes += source.report.notes
    keys = [row.pop("split_key") for row in rows]  # orders the draw; never written to the index
    _assign_folds(rows, keys, data_cfg)
    full = report.to_dict() | {"fingerprint": fingerprint, "channel_names": list(mapping), "labels": seg_cfg.labels,
                               "mapping": mapping, "source": data_cfg.source, "modalities": modalities,
                               "split_fingerprint": split_fingerprint(keys, [r["fold"] for r in rows])}
    (cache_dir / "index.json.tmp").write_text(json.dumps(rows, indent=1))
    os.replace(cache_dir / "index.json.tmp", cache_dir / "index.json")
    tmp = cache_dir / "report.json.tmp"
    tmp.write_text(json.dumps(full, indent=2))
    os.replace(tmp, cache_dir / "report.json")  # the report is the commit mark
    return SegCacheInfo(cache_dir, rows, full, False, fingerprint, seg_cfg.labels, list(mapping))


def _segmentation_source(name: str) -> type[SegmentationSource]:
    """The registered source class ``name`` when it reads segmentation masks; else a ValueError naming
    the sources that do."""
    from losslab.data.sources import get_source_class, list_sources, segmentation_sources

    source_class = get_source_class(name) if name in list_sources() else None
    if not (isinstance(source_class, type) and issubclass(source_class, SegmentationSource)):
        raise ValueError(f"data.source={name!r} has no segmentation reader; use one of "
                         f"{', '.join(segmentation_sources())}")
    return source_class


def _write_cases(items: Iterator[SegmentationItem], cache_dir: Path, mapping: dict[str, list[int]], labels: str,
                 salt: str, source: str, channel_order: list[int] | None = None
                 ) -> tuple[SkipReport, list[dict[str, Any]]]:
    report = SkipReport()
    allowed = {0} | {v for values in mapping.values() for v in values}
    cases = cache_dir / "cases"
    shutil.rmtree(cases, ignore_errors=True)
    cases.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for item, files, seg in items:
        read, reason = _read_case(files, seg, allowed, channel_order)
        if read is None:
            report.skip(item, reason)
            continue
        image, mask, spacing = read
        target = encode_target(mask, mapping, labels)
        empty = not bool((mask != 0).any())
        if empty:
            report.notes.append(f"{item}: empty mask (no labelled voxel); kept as a case without tumour")
        case_id = salted_hash(f"seg:{source}:{item}", salt)
        key = split_key(f"seg:{source}:{item}")
        arrays = {"image": _zscore(image), "target": target,
                  "dist": distance_maps(target, labels, len(mapping), spacing).astype(np.float32)}
        records = []
        for suffix, array in arrays.items():
            save_atomic(cases / f"{case_id}_{suffix}.npy", array)
            records.append(asdict(record_file(cache_dir, cases / f"{case_id}_{suffix}.npy")))
        rows.append({"case_id": case_id, "patient_id": case_id, "split_key": key, "spacing": spacing, "shape": list(mask.shape),
                     "empty": empty, "fold": 0, "voxels": channel_voxels(target, labels, len(mapping)),
                     "arrays": records})
        report.read += 1
    if not rows:
        reasons = "; ".join(f"{s['item']}: {s['reason']}" for s in report.skipped[:5])
        raise ValueError(f"no usable segmentation case under the data root: {len(report.skipped)} skipped ({reasons})")
    return report, rows


def _assign_folds(rows: list[dict[str, Any]], keys: list[str], data_cfg: Any) -> None:
    """Patient-level folds (``assign_folds`` over the split keys, so independent of the salt),
    stratified on whether the mask is empty when possible."""
    groups = list(keys)
    strata = [int(r["empty"]) for r in rows]
    if min(strata.count(0), strata.count(1) or data_cfg.num_folds) < data_cfg.num_folds:
        strata = [0] * len(rows)
    folds = assign_folds(strata, groups, data_cfg.num_folds, data_cfg.seed, data_cfg.test_fraction)
    for row, fold in zip(rows, folds):
        row["fold"] = int(fold)
