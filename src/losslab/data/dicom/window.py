"""Intensity windows: linear windows to ``[0, 1]``, several windows stacked as channels, and a
windowed crop that windows only the pixels it keeps."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from losslab.data.dicom.image import _crop_box, _place, crop_around

SOFT_TISSUE = (50.0, 350.0)
BONE = (400.0, 2000.0)
DEFAULT_WINDOWS: tuple[Any, ...] = (SOFT_TISSUE, BONE, "file")


def _window_into(volume: np.ndarray, centre: float, width: float, out: np.ndarray | None) -> np.ndarray:
    """Linear window to ``[0, 1]``, ``clip((x - (c - w/2)) / w, 0, 1)``, computed as
    ``(clip(x, lo, hi) - lo) / (hi - lo)`` with ``lo = c - w/2``, ``hi = lo + w`` in float32.

    Dividing by the float32 span the clipped values actually have keeps the result in ``[0, 1]``
    exactly; one 2D slice at a time, so the three passes stay in the CPU cache (about 1.4x faster
    than whole-volume passes at 256x256).
    """
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    volume = np.asarray(volume, dtype=np.float32)
    out = np.empty(volume.shape, dtype=np.float32) if out is None else out
    low = np.float32(centre - width / 2.0)
    high = np.float32(low + np.float32(width))
    span = np.float32(high - low)
    if not span > 0:  # a width below float32 resolution at this level: a step at the centre
        return np.greater_equal(volume, np.float32(centre), out=out, casting="unsafe")
    pairs = zip(volume, out) if volume.ndim >= 3 else [(volume, out)]
    for source, target in pairs:
        np.clip(source, low, high, out=target)
        np.subtract(target, low, out=target)
        np.divide(target, span, out=target)
    return out


def _auto_window(volume: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(volume[:: max(1, volume.shape[0] // 8)], (0.5, 99.5))
    if high <= low:
        low, high = float(volume.min()), float(volume.max())
    width = max(float(high - low), 1e-6)
    return float(low) + width / 2.0, width


def multi_window(
    volume: np.ndarray,
    windows: Iterable[Any] = DEFAULT_WINDOWS,
    file_window: Sequence[float] | None = None,
) -> np.ndarray:
    """Stack windows of ``volume (D, H, W)`` as channels: ``float32 (D, C, H, W)`` in ``[0, 1]``.

    Each entry of ``windows`` is ``(centre, width)``, ``"file"`` (the file's own window,
    ``file_window``; the automatic window when the file has none) or ``"auto"`` (0.5–99.5
    percentile of the volume). The default is soft tissue 50/350, bone 400/2000 and the file's
    window: the three channels of an RGB image for 2D backbones. Each window is linear,
    ``clip((x - (c - w/2)) / w, 0, 1)``.

    >>> multi_window(np.array([[[0., 50., 100.]]]), [(50, 100)]).tolist()
    [[[[0.0, 0.5, 1.0]]]]
    """
    volume = np.asarray(volume, dtype=np.float32)
    specs = list(windows)
    if not specs:
        raise ValueError("windows must name at least one window")
    out = np.empty((volume.shape[0], len(specs)) + volume.shape[1:], dtype=np.float32)
    for channel, spec in enumerate(specs):
        if isinstance(spec, str):
            if spec == "file" and file_window is not None:
                centre, width = float(file_window[0]), float(file_window[1])
            elif spec in ("file", "auto"):
                centre, width = _auto_window(volume)
            else:
                raise ValueError(f"unknown window {spec!r}; use (centre, width), 'file' or 'auto'")
        else:
            centre, width = float(spec[0]), float(spec[1])
        _window_into(volume, centre, width, out[:, channel])
    return out


def windowed_crop(volume: np.ndarray, index: np.ndarray, x: float, y: float, windows: Iterable[Any],
                  file_window: Sequence[float] | None = None, radius_factor: float = 0.75) -> np.ndarray:
    """``crop_around(multi_window(volume[index], windows, file_window), x, y, radius_factor)``,
    windowing only the pixels the crop keeps: ``(len(index), C, size, size)`` float32.

    Windows are pointwise and non-decreasing, so the crop of the windows is the windows of the
    crop, and the padding value (the windowed stack's minimum over every channel) is the
    smallest window of the raw stack's minimum. ``"auto"`` windows, and ``"file"`` without a
    file window, depend on the whole stack: those are windowed first, then cropped.
    """
    windows = list(windows)
    if any(w == "auto" or (w == "file" and file_window is None) for w in windows if isinstance(w, str)):
        return crop_around(multi_window(volume[index], windows, file_window), x, y, radius_factor)
    box = _crop_box(volume.shape[-2:], x, y, radius_factor)
    region = multi_window(volume[index, box[0]:box[1], box[2]:box[3]], windows, file_window)
    if region.shape[-2:] == (box[6], box[6]):
        return region
    lowest = np.full((1, 1, 1), min(float(volume[int(i)].min()) for i in set(index.tolist())), dtype=np.float32)
    return _place(region, multi_window(lowest, windows, file_window).min(), box)
