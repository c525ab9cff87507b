"""k-fold cross-validation: one parent run, one child per fold, a failing fold FAILED on its own,
mean ± std on the parent, a per-fold table, registered versions per fold and the champion alias."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from losslab.pipelines.train import run_train


def test_cv_parent_children_failing_fold_summary_and_champion(make_config, small_cache):
    # fold 7 does not exist in a 3-fold cache: that child fails while folds 0 and 1 finish
    cfg = make_config("cv.folds=[0, 1]", "train.epochs=1", "train.max_train_batches=2", "train.device=cpu",
                      "train.monitor=val/loss", "train.monitor_mode=min", "tracking.registered_model_name=cv-model",
                      experiment="cv")
    cfg.cv.folds = [0, 1, 7]  # load_config refuses fold 7 of 3; set here to exercise a fold that fails at run time
    result = run_train(cfg, info=small_cache)
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags["losslab.loss"] == "ce" and tags["losslab.dataset"] == "brats" and tags["losslab.fold"] == "0,1,7"
    assert tags["losslab.failed_folds"] == "7"
    assert "data.fold=7 has no cases" in tags["losslab.fold_7_error"]

    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_fold = {int(r.data.tags["losslab.fold"]): r for r in children}
    assert sorted(by_fold) == [0, 1, 7]
    assert by_fold[7].info.status == "FAILED" and "has no cases" in by_fold[7].data.tags["losslab.error"]
    assert {by_fold[f].info.status for f in (0, 1)} == {"FINISHED"}
    assert by_fold[0].info.run_name == "ce-f0" and by_fold[1].info.run_name == "ce-f1"
    assert {r.fold: r.run_id for r in result.folds} == {f: by_fold[f].info.run_id for f in (0, 1, 7)}

    # mean ± std over the finished folds of every validation metric
    for key in ("loss", "balanced_accuracy", "min_class_recall"):
        values = np.array([by_fold[f].data.metrics[f"best_val/{key}"] for f in (0, 1)])
        assert parent.data.metrics[f"cv/{key}_mean"] == pytest.approx(values.mean())
        assert parent.data.metrics[f"cv/{key}_std"] == pytest.approx(values.std(ddof=1))

    # the per-fold table, as CSV and markdown
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"cv_folds.csv", "cv_folds.md", "config.yaml"} <= artifacts
    import mlflow

    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/cv_folds.csv")))
    assert table.set_index("fold")["status"].to_dict() == {0: "FINISHED", 1: "FINISHED", 7: "FAILED"}
    assert table.set_index("fold").loc[1, "val/loss"] == pytest.approx(by_fold[1].data.metrics["best_val/loss"])

    # one registered version per finished fold, tagged with its fold; champion = lowest val/loss
    versions = client.search_model_versions("name='cv-model'")
    assert sorted((v.tags["fold"], v.run_id) for v in versions) == sorted(
        (str(f), by_fold[f].info.run_id) for f in (0, 1))
    best_fold = min((0, 1), key=lambda f: by_fold[f].data.metrics["best_val/loss"])
    champion = client.get_model_version_by_alias("cv-model", "champion")
    assert champion.tags["fold"] == str(best_fold) and champion.run_id == by_fold[best_fold].info.run_id
    assert tags["losslab.champion_fold"] == str(best_fold)


def test_each_fold_run_records_its_fold_and_evaluate_scores_that_fold(make_config, small_cache):
    """Every child of a 3-fold CV records its own data.fold (params and config.yaml); evaluate takes
    the fold from the registered model's run, reproduces that run's best_val/* and refuses a fold the
    model trained on."""
    import math

    import mlflow
    import yaml

    from losslab.pipelines.evaluate import run_evaluate

    cfg = make_config("cv.folds=3", "train.epochs=1", "train.max_train_batches=2", "train.device=cpu",
                      "tracking.registered_model_name=cv-fold-model", experiment="cv-folds")
    result = run_train(cfg, info=small_cache)
    client = MlflowClient()
    for fold_result in result.folds:
        run = client.get_run(fold_result.run_id)
        assert run.data.params["data.fold"] == str(fold_result.fold) == run.data.tags["losslab.fold"]
        logged = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{fold_result.run_id}/config.yaml"))
        assert logged["data"]["fold"] == fold_result.fold and logged["cv"]["folds"] is None
    fold2 = next(r for r in result.folds if r.fold == 2)
    fast = {"tta": {"enabled": False}, "latency": {"enabled": False}, "intervals": {"n_resamples": 20}}
    evaluated = run_evaluate(cfg.model_copy(update={"evaluate": {**fast, "split": "val"}}),
                             source=f"models:/cv-fold-model/{fold2.model_version}")
    logged = client.get_run(fold2.run_id).data.metrics
    keys = [k for k in logged if k.startswith("best_val/")]
    assert len(keys) > 10
    for key in keys:
        mine = evaluated.metrics[f"test/{key[len('best_val/'):]}"]
        assert math.isclose(mine, logged[key], abs_tol=1e-6) or (math.isnan(mine) and math.isnan(logged[key])), key
    n_fold2 = int((small_cache.index["fold"] == 2).sum())
    assert int(client.get_run(evaluated.run_id).data.params["evaluate.n_cases"]) == n_fold2
    assert evaluated.tags["losslab.source_fold"] == "2"
    # fold 0 was in fold 2's training set: neither scored nor used for calibration
    for split in ("val", "cache"):
        with pytest.raises(ValueError, match=r"evaluate.fold=0: the model trained on fold 0 \(its validation fold is 2\)"):
            run_evaluate(cfg.model_copy(update={"evaluate": {**fast, "split": split, "fold": 0, **(
                {"cache_dir": str(small_cache.cache_dir)} if split == "cache" else {})}}),
                         source=f"models:/cv-fold-model/{fold2.model_version}")


def test_repeats_run_seeds_times_folds_under_one_parent(make_config, small_cache):
    cfg = make_config("cv.folds=[0, 1]", "cv.repeats=2", "train.seed=5", "train.epochs=1", "train.max_train_batches=2",
                      "train.device=cpu", "tracking.log_model=false", experiment="cv-repeats")
    result = run_train(cfg, info=small_cache)
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["losslab.seed"] == "5,6" and parent.data.tags["losslab.fold"] == "0,1"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    pairs = sorted((int(r.data.tags["losslab.seed"]), int(r.data.tags["losslab.fold"])) for r in children)
    assert pairs == [(5, 0), (5, 1), (6, 0), (6, 1)]
    for r in children:
        assert r.data.params["train.seed"] == r.data.tags["losslab.seed"]
        assert r.data.params["data.fold"] == r.data.tags["losslab.fold"]
        assert r.info.run_name == f"ce-f{r.data.tags['losslab.fold']}-s{r.data.tags['losslab.seed']}"
    # different seeds give different models on the same fold
    by_pair = {(int(r.data.tags["losslab.seed"]), int(r.data.tags["losslab.fold"])): r for r in children}
    assert by_pair[(5, 0)].data.metrics["best_val/loss"] != by_pair[(6, 0)].data.metrics["best_val/loss"]
    values = np.array([r.data.metrics["best_val/loss"] for r in children])
    assert parent.data.metrics["cv/n_runs"] == 4
    assert parent.data.metrics["cv/loss_mean"] == pytest.approx(values.mean())
    assert parent.data.metrics["cv/loss_std"] == pytest.approx(values.std(ddof=1))
    import mlflow

    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/cv_folds.csv")))
    assert sorted(zip(table["seed"], table["fold"])) == pairs


def test_repeat_settings_are_checked_at_load_time(make_config):
    from losslab.config import ConfigError

    with pytest.raises(ConfigError, match="cv.repeats=3 and cv.seeds"):
        make_config("cv.repeats=3", "cv.seeds=[1, 2]")
    with pytest.raises(ConfigError, match="distinct seeds"):
        make_config("cv.seeds=[1, 1]")
    assert make_config("cv.seeds=[4]").cv.is_multi_run


def test_a_child_logged_with_the_parents_fold_is_read_by_its_tag(make_config, caplog):
    """Runs logged before each child recorded its own fold have data.fold=0 in config.yaml but the
    right losslab.fold tag: evaluate uses the tag and says so."""
    import mlflow

    from losslab.pipelines.scoring import with_run_fold as _with_run_fold

    cfg = make_config(experiment="cv-old-runs")
    mlflow.set_experiment("cv-old-runs")
    with mlflow.start_run(tags={"losslab.fold": "2"}) as run:
        pass
    with caplog.at_level("WARNING"):
        fixed = _with_run_fold(MlflowClient().get_run(run.info.run_id), cfg)
    assert cfg.data.fold == 0 and fixed.data.fold == 2
    assert any("config.yaml says data.fold=0 but the run validated on fold 2" in r.getMessage() for r in caplog.records)
    with mlflow.start_run(tags={"losslab.fold": "0,1,2"}) as parent:
        pass
    assert _with_run_fold(MlflowClient().get_run(parent.info.run_id), cfg) is cfg
