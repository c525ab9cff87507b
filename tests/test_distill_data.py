"""distill's data honours every ``data.*`` key the other tasks honour, or refuses it when the config loads.

Honoured keys are measured on the cases and batches distill trains on (the number of training cases,
the class counts of a long-tailed subsample, the sampler's class draw frequencies, the augmented and
normalised pixels, the loader's workers); refused keys are one-line ``ConfigError``s naming the key
and where it was set, before any MLflow run exists.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from losslab.config import ConfigError, load_config
from losslab.data.cache import build_cache
from losslab.models.multimodal import build_multimodal_model
from losslab.tasks.multitask_data import InputPrep, MultitaskData, fold_loaders, prepare_multitask_data

TASKS = ["modality", "location"]
MODEL = ("{image: {backbone: test_vit, kwargs: {img_size: 32, patch_size: 8}}, "
         "text: {dim: 16, depth: 1, max_length: 16}, fusion: cross_attention, fusion_dim: 16, fusion_layers: 1}")


def _config(root, cache_dir, *overrides, experiment="distill-data"):
    return load_config(None, [
        f"data.root={root}", "data.source=manifest", "data.generate=embedded_medpix",
        "data.generator_kwargs={num_samples: 120, image_size: 32}", f"data.cache_dir={cache_dir}",
        "data.num_folds=3", "data.salt=test-salt", "data.batch_size=8", "data.seed=0", "train.seed=0",
        f"tracking.experiment={experiment}", "tracking.log_model=false", f"distill.tasks=[{', '.join(TASKS)}]",
        "distill.losses=[]", f"distill.teacher.model={MODEL}", f"distill.student.model={MODEL}", *overrides])


@pytest.fixture(scope="module")
def medpix(tmp_path_factory):
    base = tmp_path_factory.mktemp("distill-data")
    root, cache_dir = base / "raw", base / "cache"
    info = build_cache(_config(root, cache_dir).data)
    return root, cache_dir, info


def _data(medpix, *overrides) -> tuple[object, MultitaskData]:
    root, cache_dir, info = medpix
    cfg = _config(root, cache_dir, *overrides)
    return cfg, prepare_multitask_data(cfg, info)


def _pool(info, fold: int = 0):
    """The training pool of ``fold`` read straight from the cache index: every other fold, no test split."""
    index = info.index
    return index[(index["fold"] != fold) & (index["fold"] >= 0)]


def _loader_labels(cfg, d: MultitaskData, epochs: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The cache labels of the training cases the loader delivers over ``epochs`` epochs, and each batch's."""
    model = build_multimodal_model(cfg.distill.student.model, d.task_classes, texts=d.texts, in_chans=d.in_chans)
    train_loader, _ = fold_loaders(cfg, d, d.train_df, InputPrep.of(model, d.preprocessing))
    labels = d.train_df["label"].to_numpy()
    batches = [labels[batch["index"].numpy()] for _ in range(epochs) for batch in train_loader]
    return np.concatenate(batches), batches


def test_train_cases_is_a_stratified_subsample_of_the_training_pool(medpix):
    _, _, info = medpix
    _, d = _data(medpix, "data.train_cases=30")
    pool = _pool(info)
    assert len(d.train_df) == 30 < len(pool)
    assert set(d.train_df["case_id"]) <= set(pool["case_id"])
    expected = pool["label"].value_counts(normalize=True) * 30
    got = d.train_df["label"].value_counts()
    for label, share in expected.items():
        assert abs(got.get(label, 0) - share) <= 1  # stratified: the pool's proportions within one case
    assert len(d.val_df) == int((info.index["fold"] == 0).sum())  # validation untouched


def test_imbalance_gives_the_long_tailed_class_counts(medpix):
    _, _, info = medpix
    _, d = _data(medpix, "data.imbalance={profile: exponential, ratio: 4.0}")
    available = np.bincount(_pool(info)["label"].to_numpy(), minlength=3)
    # by hand: n_i = floor(n_max * 4^(-i/2)), n_max the largest head count every class can supply
    factor = np.array([1.0, 0.5, 0.25])
    n_max = int(min(np.floor(available / factor)))
    expected = np.floor(n_max * factor).astype(int)
    assert np.bincount(d.train_df["label"].to_numpy(), minlength=3).tolist() == expected.tolist()
    assert expected[0] >= 2 * expected[2]


def test_weighted_random_sampler_draws_the_classes_evenly(medpix):
    cfg, d = _data(medpix, "data.sampler=weighted_random")
    drawn, _ = _loader_labels(cfg, d, epochs=10)
    frequencies = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.allclose(frequencies, 1 / 3, atol=0.06), frequencies
    plain_cfg, plain = _data(medpix)
    plain_drawn, _ = _loader_labels(plain_cfg, plain, epochs=1)
    pool_share = np.bincount(plain.train_df["label"].to_numpy(), minlength=3) / len(plain.train_df)
    assert np.allclose(np.bincount(plain_drawn, minlength=3) / len(plain_drawn), pool_share)  # each case once
    assert pool_share.min() < 1 / 3 - 0.08  # the data are imbalanced: the sampler changed the draw


