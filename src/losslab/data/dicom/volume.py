"""One series of DICOM slices into a ``float32 (D, H, W)`` volume: slice order along the normal,
duplicates, gaps, spacing, rescale, non-finite voxels, MONOCHROME1 (the policy table of
:mod:`losslab.data.dicom`)."""

from __future__ import annotations

import os
from collections import Counter
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from losslab.data.dicom.phi import safe_metadata
from losslab.data.dicom.read import _file_window, _float_list, _functional, _read_file, _rel, _Slice, _slices_of, _with_pixels, field

if TYPE_CHECKING:  # runtime import would load every source module
    from losslab.data.sources.base import SkipReport


def check_volume(volume: np.ndarray, item: str, report: SkipReport,
                 max_nonfinite_fraction: float = 0.01, assume_finite: bool = False, varies: bool = False
                 ) -> tuple[np.ndarray | None, dict[str, Any]]:
    """NaN/inf and empty-volume policy shared by every reader (see the module docstring).

    ``assume_finite`` skips the NaN/inf scan (integer pixels with a finite rescale); ``varies``
    (the caller saw two different finite values) skips the empty-volume scan.
    Returns ``(volume or None, extra meta)``; ``None`` means the item was skipped and reported.
    """
    extra: dict[str, Any] = {}
    finite = None if assume_finite else np.isfinite(volume)
    if finite is not None and not finite.all():
        bad = int(volume.size - np.count_nonzero(finite))
        fraction = bad / volume.size
        if fraction > max_nonfinite_fraction or bad == volume.size:
            report.skip(item, f"non-finite voxels: {bad} NaN/inf voxels ({fraction:.1%}) exceed the "
                              f"{max_nonfinite_fraction:.1%} allowed")
            return None, extra
        fill = float(volume[finite].min())
        volume = np.where(finite, volume, np.float32(fill)).astype(np.float32, copy=False)
        report.notes.append(f"{item}: non-finite voxels: {bad} NaN/inf voxels replaced by the minimum {fill:g}")
        extra["nonfinite_replaced"] = bad
    if not varies and (volume.size == 0 or float(volume.max()) == float(volume.min())):
        value = float(volume.flat[0]) if volume.size else float("nan")
        report.skip(item, f"empty or all-background volume: every voxel equals {value:g}")
        return None, extra
    return volume, extra


