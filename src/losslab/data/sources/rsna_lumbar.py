"""``rsna_lumbar``: the RSNA 2024 Lumbar Spine Degenerative Classification layout (DICOM + CSV).

Layout under ``root``::

    train.csv                        study_id, spinal_canal_stenosis_l1_l2, ... (25 condition-level columns)
    train_label_coordinates.csv      study_id, series_id, instance_number, condition, level, x, y
    train_series_descriptions.csv    study_id, series_id, series_description
    train_images/<study_id>/<series_id>/<instance_number>.dcm

One :class:`Case` per labelled (study, condition, level) that has a coordinate: a 2.5D stack of
``stack_slices`` (7) slices centred on the labelled instance (slices ordered by position along the
slice normal; the stack is edge-padded at the ends of the series), windowed into ``windows``
channels (soft tissue 50/350, bone 400/2000, the file's window), cropped around the labelled
``(x, y)`` and resized: ``image`` ``float32 (stack_slices, len(windows), image_size, image_size)``.

Labels: ``Normal/Mild`` = 0, ``Moderate`` = 1, ``Severe`` = 2 (``class_names``
``["normal_mild", "moderate", "severe"]``). ``meta``: ``condition`` (snake case), ``level``
(0..4 for L1/L2..L5/S1), ``level_name``, ``series_description``, ``spacing``, ``stack_padded``,
``missing_slices``. ``case_id`` = salted hash of (study, condition, level), ``patient_id`` = salted
hash of the study (one study per patient in this data set).

Errors: a missing or misnamed CSV column raises ``ValueError`` naming the file and the column.
Everything else is a skip with a reason: no label, unknown label value, unknown condition or
level, a series folder that is missing or unreadable, a labelled instance not in the series, a
coordinate outside the image, mixed series in a folder (``mixed_series``: ``"largest"`` keeps the
series with most files and reports the others, ``"skip"`` skips the folder).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from losslab.data import dicom
from losslab.data.deid import salted_hash
from losslab.data.sources.base import (Case, PositiveSize, ReadJob, SkipReport, Source, read_csv_table, refused_link,
                                       register_source)
from losslab.data.sources.embedded_lumbar import CONDITIONS, LEVELS, column_name

LABELS = {"Normal/Mild": 0, "Moderate": 1, "Severe": 2}
TRAIN_CSV = "train.csv"
COORDINATES_CSV = "train_label_coordinates.csv"
DESCRIPTIONS_CSV = "train_series_descriptions.csv"
COORDINATE_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level", "x", "y")
DESCRIPTION_COLUMNS = ("study_id", "series_id", "series_description")


def read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV as dicts; ``ValueError`` naming the file and the first missing column."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (the RSNA lumbar layout needs it)")
    return read_csv_table(path, list(required))[1]


def _is_integer(value: str) -> bool:
    """``"12"`` and ``"12.0"`` are instance numbers; ``"12.7"``, ``""`` and ``"x"`` are not."""
    try:
        return float(value).is_integer()  # False for nan and inf too
    except ValueError:
        return False


def _key(value: str) -> str:
    """Study/series ids as strings without a float's trailing ``.0``."""
    value = value.strip()
    return value[:-2] if value.endswith(".0") else value


