"""The one cache builder (:func:`build_cache`) and reader (:func:`load_cache`) of every task.

The shared machinery is here; what a case becomes on disk is the task's
:class:`~losslab.data.cache.base.CaseEncoder`
(:class:`~losslab.data.cache.images.ImageEncoder`: one image array per case;
:class:`~losslab.data.cache.segmentation.SegmentationEncoder`: image, target and distance maps).

Layout of a cache folder::

    arrays/<case_id>*.npy   the encoder's arrays of each case
    index.parquet           one row per case: case_id, patient_id, fold, split, the encoder's columns,
                            and for each array ``<key>`` of a case its ``<key>_path`` (relative to the
                            cache folder), ``<key>_bytes`` and ``<key>_sha256``
    report.json             read / skipped (with reasons) / notes, cases, folds, fingerprint,
                            split_fingerprint (the folds, independent of the salt), source, encoder,
                            modalities (the channels' names, in the one brain MRI order for MRI sources),
                            test_split, and the encoder's keys
    .salt                   the local hashing salt when none is configured (never logged)

Folds are drawn over the source's own patient identifiers (their split keys,
:func:`losslab.data.splits.split_key`) and ``data.seed``, stratified on what the encoder names
(:meth:`~losslab.data.cache.base.CaseEncoder.fold_strata`): two fresh caches of the same data, on any machine and with any salt,
put every patient in the same fold and have the same ``split_fingerprint``. The salt only hides
identifiers.

Concurrent builders of one cache folder (two workers of a sweep or a study starting at once) take an
exclusive lock first (:func:`~losslab.data.integrity.exclusive`): the salt is resolved (and, when new,
written atomically) under it, so the second waits and then reuses what the first built.

Re-running on unchanged inputs (same content hash of the source's files and the same settings) reuses
the cache and says so, once every array's size and hash match the index
(:mod:`losslab.data.integrity`); a truncated or altered array is named and the cache rebuilt from the
raw data (or refused when the raw data is gone). ``load_cache`` checks the same before any run.

Building: the encoder's read jobs (e.g. one DICOM series, or one NIfTI case, each) run in parallel
worker processes; each array is written atomically (a temporary file, then ``os.replace``) and each
finished job is appended to a journal (``.preprocess-journal.jsonl``: its index rows and report
entries). A build that was killed resumes from the journal; the index is removed when a build starts and
written last, so a cache without ``index.parquet`` is never read. The result is the same, byte for
byte, as an uninterrupted build. Only the index rows (not the arrays) are held in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from losslab.data.cache.base import CacheInfo, CaseEncoder
from losslab.data.cache.images import ImageEncoder
from losslab.data.deid import resolve_salt
from losslab.data.integrity import ArrayRecord, CacheIntegrityError, damage, exclusive, verify_arrays
from losslab.data.raw_data import ensure_raw_data_to_rebuild, hash_files
from losslab.data.sources import ReadJob, SkipReport, Source, build_source, source_reads_root
from losslab.data.splits import TEST_FOLD, assign_folds, split_fingerprint

CACHE_VERSION = 4  # 2: a source's own test split is the held-out test (fold -1); 3: array sizes and hashes;
# 4: folds drawn over split keys (independent of the salt) and the split fingerprint in report.json
JOURNAL = ".preprocess-journal.jsonl"
#: below this many raw files a build runs in-process (not worth a worker pool)
AUTO_PARALLEL_FILES = 1000
#: what an older losslab's segmentation cache left (``index.json`` + ``cases/``): refused, and removed by a rebuild
LEGACY_SEG_INDEX = "index.json"

log = logging.getLogger(__name__)


class NoUsableDataError(RuntimeError):
    """Raised when a source yields no usable case; the message carries the skip reasons."""


def _array_keys(columns: Any) -> list[str]:
    return [c[: -len("_sha256")] for c in columns if c.endswith("_sha256")]


def _row_records(row: dict[str, Any]) -> list[ArrayRecord]:
    return [ArrayRecord(row[f"{k}_path"], int(row[f"{k}_bytes"]), row[f"{k}_sha256"]) for k in _array_keys(row)]


def _settings_fingerprint(data_cfg: Any, salt: str, encoder: CaseEncoder) -> str:
    keys = {
        "version": CACHE_VERSION,
        "source": data_cfg.source,
        "source_kwargs": data_cfg.source_kwargs,
        "num_folds": data_cfg.num_folds,
        "test_fraction": data_cfg.test_fraction,
        "seed": data_cfg.seed,
        "cache_dtype": data_cfg.cache_dtype,
        "salt": hashlib.sha256(salt.encode()).hexdigest(),  # the salt itself is never stored
    } | encoder.settings()
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()


def load_cache(cache_dir: str | Path, check_hashes: bool | None = None, encoder: CaseEncoder | None = None) -> Any:
    """Open a built cache after checking its arrays against the index (:func:`verify_arrays`:
    ``check_hashes=None`` hashes caches up to ``HASH_ON_OPEN_MAX_BYTES``, sizes always); the
    ``encoder``'s view of it (default: the :class:`CacheInfo` of an image cache).

    Raises:
        FileNotFoundError: no ``index.parquet`` (never built, or a build did not finish).
        CacheIntegrityError: an array is missing, truncated or altered (the message names it), the index
            predates array hashes, or the folder holds an older losslab's segmentation cache.
        ValueError: the cache was built by another encoder (names both).
    """
    cache_dir, encoder = Path(cache_dir), encoder or ImageEncoder()
    index_path = cache_dir / "index.parquet"
    if not index_path.is_file():
        if (cache_dir / LEGACY_SEG_INDEX).is_file():
            raise CacheIntegrityError(f"{cache_dir} holds a segmentation cache of an older losslab ({LEGACY_SEG_INDEX}, "
                                      f"no index.parquet); rebuild it with `losslab preprocess`")
        raise FileNotFoundError(f"no preprocessed cache at {cache_dir} (missing index.parquet); run `losslab preprocess` first")
    index = pd.read_parquet(index_path)
    if not _array_keys(index.columns):
        raise CacheIntegrityError(f"{index_path} has no array sizes and hashes (a cache older than version "
                                  f"{CACHE_VERSION}); rebuild it with `losslab preprocess`")
    report = json.loads((cache_dir / "report.json").read_text())
    built_by = report.get("encoder", "images")  # caches of version 4 wrote no encoder: images
    if built_by != encoder.name:
        raise ValueError(f"the cache at {cache_dir} holds {built_by} cases, not {encoder.name} cases; "
                         f"point data.cache_dir at another folder")
    verify_arrays(cache_dir, (r for row in index.to_dict("records") for r in _row_records(row)), check_hashes)
    info = CacheInfo(cache_dir, index, report, True, report.get("fingerprint", ""), report.get("class_names", []))
    return encoder.view(info)


def build_cache(data_cfg: Any, force: bool = False, encoder: CaseEncoder | None = None) -> Any:
    """Read the configured source into the cache (or reuse it when inputs are unchanged and intact);
    the ``encoder``'s view of it (default :class:`~losslab.data.cache.images.ImageEncoder`: a
    :class:`CacheInfo`).

    One builder for every task: the task supplies the per-case ``encoder``; the lock, journal, workers,
    atomic writes, integrity records, folds, index and report are this module's.

    Raises:
        NoUsableDataError: no usable case (the first skip reasons are named).
        CacheIntegrityError: a damaged cache array (named) whose raw data is gone.
        ValueError: a source the encoder cannot read, duplicate case ids, too few patients for the folds.
    """
    cache_dir, encoder = Path(data_cfg.cache_dir), encoder or ImageEncoder()
    encoder.check_source(data_cfg.source)
    with exclusive(cache_dir / ".preprocess.lock"):  # one builder per cache folder at a time
        if source_reads_root(data_cfg.source):
            ensure_raw_data_to_rebuild(data_cfg, lambda: load_cache(cache_dir, check_hashes=True, encoder=encoder))
        salt = resolve_salt(data_cfg.salt, cache_dir)  # under the lock: concurrent builders share one salt
        report = SkipReport()
        source = build_source(data_cfg.source, data_cfg.root, salt, report, **data_cfg.source_kwargs)
        encoder = encoder.bind(data_cfg, source)
        fingerprint = hashlib.sha256(
            (hash_files(source.fingerprint_files(), data_cfg.root) + _settings_fingerprint(data_cfg, salt, encoder)).encode()
        ).hexdigest()
        found = None if force else _reusable(cache_dir, fingerprint, encoder)
        if found is not None and not isinstance(found, str):
            return found  # unchanged inputs, or another process built it while this one waited
        info = _build(data_cfg, cache_dir, source, encoder, report, fingerprint, force)
        info.rebuilt_because = found or ""
        return encoder.view(info)


def _reusable(cache_dir: Path, fingerprint: str, encoder: CaseEncoder) -> Any:
    """The ``encoder``'s view of the cache at ``cache_dir`` when it is complete, intact and was built from
    the same inputs; the integrity error (a str) when it was built from them but an array is damaged;
    else None."""
    if (cache_dir / "index.parquet").is_file() and (cache_dir / "report.json").is_file():
        existing = json.loads((cache_dir / "report.json").read_text())
        if existing.get("fingerprint") == fingerprint:
            (cache_dir / JOURNAL).unlink(missing_ok=True)  # left by a build killed after its commit
            try:
                info = load_cache(cache_dir, check_hashes=True, encoder=encoder)
            except CacheIntegrityError as exc:
                log.warning("%s; rebuilding the cache from the raw data", exc)
                return str(exc)
            info.reused = True
            return info
    return None


def _build(data_cfg: Any, cache_dir: Path, source: Source, encoder: CaseEncoder, report: SkipReport,
           fingerprint: str, force: bool) -> CacheInfo:
    """Run the encoder's read jobs into the cache, resuming from the journal (module docstring), then draw
    the folds and commit."""
    jobs = encoder.read_jobs(source)  # planning first: a bad table fails before the cache is touched
    (cache_dir / "index.parquet").unlink(missing_ok=True)  # the commit mark goes first, comes back last
    arrays = cache_dir / "arrays"
    arrays.mkdir(parents=True, exist_ok=True)
    journal = _Journal(cache_dir / JOURNAL, {"fingerprint": fingerprint, "tasks": len(jobs)}, arrays, force)
    resumed = len(journal.entries)
    if resumed:
        log.info("resuming an interrupted build: %d of %d read jobs already done", resumed, len(jobs))
    _run_jobs(source, encoder, jobs, journal, arrays, data_cfg.preprocess_workers)
    rows = []
    for position in range(len(jobs)):  # the jobs' order, whatever order they finished in
        entry = journal.entries[position]
        rows.extend(entry["rows"])
        report.read += entry["read"]
        report.skipped.extend(entry["skipped"])
        report.notes.extend(entry["notes"])
    index = _checked_index(rows, report, data_cfg)
    keys = index.pop("split_key").to_numpy()  # orders the draw; never written to the index
    full_report = _assign_folds(index, keys, encoder, report, data_cfg) | {
        "fingerprint": fingerprint, "source": data_cfg.source, "encoder": encoder.name,
    } | encoder.report(index, source)
    _commit(cache_dir, index, full_report, journal)
    return CacheInfo(cache_dir, index, full_report, False, fingerprint, full_report.get("class_names", []),
                     resumed, len(jobs))


def _checked_index(rows: list[dict[str, Any]], report: SkipReport, data_cfg: Any) -> pd.DataFrame:
    """The index rows as a table; no row, or two rows of one case id, is an error."""
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
    return index


def _assign_folds(index: pd.DataFrame, keys: np.ndarray, encoder: CaseEncoder, report: SkipReport,
                  data_cfg: Any) -> dict[str, Any]:
    """Draw the folds into ``index`` (columns ``fold``, ``split``); the report's common keys."""
    strata, source_test = encoder.fold_strata(index, data_cfg.num_folds)
    index["fold"] = assign_folds(strata, keys, data_cfg.num_folds, data_cfg.seed, data_cfg.test_fraction,
                                 fixed_test=source_test)
    index["split"] = np.where(index["fold"] == TEST_FOLD, "test", "train")
    own_test = source_test is not None and bool(np.asarray(source_test).any())
    if own_test:
        report.notes.append(f"the source's own test split ({int(np.sum(source_test))} cases) is the held-out "
                            f"test (fold {TEST_FOLD}); the other cases are spread over {data_cfg.num_folds} folds")
    return report.to_dict() | {
        "cases": int(len(index)),
        "folds": {int(k): int(v) for k, v in index["fold"].value_counts().sort_index().items()},
        "split_fingerprint": split_fingerprint(keys, index["fold"].to_numpy()),
        "test_split": "source" if own_test else ("test_fraction" if data_cfg.test_fraction > 0 else "none"),
    }


