"""``manifest``: a CSV ``path,label,patient_id[,text,<task columns>...]`` over PNG/NPY/DICOM/NIfTI.

Layout under ``root``::

    manifest.csv      path,label,patient_id[,text][,<extra>...]
    <path>            an image: .png/.jpg (8-bit scaled to [0, 1]), .npy, .dcm, .nii/.nii.gz

Images become ``float32 (N, C, H, W)``:

    ===========================  ===========================================================
    PNG/JPEG grey (H, W)         (1, 1, H, W); RGB(A) (H, W, 3|4) -> (1, 3, H, W)
    NPY (H, W) / (D, H, W)       (1, 1, H, W) / (D, 1, H, W); 4D arrays are taken as (N, C, H, W)
    DICOM (one file)             (D, 1, H, W) through :func:`losslab.data.dicom.read_series`
    NIfTI (X, Y, Z[, C])         (Z, C, Y, X): one instance per axial slice
    ===========================  ===========================================================

``path`` is resolved under the data root; a path that escapes it (``../x``, an absolute path
elsewhere, a symlink pointing out) is refused: skip with reason ``path escapes the data root``. The
manifest itself (``manifest``) must be inside the data root too (else ValueError, nothing read).
Labels map through the ``class_names`` kwarg, else through the sorted unique labels (numerically
when all are integers). ``meta["text"]`` holds the ``text`` column; every other extra column
``c`` goes to ``meta["task_<c>"]`` (numbers as numbers), except columns named like a DICOM
identifier (``patient_name``, ``birth_date``, ...), which are dropped and noted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from losslab.data import dicom
from losslab.data.deid import salted_hash
from losslab.data.sources.base import (Case, PositiveSize, SkipReport, Source, confined_file, read_csv_table,
                                       register_source, resolve_under)

REQUIRED_COLUMNS = ("path", "label", "patient_id")
_PHI_COLUMN_NAMES = {re.sub(r"[^a-z]", "", k.lower()) for k in dicom.PHI_KEYWORDS} | {
    "name", "birthdate", "dob", "mrn", "ssn", "address", "phone", "email"}


def manifest_path(root: str | os.PathLike[str], manifest: str = "manifest.csv") -> str:
    """``data.source_kwargs.manifest`` resolved under the data root; outside it: ValueError (nothing read)."""
    return confined_file(root, manifest, "data.source_kwargs.manifest")


def nifti_to_stack(data: np.ndarray) -> np.ndarray:
    """NIfTI array ``(X, Y[, Z[, C]])`` to ``float32 (Z, C, Y, X)``."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise ValueError(f"NIfTI data must have 2 to 4 dimensions, got shape {data.shape}")
    return np.ascontiguousarray(data.transpose(2, 3, 1, 0))


def load_image(path: str, report: SkipReport, item: str, root: str) -> np.ndarray | None:
    """Any supported file as ``float32 (N, C, H, W)``, or ``None`` (reported)."""
    lower = path.lower()
    try:
        if lower.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
            from PIL import Image

            with Image.open(path) as pil:
                array = np.asarray(pil)
            scale = 255.0 if array.dtype == np.uint8 else (65535.0 if array.dtype == np.uint16 else 1.0)
            array = array.astype(np.float32) / np.float32(scale)
            if array.ndim == 2:
                return array[None, None]
            return np.ascontiguousarray(array[..., :3].transpose(2, 0, 1))[None]
        if lower.endswith(".npy"):
            array = np.load(path, allow_pickle=False).astype(np.float32)
            if array.ndim == 2:
                return array[None, None]
            if array.ndim == 3:
                return array[:, None]
            if array.ndim == 4:
                return array
            report.skip(item, f"unsupported array shape {array.shape} (expected 2 to 4 dimensions)")
            return None
        if lower.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            return nifti_to_stack(np.asanyarray(nib.load(path).dataobj))
        if lower.endswith(".dcm") or "." not in os.path.basename(path):
            volume, _ = dicom.read_series([path], report, root=root, item=item)
            return None if volume is None else volume[:, None]
    except Exception as exc:  # noqa: BLE001 - any decoder error is a skip
        report.skip(item, f"unreadable image: {type(exc).__name__}: {exc}")
        return None
    report.skip(item, f"unsupported file type {os.path.splitext(path)[1]!r} (png, jpg, npy, dcm, nii, nii.gz)")
    return None


