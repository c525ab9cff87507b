"""``embedded_lumbar``: a generator that writes the RSNA 2024 lumbar spine layout as real DICOM.

The layout is the one :mod:`losslab.data.sources.rsna_lumbar` reads::

    train.csv                        study_id, <condition>_<level> ... ("Normal/Mild" | "Moderate" | "Severe")
    train_label_coordinates.csv      study_id, series_id, instance_number, condition, level, x, y
    train_series_descriptions.csv    study_id, series_id, series_description
    train_images/<study>/<series>/<instance>.dcm

Every file is a real DICOM Part 10 file (``FileMetaDataset``, Explicit VR Little Endian) of a
sagittal series with ``ImageOrientationPatient``/``ImagePositionPatient`` and fake identifiers
(``PatientName "FAKE^PATIENT^<n>"``, ``PatientID "FAKEID<n>"``, birth date, accession number,
institution ...) that the reader must never let out. Instance numbers (and so file names) are a
random permutation of the slice order, so a reader that sorts by ``InstanceNumber`` or file name
gets the wrong order.

Signal: a bright vertical canal at the centre column crosses five disc levels; at the labelled
level and slice the canal is narrowed by a dark band whose width and depth grow with severity
(Normal/Mild < Moderate < Severe), fading over neighbouring slices. Labels are drawn with exact
frequencies 88/7/5 % (rounded) per (study, condition, level). Deterministic for a seed.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from losslab.data.sources.base import register_generator

LEVELS = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")
CONDITIONS = (
    "Spinal Canal Stenosis",
    "Left Neural Foraminal Narrowing",
    "Right Neural Foraminal Narrowing",
    "Left Subarticular Stenosis",
    "Right Subarticular Stenosis",
)
SEVERITIES = ("Normal/Mild", "Moderate", "Severe")

#: the root of generated UIDs; the rest is a hash of their entropy sources (seed, study, series, slice),
#: so the same seed writes the same files (pydicom's generate_uid ignores the sources without a prefix)
UID_PREFIX = "1.2.826.0.1.3680043.10.1234."
#: sagittal: rows run anterior (+y), columns run inferior (-z); the normal is -x.
SAGITTAL_ORIENTATION = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def column_name(condition: str, level: str) -> str:
    """The ``train.csv`` column of a (condition, level): ``spinal_canal_stenosis_l1_l2``."""
    return f"{condition.lower().replace(' ', '_')}_{level.lower().replace('/', '_')}"


def make_dataset(
    pixels: np.ndarray,
    *,
    series_uid: str,
    study_uid: str,
    position: Sequence[float] | None,
    orientation: Sequence[float] | None = SAGITTAL_ORIENTATION,
    instance_number: int = 1,
    modality: str = "MR",
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    slice_thickness: float = 3.0,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    photometric: str = "MONOCHROME2",
    identifiers: dict[str, str] | None = None,
    series_description: str = "Sagittal T2/STIR",
) -> Any:
    """A single-frame DICOM ``FileDataset`` (uint16 pixels) ready for ``save_as``.

    Used by the generator and by tests that need hand-made broken series. ``position`` or
    ``orientation`` ``None`` leaves the attribute out.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    sop_uid = generate_uid()
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = MRImageStorage
    file_meta.MediaStorageSOPInstanceUID = sop_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=file_meta, preamble=b"\0" * 128)
    _set_fake_identifiers(ds, identifiers or {})
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(prefix=UID_PREFIX, entropy_srcs=[study_uid, "frame-of-reference"])
    ds.Modality = modality
    ds.SeriesDescription = series_description
    ds.InstanceNumber = int(instance_number)
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = float(slice_thickness)
    _set_pixels(ds, np.asarray(pixels), photometric, rescale, window)
    return ds


def _set_fake_identifiers(ds: Any, ids: dict[str, str]) -> None:
    """The patient, visit and staff attributes of a fake file: ``ids`` where given, else fake defaults."""
    ds.PatientName = ids.get("PatientName", "FAKE^PATIENT^0")
    ds.PatientID = ids.get("PatientID", "FAKEID0")
    ds.PatientBirthDate = ids.get("PatientBirthDate", "19700101")
    ds.PatientSex = "O"
    ds.AccessionNumber = ids.get("AccessionNumber", "FAKEACC0")
    ds.InstitutionName = ids.get("InstitutionName", "FAKE HOSPITAL")
    ds.ReferringPhysicianName = ids.get("ReferringPhysicianName", "FAKE^DOCTOR")
    ds.StudyID = ids.get("StudyID", "FAKESTUDY0")
    ds.StudyDate = "20240101"


