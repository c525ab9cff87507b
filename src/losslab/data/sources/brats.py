"""BraTS: the embedded synthetic cohort generator and the reader of the public BraTS layouts.

Layouts read as the releases ship them (one folder per case, NIfTI volumes, ``.nii.gz`` or ``.nii``,
axial slices along the last axis); ``data.root`` is the folder the release unpacks to:

* BraTS 2018 (``MICCAI_BraTS_2018_Data_Training``): ``<root>/{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``;
  the grade is the parent folder.
* BraTS 2019 (``MICCAI_BraTS_2019_Data_Training``): the same folders plus ``<root>/name_mapping.csv``
  (``Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID``); a
  case whose folder and table disagree on its grade is an error naming both.
* BraTS 2020 (``MICCAI_BraTS2020_TrainingData``): ``<root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii``
  (uncompressed) and ``<root>/name_mapping.csv`` (``Grade,...,BraTS_2020_subject_ID``): the grade of
  the case folder named in the latest ``BraTS_<year>_subject_ID`` column. Its subject 355 ships its mask
  under another name (:data:`KNOWN_QUIRKS`).
* BraTS 2021 (``RSNA_ASNR_MICCAI_BraTS2021_TrainingData``): ``<root>/BraTS2021_00000/BraTS2021_00000_{flair,seg,t1,t1ce,t2}.nii.gz``,
  no grade at all: classification needs ``labels_csv``; segmentation needs nothing.
* BraTS 2023: ``<case>-{t1n,t1c,t2w,t2f}.nii.gz`` (the modalities only; its ``-seg`` masks are not read).

``labels_csv`` (columns ``case,label``, label ``HGG``/``LGG``/1/0, or a table in ``name_mapping.csv``'s
format) is a path inside ``data.root`` (relative to it), like every file this reader opens.

Each case becomes a bag of axial 2D slices ``(N, 4, H, W)`` (t1, t1ce, t2, flair as channels: the one
brain MRI order of every source, :data:`losslab.data.sources.channels.BRAIN_MRI_ORDER`),
keeping slices that contain brain. Raw intensities are kept (no normalisation here) so the cache
reproduces the raw slices exactly; the dataset normalises per case with statistics stored in the
index.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from losslab.data.deid import salted_hash
from losslab.data.sources.base import (Case, PositiveSize, SegmentationItem, SegmentationSource, Source, confined_file,
                                       read_csv_table, refused_link, register_generator, register_source,
                                       shown_columns)
from losslab.data.sources.channels import BRAIN_MRI_ORDER

MODALITIES = BRAIN_MRI_ORDER
# BraTS 2023 names of the same four modalities
MODALITY_ALIASES = {"t1": ("t1", "t1n"), "t1ce": ("t1ce", "t1c"), "t2": ("t2", "t2w"), "flair": ("flair", "t2f")}
GRADES = ("LGG", "HGG")  # label 0 = LGG, 1 = HGG
#: segmentation targets of the BraTS labels (1 necrotic core, 2 oedema, 4 enhancing): whole tumour,
#: tumour core and enhancing tumour as overlapping regions, or the exclusive classes
BRATS_REGIONS = {"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}
BRATS_CLASSES = {"background": [0], "necrotic_core": [1], "edema": [2], "enhancing": [4]}
#: the grade table BraTS 2019 and 2020 ship in the data root (read without any option)
NAME_MAPPING = "name_mapping.csv"
_GRADE_VALUES = {"HGG": 1, "LGG": 0, "1": 1, "0": 0}
_SUBJECT_COLUMN = re.compile(r"BraTS_(\d{4})_subject_ID")
#: Known quirks of the public releases, read as each release ships them (no file is renamed):
#: ``(case folder, file role) -> (the file the release ships instead, which release)``.
KNOWN_QUIRKS: dict[tuple[str, str], tuple[str, str]] = {
    # MICCAI_BraTS2020_TrainingData ships this mask instead of BraTS20_Training_355_seg.nii
    ("BraTS20_Training_355", "seg"): ("W39_1998.09.19_Segm.nii", "BraTS 2020"),
}


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


def find_mask(folder: Path, case: str) -> tuple[Path | None, str]:
    """``(the case's mask, a note)``: ``<case>_seg.nii.gz`` / ``.nii``, else the file a known quirk of a
    release names (:data:`KNOWN_QUIRKS`; the note says which), else ``(None, "")``."""
    for ext in (".nii.gz", ".nii"):
        if (folder / f"{case}_seg{ext}").is_file():
            return folder / f"{case}_seg{ext}", ""
    shipped, release = KNOWN_QUIRKS.get((case, "seg"), ("", ""))
    if shipped and (folder / shipped).is_file():
        return folder / shipped, f"{case}: mask read from {shipped} (as {release} ships it: a known quirk)"
    return None, ""


def read_grade_table(path: str, shown: str) -> dict[str, str]:
    """``{case folder: grade as written}`` of a CSV with columns ``case,label`` or in the format of the
    ``name_mapping.csv`` BraTS 2019/2020 ship (``Grade`` and ``BraTS_<year>_subject_ID`` columns: the
    latest year's column names the case folder of that release).

    Raises:
        ValueError: neither format (names the file and the columns found).
    """
    header, rows = read_csv_table(path, (), shown=shown)
    if {"case", "label"} <= set(header):
        case_column, grade_column = "case", "label"
    else:
        years = sorted((int(m.group(1)), h) for h in header if (m := _SUBJECT_COLUMN.fullmatch(h)))
        if "Grade" not in header or not years:
            raise ValueError(f"{shown}: missing column(s) ['case', 'label'] (or name_mapping.csv's Grade and "
                             f"BraTS_<year>_subject_ID); found {shown_columns(header)}")
        case_column, grade_column = years[-1][1], "Grade"
    return {row[case_column]: row[grade_column].upper() for row in rows if row[case_column] not in ("", "NA")}


@register_source
class BratsSource(Source, SegmentationSource):
    """Read the public BraTS releases (module docstring): grade folders, or flat case folders with
    the release's ``name_mapping.csv`` or a labels CSV.

    Args:
        root: the dataset folder (the folder the release unpacks to).
        salt: salt for case and patient hashes.
        labels_csv: a CSV inside the data root (a path relative to it) with columns ``case,label`` where
            label is ``HGG``/``LGG`` or 1/0 (or in ``name_mapping.csv``'s format). Default None: the grade
            folders, else ``<root>/name_mapping.csv`` (BraTS 2019/2020). BraTS 2021 ships no grade.
        min_brain_fraction: keep an axial slice when at least this fraction of its pixels is brain
            (non-zero in any modality). Default 0.05.
        image_size: resize slices to this size (None keeps the native size, the default; the raw
            slices are then cached exactly).

    Raises:
        ValueError: ``labels_csv`` outside the data root (refused before it is opened).
    """

    name = "brats"
    class_names = ["LGG", "HGG"]
    modalities = list(MODALITIES)

    def __init__(self, root: str, salt: str, report=None, labels_csv: str | None = None,
                 min_brain_fraction: float = 0.05, image_size: PositiveSize | None = None) -> None:
        super().__init__(root, salt, report)
        self.labels_csv = labels_csv
        self.labels_path = confined_file(root, labels_csv, "data.source_kwargs.labels_csv") if labels_csv else None
        self.min_brain_fraction = float(min_brain_fraction)
        self.image_size = image_size

    def _grade_file(self) -> tuple[str, str] | None:
        """``(path, name shown)`` of the grade table: ``labels_csv``, else the release's ``name_mapping.csv``."""
        if self.labels_path:
            return self.labels_path, str(self.labels_csv)
        if os.path.lexists(Path(self.root) / NAME_MAPPING):
            return confined_file(self.root, NAME_MAPPING, NAME_MAPPING), NAME_MAPPING
        return None

    def _case_folders(self) -> list[tuple[Path, int | None]]:
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(f"BraTS root {root} does not exist")
        grade_file = self._grade_file()
        table = read_grade_table(*grade_file) if grade_file else None
        self.grade_source = grade_file[1] if grade_file else "the grade folders"
        grade_dirs = [root / g for g in GRADES if (root / g).is_dir() or (root / g).is_symlink()]
        if grade_dirs:
            return self._graded_folders(table)
        if table is None:
            raise ValueError(
                f"{root}: no HGG/LGG folders and no {NAME_MAPPING}, so no grade to classify (BraTS 2021 and later "
                "ship none); classification needs data.source_kwargs.labels_csv (a CSV with columns case,label "
                "inside data.root); segmentation needs no grade")
        return [(p, _GRADE_VALUES.get(table[p.name], -99) if p.name in table else None)
                for p in sorted(root.iterdir()) if self._allowed(p)]

    def _graded_folders(self, table: dict[str, str] | None) -> list[tuple[Path, int | None]]:
        """The case folders under ``HGG``/``LGG`` with the folder's grade; a grade table (BraTS 2019's
        ``name_mapping.csv``) that says otherwise for a case is an error naming both."""
        out: list[tuple[Path, int | None]] = []
        for label, grade in enumerate(GRADES):
            gdir = Path(self.root) / grade
            if not self._allowed(gdir):
                continue
            for p in sorted(gdir.iterdir()):
                if not self._allowed(p):
                    continue
                if table is not None and p.name in table and _GRADE_VALUES.get(table[p.name]) != label:
                    raise ValueError(f"{grade}/{p.name}: the folder says {grade} but {self.grade_source} says "
                                     f"{table[p.name]!r}; correct one of them")
                out.append((p, label))
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

    def segmentation_items(self) -> Iterator[SegmentationItem]:
        """Every folder under the root holding ``<folder>_*.nii*`` files: its four modalities and its mask
        (``<case>_seg.nii.gz`` / ``.nii``, or the file a known quirk names; grade folders or none). A file
        that is a symlink out of the root, or a dangling one, is left out (the case is then skipped)."""
        root = Path(self.root)
        folders = sorted(p for p in root.rglob("*") if p.is_dir() and any(p.glob(f"{p.name}_*.nii*")))
        for folder in folders:
            case = folder.name
            seg, note = find_mask(folder, case)
            if note:
                self.report.notes.append(note)
            files = [_find_modality(folder, case, m) for m in MODALITIES]
            inside = [f if f is not None and not refused_link(self.root, f) else None for f in files]
            yield (str(folder.relative_to(root)), inside,
                   seg if seg is not None and not refused_link(self.root, seg) else None)

    def image_channels(self) -> tuple[list[str], list[int]]:
        """The four modalities, in the order :meth:`segmentation_items` lists their files (the canonical one)."""
        return list(MODALITIES), list(range(len(MODALITIES)))

    def default_segmentation_mapping(self, labels: str) -> dict[str, list[int]]:
        return dict(BRATS_REGIONS if labels == "regions" else BRATS_CLASSES)

    def fingerprint_files(self) -> list[str]:
        files = sorted(str(p) for p in Path(self.root).rglob("*.nii*"))
        grade_file = self._grade_file()
        return files + ([grade_file[0]] if grade_file and os.path.isfile(grade_file[0]) else [])

    def iter_cases(self) -> Iterator[Case]:
        import nibabel as nib

        for folder, label in self._case_folders():
            case = folder.name
            rel = str(folder.relative_to(self.root))
            if label is None:
                self.report.skip(rel, f"no label for this case in {self.grade_source}")
                continue
            if label == -99:
                self.report.skip(rel, f"unknown grade in {self.grade_source} (expected HGG/LGG/1/0)")
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
                patient_key=case,
                label=int(label),
                image=np.ascontiguousarray(slices, dtype=np.float32),
                meta={"slice_index": [int(k) for k in keep], "spacing": list(spacing)},
            )
