"""Preprocessing throughput: losslab's DICOM path against a bare pydicom loop, and cost at scale.

Part 1, the read path (``--sizes 64,256``): embedded_lumbar series of each size, one task per series
folder in a ProcessPoolExecutor of ``--workers`` processes, repeats interleaved so machine noise
hits every path alike:

* ``bare``:        ``pydicom.dcmread(path).pixel_array`` for every file of the folder
* ``real``:        ``group_series(folder)`` (one full read per file groups them by series UID) +
                   ``series_volume`` (spatial sort, rescale, checks) + ``multi_window`` (3 windows
                   of every slice; rsna_lumbar windows only the crops it keeps): the reading path,
                   series grouping included (goal: >= 0.9 of bare)
* ``find+read``:   the former path: ``find_series`` (a header pass) then ``read_series`` + windows
* ``build_cache``: the whole ``preprocess`` of the data set (planning, hashing the raw files for
                   the fingerprint, grouping, reading, windows, crop, resize, float16 arrays written
                   atomically, journal, index), end to end with the same number of workers

Part 2, scale (``--scale 2000,10000``): an RSNA-layout data set of about N files from the
project's generator (15 slices a series, 64x64), preprocessed by ``build_cache`` in a fresh
subprocess: wall time, files/s, CPU ms per file (the build's process and its pool), peak RSS of the
main process and of the largest worker, cache size on disk; and, in the same subprocess, the bare
loop over the same files for the ratio, and the time of the fingerprint's content hash of the raw
files (a second read of every file's bytes, included in the build's wall time; it decides whether
a cache can be reused). Cost should grow linearly with N and memory should not grow.

Numbers only, no asserts. The ratios are measured in the same run, so they hold under load better
than the absolute times (on a shared machine, run with ``nice`` and read the ratios); the CPU
columns (CPU seconds of the workers, and of the build's process and pool) ignore the time other
processes take, though not the cache they evict.
Usage: ``python bench/preprocess.py [--sizes 64,256] [--studies 40] [--repeats 5] [--workers N]
[--scale 2000,10000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

SLICES = 15


def bare(folder: str) -> int:
    import pydicom

    return sum(pydicom.dcmread(path).pixel_array.size for path in sorted(Path(folder).iterdir()))


def real(folder: str) -> int:
    from losslab.data import dicom
    from losslab.data.sources.base import SkipReport

    report, total = SkipReport(), 0
    for members in dicom.group_series(folder, report).values():
        volume, meta = dicom.series_volume(members, report, root=folder, item=folder)
        total += dicom.multi_window(volume, dicom.DEFAULT_WINDOWS, meta["window"]).size
    return total


def find_read(folder: str) -> int:
    from losslab.data import dicom
    from losslab.data.sources.base import SkipReport

    report, total = SkipReport(), 0
    for paths in dicom.find_series(folder, report).values():
        volume, meta = dicom.read_series(paths, report)
        total += dicom.multi_window(volume, dicom.DEFAULT_WINDOWS, meta["window"]).size
    return total


def _cpu(fn, folder: str) -> float:
    """CPU seconds ``fn(folder)`` takes in this worker (unlike wall time, blind to other processes)."""
    start = time.process_time()
    fn(folder)
    return time.process_time() - start


def _cpu_now() -> float:
    """CPU seconds of this process and of its waited-for children (the cache's worker pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _warm(_: int) -> None:
    import pydicom  # noqa: F401
    from threadpoolctl import threadpool_limits

    from losslab.data import dicom  # noqa: F401

    threadpool_limits(1, user_api="blas")  # as the cache's workers do


def _config(root: str, cache_dir: str, workers: int):
    from losslab.config import DataConfig

    return DataConfig(source="rsna_lumbar", root=root, generate=None, cache_dir=cache_dir, num_folds=2,
                      salt="bench-salt", preprocess_workers=workers)


def _build_once(root: str, workers: int) -> tuple[float, float]:
    from losslab.data.cache import build_cache

    with tempfile.TemporaryDirectory() as cache_dir:
        start, cpu = time.perf_counter(), _cpu_now()
        build_cache(_config(root, cache_dir, workers))
        return time.perf_counter() - start, _cpu_now() - cpu


def read_path(size: int, studies: int, repeats: int, workers: int) -> None:
    from losslab.data.sources import run_generator

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_generator("embedded_lumbar", tmp, seed=0, studies=studies, size=size)
        folders = sorted(str(p) for p in Path(tmp, "train_images").glob("*/*") if p.is_dir())
        n_files = sum(len(os.listdir(f)) for f in folders)
        print(f"\n{size}x{size}: {len(folders)} series, {n_files} files, generated in "
              f"{time.perf_counter() - start:.1f} s; workers={workers}")
        names = ("bare", "real", "find+read", "build_cache")
        results: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_warm, range(workers * 2)))
            _build_once(tmp, workers)  # warm: imports, the sklearn import of the fold split
            for _ in range(repeats):
                for name, fn in (("bare", bare), ("real", real), ("find+read", find_read)):
                    start = time.perf_counter()
                    cpu[name].append(sum(pool.map(partial(_cpu, fn), folders, chunksize=1)))
                    results[name].append(time.perf_counter() - start)
                wall, cpu_s = _build_once(tmp, workers)
                results["build_cache"].append(wall)
                cpu["build_cache"].append(cpu_s)
    base, base_cpu = statistics.median(results["bare"]), statistics.median(cpu["bare"])
    print(f"{'path':<13}{'median s':>10}{'best s':>10}{'files/s':>10}{'vs bare':>9}{'CPU s':>9}{'CPU vs bare':>13}")
    for name in names:
        median, median_cpu = statistics.median(results[name]), statistics.median(cpu[name])
        print(f"{name:<13}{median:>10.3f}{min(results[name]):>10.3f}{n_files / median:>10.0f}{base / median:>9.2f}"
              f"{median_cpu:>9.3f}{base_cpu / median_cpu:>13.2f}")


