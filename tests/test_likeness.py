"""losslab.likeness: which params make runs different experiments; the losslab.config_hash tag."""

from __future__ import annotations

import hashlib
import json

import mlflow
from mlflow.tracking import MlflowClient

from losslab.likeness import config_hash, differing_keys, is_ignored, signature
from losslab.tracking import config_params


def test_fold_seed_and_bookkeeping_are_ignored_the_rest_is_not():
    for key in ("data.fold", "train.seed", "cv.folds", "tracking.run_name", "data.n_train", "data.n_val",
                "data.class_counts_train", "train.checkpoint_dir", "loss.formula", "data.salt",
                "data.normalize_mean", "data.normalize_std"):
        assert is_ignored(key), key
    for key in ("loss.gamma", "train.epochs", "optim.lr", "data.sampler", "data.num_folds", "model.backbone",
                "data.normalize", "data.normalize_resolved"):
        assert not is_ignored(key), key
    assert is_ignored("loss.gamma", also=("loss.",)) and not is_ignored("lossy", also=("loss.",))


def test_config_hash_by_hand_and_differing_keys():
    a = {"loss.name": "focal", "loss.gamma": "2.0", "data.fold": "0", "tracking.experiment": "x"}
    b = a | {"data.fold": "3", "tracking.experiment": "y", "train.seed": "5"}
    text = json.dumps([["loss.gamma", "2.0"], ["loss.name", "focal"]], separators=(",", ":"))
    assert config_hash(a) == hashlib.sha256(text.encode()).hexdigest()[:12] == config_hash(b)
    c = a | {"loss.gamma": "1.0"}
    assert config_hash(c) != config_hash(a)
    assert differing_keys(c, a) == {"loss.gamma": ("1.0", "2.0")}
    assert differing_keys(c, a, also=("loss.",)) == {}
    assert differing_keys({"x": "1"}, {}) == {"x": ("1", None)}  # logged vs never logged differ
    assert signature({"x": float("nan"), "y": None, "z": 1}) == (("z", "1"),)


def test_train_tags_each_fold_run_with_the_same_config_hash(make_config, small_cache):
    from losslab.pipelines.train import run_train

    runs = []
    for fold in (0, 1):
        cfg = make_config("loss=focal", "loss.gamma=2.0", f"data.fold={fold}", "train.epochs=1",
                          "tracking.log_model=false", experiment="likeness-hash")
        runs.append(run_train(cfg, info=small_cache).folds[0].run_id)
    client = MlflowClient()
    fetched = [client.get_run(r) for r in runs]
    hashes = [r.data.tags["losslab.config_hash"] for r in fetched]
    assert hashes[0] == hashes[1]  # two folds of one experiment
    other = make_config("loss=focal", "loss.gamma=1.0", "data.fold=1", "train.epochs=1", "tracking.log_model=false")
    assert config_hash(config_params(other)) != hashes[0]  # another gamma: another experiment
    # the tag is the fingerprint of the config params the run logged (read back: a second code path);
    # ddp.world_size is a launch param, not config: compare checks it, the tag does not hold it
    assert all(h == config_hash({k: v for k, v in r.data.params.items() if k != "ddp.world_size"})
               for h, r in zip(hashes, fetched))
    assert mlflow.search_runs(experiment_names=["likeness-hash"],
                              filter_string=f"tags.`losslab.config_hash` = '{hashes[0]}'").shape[0] == 2
