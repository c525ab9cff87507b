"""The data protocols a reproduction needs: a source's own test split, normalisation modes,
long-tailed subsampling and a set number of training cases (issue 12, items 3, 4, 8, 9)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from losslab.config import ConfigError, DataConfig, load_config
from losslab.data.cache import build_cache
from losslab.data.datasets import BagDataset, ImageDataset
from losslab.data.normalization import Normalizer, build_normalizer, dataset_statistics
from losslab.data.splits import (TEST_FOLD, assign_folds, long_tailed_counts, long_tailed_subsample,
                                 stratified_subsample, training_rows)


@pytest.fixture(scope="module")
def bags_cache(tmp_path_factory):
    """A small mnist_bags cache: 40 training bags over 4 folds, 25 test bags from the source."""
    cfg = DataConfig(source="mnist_bags", root="unused", generate=None, salt="s", num_folds=4,
                     cache_dir=str(tmp_path_factory.mktemp("bags")),
                     source_kwargs={"train_bags": 40, "test_bags": 25, "positive_fraction": 0.5})
    return cfg, build_cache(cfg)


def _with(cfg: DataConfig, **changes) -> DataConfig:
    return DataConfig.model_validate(cfg.model_dump() | changes)


# ------------------------------------------------------------------------------ item 3: test split
def test_source_test_bags_are_the_held_out_test_and_never_train(bags_cache):
    cfg, info = bags_cache
    index = info.index
    source_split = index["meta"].map(lambda m: json.loads(m)["split"])
    assert (source_split == "test").sum() == 25
    assert (index.loc[source_split == "test", "fold"] == TEST_FOLD).all()
    assert (index.loc[source_split == "train", "fold"] >= 0).all()
    assert set(index.loc[source_split == "train", "fold"]) == {0, 1, 2, 3}
    test_ids = set(index.loc[source_split == "test", "case_id"])
    for fold in range(4):
        train_ids = set(training_rows(cfg, index, fold, 2)["case_id"])
        assert len(train_ids) == 30 and not train_ids & test_ids
    assert info.report["test_split"] == "source" and info.report["folds"][TEST_FOLD] == 25
    assert any("own test split (25 cases)" in note for note in info.report["notes"])


def test_medmnist_test_split_is_kept(tmp_path):
    from losslab.data.sources import run_generator

    run_generator("medmnist", str(tmp_path / "raw"), seed=0, counts=(60, 20, 20), class_frequencies=(0.5, 0.5))
    cfg = DataConfig(source="medmnist", root=str(tmp_path / "raw"), generate=None, salt="s", num_folds=3,
                     cache_dir=str(tmp_path / "cache"))
    index = build_cache(cfg).index
    split = index["meta"].map(lambda m: json.loads(m)["split"])
    assert ((split == "test") == (index["fold"] == TEST_FOLD)).all() and (split == "test").sum() == 20
    with pytest.raises(ValueError, match="data.test_fraction=0.2: the source defines its own test split"):
        build_cache(_with(cfg, test_fraction=0.2, cache_dir=str(tmp_path / "c2")))


def test_assign_folds_with_a_fixed_test_split():
    labels = np.array([0, 1] * 20)
    fixed = np.zeros(40, dtype=bool)
    fixed[[0, 1, 2, 3, 10, 11]] = True
    folds = assign_folds(labels, np.arange(40), num_folds=3, seed=1, fixed_test=fixed)
    assert (folds[fixed] == TEST_FOLD).all() and (folds[~fixed] >= 0).all()
    assert np.bincount(folds[~fixed]).tolist() == [12, 11, 11] or sorted(np.bincount(folds[~fixed])) == [11, 11, 12]


# ------------------------------------------------------------------------------ item 4: normalisation
def _arrays(info, rows):
    return [np.load(info.cache_dir / p) for p in rows["array_path"]]


def test_normalisation_modes_match_numpy(bags_cache):
    cfg, info = bags_cache
    row = info.index.iloc[0]
    x = np.load(info.cache_dir / row["array_path"])
    np.testing.assert_array_equal(Normalizer("none")(x), x)
    nonzero = x[x != 0]
    expected = np.where(x != 0, (x - nonzero.mean()) / nonzero.std(), 0.0)
    np.testing.assert_allclose(Normalizer("per_case_nonzero_zscore")(x, row), expected, rtol=1e-5, atol=1e-5)
    fixed = build_normalizer({"fixed": {"mean": 0.1307, "std": 0.3081}}, info.index, info.cache_dir)
    np.testing.assert_allclose(fixed(x), (x - 0.1307) / 0.3081, rtol=1e-5, atol=1e-6)
    two = np.stack([x[:, 0], 2 * x[:, 0]], axis=1)
    per_channel = build_normalizer({"fixed": {"mean": [0.0, 1.0], "std": [1.0, 4.0]}}, info.index, info.cache_dir)
    np.testing.assert_allclose(per_channel(two)[:, 1], (2 * x[:, 0] - 1.0) / 4.0, rtol=1e-6)


def test_dataset_statistics_come_from_the_training_folds_only(bags_cache):
    cfg, info = bags_cache
    train = training_rows(cfg, info.index, 0, 2)
    pixels = np.concatenate([a.reshape(-1) for a in _arrays(info, train)]).astype(np.float64)
    normalizer = build_normalizer("dataset", train, info.cache_dir)
    assert normalizer.mean[0] == pytest.approx(pixels.mean(), rel=1e-9)
    assert normalizer.std[0] == pytest.approx(pixels.std(), rel=1e-9)
    everything = np.concatenate([a.reshape(-1) for a in _arrays(info, info.index)]).astype(np.float64)
    assert normalizer.mean[0] != pytest.approx(everything.mean(), rel=1e-6)  # validation/test not used
    val = info.index[info.index["fold"] == 0]
    item = BagDataset(val, info.cache_dir, bag_size=64, sampling="all", normalizer=normalizer)[0]
    raw = _arrays(info, val.iloc[:1])[0]
    np.testing.assert_allclose(item["image"][: len(raw)].numpy(), (raw - pixels.mean()) / pixels.std(), rtol=1e-4,
                               atol=1e-5)
    assert dataset_statistics(train, info.cache_dir) == (normalizer.mean, normalizer.std)


def test_normalize_config_values_and_source_defaults(bags_cache, tmp_path):
    from losslab.data.sources import default_normalization
    from losslab.pipelines.train import make_datasets

    assert load_config(None, ["data.normalize=dataset"]).data.normalize == "dataset"
    assert load_config(None, ["data.normalize={fixed: {mean: [0.1, 0.2], std: 0.5}}"]).data.normalize.fixed.std == 0.5
    for bad in ("data.normalize=zscore", "data.normalize={fixed: {mean: 0, std: 0}}", "data.normalize={fixed: {mean: 0}}"):
        with pytest.raises(ConfigError, match="data.normalize"):
            load_config(None, [bad])
    assert default_normalization("mnist_bags") == {"fixed": {"mean": 0.1307, "std": 0.3081}}
    assert default_normalization("brats") == "per_case_nonzero_zscore"
    assert default_normalization("medmnist") == "none"
    cfg, info = bags_cache
    experiment = load_config(None, ["data.source=mnist_bags", f"data.cache_dir={info.cache_dir}"])
    train_ds, val_ds = make_datasets(experiment, info, 1)
    assert train_ds.normalizer == val_ds.normalizer == Normalizer("fixed", (0.1307,), (0.3081,))


# ------------------------------------------------------------------------------ item 8: imbalance
def test_long_tailed_counts_follow_the_formula():
    counts = long_tailed_counts([400] * 10, ratio=100, profile="exponential")
    expected = [int(np.floor(400 * 100 ** (-i / 9) + 1e-9)) for i in range(10)]
    assert counts.tolist() == expected and counts[0] == 400 and counts[-1] == 4
    assert long_tailed_counts([320] * 10, 10).tolist()[-1] == 32
    assert long_tailed_counts([100] * 5, 10, "step").tolist() == [100, 100, 100, 10, 10]
    # an unbalanced pool: n_max is the largest head count every class can supply
    counts = long_tailed_counts([50, 50, 3], ratio=100)  # f = 1, 0.1, 0.01 -> n_max = min(50, 500, 300)
    assert counts.tolist() == [50, 5, 0]
    with pytest.raises(ValueError, match="class"):
        long_tailed_counts([10, 0], 10)


def test_imbalance_applies_to_training_folds_only(bags_cache):
    cfg, info = bags_cache
    labels = np.repeat(np.arange(4), 30)
    keep = long_tailed_subsample(labels, ratio=10, profile="exponential", seed=3, num_classes=4)
    assert np.bincount(labels[keep], minlength=4).tolist() == [int(30 * 10 ** (-i / 3) + 1e-9) for i in range(4)]
    assert keep.tolist() != long_tailed_subsample(labels, 10, "exponential", seed=4, num_classes=4).tolist()
    imbalanced = _with(cfg, imbalance={"profile": "step", "ratio": 5, "seed": 0})
    full = training_rows(cfg, info.index, 0, 2)
    rows = training_rows(imbalanced, info.index, 0, 2)
    available = np.bincount(full["label"], minlength=2)
    expected = long_tailed_counts(available, 5, "step")
    assert np.bincount(rows["label"], minlength=2).tolist() == expected.tolist()
    assert set(rows["case_id"]) <= set(full["case_id"]) and (rows["fold"] >= 0).all() and (rows["fold"] != 0).all()


# ------------------------------------------------------------------------------ item 9: train_cases
def test_train_cases_is_a_stratified_seeded_subsample(bags_cache):
    labels = np.array([0] * 60 + [1] * 40)
    chosen = stratified_subsample(labels, 20, seed=0)
    assert len(chosen) == 20 and np.bincount(labels[chosen]).tolist() == [12, 8]
    assert chosen.tolist() == stratified_subsample(labels, 20, seed=0).tolist()
    with pytest.raises(ValueError, match="data.train_cases=101"):
        stratified_subsample(labels, 101, seed=0)
    cfg, info = bags_cache
    rows = training_rows(_with(cfg, train_cases=12), info.index, 2, 2)
    assert len(rows) == 12 and (rows["fold"] != 2).all() and (rows["fold"] >= 0).all()
    assert len(training_rows(_with(cfg, train_cases=12, num_folds=2), info.index, 2, 2)) == 12


def test_image_dataset_refuses_bags(bags_cache):
    _, info = bags_cache
    with pytest.raises(ValueError, match="model.kind=image needs one image per case"):
        ImageDataset(info.index, info.cache_dir, Normalizer("none"))[0]
