"""Small on-disk data factories for the data-layer tests (DICOM series, NIfTI, npz, manifests)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.uid import generate_uid

from losslab.data.sources.embedded_lumbar import make_dataset

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def ramp_volume(depth: int = 6, size: int = 16) -> np.ndarray:
    """``uint16 (depth, size, size)``: slice k is filled with 100 * (k + 1) plus a small gradient."""
    gradient = np.add.outer(np.arange(size), np.arange(size)).astype(np.uint16)
    return np.stack([gradient + 100 * (k + 1) for k in range(depth)]).astype(np.uint16)


def write_series(
    folder: Path,
    volume: np.ndarray,
    *,
    orientation: Sequence[float] = AXIAL,
    spacing: float = 2.0,
    positions: Sequence[Sequence[float]] | None = None,
    orientations: Sequence[Sequence[float]] | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    photometric: str = "MONOCHROME2",
    seed: int = 0,
    series_uid: str | None = None,
    skip_slices: Sequence[int] = (),
    name_prefix: str = "",
) -> list[Path]:
    """Write ``volume (D, H, W)`` as one file per slice with shuffled instance numbers and names.

    Slice k (spatial order along the normal of ``orientation``) sits at ``k * spacing`` along the
    normal unless ``positions`` are given. Returns the paths in spatial order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    depth = volume.shape[0]
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    normal = np.cross(orientation[:3], orientation[3:])
    instance_numbers = rng.permutation(depth) + 1
    paths = []
    for k in range(depth):
        if k in skip_slices:
            continue
        position = positions[k] if positions is not None else (normal * k * spacing + np.array([-10.0, 5.0, 3.0]))
        ds = make_dataset(
            volume[k], series_uid=series_uid, study_uid=study_uid, position=position,
            orientation=orientations[k] if orientations is not None else orientation,
            instance_number=int(instance_numbers[k]), rescale=rescale, window=window,
            photometric=photometric, slice_thickness=spacing,
            identifiers={"PatientName": "FAKE^PATIENT^9", "PatientID": "FAKEID9"},
        )
        # file names are random, unrelated to position or instance number
        path = folder / f"{name_prefix}{int(rng.integers(10**9))}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def generate_embedded_brats(tmp_path_factory, folder: str, **kwargs) -> Path:
    """An embedded BraTS-layout cohort (the demo's generator) in a new session folder."""
    from losslab.data.sources import run_generator

    root = tmp_path_factory.mktemp(folder) / "embedded_brats"
    run_generator("embedded_brats", str(root), **kwargs)
    return root