def _set_pixels(ds: Any, pixels: np.ndarray, photometric: str, rescale: tuple[float, float] | None,
                window: tuple[float, float] | None) -> None:
    """uint16 monochrome pixel data ``(rows, columns)`` with its optional rescale and window."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = float(rescale[0]), float(rescale[1])
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()


def _study_volume(rng: np.random.Generator, severities: dict[tuple[str, str], int], condition_names: Sequence[str],
                  slices: int, size: int, level_rows: list[int], centre_slice: int) -> np.ndarray:
    """``uint16 (slices, size, size)`` with the canal narrowed at each labelled level."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    volume = np.empty((slices, size, size), dtype=np.float32)
    for k in range(slices):
        # tissue background + vertebral bodies (brighter blocks) + the canal column
        slab = 250.0 + 40.0 * np.sin(xx / 5.0)
        weight = np.exp(-((k - centre_slice) / (0.35 * slices)) ** 2)
        for row in level_rows:
            slab += 250.0 * ((np.abs(yy - row) > 2) & (np.abs(yy - row) < 5) & (xx < size * 0.45))
        canal = 600.0 * weight * np.exp(-((xx - size / 2.0) / 3.0) ** 2)
        volume[k] = slab + canal
    for (condition, level), severity in severities.items():
        row = level_rows[LEVELS.index(level)]
        col = size / 2.0 + 2.0 * condition_names.index(condition)
        depth = (0.15, 0.55, 0.9)[severity]
        half_height = (1.0, 2.5, 4.0)[severity]
        for k in range(slices):
            fade = np.exp(-((k - centre_slice) / 2.0) ** 2)
            band = np.exp(-((yy - row) / half_height) ** 2) * np.exp(-((xx - col) / 4.0) ** 2)
            volume[k] *= 1.0 - depth * fade * band
    volume += rng.normal(0.0, 25.0, volume.shape)
    return np.clip(volume, 0, 4000).astype(np.uint16)


@register_generator("embedded_lumbar")
def generate_embedded_lumbar(
    root: str,
    seed: int = 0,
    studies: int = 20,
    conditions: Sequence[str] = ("Spinal Canal Stenosis",),
    slices: int = 15,
    size: int = 64,
    class_frequencies: Sequence[float] = (0.88, 0.07, 0.05),
) -> None:
    """Write ``studies`` sagittal series in the RSNA 2024 lumbar layout under ``root``.

    Args:
        root: output folder (created).
        seed: everything (labels, coordinates, noise, shuffles, UIDs) follows from it.
        studies: number of studies (one patient, one series each). Default 20.
        conditions: condition names (of :data:`CONDITIONS`); default spinal canal stenosis only.
        slices: slices per series (default 15). size: image side in pixels (default 64).
        class_frequencies: Normal/Mild, Moderate, Severe shares over all (study, condition,
            level); counts are rounded, the remainder goes to Normal/Mild.

    20 studies x 1 condition x 5 levels = 100 cases (88/7/5) in about a second.
    """
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown condition(s) {unknown}; known: {list(CONDITIONS)}")
    rng = np.random.default_rng(seed)
    out = Path(root)
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    labels = _shuffled_labels(rng, studies * len(conditions) * len(LEVELS), class_frequencies)
    study_ids = sorted(rng.choice(np.arange(1_000_000, 9_999_999), size=studies, replace=False).tolist())
    train_rows: list[dict[str, Any]] = []
    coordinate_rows: list[list[Any]] = []
    description_rows: list[list[Any]] = []
    label_iter = iter(labels.tolist())
    for n, study_id in enumerate(study_ids):
        severities = {(c, lv): next(label_iter) for c in conditions for lv in LEVELS}
        series_id, coordinates = _write_study(out, rng, seed, n, study_id, severities, list(conditions), slices, size)
        train_rows.append(_train_row(study_id, severities))
        description_rows.append([study_id, series_id, "Sagittal T2/STIR"])
        coordinate_rows.extend(coordinates)
    _write_tables(out, train_rows, coordinate_rows, description_rows)


def _shuffled_labels(rng: np.random.Generator, n_cases: int, class_frequencies: Sequence[float]) -> np.ndarray:
    """Severity indices in the given shares (rounded; the remainder is Normal/Mild), shuffled."""
    counts = [int(round(f * n_cases)) for f in class_frequencies]
    counts[0] = n_cases - sum(counts[1:])
    labels = np.repeat(np.arange(len(SEVERITIES)), counts)
    rng.shuffle(labels)
    return labels