@register_source
class RsnaLumbarSource(Source):
    """RSNA 2024 lumbar spine: 2.5D windowed stacks per (study, condition, level).

    Args (source kwargs):
        conditions: condition names to keep (e.g. ``["Spinal Canal Stenosis"]``); default all
            five. Their 5 level columns must be in ``train.csv``.
        series_descriptions: keep only series with these descriptions (e.g.
            ``["Sagittal T2/STIR"]``); default all.
        stack_slices: slices in a stack, odd (default 7).
        image_size: side of the output images (default 64).
        windows: channel windows for :func:`losslab.data.dicom.multi_window`
            (default ``[[50, 350], [400, 2000], "file"]``).
        radius_factor: crop half-side = ``radius_factor * min(H, W) / 2`` (default 0.75).
        clahe: apply CLAHE per image after windowing (default False).
        mixed_series: ``"largest"`` (default) or ``"skip"`` for folders holding several series.
        on_gap: ``"keep"`` (default) or ``"skip"`` series with missing slices.
        images_dir: folder of the DICOM tree (default ``train_images``).
        on_label_conflict: a study listed twice in ``train.csv`` with different labels: ``"fail"``
            (default: ``ValueError`` naming the study, the column and both lines) or ``"skip"`` the
            conflicting (study, condition, level) cases, each reported. Identical duplicates are fine.
    """

    name = "rsna_lumbar"
    class_names = ["normal_mild", "moderate", "severe"]

    def __init__(
        self,
        root: str,
        salt: str,
        report: SkipReport | None = None,
        conditions: Sequence[str] | None = None,
        series_descriptions: Sequence[str] | None = None,
        stack_slices: PositiveSize = 7,
        image_size: PositiveSize = 64,
        windows: Sequence[Any] = dicom.DEFAULT_WINDOWS,
        radius_factor: float = 0.75,
        clahe: bool = False,
        mixed_series: str = "largest",
        on_gap: str = "keep",
        images_dir: str = "train_images",
        on_label_conflict: Literal["fail", "skip"] = "fail",
    ) -> None:
        super().__init__(root, salt, report)
        unknown = [c for c in (conditions or []) if c not in CONDITIONS]
        if unknown:
            raise ValueError(f"conditions: unknown {unknown}; allowed: {list(CONDITIONS)}")
        if stack_slices < 1 or stack_slices % 2 == 0:
            raise ValueError(f"stack_slices must be a positive odd number, got {stack_slices}")
        if mixed_series not in ("largest", "skip"):
            raise ValueError(f"mixed_series must be 'largest' or 'skip', got {mixed_series!r}")
        self.conditions = list(conditions) if conditions else list(CONDITIONS)
        self.series_descriptions = set(series_descriptions) if series_descriptions else None
        self.stack_slices = int(stack_slices)
        self.image_size = int(image_size)
        self.windows = [w if isinstance(w, str) else tuple(float(v) for v in w) for w in windows]
        # windowed to [0, 1]; a window wider than 2048 units has levels 1/w apart, closer than the
        # float16 step 2**-11 near 1. File and auto windows are only known after reading: allowed
        self.float16_safe = all(isinstance(w, str) or w[1] <= 2048 for w in self.windows)
        self.radius_factor = float(radius_factor)
        self.clahe = bool(clahe)
        self.mixed_series = mixed_series
        self.on_gap = on_gap
        self.images_dir = images_dir
        if on_label_conflict not in ("fail", "skip"):
            raise ValueError(f"on_label_conflict must be 'fail' or 'skip', got {on_label_conflict!r}")
        self.on_label_conflict = on_label_conflict
        self.label_conflicts: dict[tuple[str, str], str] = {}  # (study, column) -> why (on_label_conflict='skip')

    # ------------------------------------------------------------------ tables
    def _tables(self) -> tuple[dict[str, dict[str, str]], dict[tuple[str, str], str], list[dict[str, str]]]:
        root = Path(self.root)
        level_columns = [column_name(c, lv) for c in self.conditions for lv in LEVELS]
        train = read_csv(root / TRAIN_CSV, ["study_id", *level_columns])
        coordinates = read_csv(root / COORDINATES_CSV, COORDINATE_COLUMNS)
        descriptions = read_csv(root / DESCRIPTIONS_CSV, DESCRIPTION_COLUMNS)
        labels = self._labels_by_study(train, level_columns)
        series_description = {(_key(r["study_id"]), _key(r["series_id"])): r["series_description"]
                              for r in descriptions}
        return labels, series_description, coordinates

    def _labels_by_study(self, train: list[dict[str, str]], columns: list[str]) -> dict[str, dict[str, str]]:
        """``train.csv`` rows by study; a study listed again with a different label in a column is a
        conflict: ``on_label_conflict='fail'`` raises naming both lines, ``'skip'`` records it."""
        labels: dict[str, dict[str, str]] = {}
        lines: dict[str, int] = {}
        for line, row in enumerate(train, start=2):  # line 1 is the header
            study = _key(row["study_id"])
            if study not in labels:
                labels[study], lines[study] = row, line
                continue
            for column in columns:
                first, again = labels[study].get(column, ""), row.get(column, "")
                if first != again:
                    why = (f"conflicting labels for study {study} in {TRAIN_CSV} column {column!r}: {first!r} on "
                           f"line {lines[study]}, {again!r} on line {line}")
                    if self.on_label_conflict == "fail":
                        raise ValueError(f"{why} (fix the file, or set data.source_kwargs.on_label_conflict=skip)")
                    self.label_conflicts[(study, column)] = why
        return labels

    def iter_cases(self) -> Iterator[Case]:
        for job in self.read_jobs():
            yield from self.run_job(job)

    def run_job(self, job: ReadJob) -> Iterator[Case]:
        """The cases of one series: ``job.payload`` is ``(study, series, cases, labels, description)``."""
        return self._series_cases(*job.payload)

    def read_jobs(self) -> list[ReadJob]:
        """One job per (study, series) with a coordinate, in sorted order; CSV problems are reported here."""
        labels, descriptions, coordinates = self._tables()
        report = self.report
        # (study, series) -> [(condition, level, instance, x, y)], first coordinate per case wins
        by_series: dict[tuple[str, str], list[tuple[str, str, str, str, str]]] = {}
        seen: set[tuple[str, str, str]] = set()
        duplicates = 0
        for line, row in enumerate(coordinates, start=2):  # line 1 is the header
            study, series = _key(row["study_id"]), _key(row["series_id"])
            condition, level = row["condition"], row["level"]
            item = f"{COORDINATES_CSV}"
            if condition not in CONDITIONS:
                report.skip(item, f"unknown condition {condition!r} (study {study}); known: {list(CONDITIONS)}")
                continue
            if condition not in self.conditions:
                continue
            if level not in LEVELS:
                report.skip(item, f"unknown level {level!r} (study {study}, {condition}); known: {list(LEVELS)}")
                continue
            description = descriptions.get((study, series))
            if self.series_descriptions is not None and description not in self.series_descriptions:
                continue
            if (study, condition, level) in seen:
                duplicates += 1
                continue
            if not _is_integer(row["instance_number"]):  # never truncated: 12.7 is no instance
                seen.add((study, condition, level))  # its case is rejected here (the first coordinate wins)
                report.skip(f"{COORDINATES_CSV} line {line}", f"instance_number {row['instance_number']!r} is not an "
                                                              f"integer (study {study}, {condition} {level})")
                continue
            seen.add((study, condition, level))
            by_series.setdefault((study, series), []).append(
                (condition, level, row["instance_number"], row["x"], row["y"]))
        if duplicates:
            report.notes.append(f"{COORDINATES_CSV}: {duplicates} duplicate (study, condition, level) coordinates "
                                "ignored (the first one is used)")
        for study, row in sorted(labels.items()):
            for condition in self.conditions:
                for level in LEVELS:
                    value = row.get(column_name(condition, level), "")
                    if value and (study, condition, level) not in seen:
                        report.skip(TRAIN_CSV, f"no coordinate for study {study} {condition} {level}: "
                                               "cannot crop, case skipped")

        jobs = []
        for (study, series), cases in sorted(by_series.items()):
            folder = os.path.join(self.root, self.images_dir, study, series)
            files = len(os.listdir(folder)) if os.path.isdir(folder) and not refused_link(self.root, folder) else 0
            study_labels = {study: labels[study]} if study in labels else {}
            jobs.append(ReadJob(files, (study, series, cases, study_labels, descriptions.get((study, series)))))
        return jobs

    # ------------------------------------------------------------------ one series
    def _skip_all(self, cases: list[tuple[str, str, str, str, str]], item: str, reason: str) -> None:
        for condition, level, *_ in cases:
            self.report.skip(item, f"{condition} {level}: {reason}")

    def _series_cases(self, study: str, series: str, cases: list[tuple[str, str, str, str, str]],
                      labels: dict[str, dict[str, str]], description: str | None) -> Iterator[Case]:
        rel = os.path.join(self.images_dir, study, series)
        folder = os.path.join(self.root, rel)
        refused = refused_link(self.root, folder) if os.path.lexists(folder) else None
        if refused:
            self._skip_all(cases, rel, refused)
            return
        if not os.path.isdir(folder):
            self._skip_all(cases, rel, "series folder missing")
            return
        # labels first: a series is only read when one of its cases is labelled
        labelled = [case for case in (self._labelled(study, rel, case, labels) for case in cases) if case is not None]
        if not labelled:
            return
        members = self._series_members(folder, rel, cases)
        if members is None:
            return
        volume, vmeta = dicom.series_volume(members, self.report, root=self.root, item=rel, on_gap=self.on_gap)
        if volume is None:
            for condition, level, *_ in labelled:
                self.report.skip(rel, f"{condition} {level}: series unreadable (reason reported for the series)")
            return
        for condition, level, instance, x_text, y_text, label in labelled:
            centre = self._labelled_slice(volume.shape, vmeta["instance_numbers"], rel, condition, level,
                                          (instance, x_text, y_text))
            if centre is None:
                continue
            image, padded = self._crop_stack(volume, vmeta, *centre)
            condition_key = condition.lower().replace(" ", "_")
            meta = {
                "condition": condition_key,
                "level": LEVELS.index(level),
                "level_name": level,
                "series_description": description or "",
                "spacing": vmeta.get("spacing"),
                "stack_padded": padded,
                "missing_slices": int(vmeta.get("missing_slices", 0)),
            }
            self.report.read += 1
            yield Case(
                case_id=salted_hash(f"rsna_lumbar:{study}:{condition_key}:{level}", self.salt),
                patient_id=salted_hash(f"rsna_lumbar:{study}", self.salt),
                patient_key=str(study),
                label=label,
                image=image,
                meta=meta,
            )

    def _labelled(self, study: str, rel: str, case: tuple[str, str, str, str, str],
                  labels: dict[str, dict[str, str]]) -> tuple[str, str, str, str, str, int] | None:
        """A coordinate row with its class index from ``train.csv``; None (skipped, with the reason) when
        the study, the cell or a known value is missing, or the labels conflict."""
        condition, level, instance, x, y = case
        column = column_name(condition, level)
        if study not in labels:
            self.report.skip(rel, f"{condition} {level}: no label: study {study} not in {TRAIN_CSV}")
            return None
        value = labels[study].get(column, "")
        if (study, column) in self.label_conflicts:
            self.report.skip(rel, f"{condition} {level}: {self.label_conflicts[(study, column)]}")
            return None
        if value == "" or value.lower() == "nan":
            self.report.skip(rel, f"{condition} {level}: no label: empty {TRAIN_CSV} cell {column!r}")
            return None
        if value not in LABELS:
            self.report.skip(rel, f"{condition} {level}: unknown label value {value!r} in {TRAIN_CSV} column "
                                  f"{column!r}; known: {list(LABELS)}")
            return None
        return condition, level, instance, x, y, LABELS[value]

    def _series_members(self, folder: str, rel: str,
                        cases: list[tuple[str, str, str, str, str]]) -> list[tuple[Any, str]] | None:
        """The ``(dataset, path)`` pairs of the folder's series (one read per file, pixels included): the
        largest one when several are mixed (the others reported); None when the cases are skipped."""
        groups = dicom.group_series(folder, self.report, root=self.root)
        if not groups:
            self._skip_all(cases, rel, "no readable DICOM file in the series folder")
            return None
        if len(groups) == 1:
            return next(iter(groups.values()))
        if self.mixed_series == "skip":
            self._skip_all(cases, rel, f"{len(groups)} series mixed in one folder (mixed_series='skip')")
            return None
        ordered = sorted(groups.values(), key=len, reverse=True)
        for other in ordered[1:]:
            self.report.skip(rel, f"{len(groups)} series mixed in one folder: a second series of {len(other)} "
                                  f"file(s) ignored, the largest ({len(ordered[0])} files) kept")
        return ordered[0]

    def _labelled_slice(self, shape: tuple[int, ...], instances: list[int], rel: str, condition: str, level: str,
                        coordinates: tuple[str, str, str]) -> tuple[int, float, float] | None:
        """``(slice index, x, y)`` of a label's instance number and pixel coordinates in a ``(D, H, W)``
        volume; None (skipped, with the reason) when unparsable, not in the series or outside the image."""
        instance, x_text, y_text = coordinates
        _, height, width = shape
        try:
            instance_i = int(float(instance))
            x, y = float(x_text), float(y_text)
        except ValueError:
            self.report.skip(rel, f"{condition} {level}: bad instance/coordinate values "
                                  f"({instance!r}, {x_text!r}, {y_text!r})")
            return None
        if instance_i not in instances:
            self.report.skip(rel, f"{condition} {level}: labelled instance {instance_i} not in the series")
            return None
        if not (0 <= x < width and 0 <= y < height) or not (np.isfinite(x) and np.isfinite(y)):
            self.report.skip(rel, f"{condition} {level}: coordinate ({x:g}, {y:g}) outside the image "
                                  f"({width}x{height})")
            return None
        return instances.index(instance_i), x, y

    def _crop_stack(self, volume: np.ndarray, vmeta: dict[str, Any], centre: int, x: float,
                    y: float) -> tuple[np.ndarray, int]:
        """The windowed, cropped (and CLAHE'd) ``stack_slices`` around slice ``centre`` resized to
        ``(N, C, image_size, image_size)`` float32, and how many slices were padded at the ends."""
        half = self.stack_slices // 2
        wanted = np.arange(centre - half, centre + half + 1)
        index = np.clip(wanted, 0, volume.shape[0] - 1)
        stack = dicom.windowed_crop(volume, index, x, y, self.windows, vmeta.get("window"), self.radius_factor)
        if self.clahe:
            stack = dicom.clahe(stack)
        image = dicom.resize(stack, (self.image_size, self.image_size)).astype(np.float32, copy=False)
        return image, int(np.count_nonzero(wanted != index))
