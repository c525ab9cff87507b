"""One scoring path: train's logged ``test/*`` and ``evaluate`` of the same model from a run id, from a
registered version (``models:/name/version``) and from the checkpoint file agree to 1e-6, for a plain,
an EMA and an SWA classifier and an EMA segmentation model. The SWA and EMA runs also show that
scoring the raw trained weights (``ckpt["model"]``) gives other numbers, so a path that forgot the
evaluation weights fails here.

Real SQLite MLflow store (the session fixture), real tiny train runs, no mocks.
"""

from __future__ import annotations

import ast
import math
import uuid
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from losslab.engine.checkpoint import restore_loss
from losslab.engine.checkpoint import load_checkpoint
from losslab.engine.loop import resolve_device
from losslab.pipelines.evaluate import run_evaluate
from losslab.pipelines.scoring import score_test_split
from losslab.pipelines.train import run_train
from losslab.tasks import task_of

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER_KEYS = ("loss", "balanced_accuracy", "auc", "f1_macro", "recall_LGG", "recall_HGG")
FAST = {"tta": {"enabled": False}, "latency": {"enabled": False}, "calibration": {"enabled": False},
        "intervals": {"enabled": False}, "split": "test"}


@pytest.fixture(scope="module")
def test_split_cache(embedded_root, tmp_path_factory):
    """The small cohort with 20 % of its patients held out as the test split (fold -1)."""
    from losslab.config import DataConfig
    from losslab.data.cache import build_cache

    cfg = DataConfig(root=str(embedded_root), cache_dir=str(tmp_path_factory.mktemp("cache-scoring")), num_folds=3,
                     test_fraction=0.2, salt="test-salt")
    return build_cache(cfg)


