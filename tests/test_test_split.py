"""Held-out test split: train picks the best epoch on validation, then scores the best model once
on the test split (test/* with patient-bootstrap intervals), and says so when there is none;
evaluate --split test on the registered model gives the same numbers (a second code path)."""

from __future__ import annotations

import logging
import math

import pytest
from mlflow.tracking import MlflowClient

from losslab.pipelines.evaluate import run_evaluate
from losslab.pipelines.train import run_train


@pytest.fixture(scope="module")
def test_cache(embedded_root, tmp_path_factory):
    from losslab.config import DataConfig
    from losslab.data.cache import build_cache

    cfg = DataConfig(root=str(embedded_root), cache_dir=str(tmp_path_factory.mktemp("cache-test")), num_folds=3,
                     test_fraction=0.2, salt="test-salt")
    return build_cache(cfg)


def test_train_scores_the_held_out_test_split_once_and_evaluate_agrees(make_config, test_cache):
    index = test_cache.index
    n_test = int((index["fold"] == -1).sum())
    assert 0 < n_test < len(index)
    cfg = make_config(f"data.cache_dir={test_cache.cache_dir}", "data.test_fraction=0.2", "data.fold=1",
                      "train.epochs=2", "train.max_train_batches=2", "train.device=cpu",
                      "tracking.registered_model_name=test-split-model", experiment="test-split")
    result = run_train(cfg, info=test_cache)
    run = MlflowClient().get_run(result.folds[0].run_id)
    params, logged = run.data.params, run.data.metrics
    assert int(params["data.n_test"]) == n_test
    assert int(params["data.n_train"]) + int(params["data.n_val"]) + n_test == len(index)
    assert logged["test/pred_count_LGG"] + logged["test/pred_count_HGG"] == n_test
    for key in ("balanced_accuracy", "f1_macro", "auc", "recall_LGG", "recall_HGG"):
        low, high = logged[f"test/{key}_ci_low"], logged[f"test/{key}_ci_high"]
        assert math.isnan(low) or low <= high
    fast = {"tta": {"enabled": False}, "latency": {"enabled": False}, "split": "test"}
    evaluated = run_evaluate(cfg.model_copy(update={"evaluate": fast}), source="models:/test-split-model@candidate")
    test_keys = [k for k in logged if k.startswith("test/")]
    assert len(test_keys) > 20
    for key in test_keys:
        mine = evaluated.metrics[key]
        assert math.isclose(mine, logged[key], abs_tol=1e-6) or (math.isnan(mine) and math.isnan(logged[key])), key

    # the cache rebuilt with other folds (another split seed): its test cases may be training data
    from losslab.config import DataConfig
    from losslab.data.cache import build_cache

    build_cache(DataConfig(root=cfg.data.root, cache_dir=str(test_cache.cache_dir), num_folds=3, test_fraction=0.2,
                           salt="test-salt", seed=7), force=True)
    with pytest.raises(ValueError, match="puts cases in other folds than the one the model was trained on"):
        run_evaluate(cfg.model_copy(update={"evaluate": fast}), source="models:/test-split-model@candidate")


def test_no_test_split_is_said_in_one_line_and_logs_no_test_metrics(make_config, small_cache, caplog):
    assert not (small_cache.index["fold"] == -1).any()
    cfg = make_config("train.epochs=1", "train.max_train_batches=1", "train.device=cpu", "tracking.log_model=false",
                      experiment="no-test-split")
    with caplog.at_level(logging.WARNING, logger="losslab.pipelines.train"):
        result = run_train(cfg, info=small_cache)
    lines = [r.getMessage() for r in caplog.records if "no held-out test split" in r.getMessage()]
    assert len(lines) == 1 and "data.test_fraction=0.0" in lines[0] and "\n" not in lines[0]
    metrics = MlflowClient().get_run(result.folds[0].run_id).data.metrics
    assert not [k for k in metrics if k.startswith("test/")] and "best_val/auc" in metrics


def test_shipped_experiment_configs_hold_out_a_test_split():
    from pathlib import Path

    from losslab.config import load_config

    # sources whose own test split is the held-out test (fold -1; data.test_fraction > 0 is refused
    # for them): the size of that split is a source parameter
    own_test = {"mnist_digits": lambda kw: kw.get("test_fraction", 0) >= 0.1,
                "mnist_bags": lambda kw: kw.get("test_bags", 0) >= 100}
    for path in sorted((Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("*.yaml")):
        data = load_config(path).data
        if data.source in own_test:
            assert data.test_fraction == 0 and own_test[data.source](data.source_kwargs), path.name
        else:
            assert data.test_fraction >= 0.1, path.name


def test_main_job_then_evaluate_split_test_on_its_alias(embedded_root, tmp_path, mlflow_store):
    """The README flow on the small cohort: the main job (demo config: test_fraction 0.2), then
    `losslab evaluate --split test` on the registered alias succeeds and scores the test cases."""
    from typer.testing import CliRunner

    from losslab.cli import app
    from losslab.pipelines.demo import run_demo

    overrides = [f"data.root={embedded_root}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_folds=3",
                 "data.salt=test-salt", "data.bag_size=4", "model.backbone=test_resnet",
                 "model.head_kwargs={hidden_dim: 16}", "train.epochs=1", "train.max_train_batches=2",
                 "train.device=cpu", f"train.checkpoint_dir={tmp_path / 'ckpt'}",
                 "tracking.experiment=readme-flow", "tracking.registered_model_name=readme-flow-model"]
    demo = run_demo("configs/experiment/demo.yaml", overrides, ["ce", "focal"])
    candidate = MlflowClient().get_run(MlflowClient().get_run(demo.run_id).data.tags["losslab.candidate_run"])
    assert "test/balanced_accuracy_ci_low" in candidate.data.metrics
    # the registered model is scored on its own run's data settings (-o data.* would be refused)
    args = ["evaluate", "-c", "configs/experiment/demo.yaml", "--split", "test",
            "--model", "models:/readme-flow-model@candidate"]
    args += ["-o", "evaluate.tta.enabled=false", "-o", "evaluate.latency.enabled=false"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_id = result.output.split("evaluate run ")[1].split(":")[0]
    run = MlflowClient().get_run(run_id)
    n_test = int(run.data.params["evaluate.n_cases"])
    assert run.data.tags["losslab.eval_split"] == "test" and n_test > 0
    assert run.data.metrics["test/balanced_accuracy"] == pytest.approx(candidate.data.metrics["test/balanced_accuracy"])
