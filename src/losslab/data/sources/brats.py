"""BraTS: the embedded synthetic cohort generator and the reader of the public BraTS layouts.

Layouts read (one folder per case, NIfTI volumes, axial slices along the last axis):

* BraTS 2018/2019: ``<root>/{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``; the grade is
  the parent folder.
* BraTS 2020+: ``<root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (2020/2021) or
  ``<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (2023); these releases carry no grade folder, so labels come
  from a CSV (``labels_csv`` with columns ``case,label``, e.g. the 2020 ``name_mapping.csv`` turned
  into grade labels).

Each case becomes a bag of axial 2D slices ``(N, 4, H, W)`` (t1, t1ce, t2, flair as channels),
keeping slices that contain brain. Raw intensities are kept (no normalisation here) so the cache
reproduces the raw slices exactly; the dataset normalises per case with statistics stored in the
index.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from losslab.data.deid import salted_hash
from losslab.data.sources.base import (Case, PositiveSize, SegmentationItem, SegmentationSource, Source, refused_link, register_generator, register_source,
                                       shown_columns)

MODALITIES = ("t1", "t1ce", "t2", "flair")
# BraTS 2023 names of the same four modalities
MODALITY_ALIASES = {"t1": ("t1", "t1n"), "t1ce": ("t1ce", "t1c"), "t2": ("t2", "t2w"), "flair": ("flair", "t2f")}
GRADES = ("LGG", "HGG")  # label 0 = LGG, 1 = HGG
#: segmentation targets of the BraTS labels (1 necrotic core, 2 oedema, 4 enhancing): whole tumour,
#: tumour core and enhancing tumour as overlapping regions, or the exclusive classes
BRATS_REGIONS = {"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}
BRATS_CLASSES = {"background": [0], "necrotic_core": [1], "edema": [2], "enhancing": [4]}


# --------------------------------------------------------------------------------- generator
def _ellipsoid(shape: tuple[int, int, int], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
    return dist


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], scale: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=2.0) * scale


def synthesize_case(rng: np.random.Generator, grade: str, shape: tuple[int, int, int] = (64, 64, 32)) -> dict[str, np.ndarray]:
    """One synthetic case: four modalities and a BraTS label map (1 necrosis, 2 oedema, 4 enhancing).

    Arrays are ``(X, Y, Z)`` like BraTS NIfTI volumes (axial slices along Z). The grade signal:
    HGG lesions have a necrotic core with an enhancing rim on t1ce, present in only a few central
    slices of the lesion (3 or 5 slices); LGG lesions are homogeneous and do not enhance. Lesion size, position,
    oedema and noise overlap between grades, and about 20 % of each grade carry a confound (faint
    patchy enhancement in LGG, a weak rim in HGG), so the task is learnable but not trivial.
    """
    sx, sy, sz = shape
    centre_brain = np.array([sx / 2, sy / 2, sz / 2], dtype=np.float32)
    brain_radii = np.array([sx * 0.42, sy * 0.46, sz * 0.40], dtype=np.float32) * rng.uniform(0.92, 1.05, 3)
    brain = _ellipsoid(shape, centre_brain, brain_radii) <= 1.0
    wm = _ellipsoid(shape, centre_brain, brain_radii * 0.7) <= 1.0
    # lesion inside the brain, away from the edge
    offset = rng.uniform(-0.35, 0.35, 3) * brain_radii * np.array([1, 1, 0.6])
    centre = centre_brain + offset
    core_r = rng.uniform(4.0, 8.0)
    radii = np.array([core_r, core_r * rng.uniform(0.8, 1.2), rng.uniform(2.5, 4.5)], dtype=np.float32)
    lesion = _Lesion(distance=_ellipsoid(shape, centre, radii))
    lesion.tumour = (lesion.distance <= 1.0) & brain
    lesion.oedema = (_ellipsoid(shape, centre, radii * rng.uniform(1.4, 1.9)) <= 1.0) & brain & ~lesion.tumour
    seg = _label_map(rng, grade, lesion, int(round(centre[2])))
    volumes = {name: _modality(rng, name, grade, brain, wm, lesion) for name in MODALITIES}
    volumes["seg"] = seg
    return volumes


@dataclass
class _Lesion:
    """A synthetic lesion: the ellipsoid distance of each voxel (1 on the tumour surface), the tumour
    and oedema masks, the enhancing voxels and how strongly they enhance on t1ce."""

    distance: np.ndarray
    tumour: np.ndarray | None = None
    oedema: np.ndarray | None = None
    enhancing: np.ndarray | None = None
    rim_gain: float = 0.35


def _label_map(rng: np.random.Generator, grade: str, lesion: _Lesion, centre_slice: int) -> np.ndarray:
    """The BraTS label map ``uint8 (X, Y, Z)`` of a lesion; sets its enhancing voxels and rim gain."""
    shape, tumour = lesion.distance.shape, lesion.tumour
    seg = np.zeros(shape, dtype=np.uint8)
    seg[lesion.oedema] = 2
    lesion.enhancing = np.zeros(shape, dtype=bool)
    confound = rng.uniform() < 0.2
    if grade == "HGG":
        # rim and necrosis only in the central slices of the lesion (1 or 2 slices each side)
        half = int(rng.integers(1, 3))
        zmask = np.zeros(shape, dtype=bool)
        zmask[:, :, max(centre_slice - half, 0) : centre_slice + half + 1] = True
        rim = tumour & (lesion.distance > 0.45) & zmask
        necrosis = tumour & (lesion.distance <= 0.45) & zmask
        seg[tumour] = 1
        seg[rim] = 4
        seg[necrosis] = 1
        lesion.enhancing = rim
        lesion.rim_gain = 0.2 if confound else rng.uniform(0.35, 0.8)
    else:
        seg[tumour] = 1
        if confound:  # faint patchy enhancement
            lesion.enhancing = tumour & (rng.uniform(size=shape) < 0.25)
        lesion.rim_gain = 0.35
    return seg


_MODALITY_BASE = {"t1": 420.0, "t1ce": 450.0, "t2": 380.0, "flair": 400.0}


def _modality(rng: np.random.Generator, name: str, grade: str, brain: np.ndarray, wm: np.ndarray,
              lesion: _Lesion) -> np.ndarray:
    """One modality ``int16 (X, Y, Z)``: brain and white matter levels, smooth and white noise, the
    lesion's contrast in that modality, zero outside the brain."""
    shape, tumour, oedema = brain.shape, lesion.tumour, lesion.oedema
    v = np.zeros(shape, dtype=np.float32)
    v[brain] = _MODALITY_BASE[name]
    v[wm] += 60.0 if name in ("t1", "t1ce") else -40.0
    v += _smooth_noise(rng, shape, 25.0)
    v += rng.normal(0.0, 30.0, shape).astype(np.float32)
    if name == "t1":
        v[tumour] -= 120.0
    elif name == "t1ce":
        v[tumour] -= 90.0
        v[lesion.enhancing] += lesion.rim_gain * 450.0
        if grade == "HGG":
            v[tumour & (lesion.distance <= 0.45)] -= 60.0  # necrotic core darker
    elif name == "t2":
        v[tumour] += 260.0
        v[oedema] += 160.0
    else:  # flair
        v[tumour] += 180.0
        v[oedema] += 220.0
    v[~brain] = 0.0
    return np.clip(v, 0, None).round().astype(np.int16)


