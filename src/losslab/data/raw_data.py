"""The raw data a cache is built from: its content hash, and generating it where that is asked for."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from losslab.data.integrity import CacheIntegrityError
from losslab.data.sources import default_generator_for, list_generators, run_generator


def hash_files(files: list[str], root: str) -> str:
    """sha256 over (relative path, content) of every file: a content hash of the raw data."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(os.path.relpath(f, root).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def ensure_raw_data(data_cfg: Any) -> bool:
    """Generate synthetic data when ``data.root`` is missing or empty, but only where that is asked
    for: into the default embedded location of a generator (``data/<generator>`` under the working
    directory, e.g. ``data/embedded_brats``), or anywhere when ``data.generate`` names a generator.
    Any other missing root is an error naming the path (a mistyped real data path must not train on
    synthetic data). Returns True if data was generated."""
    root = Path(data_cfg.root)
    if root.exists() and any(root.iterdir()):
        return False
    generator = data_cfg.generate or default_generator_for(root)
    if not generator:
        state = "is empty" if root.exists() else "does not exist"
        raise FileNotFoundError(
            f"data.root {root} {state} ({root.resolve()}); point data.root at the data set, or set "
            f"data.generate=<generator> to write synthetic data there (generators: {', '.join(list_generators())})")
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=str(root.parent) if root.parent.exists() else None))
    try:
        run_generator(generator, str(tmp), seed=data_cfg.seed, **data_cfg.generator_kwargs)
        root.parent.mkdir(parents=True, exist_ok=True)
        if root.exists():
            root.rmdir()
        shutil.move(str(tmp), str(root))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def ensure_raw_data_to_rebuild(data_cfg: Any, open_cache: Callable[[], Any]) -> None:
    """:func:`ensure_raw_data`; when the raw data is gone and ``open_cache()`` (the cache's loader,
    checking hashes) finds a damaged array, the refusal is a :class:`CacheIntegrityError` naming both:
    that cache cannot be rebuilt."""
    try:
        ensure_raw_data(data_cfg)
    except FileNotFoundError as missing:
        try:
            open_cache()
        except CacheIntegrityError as damaged:
            raise CacheIntegrityError(f"{damaged}; cannot rebuild it: {missing}") from missing
        except FileNotFoundError:
            pass  # no cache either: the missing raw data is the error
        raise