def _value(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def sorted_labels(values: Sequence[str]) -> list[str]:
    """Unique labels, numerically sorted when all are integers, else lexically."""
    unique = set(values)
    if unique and all(re.fullmatch(r"-?\d+", v) for v in unique):
        return sorted(unique, key=int)
    return sorted(unique)


@register_source
class ManifestSource(Source):
    """Images listed in a CSV manifest.

    Args (source kwargs):
        manifest: CSV path relative to root (default ``manifest.csv``); must stay inside root.
        class_names: label values in class order; default the sorted unique labels.
        image_size: resize every image to ``(image_size, image_size)`` (default: keep).
        normalise: ``"none"`` (default), ``"minmax"`` or ``"zscore"`` per case.

    Raises:
        FileNotFoundError: no manifest. ValueError: the manifest is outside the data root; a required
        column is missing (names the file and the column).
    """

    name = "manifest"

    def __init__(self, root: str, salt: str, report: SkipReport | None = None, manifest: str = "manifest.csv",
                 class_names: Sequence[str] | None = None, image_size: PositiveSize | None = None,
                 normalise: str = "none") -> None:
        super().__init__(root, salt, report)
        self.manifest = manifest
        self.image_size = image_size
        self.normalise = normalise
        path = Path(manifest_path(root, manifest))
        if not path.is_file():
            raise FileNotFoundError(f"{path}: manifest not found")
        header, self.rows = read_csv_table(path, REQUIRED_COLUMNS, shown=str(manifest))
        self.extra_columns = [h for h in header if h not in REQUIRED_COLUMNS and h != "text"]
        self.dropped_columns = [h for h in self.extra_columns if re.sub(r"[^a-z]", "", h.lower()) in _PHI_COLUMN_NAMES]
        self.extra_columns = [h for h in self.extra_columns if h not in self.dropped_columns]
        self.has_text = "text" in header
        if class_names:
            self.class_names = [str(c) for c in class_names]
        else:
            self.class_names = sorted_labels([r["label"] for r in self.rows if r["label"]])

    def iter_cases(self) -> Iterator[Case]:
        report = self.report
        if self.dropped_columns:
            report.notes.append(f"{self.manifest}: columns {self.dropped_columns} look like identifiers and were "
                                "not copied")
        index = {name: i for i, name in enumerate(self.class_names)}
        for line, row in enumerate(self.rows, start=2):
            item = row["path"] or f"{self.manifest}:{line}"
            if not row["path"]:
                report.skip(item, "empty path")
                continue
            resolved = resolve_under(self.root, row["path"])
            if resolved is None:
                report.skip(item, "path escapes the data root (refused)")
                continue
            if not row["label"]:
                report.skip(item, "no label")
                continue
            if row["label"] not in index:
                report.skip(item, f"unknown label value {row['label']!r}; known: {self.class_names}")
                continue
            if not row["patient_id"]:
                report.skip(item, "no patient_id")
                continue
            if not os.path.isfile(resolved):
                report.skip(item, "file not found")
                continue
            image = load_image(resolved, report, item, self.root)
            if image is None:
                continue
            image, extra = dicom.check_volume(image, item, report)
            if image is None:
                continue
            if self.image_size:
                image = dicom.resize(image, (self.image_size, self.image_size))
            image = dicom.normalise(image, self.normalise)
            meta: dict[str, Any] = dict(extra)
            if self.has_text:
                meta["text"] = row.get("text", "")
            for column in self.extra_columns:
                meta[f"task_{column}"] = _value(row.get(column, ""))
            report.read += 1
            yield Case(
                case_id=salted_hash(f"manifest:{row['path']}", self.salt),
                patient_id=salted_hash(f"manifest:{row['patient_id']}", self.salt),
                patient_key=str(row["patient_id"]),
                label=index[row["label"]],
                image=np.ascontiguousarray(image, dtype=np.float32),
                meta=meta,
            )
