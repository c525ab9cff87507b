"""The Case record every source yields, the source registry and the skip report.

A source turns one public data layout into :class:`Case` records. It never writes files and never
lets an identifier out: ``case_id`` and ``patient_id`` are already salted hashes
(:func:`losslab.data.deid.salted_hash`). A bad file or case is not an exception that stops the
run: the source calls ``report.skip(item, reason)`` and goes on.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Iterator

import numpy as np
from pydantic import Field

#: A source parameter that must be a positive integer (image sides, slice counts); checked at load time.
PositiveSize = Annotated[int, Field(ge=1)]


@dataclass
class Case:
    """One training example.

    Attributes:
        case_id: salted hash that names the case in the cache (never a raw identifier).
        patient_id: salted hash of the patient (groups for patient-level splits).
        label: integer class index (``-1`` only for unlabelled data, which the cache refuses).
        image: ``float32`` array ``(N, C, H, W)``: N instances (slices of a bag, or of a 2.5D stack)
            with C channels (modalities or windows). A single 2D image is ``(1, C, H, W)``; a
            volume for 3D models is stored as ``(D, C, H, W)`` too and transposed by the dataset.
        meta: small JSON-able extras stored as index columns (e.g. ``level``, ``text``, extra task
            labels, ``spacing``); never identifiers.
        patient_key: the source's own patient identifier, unsalted (a BraTS case folder, a study id).
            Never stored: the cache turns it into a split key (:func:`losslab.data.splits.split_key`)
            that orders patients for the fold draw, so folds do not depend on the salt.
    """

    case_id: str
    patient_id: str
    label: int
    image: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    patient_key: str = ""


@dataclass(frozen=True)
class ReadJob:
    """One independent unit of reading a source (e.g. one DICOM series), run by :meth:`Source.run_job`.

    Attributes:
        files: the raw files the job reads (for the progress bar; 0 when unknown).
        payload: what :meth:`Source.run_job` needs; pickled to worker processes, so small and
            free of arrays. The cache journals jobs by their position, never by payload.
    """

    files: int = 0
    payload: Any = None


@dataclass
class SkipReport:
    """Cases and files read, skipped and why (written to ``report.json`` and logged to MLflow)."""

    read: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def skip(self, item: str, reason: str) -> None:
        self.skipped.append({"item": str(item), "reason": str(reason)})

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "skipped_count": len(self.skipped), "skipped": self.skipped, "notes": self.notes}


class Source:
    """Base class of data sources. Subclasses set ``class_names`` and implement ``iter_cases``."""

    name: str = "source"
    class_names: list[str] = []
    #: every case lies in [0, 1] at a precision float16 keeps (windowed with widths up to 2048, or
    #: 8-bit scaled): ``data.cache_dtype: auto`` then stores float16 (see losslab.data.cache)
    float16_safe: bool = False
    # the intensity normalisation used when data.normalize is null (losslab.data.normalization)
    default_normalize: Any = "per_case_nonzero_zscore"
    reads_root: bool = True  # False: the data ship in a package; data.root need not exist

    def __init__(self, root: str, salt: str, report: SkipReport | None = None, **kwargs: Any) -> None:
        self.root = root
        self.salt = salt
        self.report = report or SkipReport()
        self.kwargs = kwargs

    def iter_cases(self) -> Iterator[Case]:  # pragma: no cover - abstract
        raise NotImplementedError

    def read_jobs(self) -> list[ReadJob]:
        """The source's independent units of reading, in a fixed order (the cache runs them in
        parallel and resumes an interrupted build job by job). Planning problems are reported
        to ``self.report`` here; default: one job that runs :meth:`iter_cases`."""
        return [ReadJob()]

    def run_job(self, job: ReadJob) -> Iterator[Case]:
        """The cases of one job of :meth:`read_jobs`; problems go to ``self.report``."""
        return self.iter_cases()

    def fingerprint_files(self) -> list[str]:
        """Files whose content defines the cache (for cache reuse); default: every file under root."""
        from pathlib import Path

        return sorted(str(p) for p in Path(self.root).rglob("*") if p.is_file())


def resolve_under(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> str | None:
    """``path`` (relative to ``root`` or absolute) resolved with symlinks; ``None`` if outside root."""
    real_root = os.path.realpath(root)
    candidate = os.path.realpath(os.path.join(real_root, path))
    try:
        inside = os.path.commonpath([real_root, candidate]) == real_root
    except ValueError:  # pragma: no cover - other drive on Windows
        inside = False
    return candidate if inside else None


def refused_link(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` (a file or folder found under ``root``) must not be read, or ``None``: a dangling
    symlink, or a symlink (anywhere on the path) that leads outside the data root. Sources report the
    reason with ``report.skip(path, reason)``, so every refused path is named in the preprocess report."""
    if os.path.islink(path) and not os.path.exists(path):
        return "dangling symlink (refused)"
    if resolve_under(root, path) is None:
        return "symlink leads outside the data root (refused)"
    return None