@register_generator("embedded_brats")
def generate_embedded_brats(
    root: str,
    seed: int = 0,
    num_cases: int = 90,
    hgg_ratio: float = 2.8,
    shape: tuple[int, int, int] | list[int] = (64, 64, 32),
) -> None:
    """Write a synthetic cohort in the public BraTS 2018 layout under ``root``.

    ``num_cases`` cases at the BraTS ratio ``hgg_ratio`` HGG : 1 LGG, deterministic for ``seed``.
    Case names follow BraTS 2018 (``Brats18_SYN_<n>_1``). Volumes are int16 NIfTI with 1 mm voxels.
    """
    import nibabel as nib

    shape = tuple(int(s) for s in shape)
    n_lgg = int(round(num_cases / (1.0 + hgg_ratio)))
    n_hgg = num_cases - n_lgg
    grades = ["HGG"] * n_hgg + ["LGG"] * n_lgg
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_cases)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for i, idx in enumerate(order):
        grade = grades[idx]
        case = f"Brats18_SYN_{i:03d}_1"
        case_rng = np.random.default_rng([seed, i])
        vols = synthesize_case(case_rng, grade, shape)
        folder = Path(root) / grade / case
        folder.mkdir(parents=True, exist_ok=True)
        for name, arr in vols.items():
            img = nib.Nifti1Image(arr, affine)
            img.header.set_zooms((1.0, 1.0, 1.0))
            nib.save(img, str(folder / f"{case}_{name}.nii.gz"))


