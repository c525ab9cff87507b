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
    cfg = make_config("cv.folds=[0, 1, 7]", "train.epochs=1", "train.max_train_batches=2", "train.device=cpu",
                      "train.monitor=val/loss", "train.monitor_mode=min", "tracking.registered_model_name=cv-model",
                      experiment="cv")
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
