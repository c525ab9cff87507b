"""Reading DICOM files: one read per file, series grouping, the fast element and pixel parsers, and
the per-frame slices (pixels, position, orientation, rescale) a volume is assembled from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

if TYPE_CHECKING:  # runtime import would load every source module
    from losslab.data.sources.base import SkipReport


def _rel(path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> str:
    if root is None:
        return str(path)
    try:
        return os.path.relpath(path, root)
    except ValueError:  # pragma: no cover - other drive on Windows
        return str(path)


#: The elements read from every file, with the VR the fast parser expects.
_FAST_VR: dict[str, str] = {
    "Rows": "US", "Columns": "US", "BitsAllocated": "US", "BitsStored": "US", "PixelRepresentation": "US",
    "SamplesPerPixel": "US", "NumberOfFrames": "IS", "InstanceNumber": "IS", "ImagePositionPatient": "DS",
    "ImageOrientationPatient": "DS", "GridFrameOffsetVector": "DS", "RescaleSlope": "DS",
    "RescaleIntercept": "DS", "SeriesInstanceUID": "UI",
}
_FAST_TAG: dict[str, int] = {keyword: int(pydicom.datadict.tag_for_keyword(keyword)) for keyword in _FAST_VR}


def _parse_raw(raw: Any, vr: str) -> Any:
    """The value of an uncoverted element from its bytes; ``None`` when not a plain case."""
    if raw.VR not in (None, vr) or not isinstance(raw.value, bytes) or not raw.value:
        return None
    if vr == "US":
        return int.from_bytes(raw.value, "little" if raw.is_little_endian else "big") if len(raw.value) == 2 else None
    text = raw.value.decode("ascii").strip(" \0")
    if vr == "UI":
        return text or None
    parts = text.split("\\")
    if vr == "IS":
        return int(parts[0]) if len(parts) == 1 else None
    values = [float(part) for part in parts]
    return values[0] if len(values) == 1 else values


def field(ds: Any, keyword: str) -> Any:
    """``ds.get(keyword)`` for the elements of :data:`_FAST_VR`, parsed straight from the raw bytes.

    pydicom converts an element on first access through its hook machinery (about 9 us each,
    as much as the whole pixel decode for a small image); reading the ~15 per-file elements
    this way halves the reader's per-file overhead. A multi-valued DS comes back as a list of
    floats. Anything unusual (another VR, empty, several values where one is expected, a value
    that does not parse) falls back to pydicom's own conversion, so behaviour is unchanged.
    """
    elem = ds.get_item(_FAST_TAG[keyword])
    if elem is None:
        return None
    if isinstance(elem, pydicom.dataelem.RawDataElement):
        try:
            value = _parse_raw(elem, _FAST_VR[keyword])
        except (UnicodeDecodeError, ValueError):
            value = None
        if value is not None:
            return value
    return ds.get(keyword)


def _read_file(path: str, report: SkipReport, root: str | None, header_only: bool) -> Any | None:
    """dcmread with every failure turned into a skip; ``None`` when skipped."""
    item = _rel(path, root)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError:
        report.skip(item, "not a DICOM file (no DICM preamble)")
        return None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
        report.skip(item, f"unreadable or truncated DICOM: {type(exc).__name__}: {exc}")
        return None
    if "SOPClassUID" not in ds and "Rows" not in ds and "SeriesInstanceUID" not in ds:
        if getattr(ds, "preamble", None) is not None or len(getattr(ds, "file_meta", None) or ()):
            report.skip(item, "unreadable or truncated DICOM: the file ends before the image attributes")
        else:
            report.skip(item, "not a DICOM file (no image attributes)")
        return None
    return ds


def find_series(
    folder: str | os.PathLike[str], report: SkipReport, *, root: str | os.PathLike[str] | None = None
) -> dict[str, list[str]]:
    """Group the DICOM files under ``folder`` (recursively) by ``SeriesInstanceUID``.

    Reads headers only. Non-DICOM and unreadable files are skipped and reported (paths relative
    to ``root``, default ``folder``). Returns ``{series_uid: [path, ...]}`` with paths sorted by
    name (which says nothing about slice order). Series UIDs are for grouping only: never store
    them (they are PS3.15 identifiers; hash them if a name is needed).
    """
    return {uid: [path for _, path in members]
            for uid, members in _scan(folder, report, root, header_only=True).items()}


def group_series(
    folder: str | os.PathLike[str], report: SkipReport, *, root: str | os.PathLike[str] | None = None
) -> dict[str, list[tuple[Any, str]]]:
    """:func:`find_series` from one full read of each file: ``{series_uid: [(dataset, path), ...]}``.

    The datasets carry their pixel data, so :func:`series_volume` builds the volume without
    opening the files again (the header pass of :func:`find_series` followed by
    :func:`read_series` reads every file twice). Files without pixel data are reported
    (``no pixel data``) and left out of the groups.
    """
    groups = _scan(folder, report, root, header_only=False)
    root_s = str(root) if root is not None else str(folder)
    for uid in list(groups):
        groups[uid] = _with_pixels(groups[uid], report, root_s)
        if not groups[uid]:
            del groups[uid]
    return groups


def series_files(folder: str | os.PathLike[str]) -> list[str]:
    """Every file under ``folder`` (recursively; dangling symlinks included, so that they are
    reported), sorted by path: the candidates of a series."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() or (p.is_symlink() and not p.exists()))


