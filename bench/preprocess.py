"""Series -> arrays throughput: losslab's DICOM reading path against a bare pydicom loop.

Both sides run over the same embedded_lumbar series with a ProcessPoolExecutor of
``os.cpu_count()`` workers, one task per series:

* ``bare``:    ``pydicom.dcmread(path).pixel_array`` for every file of the series
* ``losslab``: ``read_series(paths)`` (spatial sort, rescale, checks) + ``multi_window`` (3 windows)
* ``losslab+find``: the same after ``find_series(folder)`` (a header pass to group by series UID)

Prints files/s for each and the ratio to the bare loop (goal >= 0.8 for ``losslab``). Numbers
only, no asserts. Usage: ``python bench/preprocess.py [--studies 40] [--repeats 5] [--workers N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def bare(paths: list[str]) -> int:
    import pydicom

    total = 0
    for path in paths:
        total += pydicom.dcmread(path).pixel_array.size
    return total


def losslab_path(paths: list[str]) -> int:
    from losslab.data import dicom
    from losslab.data.sources.base import SkipReport

    volume, meta = dicom.read_series(paths, SkipReport())
    return dicom.multi_window(volume, dicom.DEFAULT_WINDOWS, meta["window"]).size


def losslab_find(folder: str) -> int:
    from losslab.data import dicom
    from losslab.data.sources.base import SkipReport

    report = SkipReport()
    total = 0
    for paths in dicom.find_series(folder, report).values():
        volume, meta = dicom.read_series(paths, report)
        total += dicom.multi_window(volume, dicom.DEFAULT_WINDOWS, meta["window"]).size
    return total


def _warm(_: int) -> None:
    import pydicom  # noqa: F401

    from losslab.data import dicom  # noqa: F401
    from losslab.data.sources.base import SkipReport  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    from losslab.data.sources import run_generator

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_generator("embedded_lumbar", tmp, seed=0, studies=args.studies, size=args.size)
        folders = sorted(str(p) for p in Path(tmp, "train_images").glob("*/*") if p.is_dir())
        series = [sorted(str(p) for p in Path(f).glob("*.dcm")) for f in folders]
        n_files = sum(len(s) for s in series)
        print(f"generated {len(series)} series, {n_files} files of {args.size}x{args.size} "
              f"in {time.perf_counter() - start:.2f} s; workers={args.workers}")
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            list(pool.map(_warm, range(args.workers * 2)))
            results: dict[str, list[float]] = {"bare": [], "losslab": [], "losslab+find": []}
            for _ in range(args.repeats):  # interleaved, so machine noise hits all three alike
                for name, fn, items in (("bare", bare, series), ("losslab", losslab_path, series),
                                        ("losslab+find", losslab_find, folders)):
                    start = time.perf_counter()
                    list(pool.map(fn, items, chunksize=1))
                    results[name].append(time.perf_counter() - start)
    base = statistics.median(results["bare"])
    print(f"{'path':<14}{'median s':>10}{'best s':>10}{'files/s':>10}{'vs bare':>9}")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"{name:<14}{median:>10.3f}{min(times):>10.3f}{n_files / median:>10.0f}{base / median:>9.2f}")


if __name__ == "__main__":
    main()
