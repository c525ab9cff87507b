import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from losslab.config import DataConfig
from losslab.data.cache import NoUsableDataError, build_cache
from losslab.data.datasets import BagDataset
from losslab.data.sources import SkipReport, build_source, run_generator
from losslab.data.splits import assign_folds


def test_generator_is_deterministic_and_has_the_brats_ratio(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_generator("embedded_brats", str(a), seed=7, num_cases=38, shape=(32, 32, 12))
    run_generator("embedded_brats", str(b), seed=7, num_cases=38, shape=(32, 32, 12))
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.nii.gz"))
    assert len(files_a) == 38 * 5
    for rel in files_a[:10]:
        np.testing.assert_array_equal(nib.load(str(a / rel)).get_fdata(), nib.load(str(b / rel)).get_fdata())
    n_hgg = len(list((a / "HGG").iterdir()))
    n_lgg = len(list((a / "LGG").iterdir()))
    assert n_hgg + n_lgg == 38 and n_hgg / n_lgg == pytest.approx(2.8, abs=0.2)


def test_generator_full_size_ratio_and_brats_labels(embedded_root):
    seg = nib.load(str(next(embedded_root.rglob("*_seg.nii.gz")))).get_fdata()
    assert set(np.unique(seg)) <= {0, 1, 2, 4}
    # HGG lesions enhance on t1ce (label 4) only in a few slices; LGG never has label 4
    for case in (embedded_root / "HGG").iterdir():
        s = nib.load(str(case / f"{case.name}_seg.nii.gz")).get_fdata()
        rim_slices = np.flatnonzero((s == 4).any(axis=(0, 1)))
        lesion_slices = np.flatnonzero((s > 0).any(axis=(0, 1)))
        assert 1 <= len(rim_slices) <= 5 and len(rim_slices) < len(lesion_slices)
    for case in (embedded_root / "LGG").iterdir():
        s = nib.load(str(case / f"{case.name}_seg.nii.gz")).get_fdata()
        assert not (s == 4).any()


def test_brats_reader_on_generated_data(embedded_root):
    report = SkipReport()
    cases = list(build_source("brats", str(embedded_root), "salt", report).iter_cases())
    assert len(cases) == 30 and report.read == 30 and not report.skipped
    labels = np.array([c.label for c in cases])
    assert (labels == 1).sum() == len(list((embedded_root / "HGG").iterdir()))
    case = cases[0]
    assert case.image.dtype == np.float32 and case.image.shape[1:] == (4, 48, 48)
    # case ids are salted hashes, never the folder names
    names = {p.name for p in embedded_root.rglob("Brats18_*") if p.is_dir()}
    assert not names & {c.case_id for c in cases}


def test_brats_reader_skips_case_with_missing_modality(embedded_root, tmp_path):
    root = tmp_path / "brats"
    shutil.copytree(embedded_root, root)
    case = sorted((root / "LGG").iterdir())[0]
    (case / f"{case.name}_flair.nii.gz").unlink()
    report = SkipReport()
    cases = list(build_source("brats", str(root), "salt", report).iter_cases())
    assert len(cases) == 29
    assert report.skipped == [{"item": f"LGG/{case.name}", "reason": "missing modality file(s): flair"}]


def test_brats_2020_layout_with_labels_csv(embedded_root, tmp_path):
    root = tmp_path / "brats2020"
    rows = []
    for grade in ("HGG", "LGG"):
        for case in sorted((embedded_root / grade).iterdir())[:3]:
            shutil.copytree(case, root / case.name)  # a copy: a symlink out of the data root is refused
            rows.append({"case": case.name, "label": grade})
    rows.append({"case": "Brats18_missing", "label": "HGG"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    report = SkipReport()
    cases = list(build_source("brats", str(root), "s", report, labels_csv="labels.csv").iter_cases())
    assert sorted(c.label for c in cases) == [0, 0, 0, 1, 1, 1]
    # relative to data.root (not to the working directory), and never outside it
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    for outside in (str(tmp_path / "labels.csv"), "../labels.csv"):
        with pytest.raises(ValueError, match=r"data.source_kwargs.labels_csv=.* is outside the data root"):
            build_source("brats", str(root), "s", SkipReport(), labels_csv=outside)


def test_cache_reproduces_raw_slices_exactly(embedded_root, small_cache):
    index = small_cache.index
    row = index.iloc[0]
    arr = np.load(small_cache.cache_dir / row["array_path"], mmap_mode="r")
    # find the raw case with the same hash
    from losslab.data.deid import salted_hash

    for case_dir in embedded_root.glob("*/*"):
        if salted_hash(case_dir.name, "test-salt") == row["case_id"]:
            break
    else:
        raise AssertionError("case not found")
    meta = json.loads(row["meta"])
    raw = np.stack([np.asarray(nib.load(str(case_dir / f"{case_dir.name}_{m}.nii.gz")).dataobj, dtype=np.float32)
                    for m in ("t1", "t1ce", "t2", "flair")])
    expected = np.transpose(raw[:, :, :, meta["slice_index"]], (3, 0, 1, 2))
    np.testing.assert_array_equal(arr, expected)
    assert list(row["shape"]) == list(expected.shape)


def test_cache_is_reused_when_inputs_are_unchanged(embedded_root, tmp_path):
    cfg = DataConfig(root=str(embedded_root), cache_dir=str(tmp_path / "c"), num_folds=3, salt="x")
    first = build_cache(cfg)
    second = build_cache(cfg)
    assert not first.reused and second.reused
    assert first.fingerprint == second.fingerprint
    third = build_cache(cfg.model_copy(update={"seed": 5}))
    assert not third.reused


def test_folds_are_patient_disjoint_and_stratified():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(60), 2)  # two cases per patient
    labels = np.repeat((rng.uniform(size=60) < 0.26).astype(int), 2)
    folds = assign_folds(labels, patients.astype(str), num_folds=5, seed=0, test_fraction=0.2)
    for p in np.unique(patients):
        assert len(set(folds[patients == p])) == 1
    overall = labels[folds >= 0].mean()
    for f in range(5):
        assert abs(labels[folds == f].mean() - overall) < 0.2
    assert (folds == -1).sum() > 0


def test_small_cache_folds_stratified(small_cache):
    index = small_cache.index
    assert set(index["fold"]) == {0, 1, 2}
    for _, part in index.groupby("fold"):
        assert set(part["label"]) == {0, 1}
    assert index.groupby("patient_id")["fold"].nunique().max() == 1


def test_no_usable_case_is_a_clear_error(tmp_path):
    root = tmp_path / "empty_brats" / "HGG" / "Brats18_x_1"
    root.mkdir(parents=True)
    cfg = DataConfig(root=str(tmp_path / "empty_brats"), cache_dir=str(tmp_path / "c"), generate=None)
    with pytest.raises(NoUsableDataError, match="no usable case.*missing modality"):
        build_cache(cfg)


def test_bag_dataset_sampling_and_normalisation(small_cache):
    ds = BagDataset(small_cache.index, small_cache.cache_dir, bag_size=6, sampling="evenly_spaced")
    item = ds[0]
    assert item["image"].shape[0] == 6 and item["mask"].all()
    idx = item["instance_index"].numpy()
    assert (np.diff(idx) > 0).all()
    raw = np.load(small_cache.cache_dir / small_cache.index.iloc[0]["array_path"])[idx]
    mean = np.asarray(small_cache.index.iloc[0]["channel_mean"])[None, :, None, None]
    std = np.asarray(small_cache.index.iloc[0]["channel_std"])[None, :, None, None]
    np.testing.assert_allclose(item["image"].numpy(), np.where(raw != 0, (raw - mean) / std, 0), rtol=1e-5, atol=1e-5)
    big = BagDataset(small_cache.index, small_cache.cache_dir, bag_size=500, sampling="random")[0]
    n = int(small_cache.index.iloc[0]["n_instances"])
    assert big["mask"].sum() == n and not big["mask"][n:].any() and (big["image"][n:] == 0).all()