def _fake_identifiers(n: int) -> dict[str, str]:
    """The fake patient, visit and staff identifiers of study number ``n`` (never real ones)."""
    return {
        "PatientName": f"FAKE^PATIENT^{n}", "PatientID": f"FAKEID{n}",
        "PatientBirthDate": f"19{50 + n % 40:02d}0{1 + n % 9}15", "AccessionNumber": f"FAKEACC{n}",
        "InstitutionName": "FAKE HOSPITAL", "ReferringPhysicianName": f"FAKE^DOCTOR^{n}",
        "StudyID": f"FAKESTUDY{n}",
    }


def _write_study(out: Path, rng: np.random.Generator, seed: int, n: int, study_id: int,
                 severities: dict[tuple[str, str], int], conditions: list[str], slices: int,
                 size: int) -> tuple[int, list[list[Any]]]:
    """Write study ``n``'s sagittal series; its series id and its label coordinate rows."""
    series_id = int(rng.integers(100_000_000, 999_999_999))
    level_rows = [int(round(size * (0.18 + 0.16 * i))) + int(rng.integers(-2, 3)) for i in range(len(LEVELS))]
    centre_slice = slices // 2 + int(rng.integers(-1, 2))
    volume = _study_volume(rng, severities, conditions, slices, size, level_rows, centre_slice)
    instance_numbers = rng.permutation(slices) + 1  # instance number of spatial slice k
    series_dir = out / "train_images" / str(study_id) / str(series_id)
    series_dir.mkdir(parents=True, exist_ok=True)
    _write_series(series_dir, volume, instance_numbers, seed, study_id, series_id, _fake_identifiers(n))
    coordinates = []
    for (condition, level), _ in severities.items():
        k = centre_slice + int(rng.integers(-1, 2))
        x = size / 2.0 + 2.0 * conditions.index(condition) + float(rng.normal(0, 0.5))
        y = level_rows[LEVELS.index(level)] + float(rng.normal(0, 0.5))
        coordinates.append([study_id, series_id, int(instance_numbers[k]), condition, level, round(x, 3), round(y, 3)])
    return series_id, coordinates


def _write_series(series_dir: Path, volume: np.ndarray, instance_numbers: np.ndarray, seed: int, study_id: int,
                  series_id: int, identifiers: dict[str, str]) -> None:
    """One file per slice of ``volume (D, H, W)``, named by its instance number."""
    from pydicom.uid import generate_uid

    study_uid = generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(seed), str(study_id)])
    series_uid = generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(seed), str(study_id), str(series_id)])
    spacing = 3.5
    for k in range(volume.shape[0]):
        # slice k sits at x = -20 + k*spacing; the sagittal normal is -x
        ds = make_dataset(
            volume[k], series_uid=series_uid, study_uid=study_uid,
            position=(-20.0 + k * spacing, -40.0, 60.0), instance_number=int(instance_numbers[k]),
            pixel_spacing=(0.8, 0.8), slice_thickness=spacing, window=(600.0, 1200.0),
            rescale=(1.0, 0.0), identifiers=identifiers,
        )
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            prefix=UID_PREFIX, entropy_srcs=[str(seed), str(study_id), str(k)])
        ds.save_as(series_dir / f"{int(instance_numbers[k])}.dcm", enforce_file_format=True)


def _train_row(study_id: int, severities: dict[tuple[str, str], int]) -> dict[str, Any]:
    """The ``train.csv`` row of a study: a severity name per (condition, level) column, blank where unlabelled."""
    row: dict[str, Any] = {"study_id": study_id}
    for condition in CONDITIONS:
        for level in LEVELS:
            key = (condition, level)
            row[column_name(condition, level)] = SEVERITIES[severities[key]] if key in severities else ""
    return row


def _write_tables(out: Path, train_rows: list[dict[str, Any]], coordinate_rows: list[list[Any]],
                  description_rows: list[list[Any]]) -> None:
    """``train.csv``, ``train_label_coordinates.csv`` and ``train_series_descriptions.csv``."""
    with open(out / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(train_rows[0]))
        writer.writeheader()
        writer.writerows(train_rows)
    with open(out / "train_label_coordinates.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study_id", "series_id", "instance_number", "condition", "level", "x", "y"])
        writer.writerows(coordinate_rows)
    with open(out / "train_series_descriptions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study_id", "series_id", "series_description"])
        writer.writerows(description_rows)
