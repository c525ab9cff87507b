"""The case cache: memory-mappable ``.npy`` arrays, one parquet index and ``report.json``.

Layout of a cache folder::

    arrays/<case_id>.npy    float32 (N, C, H, W), raw intensities as read by the source
    index.parquet           case_id, patient_id, label, class_name, fold, split, array_path,
                            n_instances, shape, channel_mean, channel_std, meta (JSON)
    report.json             cases read and skipped (with reasons), class counts, fingerprint
    .salt                   the local hashing salt when none is configured (never logged)

Re-running on unchanged inputs (same content hash of the source files and the same settings)
reuses the cache and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from losslab.data.deid import resolve_salt
from losslab.data.sources import SkipReport, build_source, run_generator
from losslab.data.splits import TEST_FOLD, assign_folds

CACHE_VERSION = 1


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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _hash_files(files: list[str], root: str) -> str:
    """sha256 over (relative path, content) of every file: a content hash of the raw data."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(os.path.relpath(f, root).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _settings_fingerprint(data_cfg: Any, salt: str) -> str:
    keys = {
        "version": CACHE_VERSION,
        "source": data_cfg.source,
        "source_kwargs": data_cfg.source_kwargs,
        "num_folds": data_cfg.num_folds,
        "test_fraction": data_cfg.test_fraction,
        "seed": data_cfg.seed,
        "salt": hashlib.sha256(salt.encode()).hexdigest(),  # the salt itself is never stored
    }
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()


def ensure_raw_data(data_cfg: Any) -> bool:
    """Generate the embedded dataset when ``data.root`` is missing; return True if generated."""
    root = Path(data_cfg.root)
    if root.exists() and any(root.iterdir()):
        return False
    if not data_cfg.generate:
        raise FileNotFoundError(f"data.root {root} does not exist and data.generate is not set")
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=str(root.parent) if root.parent.exists() else None))
    try:
        run_generator(data_cfg.generate, str(tmp), seed=data_cfg.seed, **data_cfg.generator_kwargs)
        root.parent.mkdir(parents=True, exist_ok=True)
        if root.exists():
            root.rmdir()
        shutil.move(str(tmp), str(root))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def load_cache(cache_dir: str | Path) -> CacheInfo:
    cache_dir = Path(cache_dir)
    index_path = cache_dir / "index.parquet"
    if not index_path.is_file():
        raise FileNotFoundError(f"no preprocessed cache at {cache_dir} (missing index.parquet); run `losslab preprocess` first")
    index = pd.read_parquet(index_path)
    report = json.loads((cache_dir / "report.json").read_text())
    return CacheInfo(cache_dir, index, report, True, report.get("fingerprint", ""), report.get("class_names", []))


def build_cache(data_cfg: Any, force: bool = False) -> CacheInfo:
    """Read the configured source into the cache (or reuse it when inputs are unchanged)."""
    cache_dir = Path(data_cfg.cache_dir)
    ensure_raw_data(data_cfg)
    salt = resolve_salt(data_cfg.salt, cache_dir)
    report = SkipReport()
    source = build_source(data_cfg.source, data_cfg.root, salt, report, **data_cfg.source_kwargs)
    fingerprint = hashlib.sha256(
        (_hash_files(source.fingerprint_files(), data_cfg.root) + _settings_fingerprint(data_cfg, salt)).encode()
    ).hexdigest()
    if not force and (cache_dir / "index.parquet").is_file() and (cache_dir / "report.json").is_file():
        existing = json.loads((cache_dir / "report.json").read_text())
        if existing.get("fingerprint") == fingerprint:
            info = load_cache(cache_dir)
            info.reused = True
            return info

    class_names = list(data_cfg.class_names or source.class_names)
    tmp_arrays = cache_dir / f".arrays-{os.getpid()}"
    if tmp_arrays.exists():
        shutil.rmtree(tmp_arrays)
    tmp_arrays.mkdir(parents=True)
    rows = []
    for case in source.iter_cases():
        if not (0 <= case.label < len(class_names)):
            report.skip(case.case_id, f"label {case.label} outside 0..{len(class_names) - 1}")
            continue
        image = np.ascontiguousarray(case.image, dtype=np.float32)
        np.save(tmp_arrays / f"{case.case_id}.npy", image)
        nonzero = image != 0
        mean = [float(image[:, c][nonzero[:, c]].mean()) if nonzero[:, c].any() else 0.0 for c in range(image.shape[1])]
        std = [float(image[:, c][nonzero[:, c]].std()) if nonzero[:, c].any() else 1.0 for c in range(image.shape[1])]
        rows.append({
            "case_id": case.case_id,
            "patient_id": case.patient_id,
            "label": int(case.label),
            "class_name": class_names[case.label],
            "array_path": f"arrays/{case.case_id}.npy",
            "n_instances": int(image.shape[0]),
            "shape": list(image.shape),
            "channel_mean": mean,
            "channel_std": [s if s > 0 else 1.0 for s in std],
            "meta": json.dumps(case.meta, sort_keys=True),
        })
    if not rows:
        shutil.rmtree(tmp_arrays, ignore_errors=True)
        reasons = "; ".join(f"{s['item']}: {s['reason']}" for s in report.skipped[:10])
        raise NoUsableDataError(
            f"no usable case in {data_cfg.root} (source {data_cfg.source!r}): {len(report.skipped)} skipped"
            + (f" — {reasons}" if reasons else "")
        )
    index = pd.DataFrame(rows)
    if index["case_id"].duplicated().any():
        dup = index.loc[index["case_id"].duplicated(), "case_id"].tolist()[:5]
        raise ValueError(f"duplicate case ids from source {data_cfg.source!r}: {dup}")
    index["fold"] = assign_folds(index["label"].to_numpy(), index["patient_id"].to_numpy(),
                                 data_cfg.num_folds, data_cfg.seed, data_cfg.test_fraction)
    index["split"] = np.where(index["fold"] == TEST_FOLD, "test", "train")

    # swap in atomically-ish: arrays folder, then index, then report (the report is the commit mark)
    arrays = cache_dir / "arrays"
    if arrays.exists():
        shutil.rmtree(arrays)
    tmp_arrays.rename(arrays)
    index.to_parquet(cache_dir / "index.parquet.tmp", index=False)
    os.replace(cache_dir / "index.parquet.tmp", cache_dir / "index.parquet")
    counts = index["class_name"].value_counts().reindex(class_names, fill_value=0)
    full_report = report.to_dict() | {
        "class_names": class_names,
        "class_counts": {k: int(v) for k, v in counts.items()},
        "cases": int(len(index)),
        "folds": {int(k): int(v) for k, v in index["fold"].value_counts().sort_index().items()},
        "fingerprint": fingerprint,
        "source": data_cfg.source,
    }
    tmp = cache_dir / "report.json.tmp"
    tmp.write_text(json.dumps(full_report, indent=2))
    os.replace(tmp, cache_dir / "report.json")
    return CacheInfo(cache_dir, index, full_report, False, fingerprint, class_names)
