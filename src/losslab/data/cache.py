"""The case cache: memory-mappable ``.npy`` arrays, one parquet index and ``report.json``.

Layout of a cache folder::

    arrays/<case_id>.npy    (N, C, H, W) as read by the source, in ``data.cache_dtype``
    index.parquet           case_id, patient_id, label, class_name, fold, split, array_path,
                            array_bytes, array_sha256, n_instances, shape, channel_mean,
                            channel_std, meta (JSON)
    report.json             cases read and skipped (with reasons), class counts, fingerprint,
                            split_fingerprint (the folds, independent of the salt), modalities
                            (the channels' names, in the one brain MRI order for MRI sources)
    .salt                   the local hashing salt when none is configured (never logged)

Folds are drawn over the source's own patient identifiers (their split keys,
:func:`losslab.data.splits.split_key`) and ``data.seed``: two fresh caches of the same data, on any
machine and with any salt, put every patient in the same fold and have the same
``split_fingerprint``. The salt only hides identifiers.

Concurrent builders of one cache folder (two workers of a sweep or a study starting at once) take
an exclusive lock first: the salt is resolved (and, when new, written atomically) under it, so the
second waits and then reuses what the first built.

Re-running on unchanged inputs (same content hash of the source files and the same settings)
reuses the cache and says so, once every array's size and hash match the index
(:mod:`losslab.data.integrity`); a truncated or altered array is named and the cache rebuilt from
the raw data (or refused when the raw data is gone). ``load_cache`` checks the same before any run.

Building: the source's read jobs (e.g. one DICOM series each) run in parallel worker processes; each
case array is written atomically (a temporary file, then ``os.replace``) and each finished job
is appended to a journal (``.preprocess-journal.jsonl``: its index rows and report entries). A
build that was killed resumes from the journal; the index is removed when a build starts and
written last, so a cache without ``index.parquet`` is never read. The result is the same, byte
for byte, as an uninterrupted build. Only the index rows (not the arrays) are held in memory.

``data.cache_dtype``: ``auto`` (default) stores float16 when the source says its cases are
windowed into [0, 1] with windows of width up to 2048 (``Source.float16_safe``; rsna_lumbar),
float32 otherwise; datasets read either and hand out float32. A value ``v`` in [0, 1] stored as
float16 is off by at most ``2**-12 = 2.44e-4`` (half the float16 step just below 1). Measured
max |float16 - float32| of windowed values (soft tissue 50/350, bone 400/2000, the file's
window): 2.435e-4 on the embedded lumbar cases; 2.438e-4 on pydicom's CT_small.dcm, 2.428e-4 on
MR_small.dcm and emri_small.dcm (``tests/test_preprocess.py`` checks the bound). That is below
half a grey level of any window up to 2048 wide (soft tissue: one level = 1/350 = 2.9e-3; bone:
1/2000 = 5.0e-4), at half the disk. Raw intensities stay float32: MR_small's raw values (up to
2145) already lose 1.0 in float16.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from losslab.data.deid import resolve_salt
from losslab.data.integrity import (ArrayRecord, CacheIntegrityError, damage, exclusive, record_file, save_atomic,
                                    verify_arrays)
from losslab.data.raw_data import ensure_raw_data, ensure_raw_data_to_rebuild  # noqa: F401 - ensure_raw_data re-exported
from losslab.data.raw_data import hash_files as _hash_files
from losslab.data.seg_cache import SegCacheInfo, build_seg_cache
from losslab.data.sources import Case, ReadJob, SkipReport, Source, build_source, source_reads_root
from losslab.data.splits import TEST_FOLD, assign_folds, split_fingerprint, split_key

CACHE_VERSION = 4  # 2: a source's own test split is the held-out test (fold -1); 3: array sizes and hashes;
# 4: folds drawn over split keys (independent of the salt) and the split fingerprint in report.json
JOURNAL = ".preprocess-journal.jsonl"
#: below this many raw files a build runs in-process (not worth a worker pool)
AUTO_PARALLEL_FILES = 1000
FLOAT16_MAX = float(np.finfo(np.float16).max)

log = logging.getLogger(__name__)


class NoUsableDataError(RuntimeError):
    """Raised when a source yields no usable case; the message carries the skip reasons."""


@dataclass
class CacheInfo:
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


def _settings_fingerprint(data_cfg: Any, salt: str) -> str:
    keys = {
        "version": CACHE_VERSION,
        "source": data_cfg.source,
        "source_kwargs": data_cfg.source_kwargs,
        "num_folds": data_cfg.num_folds,
        "test_fraction": data_cfg.test_fraction,
        "seed": data_cfg.seed,
        "cache_dtype": data_cfg.cache_dtype,
        "salt": hashlib.sha256(salt.encode()).hexdigest(),  # the salt itself is never stored
    }
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()


def load_cache(cache_dir: str | Path, check_hashes: bool | None = None) -> CacheInfo:
    """Open a built cache after checking its arrays against the index (:func:`verify_arrays`:
    ``check_hashes=None`` hashes caches up to ``HASH_ON_OPEN_MAX_BYTES``, sizes always).

    Raises:
        FileNotFoundError: no ``index.parquet`` (never built, or a build did not finish).
        CacheIntegrityError: an array is missing, truncated or altered (the message names it), or
            the index predates array hashes.
    """
    cache_dir = Path(cache_dir)
    index_path = cache_dir / "index.parquet"
    if not index_path.is_file():
        raise FileNotFoundError(f"no preprocessed cache at {cache_dir} (missing index.parquet); run `losslab preprocess` first")
    index = pd.read_parquet(index_path)
    verify_arrays(cache_dir, _array_records(index, index_path), check_hashes)
    report = json.loads((cache_dir / "report.json").read_text())
    return CacheInfo(cache_dir, index, report, True, report.get("fingerprint", ""), report.get("class_names", []))


def _array_records(index: pd.DataFrame, index_path: Path) -> list[ArrayRecord]:
    if "array_sha256" not in index.columns:
        raise CacheIntegrityError(f"{index_path} has no array sizes and hashes (a cache older than version "
                                  f"{CACHE_VERSION}); rebuild it with `losslab preprocess`")
    return [ArrayRecord(path, int(size), digest)
            for path, size, digest in zip(index["array_path"], index["array_bytes"], index["array_sha256"])]


def build_cache(data_cfg: Any, force: bool = False, seg: Any = None) -> CacheInfo | SegCacheInfo:
    """Read the configured source into the cache (or reuse it when inputs are unchanged and intact).

    One builder for every task: a segmentation task passes its ``seg`` settings (how raw label values
    map to regions or classes) and gets the segmentation cache (:func:`build_seg_cache`, read through
    the source's masks); the other tasks get the case cache of this module.
    """
    if seg is not None:
        return build_seg_cache(data_cfg, seg, force)
    cache_dir = Path(data_cfg.cache_dir)
    with exclusive(cache_dir / ".preprocess.lock"):  # one builder per cache folder at a time
        if source_reads_root(data_cfg.source):
            ensure_raw_data_to_rebuild(data_cfg, lambda: load_cache(cache_dir, check_hashes=True))
        salt = resolve_salt(data_cfg.salt, cache_dir)  # under the lock: concurrent builders share one salt
        report = SkipReport()
        source = build_source(data_cfg.source, data_cfg.root, salt, report, **data_cfg.source_kwargs)
        fingerprint = hashlib.sha256(
            (_hash_files(source.fingerprint_files(), data_cfg.root) + _settings_fingerprint(data_cfg, salt)).encode()
        ).hexdigest()
        found = None if force else _reusable(cache_dir, fingerprint)
        if isinstance(found, CacheInfo):
            return found  # unchanged inputs, or another process built it while this one waited
        info = _build(data_cfg, cache_dir, source, report, fingerprint, force)
        info.rebuilt_because = found or ""
        return info


def _reusable(cache_dir: Path, fingerprint: str) -> CacheInfo | str | None:
    """The cache at ``cache_dir`` when it is complete, intact and was built from the same inputs; the
    integrity error (a str) when it was built from them but an array is damaged; else None."""
    if (cache_dir / "index.parquet").is_file() and (cache_dir / "report.json").is_file():
        existing = json.loads((cache_dir / "report.json").read_text())
        if existing.get("fingerprint") == fingerprint:
            (cache_dir / JOURNAL).unlink(missing_ok=True)  # left by a build killed after its commit
            try:
                info = load_cache(cache_dir, check_hashes=True)
            except CacheIntegrityError as exc:
                log.warning("%s; rebuilding the cache from the raw data", exc)
                return str(exc)
            info.reused = True
            return info
    return None


def _build(data_cfg: Any, cache_dir: Path, source: Source, report: SkipReport, fingerprint: str,
           force: bool) -> CacheInfo:
    """Run the source's read jobs into the cache, resuming from the journal (module docstring)."""
    class_names = list(data_cfg.class_names or source.class_names)
    jobs = source.read_jobs()  # planning first: a bad table fails before the cache is touched
    (cache_dir / "index.parquet").unlink(missing_ok=True)  # the commit mark goes first, comes back last
    store = _Store(cache_dir / "arrays", class_names, cache_dtype(data_cfg.cache_dtype, source))
    store.arrays.mkdir(parents=True, exist_ok=True)
    journal = _Journal(cache_dir / JOURNAL, {"fingerprint": fingerprint, "tasks": len(jobs)}, store.arrays, force)
    resumed = len(journal.entries)
    if resumed:
        log.info("resuming an interrupted build: %d of %d read jobs already done", resumed, len(jobs))
    _run_jobs(source, jobs, journal, store, data_cfg.preprocess_workers)
    rows = []
    for position in range(len(jobs)):  # the jobs' order, whatever order they finished in
        entry = journal.entries[position]
        rows.extend(entry["rows"])
        report.read += entry["read"]
        report.skipped.extend(entry["skipped"])
        report.notes.extend(entry["notes"])
    if not rows:
        reasons = "; ".join(f"{s['item']}: {s['reason']}" for s in report.skipped[:10])
        raise NoUsableDataError(
            f"no usable case in {data_cfg.root} (source {data_cfg.source!r}): {len(report.skipped)} skipped"
            + (f" — {reasons}" if reasons else "")
        )
    index = pd.DataFrame(rows)
    if index["case_id"].duplicated().any():
        dup = index.loc[index["case_id"].duplicated(), "case_id"].tolist()[:5]
        raise ValueError(f"duplicate case ids from source {data_cfg.source!r}: {dup}")
    source_test = np.array([json.loads(m).get("split") == "test" for m in index["meta"]])
    keys = index.pop("split_key").to_numpy()  # orders the draw; never written to the index
    index["fold"] = assign_folds(index["label"].to_numpy(), keys,
                                 data_cfg.num_folds, data_cfg.seed, data_cfg.test_fraction, fixed_test=source_test)
    index["split"] = np.where(index["fold"] == TEST_FOLD, "test", "train")
    if source_test.any():
        report.notes.append(f"the source's own test split ({int(source_test.sum())} cases) is the held-out "
                            f"test (fold {TEST_FOLD}); the other cases are spread over {data_cfg.num_folds} folds")

    counts = index["class_name"].value_counts().reindex(class_names, fill_value=0)
    full_report = report.to_dict() | {
        "class_names": class_names,
        "class_counts": {k: int(v) for k, v in counts.items()},
        "cases": int(len(index)),
        "folds": {int(k): int(v) for k, v in index["fold"].value_counts().sort_index().items()},
        "fingerprint": fingerprint,
        "split_fingerprint": split_fingerprint(keys, index["fold"].to_numpy()),
        "source": data_cfg.source,
        # the channels' names, in the one brain MRI order for MRI sources (losslab.data.sources.channels)
        "modalities": list(getattr(source, "modalities", None) or []),
        "test_split": "source" if source_test.any() else ("test_fraction" if data_cfg.test_fraction > 0 else "none"),
    }
    _commit(cache_dir, index, full_report, journal)
    return CacheInfo(cache_dir, index, full_report, False, fingerprint, class_names, resumed, len(jobs))


# ----------------------------------------------------------------------------- the write path
def cache_dtype(setting: str, source: Source) -> str:
    """``data.cache_dtype`` resolved: ``auto`` is float16 when ``source.float16_safe``, else float32."""
    if setting == "auto":
        return "float16" if getattr(source, "float16_safe", False) else "float32"
    if setting not in ("float16", "float32"):
        raise ValueError(f"data.cache_dtype must be auto, float16 or float32, got {setting!r}")
    return setting


@dataclass(frozen=True)
class _Store:
    """Where and how a read job's cases are written (pickled to the worker processes)."""

    arrays: Path
    class_names: list[str]
    dtype: str  # float16 | float32; float16 values beyond its range are an error, never clipped


def _float16_round_trip(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(float16 copy, its float32 values)`` of a float32 array. torch's conversion (F16C, round to
    nearest even) gives the same bits as ``ndarray.astype(np.float16)`` about 4x faster (numpy
    converts in software: 6.6 ms against 1.4 ms for a 15 x 3 x 256 x 256 stack, measured here)."""
    import torch

    half = torch.from_numpy(image).to(torch.float16)
    return half.numpy(), half.to(torch.float32).numpy()


def _store_case(case: Case, store: _Store, report: SkipReport) -> dict[str, Any] | None:
    """Write one case's array; its index row (statistics of the stored values), or None if skipped."""
    if not (0 <= case.label < len(store.class_names)):
        report.skip(case.case_id, f"label {case.label} outside 0..{len(store.class_names) - 1}")
        return None
    image = np.ascontiguousarray(case.image, dtype=np.float32)
    if store.dtype == "float16":
        peak = max(float(image.max()), -float(image.min())) if image.size else 0.0
        if peak > FLOAT16_MAX:
            raise ValueError(f"data.cache_dtype=float16: case {case.case_id} has values up to {peak:g}, beyond "
                             f"float16's {FLOAT16_MAX:g}; use data.cache_dtype=float32")
        stored, image = _float16_round_trip(image)
    else:
        stored = image
    path = store.arrays / f"{case.case_id}.npy"
    save_atomic(path, stored)
    record = record_file(store.arrays.parent, path)
    mean, std = channel_statistics(image)
    return {
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "split_key": split_key(case.patient_key),
        "label": int(case.label),
        "class_name": store.class_names[case.label],
        "array_path": record.path,
        "array_bytes": record.size,
        "array_sha256": record.digest,
        "n_instances": int(image.shape[0]),
        "shape": list(image.shape),
        "channel_mean": mean,
        "channel_std": std,
        "meta": json.dumps(case.meta, sort_keys=True),
    }


def channel_statistics(image: np.ndarray) -> tuple[list[float], list[float]]:
    """Per channel of ``(N, C, H, W)``: mean and standard deviation over the non-zero voxels.

    Sums in float64 (zeros add nothing, so no boolean gather): ``mean = S1 / n``,
    ``std = sqrt(S2 / n - mean**2)``. A channel with no non-zero voxel gets ``(0, 1)``; a zero
    std becomes 1 (the z-score of a constant channel is then 0).
    """
    axes = (0,) + tuple(range(2, image.ndim))  # reduced in place: no channel-first copy (2x faster at 256²)
    count = np.count_nonzero(image, axis=axes)
    total = image.sum(axis=axes, dtype=np.float64)
    rows = np.ascontiguousarray(image).reshape(image.shape[0], image.shape[1], -1)  # a view when contiguous
    squares = np.einsum("ncx,ncx->c", rows, rows, dtype=np.float64)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    variance = np.divide(squares, count, out=np.zeros_like(total), where=count > 0) - mean**2
    std = np.sqrt(np.maximum(variance, 0.0))
    return [float(m) for m in mean], [float(s) if s > 0 else 1.0 for s in std]


_worker: dict[str, Any] = {}


def _init_worker(source: Source, store: _Store) -> None:
    from threadpoolctl import threadpool_limits

    # one BLAS thread per process: the parallelism is across read jobs, and OpenBLAS threads spinning
    # on a busy machine made the small resize products 70x slower (measured on 2 shared cores)
    _worker.update(source=source, store=store, limits=threadpool_limits(1, user_api="blas"))
    if store.dtype == "float16":
        import torch

        # the float16 conversion is torch's: entering the parent's OpenMP pool from a forked worker
        # hangs (GNU libgomp after fork), one thread runs it inline
        torch.set_num_threads(1)


def _run_job(position: int, job: ReadJob) -> tuple[int, dict[str, Any]]:
    """Run one read job in this process: its journal entry (index rows and report entries)."""
    source, store = _worker["source"], _worker["store"]
    report, saved = SkipReport(), source.report
    source.report = report
    try:
        rows = [row for case in source.run_job(job) if (row := _store_case(case, store, report)) is not None]
    finally:
        source.report = saved
    return position, {"task": position, "rows": rows, "read": report.read, "skipped": report.skipped,
                      "notes": report.notes}


class _Journal:
    """The finished read jobs of a build, one JSON line each (its position under the key ``task``)
    after a header line naming the build.

    A journal of another build (fingerprint, job count under ``tasks``) is discarded; a line cut short
    by a kill is dropped, as is any job whose arrays are missing or not of their journalled size (it
    runs again).
    """

    def __init__(self, path: Path, header: dict[str, Any], arrays: Path, discard: bool) -> None:
        self.path = path
        self.entries: dict[int, dict[str, Any]] = {}
        lines = [] if discard or not path.is_file() else path.read_bytes().split(b"\n")
        if lines and _json_line(lines[0]) == header:
            for line in lines[1:]:
                entry = _json_line(line)
                if entry is not None and not any(damage(arrays.parent, _row_record(row), check_hash=False)
                                                 for row in entry["rows"]):
                    self.entries[int(entry["task"])] = entry
        with open(path, "w") as fh:  # rewritten whole: drops a partial last line and stale entries
            fh.write(json.dumps(header) + "\n")
            fh.writelines(json.dumps(e) + "\n" for e in self.entries.values())

    def append(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        self.entries[int(entry["task"])] = entry


def _row_record(row: dict[str, Any]) -> ArrayRecord:
    return ArrayRecord(row["array_path"], int(row["array_bytes"]), row["array_sha256"])


def _json_line(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _workers(setting: int | None, files: int, jobs: int) -> int:
    if setting is None:
        setting = (os.cpu_count() or 1) if files >= AUTO_PARALLEL_FILES else 1
    return max(1, min(int(setting), jobs))


def _run_jobs(source: Source, jobs: list[ReadJob], journal: _Journal, store: _Store, workers: int | None) -> None:
    """Run the read jobs the journal lacks (in a process pool when worth it), journalling each."""
    from tqdm import tqdm

    todo = [i for i in range(len(jobs)) if i not in journal.entries]
    by_files = any(job.files > 0 for job in jobs)  # a missing series folder counts 0 files
    weight = [job.files if by_files else 1 for job in jobs]
    workers = _workers(workers, sum(weight[i] for i in todo) if by_files else 0, len(todo))
    bar = tqdm(total=sum(weight), initial=sum(weight) - sum(weight[i] for i in todo),
               unit="file" if by_files else "job", desc="preprocess", disable=not sys.stderr.isatty(),
               dynamic_ncols=True)
    with bar:
        if workers == 1:
            _init_worker(source, store)
            try:
                for position in todo:
                    journal.append(_run_job(position, jobs[position])[1])
                    bar.update(weight[position])
            finally:
                _worker.pop("limits").restore_original_limits()
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # fork: workers start at once with the parent's imports, and a script without a
        # `__main__` guard still works (spawn/forkserver re-run the main module)
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(source, store)) as pool:
            futures = [pool.submit(_run_job, i, jobs[i]) for i in todo]
            try:
                for future in as_completed(futures):
                    position, entry = future.result()
                    journal.append(entry)
                    bar.update(weight[position])
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise


def _commit(cache_dir: Path, index: pd.DataFrame, report: dict[str, Any], journal: _Journal) -> None:
    """Drop arrays no index row names, write the report, then the index (the commit mark), then
    remove the journal."""
    keep = {Path(p).name for p in index["array_path"]}
    for path in (cache_dir / "arrays").iterdir():
        if path.name not in keep:
            path.unlink()
    tmp = cache_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, cache_dir / "report.json")
    index.to_parquet(cache_dir / "index.parquet.tmp", index=False)
    os.replace(cache_dir / "index.parquet.tmp", cache_dir / "index.parquet")
    journal.path.unlink(missing_ok=True)