def read_series(
    paths: Sequence[str | os.PathLike[str]],
    report: SkipReport,
    *,
    root: str | os.PathLike[str] | None = None,
    item: str | None = None,
    on_gap: str = "keep",
    max_nonfinite_fraction: float = 0.01,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Read one series into a volume.

    Args:
        paths: the files of one series, in any order (single- or multi-frame).
        report: where skips and notes go (items are paths relative to ``root``).
        root: data root for report items (default: the common parent of ``paths``).
        item: the name of the series in the report (default: its folder relative to ``root``).
        on_gap: ``"keep"`` (default) keeps a series with missing slices and notes it;
            ``"skip"`` skips it.
        max_nonfinite_fraction: NaN/inf voxels up to this fraction are replaced, above it the
            series is skipped.

    Returns:
        ``(volume, meta)``: ``volume`` is ``float32 (D, H, W)`` ordered along the slice normal,
        or ``None`` when the series was skipped (the reason is in ``report``). ``meta`` holds
        :func:`safe_metadata` of the first slice plus ``spacing`` ``[dz, dy, dx]``,
        ``orientation``, ``window`` (the file's ``[centre, width]`` or ``None``),
        ``instance_numbers`` (per slice, in volume order), ``missing_slices``, ``n_slices``.
        No identifier is in it.

    Raises:
        ValueError: only for a bad ``on_gap`` argument; bad files are reported, not raised.
    """
    _check_on_gap(on_gap)
    paths = [str(p) for p in paths]
    if root is None:  # default: the parent of the series folder
        root = os.path.dirname(os.path.dirname(os.path.abspath(paths[0]))) if paths else "."
    root = str(root)
    if item is None:
        item = _rel(os.path.dirname(paths[0]), root) if paths else "<empty series>"
    if not paths:
        report.skip(item, "empty series: no files")
        return None, {}
    by_series = _read_by_series(paths, report, root)
    if not by_series:
        report.skip(item, "no readable DICOM slice with pixel data")
        return None, {}
    return series_volume(_largest_series(by_series, report, root), report, root=root, item=item, on_gap=on_gap,
                         max_nonfinite_fraction=max_nonfinite_fraction)


def _check_on_gap(on_gap: str) -> None:
    if on_gap not in ("keep", "skip"):
        raise ValueError(f"on_gap must be 'keep' or 'skip', got {on_gap!r}")


def _read_by_series(paths: list[str], report: SkipReport, root: str) -> dict[str, list[tuple[Any, str]]]:
    """Each readable file with pixel data, read once, grouped by ``SeriesInstanceUID``."""
    by_series: dict[str, list[tuple[Any, str]]] = {}
    for path in paths:
        ds = _read_file(path, report, root, header_only=False)
        if ds is None or not _with_pixels([(ds, path)], report, root):
            continue
        by_series.setdefault(str(field(ds, "SeriesInstanceUID") or ""), []).append((ds, path))
    return by_series


def _largest_series(by_series: dict[str, list[tuple[Any, str]]], report: SkipReport,
                    root: str) -> list[tuple[Any, str]]:
    """The members of the series with the most files; the other series' files are reported."""
    keep = max(by_series, key=lambda uid: len(by_series[uid]))
    if len(by_series) > 1:
        for uid, members in by_series.items():
            if uid != keep:
                for _, path in members:
                    report.skip(_rel(path, root), "belongs to another series than the one read "
                                                  f"({len(by_series)} series mixed; kept the largest)")
    return by_series[keep]


def series_volume(
    members: Sequence[tuple[Any, str]],
    report: SkipReport,
    *,
    root: str | os.PathLike[str],
    item: str,
    on_gap: str = "keep",
    max_nonfinite_fraction: float = 0.01,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """:func:`read_series` from datasets already read (with pixels) of one series.

    ``members`` are ``(dataset, path)`` pairs, e.g. one group of :func:`group_series`; the
    policy, the returned volume and ``meta`` are those of :func:`read_series`.
    """
    _check_on_gap(on_gap)
    root = str(root)
    meta: dict[str, Any] = {}
    slices, unpositioned = _decode_slices(members, report, root)
    if not slices:
        report.skip(item, "no readable DICOM slice with pixel data")
        return None, meta
    slices, shape = _drop_odd_sizes(slices, report, root)
    first = slices[0].ds
    meta.update(safe_metadata(first))
    if len(slices) > 1 and not unpositioned:
        geometry = _positioned_geometry(slices, first, item, report, root, on_gap, meta)
        if geometry is None:
            return None, meta
        slices, spacing_z, missing = geometry
    else:
        if unpositioned and len(slices) > 1:
            report.notes.append(f"{item}: multi-frame without per-frame positions: frame order kept")
        spacing_z, missing = _header_spacing(first), 0
    volume, varies = _stack(slices, shape)
    integer_source = all(s.pixels.dtype.kind in "iu" and np.isfinite(s.slope) and np.isfinite(s.intercept)
                         for s in slices)
    volume, extra = check_volume(volume, item, report, max_nonfinite_fraction, assume_finite=integer_source,
                                 varies=varies and integer_source)
    if volume is None:
        return None, meta
    meta.update(extra)
    volume, window = _monochrome2(volume, _file_window(first), first, meta)
    spacing_xy = _float_list(first.get("PixelSpacing")) or _float_list(
        _functional(first, 0, "PixelMeasuresSequence", "PixelSpacing")) or [1.0, 1.0]
    meta.update(
        spacing=[abs(spacing_z), float(spacing_xy[0]), float(spacing_xy[1])],
        orientation=slices[0].orientation,
        window=list(window) if window else None,
        instance_numbers=[s.instance for s in slices],
        missing_slices=missing,
        n_slices=len(slices),
    )
    return volume, meta


def _decode_slices(members: Sequence[tuple[Any, str]], report: SkipReport, root: str) -> tuple[list[_Slice], bool]:
    """Every frame of every member as a slice (undecodable pixel data reported); the flag says some
    multi-frame file had no per-frame positions."""
    slices: list[_Slice] = []
    unpositioned = False
    for ds, path in members:
        try:
            file_slices, no_position = _slices_of(ds, path)
        except Exception as exc:  # noqa: BLE001 - truncated/undecodable pixel data
            report.skip(_rel(path, root), f"truncated or undecodable pixel data: {type(exc).__name__}: {exc}")
            continue
        unpositioned |= no_position
        slices.extend(file_slices)
    return slices, unpositioned


def _drop_odd_sizes(slices: list[_Slice], report: SkipReport, root: str) -> tuple[list[_Slice], tuple[int, ...]]:
    """The slices of the series' most common size (the others reported), and that size."""
    shape_counts = Counter(s.pixels.shape for s in slices)
    shape = shape_counts.most_common(1)[0][0]
    if len(shape_counts) > 1:
        for s in slices:
            if s.pixels.shape != shape:
                report.skip(_rel(s.path, root), f"slice size {s.pixels.shape} differs from the series {shape}")
        slices = [s for s in slices if s.pixels.shape == shape]
    return slices, shape


def _header_spacing(ds: Any) -> float:
    """The slice spacing a header states (``SpacingBetweenSlices``, else ``SliceThickness``, else 1)."""
    return float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0)


def _positioned_geometry(slices: list[_Slice], first: Any, item: str, report: SkipReport, root: str, on_gap: str,
                         meta: dict[str, Any]) -> tuple[list[_Slice], float, int] | None:
    """``(slices ordered along the normal without duplicates, slice spacing, missing slices)``, or None
    when the series is skipped (order unknown, orientations differ, or a gap with ``on_gap="skip"``).
    One distinct position left: the spacing of ``first``'s header."""
    ordered = _order_along_normal(slices, item, report)
    if ordered is None:
        return None
    slices, along = _drop_duplicate_positions(*ordered, report, root)
    steps = np.diff(along)
    if not len(steps):
        return slices, _header_spacing(first), 0
    spacing = _spacing_and_gaps(steps, item, report, on_gap, meta)
    return None if spacing is None else (slices, spacing[0], spacing[1])


def _order_along_normal(slices: list[_Slice], item: str, report: SkipReport) -> tuple[list[_Slice], np.ndarray] | None:
    """The slices sorted by ``ImagePositionPatient`` projected on the slice normal, with those
    projections; None (skipped) without positions/orientations or with differing orientations."""
    if any(s.orientation is None or len(s.orientation) != 6 or s.position is None or len(s.position) != 3
           for s in slices):
        report.skip(item, "no ImagePositionPatient/ImageOrientationPatient: slice order unknown")
        return None
    orientations = np.asarray([s.orientation for s in slices], dtype=np.float64)
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        n_distinct = len({tuple(np.round(o, 3)) for o in orientations})
        report.skip(item, f"inconsistent ImageOrientationPatient: {n_distinct} different orientations "
                          "in one series")
        return None
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    along = np.asarray([s.position for s in slices], dtype=np.float64) @ normal
    order = np.argsort(along, kind="stable")
    return [slices[i] for i in order], along[order]


def _drop_duplicate_positions(slices: list[_Slice], along: np.ndarray, report: SkipReport,
                              root: str) -> tuple[list[_Slice], np.ndarray]:
    """Ordered slices without a second slice at the same position (each duplicate file reported)."""
    duplicates = np.flatnonzero(np.abs(np.diff(along)) < 1e-4)
    for i in duplicates[::-1]:
        report.skip(_rel(slices[i + 1].path, root), "duplicate slice position "
                                                   f"{along[i + 1]:.3f} mm along the normal")
        del slices[i + 1]
    return slices, np.delete(along, duplicates + 1)


def _spacing_and_gaps(steps: np.ndarray, item: str, report: SkipReport, on_gap: str,
                      meta: dict[str, Any]) -> tuple[float, int] | None:
    """``(median step, missing slices)``: gaps over 1.5 x the median are missing slices (noted, or the
    series skipped: None); other uneven steps are noted and flagged in ``meta``."""
    spacing_z = float(np.median(steps))
    gaps = np.flatnonzero(steps > 1.5 * spacing_z)
    if len(gaps):
        missing = int(sum(round(steps[g] / spacing_z) - 1 for g in gaps))
        where = ", ".join(f"{steps[g]:.2f} mm after slice {g}" for g in gaps)
        reason = f"missing slice: {missing} slice(s) missing (gap of {where}; expected {spacing_z:.2f} mm)"
        if on_gap == "skip":
            report.skip(item, reason)
            return None
        report.notes.append(f"{item}: {reason}")
        return spacing_z, missing
    if np.abs(steps - spacing_z).max() > max(0.01 * spacing_z, 1e-3):
        report.notes.append(f"{item}: inconsistent slice spacing: steps from {steps.min():.3f} to "
                            f"{steps.max():.3f} mm (median {spacing_z:.3f})")
        meta["inconsistent_spacing"] = True
    return spacing_z, 0


def _stack(slices: list[_Slice], shape: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """The rescaled slices as ``float32 (D, H, W)``; the flag says two different voxel values were
    seen (checked slice by slice while the slice is in cache)."""
    volume = np.empty((len(slices),) + shape, dtype=np.float32)
    varies = False
    for i, s in enumerate(slices):
        if s.slope == 1.0 and s.intercept == 0.0:
            volume[i] = s.pixels
        else:
            np.multiply(s.pixels, s.slope, out=volume[i], casting="unsafe")
            volume[i] += s.intercept
        if not varies:
            varies = bool(volume[i].max() != volume[i].min()) or bool(volume[i].flat[0] != volume[0].flat[0])
    return volume, varies


def _monochrome2(volume: np.ndarray, window: tuple[float, float] | None, first: Any,
                 meta: dict[str, Any]) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A ``MONOCHROME1`` volume inverted to ``x' = K - x`` (``K = min + max``) with its window centre
    ``K - c``, flagged in ``meta``; any other volume unchanged."""
    if str(first.get("PhotometricInterpretation", "")).upper() != "MONOCHROME1":
        return volume, window
    k = float(volume.min()) + float(volume.max())
    meta["inverted_monochrome1"] = True
    return np.float32(k) - volume, (k - window[0], window[1]) if window is not None else None