def _best_checkpoint(run_id: str, folder: Path) -> Path:
    """The run's ``checkpoints/best.pt`` artifact, downloaded into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(MlflowClient().download_artifacts(run_id, "checkpoints/best.pt", str(folder)))


def _evaluate_three_ways(cfg, run_id: str, model_name: str, version: str, checkpoint: Path
                         ) -> dict[str, dict[str, float]]:
    """``test/*`` of evaluate from the run id, the registered version and the checkpoint file."""
    evaluated = {}
    for name, source in (("run id", run_id), ("registered version", f"models:/{model_name}/{version}"),
                         ("checkpoint file", str(checkpoint))):
        evaluated[name] = run_evaluate(cfg.model_copy(update={"evaluate": FAST}), source=source).metrics
    return evaluated


def _assert_agree(logged: dict[str, float], evaluated: dict[str, dict[str, float]], keys: list[str]) -> None:
    for way, metrics in evaluated.items():
        for key in keys:
            mine, train = metrics[key], logged[key]
            assert math.isclose(mine, train, rel_tol=0, abs_tol=1e-6) or (math.isnan(mine) and math.isnan(train)), \
                (way, key, mine, train)


def _weights_moved():
    import importlib.util

    spec = importlib.util.spec_from_file_location("weights_moved", REPO / "scripts" / "weights_moved.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _raw_weights_test_metrics(cfg, info, ckpt: dict) -> dict[str, float]:
    """``test/*`` of the run's best checkpoint scored with its raw trained weights (``ckpt["model"]``)."""
    from losslab.pipelines.train import make_datasets

    task = task_of(cfg)
    train_ds, _ = make_datasets(cfg, info, cfg.data.fold)
    counts = torch.bincount(torch.as_tensor(train_ds.labels), minlength=len(info.class_names)).tolist()
    loss_fn, model = task.build(cfg, info.class_names, counts)
    model.load_state_dict(ckpt["model"])
    restore_loss(loss_fn, ckpt)  # the loss as validated: only the model's weights differ
    step = task.step(cfg, loss_fn, info.class_names)
    return score_test_split(cfg, info, task, step, model.eval(), loss_fn, resolve_device("cpu"), train_ds.normalizer)


@pytest.mark.parametrize("variant, overrides, eval_source", [
    ("plain", (), "model"),
    ("ema", ("train.ema_decay=0.5",), "ema"),
    ("swa", ("train.swa_epochs=2", "train.swa_lr=0.01"), "swa"),
    # losses built from the training class counts on training folds that data.imbalance or data.train_cases
    # subsample (a checkpoint rebuilt from the whole cache's counts scores another loss): LDAM, whose deferred
    # re-weighting switches on at epoch 2, class-balanced weights of the absolute counts (beta 0.9), and a
    # compound of logit adjustment and focal whose uncertainty weights are learned (the loss's own state)
    ("ldam on a long-tailed subsample", ("loss.name=ldam", "loss.drw_start_epoch=2", "data.imbalance={ratio: 4.0}"),
     "model"),
    ("class-balanced on 12 training cases", ("loss.name=class_balanced", "loss.beta=0.9", "data.train_cases=12"),
     "model"),
    ("learned compound on a long-tailed subsample", (
        "loss.name=compound", "loss.weighting=uncertainty", "data.imbalance={ratio: 3.0}",
        "loss.terms=[{name: logit_adjusted, weight: 1.0}, {name: focal, weight: 1.0, gamma: 2.0}]"), "model"),
])
def test_train_and_the_three_evaluate_sources_give_the_same_test_numbers(make_config, test_split_cache, variant,
                                                                         overrides, eval_source, tmp_path):
    name = f"scoring-{variant.replace(' ', '-')}-{uuid.uuid4().hex[:6]}"
    cfg = make_config(f"data.cache_dir={test_split_cache.cache_dir}", "data.test_fraction=0.2", "train.epochs=4",
                      "train.max_train_batches=3", "train.device=cpu", "loss.name=focal",
                      f"tracking.registered_model_name={name}", *overrides, experiment="scoring")
    fold = run_train(cfg, info=test_split_cache).folds[0]
    logged = MlflowClient().get_run(fold.run_id).data.metrics
    checkpoint = _best_checkpoint(fold.run_id, tmp_path / "best")
    ckpt = load_checkpoint(checkpoint)
    assert ckpt.get("eval_source", "model") == eval_source  # the run validated the weights the variant names
    keys = [f"test/{k}" for k in CLASSIFIER_KEYS]
    if any(o.startswith("data.") for o in overrides):  # the training counts are not the whole training folds'
        index = test_split_cache.index
        whole = torch.bincount(torch.as_tensor(index[index["fold"] > 0]["label"].to_numpy()), minlength=2).tolist()
        assert ast.literal_eval(MlflowClient().get_run(fold.run_id).data.params["data.class_counts_train"]) != whole
    if "loss.weighting=uncertainty" in overrides:  # the loss learned its weights: its state is not the initial one
        assert ckpt["loss"]["log_vars"].abs().max() > 1e-3, ckpt["loss"]
    evaluated = _evaluate_three_ways(cfg, fold.run_id, name, fold.model_version, checkpoint)
    _assert_agree(logged, evaluated, keys)
    raw = _raw_weights_test_metrics(cfg, test_split_cache, ckpt)
    both = _weights_moved().score_both(fold.run_id)  # scripts/weights_moved.py: the same two scores
    assert both["eval_source"] == eval_source
    _assert_agree(logged, {"weights_moved averaged": both["averaged"]}, keys)
    _assert_agree(raw, {"weights_moved raw": both["raw"]}, keys)
    if eval_source == "model":
        _assert_agree(logged, {"raw weights": raw}, keys)  # the raw weights are the evaluation weights
    else:  # the averaged weights are another model: scoring the raw ones would be a different number
        assert abs(raw["test/loss"] - logged["test/loss"]) > 1e-4, (raw["test/loss"], logged["test/loss"])


def test_segmentation_train_and_the_three_evaluate_sources_agree_with_ema(tmp_path_factory, mlflow_store, monkeypatch):
    from _data_factories import generate_embedded_brats

    from losslab.config import load_config

    root = generate_embedded_brats(tmp_path_factory, "scoring-seg", seed=5, num_cases=8, shape=(32, 32, 16))
    work = tmp_path_factory.mktemp("scoring-seg-work")
    name = f"scoring-seg-{uuid.uuid4().hex[:6]}"
    cfg = load_config(REPO / "configs" / "experiment" / "seg_dice.yaml", [
        f"data.root={root}", f"data.cache_dir={work / 'cache'}", "data.num_folds=2", "data.test_fraction=0.25",
        "data.salt=test-salt", "data.batch_size=2", "seg.patch_size=[16, 16, 16]", "seg.samples_per_case=1",
        "seg.hd95=false", "train.epochs=2", "train.ema_decay=0.5", "train.device=cpu",
        f"train.checkpoint_dir={work / 'ckpt'}", "tracking.experiment=scoring-seg",
        f"tracking.registered_model_name={name}", "optim.lr=0.01"])
    torch.set_num_threads(1)
    fold = run_train(cfg).folds[0]
    logged = MlflowClient().get_run(fold.run_id).data.metrics
    monkeypatch.setenv("LOSSLAB_SALT", "test-salt")  # the run's logged config holds only the salt's fingerprint
    checkpoint = _best_checkpoint(fold.run_id, work / "best")
    assert load_checkpoint(checkpoint)["eval_source"] == "ema"
    keys = ["test/loss", "test/mean_dice"] + [k for k in logged if k.startswith("test/dice_")]
    assert len(keys) >= 4 and logged["test/n_cases"] == 2  # 25 % of 8 patients
    evaluated = _evaluate_three_ways(cfg, fold.run_id, name, fold.model_version, checkpoint)
    _assert_agree(logged, evaluated, keys)


def test_weights_moved_table_by_hand():
    """scripts/weights_moved.py's table: means over folds and the paired differences, by hand."""
    import pandas as pd

    rows = []
    for fold, (avg, raw) in enumerate([(0.70, 0.60), (0.80, 0.85), (0.65, 0.55)]):
        for weights, value in (("averaged", avg), ("raw", raw)):
            rows.append({"variant": "focal", "fold": str(fold), "seed": "0", "weights": weights, "eval_source": "ema",
                         "test/balanced_accuracy": value, "test/auc": value, "test/loss": 1 - value})
    row = _weights_moved().moved_table(pd.DataFrame(rows)).iloc[0]
    assert row["folds"] == "3" and row["best checkpoint's weights"] == "ema 3/3"
    assert row["bal. acc. averaged"] == f"{(0.70 + 0.80 + 0.65) / 3:.3f}" and row["bal. acc. raw"] == f"{2.0 / 3:.3f}"
    assert row["bal. acc. Δ mean (largest)"] == f"{(0.10 - 0.05 + 0.10) / 3:+.3f} (0.100)"
    assert row["test loss Δ mean (largest)"] == f"{-(0.10 - 0.05 + 0.10) / 3:+.3f} (0.100)"