class LinkGuard:
    """:func:`refused_link` for the many files of one data root, with the root and each folder
    resolved once: a file that is not itself a symlink is inside the root exactly when its folder
    resolves inside it (one ``lstat`` per file instead of a ``realpath`` walk of every path
    component, about 1 ms per 15-file series). A symlinked file gets the full check."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = root
        self._folders: dict[str, bool] = {}

    def refused(self, path: str | os.PathLike[str]) -> str | None:
        if os.path.islink(path):
            return refused_link(self.root, path)
        folder = os.path.dirname(os.fspath(path))
        inside = self._folders.get(folder)
        if inside is None:
            inside = self._folders[folder] = resolve_under(self.root, folder) is not None
        return None if inside else "symlink leads outside the data root (refused)"


def confined_file(root: str | os.PathLike[str], path: str, key: str) -> str:
    """A file named in the config (``key``, e.g. ``data.source_kwargs.manifest``), relative to the
    data root, resolved; it must stay inside the root.

    Raises:
        ValueError: the path leads outside the data root (named, with the key; nothing is read).
    """
    resolved = resolve_under(root, path)
    if resolved is None:
        raise ValueError(f"{key}={path!r} is outside the data root {root}: refused (give a path inside data.root)")
    return resolved


_COLUMN_NAME = re.compile(r"[\w .()\[\]/+-]{1,64}")


def shown_columns(header: list[str]) -> str:
    """The columns of a CSV header for an error message, without echoing a file that is no CSV:
    names are listed only when every one looks like a column name (else only their number)."""
    if header and len(header) <= 200 and all(_COLUMN_NAME.fullmatch(h) for h in header):
        return ", ".join(header)
    return f"{len(header)} column(s), names not shown"


def read_csv_table(path: "str | os.PathLike", required: "list[str] | tuple[str, ...]", shown: str | None = None
                   ) -> tuple[list[str], list[dict[str, str]]]:
    """``(header, rows)`` of a CSV with stripped keys and values.

    Raises:
        FileNotFoundError: the file is missing (message names it).
        ValueError: a required column is missing; the message names the file (``shown``, default the
            file name), the column and the columns found.
    """
    import csv
    from pathlib import Path

    path = Path(path)
    shown = shown or path.name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        for column in required:
            if column not in header:
                raise ValueError(f"{shown}: missing column {column!r} (found columns: {shown_columns(header)})")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    return header, rows


_sources: dict[str, Callable[..., Source]] = {}


class UnknownSourceError(KeyError):
    pass


def register_source(arg: Any = None, *, key: str | None = None) -> Any:
    """Register a Source class under ``key`` (default: its ``name``); bare or ``key=`` form."""

    def _register(cls: Any) -> Any:
        name = key or getattr(cls, "name", None) or cls.__name__
        if name in _sources:
            raise ValueError(f"data source {name!r} is already registered")
        _sources[name] = cls
        return cls

    if callable(arg):
        return _register(arg)
    return _register


def get_source_class(name: str) -> Callable[..., Source]:
    """The class registered under ``name``; :class:`UnknownSourceError` lists the known names."""
    if name not in _sources:
        raise UnknownSourceError(f"unknown data source {name!r}; known: {', '.join(sorted(_sources))}")
    return _sources[name]


def build_source(name: str, root: str, salt: str, report: SkipReport | None = None, **kwargs: Any) -> Source:
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return get_source_class(name)(root=root, salt=salt, report=report, **kwargs)


#: ``(report item, image files (None where one is missing), mask file or None)`` of one segmentation case
SegmentationItem = tuple[str, list[Any], Any]


class SegmentationSource:
    """A registered source that also reads voxel masks: the segmentation cache
    (:mod:`losslab.data.cache.segmentation`) reads through these two methods, never through a source's name."""

    def segmentation_items(self) -> Iterator[SegmentationItem]:  # pragma: no cover - abstract
        """Per case: the report item, its image files (one per modality, or one 4D file) and its label map."""
        raise NotImplementedError

    def default_segmentation_mapping(self, labels: str) -> dict[str, list[int]]:  # pragma: no cover - abstract
        """``{name: [raw label values]}`` for ``labels`` = ``regions`` (overlapping, sigmoid) or ``classes``
        (exclusive, softmax, background first), when the config names none."""
        raise NotImplementedError

    def image_channels(self) -> tuple[list[str], list[int]]:
        """``(channel names as cached, position of each in the image as read)``: the segmentation cache stores
        channel k of a case as channel ``order[k]`` of its files' stack (or 4D image), and records the names
        in ``report.json`` (``modalities``). Default ``([], [])``: the channels as read, unnamed."""
        return [], []


