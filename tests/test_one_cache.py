"""One cache builder for every task (issue #30): a segmentation cache is built by the same machinery as
the case cache (lock, journal, workers, atomic writes, integrity records, parquet index), and what it
holds is unchanged: case ids, folds, split fingerprint and arrays against an independent computation
(and against the fingerprint the older segmentation cache gave the same cohort)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from losslab.config import DataConfig, SegConfig
from losslab.data.cache import JOURNAL, SegCacheInfo, SegmentationEncoder, build_cache, load_cache
from losslab.data.cache.segmentation import encode_target
from losslab.data.deid import salted_hash
from losslab.data.integrity import CacheIntegrityError
from losslab.data.splits import assign_folds

SALT = "one-cache"
MODALITIES = ("t1", "t1ce", "t2", "flair")
#: the split fingerprint the older segmentation cache (losslab.data.seg_cache, before issue #30) wrote
#: for the cohort below with num_folds=3, test_fraction=0.25, seed=0 (built with that code at commit
#: aa8ac4d): the one builder must put every patient where it did
OLD_SPLIT_FINGERPRINT = "5f5ad88e4af9"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """12 embedded BraTS-layout cases of 16 x 16 x 8 voxels, grade folders, masks beside."""
    from _data_factories import generate_embedded_brats

    return generate_embedded_brats(tmp_path_factory, "one_cache", seed=21, num_cases=12, shape=(16, 16, 8))


def _data(cohort: Path, cache: Path, **extra) -> DataConfig:
    return DataConfig(source="brats", root=str(cohort), cache_dir=str(cache), num_folds=3, test_fraction=0.25,
                      salt=SALT, preprocess_workers=1).model_copy(update=extra)


def _encoder(**seg) -> SegmentationEncoder:
    return SegmentationEncoder.from_config(SegConfig(**seg))


def _items(cohort: Path) -> list[str]:
    """The cases as the BraTS source lists them: ``<grade>/<case>``, in path order."""
    return sorted(str(p.relative_to(cohort)) for p in cohort.glob("*/*") if p.is_dir())


def _volumes(cohort: Path, item: str) -> tuple[np.ndarray, np.ndarray]:
    name = item.split("/")[1]
    image = np.stack([np.asarray(nib.load(str(cohort / item / f"{name}_{m}.nii.gz")).dataobj, dtype=np.float64)
                      for m in MODALITIES])
    return image, np.rint(np.asarray(nib.load(str(cohort / item / f"{name}_seg.nii.gz")).dataobj)).astype(int)


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Brute force at unit spacing: distance to the nearest inside voxel outside, minus (distance to the
    nearest outside voxel - 1) inside; all zeros when the mask is empty or full."""
    if not mask.any() or mask.all():
        return np.zeros(mask.shape)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in mask.shape], indexing="ij"), -1).astype(float)
    inside, outside = grid[mask], grid[~mask]
    out = np.zeros(mask.shape)
    out[~mask] = np.sqrt(((outside[:, None] - inside[None]) ** 2).sum(-1)).min(1)
    out[mask] = -(np.sqrt(((inside[:, None] - outside[None]) ** 2).sum(-1)).min(1) - 1.0)
    return out


