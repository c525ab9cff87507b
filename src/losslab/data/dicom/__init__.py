"""DICOM series reading, windowing and de-identification (pydicom + numpy; no torch, no MLflow).

Modules: :mod:`~losslab.data.dicom.read` (files, series grouping, slices), :mod:`~losslab.data.dicom.volume`
(a series into a volume, the policy below), :mod:`~losslab.data.dicom.window` (intensity windows),
:mod:`~losslab.data.dicom.image` (crop, resize, CLAHE, normalise), :mod:`~losslab.data.dicom.phi`
(identifiers and safe metadata). Every public name is re-exported here.

Reading
    :func:`find_series` groups the files of a folder by ``SeriesInstanceUID``;
    :func:`read_series` turns the files of one series into a ``float32`` volume ``(D, H, W)``:

    * slices are ordered by ``ImagePositionPatient`` projected on the slice normal
      ``row x col`` of ``ImageOrientationPatient`` — never by ``InstanceNumber`` or file name;
    * ``RescaleSlope`` / ``RescaleIntercept`` are applied (top level, or the shared / per-frame
      ``PixelValueTransformationSequence`` of enhanced multi-frame objects);
    * ``MONOCHROME1`` is inverted to the ``MONOCHROME2`` convention (bright = high) with
      ``x' = K - x``, ``K = min + max`` of the volume; the file's window centre becomes ``K - c``;
    * multi-frame files contribute one slice per frame, positioned from the per-frame functional
      groups or ``GridFrameOffsetVector``; without either, frame order is kept (and noted).

Bad input never raises out of these functions: each problem is a ``report.skip(item, reason)``
(the file or series is dropped) or a ``report.notes`` line (the series is kept, and its ``meta``
says so). Decisions:

    =====================================  =======================================================
    not a DICOM file                       skip file: ``not a DICOM file``
    truncated / unreadable header          skip file: ``unreadable or truncated DICOM``
    no pixel data                          skip file: ``no pixel data``
    truncated pixel data                   skip file: ``truncated or undecodable pixel data``
    slice of another size                  skip file: ``slice size ... differs from the series``
    two series in one folder               :func:`find_series` returns both; the caller picks
    several series given to read_series    keep the largest, skip the others' files
    inconsistent orientation               skip series: ``inconsistent ImageOrientationPatient``
    missing position/orientation           skip series (order unknown) unless a single slice
    duplicate slice positions              skip the duplicate file
    missing slice (gap > 1.5 x median)     note (``missing slice``); ``meta["missing_slices"]``
                                           (``on_gap="skip"`` skips the series instead)
    other non-uniform spacing              note (``inconsistent slice spacing``)
    NaN / inf voxels                       replaced by the minimum finite value and noted when at
                                           most ``max_nonfinite_fraction`` (1 %) of voxels;
                                           otherwise skip series: ``non-finite voxels``
    constant (empty / all-background)      skip series: ``empty or all-background volume``
    =====================================  =======================================================

De-identification
    Readers never return the PS3.15 basic-profile identifiers in :data:`PHI_KEYWORDS`;
    :func:`safe_metadata` keeps only the technical fields in :data:`SAFE_KEYWORDS`.
"""
try:  # pydicom is a hard dependency of losslab; the import is here so the error is clear
    import pydicom  # noqa: F401
except ImportError as exc:  # pragma: no cover
    raise ImportError("losslab.data.dicom needs pydicom>=3.0 (pip install pydicom)") from exc

from losslab.data.dicom.image import clahe, crop_around, normalise, resize
from losslab.data.dicom.phi import PHI_KEYWORDS, SAFE_KEYWORDS, safe_metadata
from losslab.data.dicom.read import field, find_series, group_series, native_pixels, series_files
from losslab.data.dicom.volume import check_volume, read_series, series_volume
from losslab.data.dicom.window import BONE, DEFAULT_WINDOWS, SOFT_TISSUE, multi_window, windowed_crop

__all__ = [
    "BONE", "DEFAULT_WINDOWS", "PHI_KEYWORDS", "SAFE_KEYWORDS", "SOFT_TISSUE", "check_volume",
    "clahe", "crop_around", "field", "find_series", "group_series", "multi_window", "native_pixels", "normalise",
    "read_series", "resize", "safe_metadata", "series_files", "series_volume", "windowed_crop",
]