def segmentation_sources() -> list[str]:
    """The registered sources that read segmentation masks."""
    return sorted(name for name, cls in _sources.items() if isinstance(cls, type) and issubclass(cls, SegmentationSource))


class SourceKwargsError(ValueError):
    """A ``data.source_kwargs`` entry the source does not take, or a value its parameter refuses."""

    def __init__(self, key: str, value: Any, problem: str) -> None:
        super().__init__(f"{key} = {value!r}: {problem}")
        self.key, self.value, self.problem = key, value, problem


_FIXED_PARAMS = ("self", "root", "salt", "report")


def check_source_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Check ``data.source_kwargs`` against the source's constructor before anything is read: every
    key must be one of its parameters and every value must fit the parameter's annotation (pydantic,
    lax mode; ``Annotated[int, Field(ge=1)]`` bounds such as :data:`PositiveSize` are enforced).

    Raises:
        UnknownSourceError: ``name`` is not registered.
        SourceKwargsError: an unknown key (the message lists the parameters) or a refused value.
    """
    import inspect
    import typing

    from pydantic import TypeAdapter, ValidationError

    init = get_source_class(name).__init__
    signature = inspect.signature(init)
    params = [p.name for p in signature.parameters.values()
              if p.name not in _FIXED_PARAMS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    try:
        hints = typing.get_type_hints(init, include_extras=True)
    except Exception:  # an annotation that cannot be resolved: check the names only
        hints = {}
    for key, value in kwargs.items():
        if value is None:  # dropped by build_source: the parameter keeps its default
            continue
        if key not in params:
            raise SourceKwargsError(key, value, f"source {name!r} has no parameter {key!r}; "
                                                f"its parameters: {', '.join(params)}")
        if key in hints:
            try:
                TypeAdapter(hints[key]).validate_python(value)
            except ValidationError as exc:
                raise SourceKwargsError(key, value, f"{exc.errors()[0]['msg']} (source {name!r})") from None


def default_normalization(name: str) -> Any:
    """The registered source ``name``'s default ``data.normalize`` (a mode name or ``{"fixed": ...}``)."""
    if name not in _sources:
        raise UnknownSourceError(f"unknown data source {name!r}; known: {', '.join(sorted(_sources))}")
    return getattr(_sources[name], "default_normalize", "per_case_nonzero_zscore")


def source_reads_root(name: str) -> bool:
    """Whether source ``name`` reads ``data.root`` (False for data shipped in a package)."""
    return bool(getattr(_sources.get(name), "reads_root", True))


def list_sources(pattern: str = "*") -> list[str]:
    return sorted(n for n in _sources if fnmatch.fnmatch(n, pattern))


# ----------------------------------------------------------------------------- data generators
# Generators write an offline dataset in a public layout (so that the real reader is exercised).
_generators: dict[str, Callable[..., Any]] = {}


def register_generator(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(root: str, seed: int = 0, **kwargs) -> None`` under ``name``."""

    def _register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _generators:
            raise ValueError(f"data generator {name!r} is already registered")
        _generators[name] = fn
        return fn

    return _register


def run_generator(name: str, root: str, seed: int = 0, **kwargs: Any) -> None:
    if name not in _generators:
        raise UnknownSourceError(f"unknown data generator {name!r}; known: {', '.join(sorted(_generators))}")
    _generators[name](root, seed=seed, **kwargs)


def list_generators() -> list[str]:
    return sorted(_generators)


#: Where an embedded data set (a generator named ``embedded_*``) lives by default:
#: ``<working directory>/data/<generator name>``. Other generators (``msd``, ``medmnist`` test
#: data) have no default location: ``data/msd`` may well be meant for the real data.
EMBEDDED_DATA_DIR = "data"


def default_generator_for(root: "str | os.PathLike") -> str | None:
    """The embedded generator whose default location is ``root`` (``data/embedded_brats`` ->
    ``embedded_brats``), else None."""
    from pathlib import Path

    target = Path(root).resolve()
    for name in _generators:
        if name.startswith("embedded_") and (Path.cwd() / EMBEDDED_DATA_DIR / name).resolve() == target:
            return name
    return None