def _scan(folder: str | os.PathLike[str], report: SkipReport, root: str | os.PathLike[str] | None,
          header_only: bool) -> dict[str, list[tuple[Any, str]]]:
    from losslab.data.sources.base import LinkGuard

    root_s = str(root) if root is not None else str(folder)
    guard = LinkGuard(root_s)
    series: dict[str, list[tuple[Any, str]]] = {}
    for path in series_files(folder):
        refused = guard.refused(path)
        if refused:  # a symlink out of the data root, or a dangling one: named, never read
            report.skip(_rel(path, root_s), refused)
            continue
        ds = _read_file(path, report, root_s, header_only=header_only)
        if ds is None:
            continue
        uid = str(field(ds, "SeriesInstanceUID") or "") or "no-series-uid"
        series.setdefault(uid, []).append((ds, path))
    return series


def _with_pixels(members: list[tuple[Any, str]], report: SkipReport, root: str) -> list[tuple[Any, str]]:
    """The members that carry pixel data; the others are reported (``no pixel data``)."""
    kept = []
    for ds, path in members:
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            report.skip(_rel(path, root), "no pixel data")
        else:
            kept.append((ds, path))
    return kept


def _float_list(value: Any) -> list[float] | None:
    if value is None:
        return None
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out


def _functional(ds: Any, frame: int, sequence: str, keyword: str) -> Any:
    """A value from the per-frame, then the shared functional groups of an enhanced object."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is None or len(seq) <= index:
            continue
        inner = seq[index].get(sequence)
        if inner is not None and len(inner) and keyword in inner[0]:
            return inner[0].get(keyword)
    return None


def _rescale(ds: Any, frame: int) -> tuple[float, float]:
    slope = field(ds, "RescaleSlope")
    intercept = field(ds, "RescaleIntercept")
    if slope is None and intercept is None:
        slope = _functional(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    slope_f = 1.0 if slope in (None, "") else float(slope)
    intercept_f = 0.0 if intercept in (None, "") else float(intercept)
    return slope_f, intercept_f


class _Slice:
    __slots__ = ("pixels", "position", "orientation", "instance", "path", "slope", "intercept", "ds")

    def __init__(self, pixels: np.ndarray, position: list[float] | None, orientation: list[float] | None,
                 instance: int | None, path: str, slope: float, intercept: float, ds: Any) -> None:
        self.pixels = pixels
        self.position = position
        self.orientation = orientation
        self.instance = instance
        self.path = path
        self.slope = slope
        self.intercept = intercept
        self.ds = ds


_PIXEL_DATA = 0x7FE00010
_NATIVE_BYTE_ORDER = {
    "1.2.840.10008.1.2": "<",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": "<",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2": ">",  # Explicit VR Big Endian (retired)
}


def native_pixels(ds: Any) -> np.ndarray | None:
    """Uncompressed monochrome pixel data as ``(frames, rows, cols)`` straight from the bytes.

    The fast path of the reader (``pixel_array`` costs about as much again as parsing the file
    for small images): the same values as pydicom's ``pixel_array`` (masked to ``BitsStored``,
    sign-extended when signed). ``None`` when the data is compressed, colour, of another bit
    depth or short; the caller then falls back to ``pixel_array``.
    """
    file_meta = getattr(ds, "file_meta", None)
    order = _NATIVE_BYTE_ORDER.get(str(file_meta.get("TransferSyntaxUID", ""))) if file_meta is not None else None
    if order is None or "PixelData" not in ds:
        return None
    bits_allocated = field(ds, "BitsAllocated")
    if bits_allocated not in (8, 16, 32) or int(field(ds, "SamplesPerPixel") or 1) != 1:
        return None
    bits_stored = int(field(ds, "BitsStored") or bits_allocated)
    signed = int(field(ds, "PixelRepresentation") or 0) == 1
    rows, cols = int(field(ds, "Rows")), int(field(ds, "Columns"))
    frames = int(field(ds, "NumberOfFrames") or 1)
    raw = ds.get_item(_PIXEL_DATA).value
    dtype = np.dtype(f"{order}{'i' if signed else 'u'}{bits_allocated // 8}")
    count = rows * cols * frames
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < count * dtype.itemsize:
        return None
    pixels = np.frombuffer(raw, dtype=dtype, count=count).reshape(frames, rows, cols)
    if bits_stored < bits_allocated:
        native = pixels.astype(dtype.newbyteorder("="))
        unsigned = native.view(native.dtype.str.replace("i", "u")) & ((1 << bits_stored) - 1)
        if not signed:
            return unsigned
        sign_bit = 1 << (bits_stored - 1)
        return (unsigned.astype(np.int64) ^ sign_bit) - sign_bit  # sign extension
    return pixels


def _slices_of(ds: Any, path: str) -> tuple[list[_Slice], bool]:
    """One ``_Slice`` per frame; the flag says the frames had no position of their own."""
    pixels = native_pixels(ds)
    if pixels is None:
        pixels = ds.pixel_array
    samples = int(field(ds, "SamplesPerPixel") or 1)
    frames = int(field(ds, "NumberOfFrames") or 1)
    if samples > 1:  # colour: keep luminance (medical colour images are rare in this package)
        pixels = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if frames == 1 or pixels.ndim == 2:
        pixels = pixels.reshape((1,) + pixels.shape[-2:])
    instance = field(ds, "InstanceNumber")
    instance_i = int(instance) if instance not in (None, "") else None
    orientation = _float_list(field(ds, "ImageOrientationPatient"))
    position = _float_list(field(ds, "ImagePositionPatient"))
    offsets = _float_list(field(ds, "GridFrameOffsetVector"))
    out: list[_Slice] = []
    unpositioned = False
    for frame in range(pixels.shape[0]):
        frame_orientation = orientation or _float_list(
            _functional(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"))
        frame_position = None
        if pixels.shape[0] == 1:
            frame_position = position
        else:
            frame_position = _float_list(_functional(ds, frame, "PlanePositionSequence", "ImagePositionPatient"))
            if frame_position is None and position is not None and frame_orientation and offsets \
                    and len(offsets) == pixels.shape[0]:
                normal = np.cross(frame_orientation[:3], frame_orientation[3:])
                frame_position = list(np.asarray(position) + offsets[frame] * normal)
            if frame_position is None:
                unpositioned = True
        slope, intercept = _rescale(ds, frame)
        out.append(_Slice(pixels[frame], frame_position, frame_orientation, instance_i, path, slope, intercept, ds))
    return out, unpositioned


def _file_window(ds: Any) -> tuple[float, float] | None:
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None:
        centre = _functional(ds, 0, "FrameVOILUTSequence", "WindowCenter")
        width = _functional(ds, 0, "FrameVOILUTSequence", "WindowWidth")
    if centre is None or width is None:
        return None
    if isinstance(centre, pydicom.multival.MultiValue):
        centre = centre[0]
    if isinstance(width, pydicom.multival.MultiValue):
        width = width[0]
    try:
        c, w = float(centre), float(width)
    except (TypeError, ValueError):
        return None
    return (c, w) if w > 0 else None