# --------------------------------------------------------------------------------- reader
def _find_modality(folder: Path, case: str, modality: str) -> Path | None:
    for alias in MODALITY_ALIASES[modality]:
        for sep in ("_", "-"):
            for ext in (".nii.gz", ".nii"):
                p = folder / f"{case}{sep}{alias}{ext}"
                if p.is_file():
                    return p
    return None


@register_source
class BratsSource(Source, SegmentationSource):
    """Read BraTS 2018/2019 grade folders, or BraTS 2020+ flat folders with a labels CSV.

    Args:
        root: the dataset folder.
        salt: salt for case and patient hashes.
        labels_csv: for BraTS 2020+ (no grade folders): CSV with columns ``case,label`` where label
            is ``HGG``/``LGG`` or 1/0. Default None (grade folders required).
        min_brain_fraction: keep an axial slice when at least this fraction of its pixels is brain
            (non-zero in any modality). Default 0.05.
        image_size: resize slices to this size (None keeps the native size, the default; the raw
            slices are then cached exactly).
    """

    name = "brats"
    class_names = ["LGG", "HGG"]

    def __init__(self, root: str, salt: str, report=None, labels_csv: str | None = None,
                 min_brain_fraction: float = 0.05, image_size: PositiveSize | None = None) -> None:
        super().__init__(root, salt, report)
        self.labels_csv = labels_csv
        self.min_brain_fraction = float(min_brain_fraction)
        self.image_size = image_size

    def _case_folders(self) -> list[tuple[Path, int | None]]:
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(f"BraTS root {root} does not exist")
        out: list[tuple[Path, int | None]] = []
        grade_dirs = [root / g for g in GRADES if (root / g).is_dir() or (root / g).is_symlink()]
        if grade_dirs:
            for label, grade in enumerate(GRADES):
                gdir = root / grade
                if self._allowed(gdir):
                    out += [(p, label) for p in sorted(gdir.iterdir()) if self._allowed(p)]
            return out
        labels = self._read_labels_csv()
        for p in sorted(root.iterdir()):
            if self._allowed(p):
                out.append((p, labels.get(p.name)))
        return out

    def _allowed(self, path: Path) -> bool:
        """A case (or grade) folder to read: a real folder inside the data root. A symlink that leads
        outside the root, or a dangling one, is refused and named in the report."""
        if not (path.is_dir() or path.is_symlink()):
            return False
        reason = refused_link(self.root, path)
        if reason:
            self.report.skip(os.path.relpath(path, self.root), reason)
            return False
        return path.is_dir()

    def _read_labels_csv(self) -> dict[str, int]:
        if not self.labels_csv:
            raise ValueError(
                f"{self.root}: no HGG/LGG folders found; for BraTS 2020+ layouts pass "
                "data.source_kwargs.labels_csv (CSV with columns case,label)"
            )
        path = Path(self.labels_csv)
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"case", "label"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: missing column(s) {sorted(missing)}; found "
                                 f"{shown_columns([str(h) for h in reader.fieldnames or []])}")
            out = {}
            for row in reader:
                raw = str(row["label"]).strip().upper()
                mapping = {"HGG": 1, "LGG": 0, "1": 1, "0": 0}
                if raw in mapping:
                    out[row["case"].strip()] = mapping[raw]
                else:
                    out[row["case"].strip()] = -99  # reported as unknown label when the case is read
        return out

    def segmentation_items(self) -> Iterator[SegmentationItem]:
        """Every folder under the root holding ``<folder>_*.nii*`` files: its four modalities and
        ``<case>_seg.nii.gz`` (grade folders or none)."""
        root = Path(self.root)
        folders = sorted(p for p in root.rglob("*") if p.is_dir() and any(p.glob(f"{p.name}_*.nii*")))
        for folder in folders:
            case = folder.name
            seg = next((p for p in (folder / f"{case}_seg.nii.gz", folder / f"{case}_seg.nii") if p.is_file()), None)
            yield str(folder.relative_to(root)), [_find_modality(folder, case, m) for m in MODALITIES], seg

    def default_segmentation_mapping(self, labels: str) -> dict[str, list[int]]:
        return dict(BRATS_REGIONS if labels == "regions" else BRATS_CLASSES)

    def fingerprint_files(self) -> list[str]:
        files = sorted(str(p) for p in Path(self.root).rglob("*.nii*"))
        return files + ([str(self.labels_csv)] if self.labels_csv else [])

    def iter_cases(self) -> Iterator[Case]:
        import nibabel as nib

        for folder, label in self._case_folders():
            case = folder.name
            rel = str(folder.relative_to(self.root))
            if label is None:
                self.report.skip(rel, "no label for this case in labels_csv")
                continue
            if label == -99:
                self.report.skip(rel, "unknown label value in labels_csv (expected HGG/LGG/1/0)")
                continue
            paths = {m: _find_modality(folder, case, m) for m in MODALITIES}
            missing = [m for m, p in paths.items() if p is None]
            if missing:
                self.report.skip(rel, f"missing modality file(s): {', '.join(missing)}")
                continue
            refused = {m: refused_link(self.root, p) for m, p in paths.items()}
            if any(refused.values()):
                for m, reason in refused.items():
                    if reason:
                        self.report.skip(os.path.relpath(paths[m], self.root), reason)
                continue
            try:
                vols = [np.asarray(nib.load(str(paths[m])).dataobj, dtype=np.float32) for m in MODALITIES]
            except Exception as exc:  # a corrupt file is reported, not fatal
                self.report.skip(rel, f"cannot read NIfTI: {type(exc).__name__}: {exc}")
                continue
            shapes = {v.shape for v in vols}
            if len(shapes) != 1 or len(vols[0].shape) != 3:
                self.report.skip(rel, f"modalities have different or non-3D shapes: {sorted(shapes)}")
                continue
            stack = np.stack(vols, axis=0)  # (C, X, Y, Z)
            if not np.isfinite(stack).all():
                self.report.skip(rel, "non-finite (NaN/inf) voxel values")
                continue
            brain = (stack != 0).any(axis=0)  # (X, Y, Z)
            fraction = brain.mean(axis=(0, 1))
            keep = np.flatnonzero(fraction >= self.min_brain_fraction)
            if keep.size == 0:
                self.report.skip(rel, "empty or all-background volume (no slice contains brain)")
                continue
            slices = np.transpose(stack[:, :, :, keep], (3, 0, 1, 2))  # (N, C, X, Y)
            if self.image_size and slices.shape[-1] != self.image_size:
                import torch
                import torch.nn.functional as F

                slices = F.interpolate(torch.from_numpy(np.ascontiguousarray(slices)), size=(self.image_size,) * 2,
                                       mode="bilinear", align_corners=False).numpy()
            self.report.read += 1
            spacing = tuple(float(z) for z in nib.load(str(paths["t1"])).header.get_zooms()[:3])
            yield Case(
                case_id=salted_hash(case, self.salt),
                patient_id=salted_hash(case, self.salt),
                label=int(label),
                image=np.ascontiguousarray(slices, dtype=np.float32),
                meta={"slice_index": [int(k) for k in keep], "spacing": list(spacing)},
            )