def _child(root: str, workers: int) -> None:
    """In a fresh process: the bare loop over every file, then build_cache; JSON on stdout."""
    import pydicom  # noqa: F401
    import sklearn.model_selection  # noqa: F401 - the fold split's import (seconds) is not preprocessing

    from losslab.data import cache
    from losslab.data.raw_data import hash_files

    folders = sorted(str(p) for p in Path(root, "train_images").glob("*/*") if p.is_dir())
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_warm, range(workers * 2)))
        start = time.perf_counter()
        bare_cpu = sum(pool.map(partial(_cpu, bare), folders, chunksize=4))
        bare_s = time.perf_counter() - start
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    hash_files([str(p) for p in Path(root).rglob("*") if p.is_file()], root)
    hash_s = time.perf_counter() - start  # the fingerprint's content hash, part of build_cache's wall
    with tempfile.TemporaryDirectory() as cache_dir:
        start, cpu = time.perf_counter(), _cpu_now()
        info = cache.build_cache(_config(root, cache_dir, workers))
        wall, cpu = time.perf_counter() - start, _cpu_now() - cpu
        arrays = sum(p.stat().st_size for p in Path(cache_dir, "arrays").iterdir())
        index = Path(cache_dir, "index.parquet").stat().st_size + Path(cache_dir, "report.json").stat().st_size
    print(json.dumps({
        "bare_s": bare_s, "wall_s": wall, "hash_s": hash_s, "cpu_s": cpu, "bare_cpu_s": bare_cpu,
        "cases": len(info.index), "arrays_bytes": arrays, "index_bytes": index,
        "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_build_mb": rss_before / 1024,
        "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def scale(sizes: list[int], workers: int) -> None:
    from losslab.data.sources import run_generator

    print(f"\nscale: RSNA layout, {SLICES} slices of 64x64 a series, workers={workers}")
    print(f"{'files':>7}{'cases':>7}{'gen s':>8}{'build s':>9}{'files/s':>9}{'ms/file':>9}{'CPU ms/f':>9}"
          f"{'hash s':>8}{'bare s':>8}{'vs bare':>9}{'CPU vs':>8}{'RSS main':>10}{'RSS wkr':>9}{'arrays MB':>11}"
          f"{'index kB':>10}")
    for n_files in sizes:
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            run_generator("embedded_lumbar", root, seed=0, studies=max(1, round(n_files / SLICES)))
            generated = time.perf_counter() - start
            files = sum(1 for _ in Path(root, "train_images").rglob("*.dcm"))
            out = subprocess.run([sys.executable, __file__, "--_child", root, "--workers", str(workers)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
        print(f"{files:>7}{r['cases']:>7}{generated:>8.1f}{r['wall_s']:>9.2f}{files / r['wall_s']:>9.0f}"
              f"{1000 * r['wall_s'] / files:>9.3f}{1000 * r['cpu_s'] / files:>9.3f}{r['hash_s']:>8.2f}"
              f"{r['bare_s']:>8.2f}{r['bare_s'] / r['wall_s']:>9.2f}{r['bare_cpu_s'] / r['cpu_s']:>8.2f}"
              f"{r['rss_main_mb']:>9.0f}M{r['rss_worker_mb']:>8.0f}M{r['arrays_bytes'] / 1e6:>11.1f}"
              f"{r['index_bytes'] / 1e3:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256", help="image sides for the read-path part ('' to skip)")
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--scale", default="", help="file counts for the scale part, e.g. 2000,10000")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        _child(args._child, args.workers)
        return
    for size in [int(s) for s in args.sizes.split(",") if s]:
        read_path(size, args.studies, args.repeats, args.workers)
    if args.scale:
        scale([int(s) for s in args.scale.split(",")], args.workers)


if __name__ == "__main__":
    main()