def test_class_balanced_batches_hold_every_class(medpix):
    cfg, d = _data(medpix, "data.sampler=class_balanced_batch")
    _, batches = _loader_labels(cfg, d, epochs=2)
    assert batches and all(set(batch.tolist()) == {0, 1, 2} for batch in batches)


def test_augment_flips_training_images_only(medpix):
    cfg, d = _data(medpix, "data.augment={hflip: 1.0}")
    model = build_multimodal_model(cfg.distill.student.model, d.task_classes, texts=d.texts, in_chans=d.in_chans)
    train_loader, val_loader = fold_loaders(cfg, d, d.train_df, InputPrep.of(model, d.preprocessing))
    mean = np.asarray(d.preprocessing["image_mean"], np.float32)[:, None, None]
    std = np.asarray(d.preprocessing["image_std"], np.float32)[:, None, None]
    raw = np.load(d.info.cache_dir / d.train_df.at[0, "array_path"])[0].astype(np.float32)
    train_item, val_item = train_loader.dataset[0], val_loader.dataset[0]
    np.testing.assert_allclose(train_item["image"].numpy(), np.flip((raw - mean) / std, axis=-1), atol=1e-5)
    raw_val = np.load(d.info.cache_dir / d.val_df.at[0, "array_path"])[0].astype(np.float32)
    np.testing.assert_allclose(val_item["image"].numpy(), (raw_val - mean) / std, atol=1e-5)


@pytest.mark.parametrize("normalize, expected", [
    ("none", lambda raw: raw),
    ("{fixed: {mean: 0.5, std: 0.25}}", lambda raw: (raw - 0.5) / 0.25),
])
def test_normalize_sets_the_preprocessing(medpix, normalize, expected):
    cfg, d = _data(medpix, f"data.normalize={normalize}")
    model = build_multimodal_model(cfg.distill.student.model, d.task_classes, texts=d.texts, in_chans=d.in_chans)
    _, val_loader = fold_loaders(cfg, d, d.train_df, InputPrep.of(model, d.preprocessing))
    raw = np.load(d.info.cache_dir / d.val_df.at[0, "array_path"])[0].astype(np.float32)
    np.testing.assert_allclose(val_loader.dataset[0]["image"].numpy(), expected(raw), atol=1e-5)


def test_dataset_normalisation_is_the_training_cases_channel_statistics(medpix):
    _, d = _data(medpix, "data.normalize=dataset")
    stack = np.stack([np.load(d.info.cache_dir / p)[0] for p in d.train_df["array_path"]]).astype(np.float64)
    np.testing.assert_allclose(d.preprocessing["image_mean"], stack.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(d.preprocessing["image_std"], stack.std(axis=(0, 2, 3)), rtol=1e-4)


def test_num_workers_run_the_loaders(medpix):
    cfg, d = _data(medpix, "data.num_workers=2")
    model = build_multimodal_model(cfg.distill.student.model, d.task_classes, texts=d.texts, in_chans=d.in_chans)
    train_loader, val_loader = fold_loaders(cfg, d, d.train_df, InputPrep.of(model, d.preprocessing))
    assert (train_loader.num_workers, val_loader.num_workers) == (2, 2)
    seen = torch.cat([batch["index"] for batch in train_loader])
    assert sorted(seen.tolist()) == list(range(len(d.train_df)))  # the workers deliver every case once


@pytest.mark.parametrize("override, message", [
    ("data.bag_size=8", r"data.bag_size = 8 in command-line override .*: distill trains on one image per case"),
    ("data.bag_sampling=all", r"data.bag_sampling = 'all' in command-line override .*: distill trains on one image"),
    ("data.volume_depth=8", r"data.volume_depth = 8 in command-line override .*: distill trains on one image"),
    ("data.volume_size=[16, 16]", r"data.volume_size = \[16, 16\] in command-line override .*: distill trains"),
    ("data.train_data_on_device=true", r"data.train_data_on_device = True in command-line override .*: distill's"),
    ("data.normalize=per_case_nonzero_zscore",
     r"data.normalize = 'per_case_nonzero_zscore' in command-line override .*: distill normalises every image"),
])
def test_unsupported_data_keys_are_refused_when_the_config_loads(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path / "raw", tmp_path / "cache", override)
    assert load_config(None, [override]).distill is None  # without a distill section the key is accepted


def test_the_pipeline_trains_on_the_chosen_cases(medpix, mlflow_store):
    from losslab.pipelines.distill import run_distill

    root, cache_dir, info = medpix
    cfg = _config(root, cache_dir, "data.train_cases=24", "data.sampler=weighted_random",
                  "data.augment={hflip: 0.5}", "train.epochs=1", "distill.teacher.epochs=1",
                  "train.max_train_batches=2", experiment="distill-data-pipeline")
    result = run_distill(cfg, info=info)
    client = MlflowClient()
    assert int(client.get_run(result.parent_run_id).data.params["data.n_train"]) == 24
    assert int(client.get_run(result.student_run_ids["none"]).data.params["data.n_train_cases"]) == 24
