"""What the one cache builder (:mod:`losslab.data.cache.build`) and a task's per-case encoder share: the
:class:`CaseEncoder` contract, the :class:`CacheInfo` of a built cache and the index columns of an array."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from losslab.data.integrity import ArrayRecord
from losslab.data.sources import ReadJob, SkipReport, Source


@dataclass
class CacheInfo:
    """A built (or reused) cache: ``index`` (``index.parquet``, one row per case), ``report``
    (``report.json``), whether it was ``reused``, its ``fingerprint`` and ``class_names``."""

    cache_dir: Path
    index: pd.DataFrame
    report: dict[str, Any]
    reused: bool
    fingerprint: str
    class_names: list[str] = field(default_factory=list)
    resumed_tasks: int = 0  # read jobs taken from the journal of an interrupted build
    total_tasks: int = 0
    rebuilt_because: str = ""  # the damage found in the previous cache when this build replaced it

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def split_fingerprint(self) -> str:
        """The folds and test split of the cache (:func:`losslab.data.splits.split_fingerprint`)."""
        return str(self.report.get("split_fingerprint", ""))


class CaseEncoder(ABC):
    """What a task stores of each case; :func:`~losslab.data.cache.build.build_cache` does the rest (lock, fingerprint, journal,
    workers, atomic writes, integrity records, folds, report, index).

    A subclass is a frozen dataclass (it is pickled to the worker processes). :meth:`bind` resolves what
    depends on the source (class names, a label mapping) and returns the encoder the build runs with.
    """

    #: recorded in ``report.json`` (``encoder``); a cache is opened only by the encoder that built it
    name = "cases"

    def check_source(self, source_name: str) -> None:
        """Refuse a ``data.source`` this encoder cannot read, before anything is read (default: any)."""

    def bind(self, data_cfg: Any, source: Source) -> CaseEncoder:
        """This encoder with what depends on ``source`` resolved (default: itself)."""
        return self

    def settings(self) -> dict[str, Any]:
        """What, beside the common data settings, makes a cache: hashed into its fingerprint."""
        return {}

    @abstractmethod
    def read_jobs(self, source: Source) -> list[ReadJob]:
        """The independent units of reading, in a fixed order (their position names them in the journal)."""
        raise NotImplementedError

    def worker_setup(self) -> None:
        """Called once in each process that runs :meth:`encode` (default: nothing)."""

    @abstractmethod
    def encode(self, source: Source, job: ReadJob, arrays: Path, report: SkipReport) -> list[dict[str, Any]]:
        """Run one read job: write its cases' arrays under ``arrays`` (atomically) and return their index
        rows: ``case_id``, ``patient_id``, ``split_key`` (never written to the index) and, per array,
        ``<key>_path``/``<key>_bytes``/``<key>_sha256`` (:func:`array_columns`). Problems go to ``report``."""
        raise NotImplementedError

    @abstractmethod
    def fold_strata(self, index: pd.DataFrame, num_folds: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(labels (N,) the folds are stratified on, the source's own test cases (N,) bool or None)``."""
        raise NotImplementedError

    def report(self, index: pd.DataFrame, source: Source) -> dict[str, Any]:
        """The encoder's keys of ``report.json`` (``modalities`` among them)."""
        return {}

    def view(self, info: CacheInfo) -> Any:
        """What :func:`~losslab.data.cache.build.build_cache` and ``load_cache`` hand the task (default: ``info`` itself)."""
        return info


def array_columns(key: str, record: ArrayRecord) -> dict[str, Any]:
    """The index columns of one array of a case: ``<key>_path``, ``<key>_bytes``, ``<key>_sha256``."""
    return {f"{key}_path": record.path, f"{key}_bytes": record.size, f"{key}_sha256": record.digest}