# ----------------------------------------------------------------------------- journal and workers
_worker: dict[str, Any] = {}


def _init_worker(source: Source, encoder: CaseEncoder, arrays: Path) -> None:
    from threadpoolctl import threadpool_limits

    # one BLAS thread per process: the parallelism is across read jobs, and OpenBLAS threads spinning
    # on a busy machine made the small resize products 70x slower (measured on 2 shared cores)
    _worker.update(source=source, encoder=encoder, arrays=arrays, limits=threadpool_limits(1, user_api="blas"))
    encoder.worker_setup()


def _run_job(position: int, job: ReadJob) -> tuple[int, dict[str, Any]]:
    """Run one read job in this process: its journal entry (index rows and report entries)."""
    source, encoder = _worker["source"], _worker["encoder"]
    report, saved = SkipReport(), source.report
    source.report = report
    try:
        rows = encoder.encode(source, job, _worker["arrays"], report)
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
                if entry is not None and not any(damage(arrays.parent, record, check_hash=False)
                                                 for row in entry["rows"] for record in _row_records(row)):
                    self.entries[int(entry["task"])] = entry
        with open(path, "w") as fh:  # rewritten whole: drops a partial last line and stale entries
            fh.write(json.dumps(header) + "\n")
            fh.writelines(json.dumps(e) + "\n" for e in self.entries.values())

    def append(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        self.entries[int(entry["task"])] = entry


def _json_line(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _workers(setting: int | None, files: int, jobs: int) -> int:
    if setting is None:
        setting = (os.cpu_count() or 1) if files >= AUTO_PARALLEL_FILES else 1
    return max(1, min(int(setting), jobs))


def _run_jobs(source: Source, encoder: CaseEncoder, jobs: list[ReadJob], journal: _Journal, arrays: Path,
              workers: int | None) -> None:
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
            _init_worker(source, encoder, arrays)
            try:
                for position in todo:
                    journal.append(_run_job(position, jobs[position])[1])
                    bar.update(weight[position])
            finally:
                _worker.pop("limits").restore_original_limits()
            return
        _run_in_pool(source, encoder, arrays, jobs, todo, workers, journal, lambda position: bar.update(weight[position]))


def _run_in_pool(source: Source, encoder: CaseEncoder, arrays: Path, jobs: list[ReadJob], todo: list[int],
                 workers: int, journal: _Journal, done: Any) -> None:
    """The jobs at positions ``todo`` in ``workers`` forked processes, journalled as they finish."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # fork: workers start at once with the parent's imports, and a script without a
    # `__main__` guard still works (spawn/forkserver re-run the main module)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(source, encoder, arrays)) as pool:
        futures = [pool.submit(_run_job, i, jobs[i]) for i in todo]
        try:
            for future in as_completed(futures):
                position, entry = future.result()
                journal.append(entry)
                done(position)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _commit(cache_dir: Path, index: pd.DataFrame, report: dict[str, Any], journal: _Journal) -> None:
    """Drop arrays no index row names (and an older losslab's segmentation cache), write the report,
    then the index (the commit mark), then remove the journal."""
    keep = {Path(p).name for key in _array_keys(index.columns) for p in index[f"{key}_path"]}
    for path in (cache_dir / "arrays").iterdir():
        if path.name not in keep:
            path.unlink()
    if (cache_dir / LEGACY_SEG_INDEX).is_file():
        shutil.rmtree(cache_dir / "cases", ignore_errors=True)
        (cache_dir / LEGACY_SEG_INDEX).unlink()
    tmp = cache_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, cache_dir / "report.json")
    index.to_parquet(cache_dir / "index.parquet.tmp", index=False)
    os.replace(cache_dir / "index.parquet.tmp", cache_dir / "index.parquet")
    journal.path.unlink(missing_ok=True)