def test_encode_target_on_a_hand_worked_mask():
    mask = np.array([[[0], [1]], [[2], [4]]])  # (2, 2, 1): one voxel of each BraTS label
    regions = encode_target(mask, {"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}, "regions")
    assert regions.dtype == np.uint8 and regions.shape == (3, 2, 2, 1)
    assert regions.reshape(3, -1).tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
    classes = encode_target(mask, {"background": [0], "necrotic": [1], "edema": [2], "enhancing": [4]}, "classes")
    assert classes.shape == (1, 2, 2, 1) and classes.reshape(-1).tolist() == [0, 1, 2, 3]


def test_a_segmentation_cache_holds_what_an_independent_computation_gives(cohort, tmp_path):
    info = build_cache(_data(cohort, tmp_path / "cache"), encoder=_encoder())
    assert isinstance(info, SegCacheInfo) and info.channel_names == ["wt", "tc", "et"]
    items = _items(cohort)
    # case ids: salted hashes of seg:<source>:<item>, in the source's order
    assert [r["case_id"] for r in info.index] == [salted_hash(f"seg:brats:{item}", SALT) for item in items]
    # folds: assign_folds over the unsalted split keys, stratified on an empty mask when every fold gets one
    masks = {item: _volumes(cohort, item)[1] for item in items}
    empty = [int(not masks[item].any()) for item in items]
    strata = empty if min(empty.count(0), empty.count(1) or 3) >= 3 else [0] * len(items)
    keys = [hashlib.sha256(f"losslab-split:seg:brats:{item}".encode()).hexdigest()[:16] for item in items]
    folds = assign_folds(strata, keys, num_folds=3, seed=0, test_fraction=0.25)
    assert [r["fold"] for r in info.index] == folds.tolist() and (folds == -1).sum() == 3
    pairs = sorted(zip(keys, folds.tolist()))
    assert info.split_fingerprint == hashlib.sha256(repr(pairs).encode()).hexdigest()[:12] == OLD_SPLIT_FINGERPRINT
    # arrays: numpy z-score over the brain, the BraTS regions, brute-force distance maps, voxel counts
    for item, row in zip(items, info.index):
        image, mask = _volumes(cohort, item)
        arrays = info.arrays(row)
        expected = np.zeros(image.shape)
        for c, channel in enumerate(image):
            brain = channel != 0
            expected[c][brain] = (channel[brain] - channel[brain].mean()) / (channel[brain].std() or 1.0)
        np.testing.assert_allclose(arrays["image"], expected, atol=2e-5)
        regions = np.stack([np.isin(mask, [1, 2, 4]), np.isin(mask, [1, 4]), mask == 4])
        np.testing.assert_array_equal(arrays["label"], regions.astype(np.uint8))
        assert arrays["dist"].dtype == np.float32 and row["spacing"] == [1.0, 1.0, 1.0]
        np.testing.assert_allclose(arrays["dist"][0], _signed_distance(regions[0]), atol=1e-5)
        assert row["voxels"] == regions.reshape(3, -1).sum(axis=1).tolist() and row["shape"] == list(mask.shape)
    # the one layout: arrays/ and index.parquet with each array's size and hash; the report as before
    index = pd.read_parquet(tmp_path / "cache" / "index.parquet")
    assert {f"{k}_{c}" for k in ("image", "target", "dist") for c in ("path", "bytes", "sha256")} <= set(index.columns)
    assert all(p.startswith("arrays/") for p in index["image_path"]) and "split_key" not in index.columns
    assert info.report["encoder"] == "segmentation" and info.report["mapping"] == {
        "wt": [1, 2, 4], "tc": [1, 4], "et": [4]} and info.report["modalities"] == list(MODALITIES)
    # and the task's view reads back what was written
    again = load_cache(tmp_path / "cache", check_hashes=True, encoder=_encoder())
    assert again.index == info.index and again.voxel_fractions(0) == info.voxel_fractions(0)


def test_a_killed_segmentation_build_resumes_from_its_journal_to_the_same_cache(cohort, tmp_path, monkeypatch):
    """The journal (new for segmentation): a build killed after three cases resumes with those three
    done, and ends byte for byte like an uninterrupted build."""
    reference = build_cache(_data(cohort, tmp_path / "reference"), encoder=_encoder())
    encode, calls = SegmentationEncoder.encode, []

    def killed_after_three(self, *args):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return encode(self, *args)

    monkeypatch.setattr(SegmentationEncoder, "encode", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        build_cache(_data(cohort, tmp_path / "cache"), encoder=_encoder())
    assert not (tmp_path / "cache" / "index.parquet").exists()
    assert len((tmp_path / "cache" / JOURNAL).read_text().splitlines()) == 1 + 3  # header + three cases
    monkeypatch.setattr(SegmentationEncoder, "encode", encode)
    resumed = build_cache(_data(cohort, tmp_path / "cache"), encoder=_encoder())
    assert (resumed.resumed_tasks, resumed.total_tasks) == (3, 12) and not (tmp_path / "cache" / JOURNAL).exists()
    assert resumed.index == reference.index and resumed.split_fingerprint == reference.split_fingerprint
    for name in ("index.parquet", *(r["image_path"] for r in reference.index), *(r["dist_path"] for r in reference.index)):
        assert (tmp_path / "cache" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_worker_processes_write_the_same_segmentation_cache(cohort, tmp_path):
    one = build_cache(_data(cohort, tmp_path / "one"), encoder=_encoder(labels="classes"))
    two = build_cache(_data(cohort, tmp_path / "two", preprocess_workers=2), encoder=_encoder(labels="classes"))
    assert two.index == one.index and two.channel_names == ["background", "necrotic_core", "edema", "enhancing"]
    for row in one.index:
        for key in ("image", "target", "dist"):
            path = row[f"{key}_path"]
            assert (tmp_path / "two" / path).read_bytes() == (tmp_path / "one" / path).read_bytes()


def _older_segmentation_cache(folder: Path) -> None:
    """What losslab.data.seg_cache (version 4) left: index.json, report.json and cases/."""
    (folder / "cases").mkdir(parents=True)
    np.save(folder / "cases" / "abc_image.npy", np.zeros((4, 2, 2, 2), np.float32))
    (folder / "index.json").write_text(json.dumps([{"case_id": "abc", "fold": 0, "arrays": []}]))
    (folder / "report.json").write_text(json.dumps({"fingerprint": "old", "labels": "regions", "channel_names": ["wt"]}))


def test_an_older_segmentation_cache_is_refused_in_one_line_or_rebuilt(cohort, tmp_path):
    cache = tmp_path / "cache"
    _older_segmentation_cache(cache)
    refusal = f"{cache} holds a segmentation cache of an older losslab (index.json, no index.parquet); " \
              "rebuild it with `losslab preprocess`"
    with pytest.raises(CacheIntegrityError, match=f"^{re.escape(refusal)}$"):
        load_cache(cache, encoder=_encoder())
    # its raw data gone: refused, naming both, in one line
    gone = _data(tmp_path / "gone", cache, generate=None)
    with pytest.raises(CacheIntegrityError, match=f"^{re.escape(refusal)}; cannot rebuild it: data.root .* does not exist"):
        build_cache(gone, encoder=_encoder())
    # with its raw data: rebuilt in the one layout, the older files removed
    info = build_cache(_data(cohort, cache), encoder=_encoder())
    assert not info.reused and len(info.index) == 12
    assert not (cache / "index.json").exists() and not (cache / "cases").exists()


def test_a_cache_is_opened_only_by_the_encoder_that_built_it(cohort, tmp_path):
    build_cache(_data(cohort, tmp_path / "cache"), encoder=_encoder())
    with pytest.raises(ValueError, match=r"holds segmentation cases, not images cases"):
        load_cache(tmp_path / "cache")
