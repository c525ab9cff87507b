"""A cache array that was truncated or altered is found when the cache is opened, named, and rebuilt
from the raw data (or refused when the raw data is gone): the classification and segmentation caches."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from losslab.config import DataConfig, SegConfig
from losslab.data.cache import SegCacheInfo, SegmentationEncoder, build_cache, load_cache
from losslab.data.integrity import CacheIntegrityError


def _truncate_to_half(path: Path) -> tuple[int, int]:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    return size // 2, size


def _flip_last_byte(path: Path) -> None:
    """Flip every bit of the last byte (array data, past the ``.npy`` header): same size, other content."""
    with open(path, "r+b") as fh:
        fh.seek(-1, 2)
        byte = fh.read(1)[0]
        fh.seek(-1, 2)
        fh.write(bytes([byte ^ 0xFF]))


def _manifest_root(folder: Path) -> Path:
    """Six float32 ``.npy`` images of two patients' cases, two classes."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = ["path,label,patient_id"]
    for k in range(6):
        np.save(folder / f"img{k}.npy", rng.random((1, 1, 8, 8)).astype(np.float32))
        lines.append(f"img{k}.npy,{'ab'[k % 2]},p{k}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


def _data_config(root: Path, cache_dir: Path) -> DataConfig:
    return DataConfig(source="manifest", root=str(root), generate=None, cache_dir=str(cache_dir), salt="s",
                      num_folds=2, class_names=["a", "b"], preprocess_workers=1)


@pytest.fixture()
def built(tmp_path):
    cfg = _data_config(_manifest_root(tmp_path / "raw"), tmp_path / "cache")
    info = build_cache(cfg)
    originals = {p: (info.cache_dir / p).read_bytes() for p in info.index["array_path"]}
    return cfg, info, originals


def test_the_index_records_each_arrays_size_and_sha256(built):
    _, info, originals = built
    for _, row in info.index.iterrows():
        data = originals[row["array_path"]]
        assert row["array_bytes"] == len(data)
        assert row["array_sha256"] == hashlib.sha256(data).hexdigest()


def test_a_truncated_array_is_named_when_the_cache_is_opened(built):
    _, info, _ = built
    path = info.cache_dir / info.index["array_path"][2]
    now, was = _truncate_to_half(path)
    message = f"cache array {path} is truncated: {now} bytes, index says {was}"
    for check_hashes in (False, True, None):  # sizes are checked on every open
        with pytest.raises(CacheIntegrityError, match=f"^{re.escape(message)}$"):
            load_cache(info.cache_dir, check_hashes=check_hashes)


def test_an_altered_array_is_named_when_the_cache_is_opened(built):
    _, info, originals = built
    path = info.cache_dir / info.index["array_path"][4]
    _flip_last_byte(path)
    altered = hashlib.sha256(path.read_bytes()).hexdigest()
    recorded = hashlib.sha256(originals[info.index["array_path"][4]]).hexdigest()
    with pytest.raises(CacheIntegrityError) as raised:
        load_cache(info.cache_dir)  # a small cache: hashes checked on every open
    assert str(raised.value) == f"cache array {path} is altered: sha256 {altered[:16]}…, index says {recorded[:16]}…"
    load_cache(info.cache_dir, check_hashes=False)  # same size: only the hash finds it


def test_build_cache_rebuilds_damaged_arrays_from_the_raw_data(built):
    cfg, info, originals = built
    truncated, altered = (info.cache_dir / info.index["array_path"][k] for k in (1, 3))
    _truncate_to_half(truncated)
    _flip_last_byte(altered)
    with pytest.raises(CacheIntegrityError, match=re.escape(f"cache array {truncated} is truncated") +
                       r".*\(and 1 more damaged array\(s\)\)$"):
        load_cache(info.cache_dir)
    rebuilt = build_cache(cfg)
    assert not rebuilt.reused and rebuilt.rebuilt_because.startswith(f"cache array {truncated} is truncated")
    assert {p: (info.cache_dir / p).read_bytes() for p in rebuilt.index["array_path"]} == originals
    again = build_cache(cfg)
    assert again.reused and again.rebuilt_because == ""


def test_a_damaged_cache_without_its_raw_data_is_refused_by_name(built):
    cfg, info, _ = built
    path = info.cache_dir / info.index["array_path"][0]
    _truncate_to_half(path)
    shutil.rmtree(cfg.root)
    with pytest.raises(CacheIntegrityError, match=re.escape(f"cache array {path} is truncated") +
                       r".*; cannot rebuild it: data.root .* does not exist"):
        build_cache(cfg)


def test_a_cache_without_hashes_is_refused_with_the_rebuild_command(built):
    _, info, _ = built
    index = pd.read_parquet(info.cache_dir / "index.parquet").drop(columns=["array_bytes", "array_sha256"])
    index.to_parquet(info.cache_dir / "index.parquet", index=False)
    with pytest.raises(CacheIntegrityError, match=r"index.parquet has no array sizes and hashes .* `losslab preprocess`"):
        load_cache(info.cache_dir)


# ----------------------------------------------------------------------------- segmentation cache
@pytest.fixture(scope="module")
def seg_raw(tmp_path_factory) -> Path:
    from _data_factories import generate_embedded_brats

    return generate_embedded_brats(tmp_path_factory, "integrity_seg", seed=2, num_cases=3, shape=(16, 16, 8))


def test_the_seg_cache_names_a_damaged_array_and_rebuilds_it(seg_raw, tmp_path):
    cfg = DataConfig(source="brats", root=str(seg_raw), cache_dir=str(tmp_path / "seg"), salt="s", num_folds=2)
    encoder = SegmentationEncoder.from_config(SegConfig())
    info = build_cache(cfg, encoder=encoder)
    index = pd.read_parquet(info.cache_dir / "index.parquet")
    keys = ("image", "target", "dist")
    files = [info.cache_dir / path for _, row in index.iterrows() for path in (row[f"{k}_path"] for k in keys)]
    assert len(files) == 9 and {f.name.rsplit("_", 1)[1] for f in files} == {"image.npy", "target.npy", "dist.npy"}
    for _, row in index.iterrows():
        for k in keys:
            data = (info.cache_dir / row[f"{k}_path"]).read_bytes()
            assert (row[f"{k}_bytes"], row[f"{k}_sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    originals = {f: f.read_bytes() for f in files}
    now, was = _truncate_to_half(files[0])
    with pytest.raises(CacheIntegrityError, match=f"^{re.escape(f'cache array {files[0]} is truncated: {now} bytes, index says {was}')}$"):
        load_cache(info.cache_dir, encoder=encoder)
    files[0].write_bytes(originals[files[0]])
    _flip_last_byte(files[5])
    with pytest.raises(CacheIntegrityError, match=f"^{re.escape(f'cache array {files[5]} is altered: sha256 ')}"):
        load_cache(info.cache_dir, encoder=encoder)
    _truncate_to_half(files[7])
    rebuilt = build_cache(cfg, encoder=encoder)  # the one builder: a segmentation task passes its encoder
    assert isinstance(rebuilt, SegCacheInfo) and rebuilt.index == info.index
    assert not rebuilt.reused and rebuilt.rebuilt_because.startswith(f"cache array {files[5]} is altered")
    assert {f: f.read_bytes() for f in files} == originals
    assert build_cache(cfg, encoder=encoder).reused
