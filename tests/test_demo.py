"""The main job on the tiny cohort: each loss on k folds as child runs of the main run, the comparison
and paired statistics logged to the main run, the doctor run on every fold run, the candidate alias."""

from __future__ import annotations

import math
import uuid

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats as sps

from losslab.config import ConfigError


def _overrides(embedded_root, small_cache, tmp_path, experiment):
    return [f"data.root={embedded_root}", f"data.cache_dir={small_cache.cache_dir}", "data.num_folds=3",
            "data.salt=test-salt", "data.bag_size=4", "data.batch_size=4", "model.backbone=test_resnet",
            "model.head_kwargs={hidden_dim: 16}", "train.epochs=1", f"train.checkpoint_dir={tmp_path / 'ckpt'}",
            f"tracking.experiment={experiment}", "tracking.registered_model_name=test-demo-model", "optim.lr=0.003"]


@pytest.mark.slow
def test_main_job_compares_over_folds_and_logs_to_its_own_run(embedded_root, small_cache, tmp_path, mlflow_store,
                                                              capsys):
    from losslab.pipelines.demo import run_demo

    experiment = f"demo-{uuid.uuid4().hex[:8]}"
    overrides = _overrides(embedded_root, small_cache, tmp_path, experiment)
    result = run_demo(None, overrides, ["ce", "focal"], folds=2)
    client = MlflowClient()
    main = client.get_run(result.run_id)
    children = client.search_runs([main.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    folds = [r for r in children if r.data.tags.get("losslab.entry_point") == "train"]
    assert sorted((r.data.tags["losslab.loss"], r.data.tags["losslab.fold"]) for r in folds) == \
        [("ce", "0"), ("ce", "1"), ("focal", "0"), ("focal", "1")]

    # the main run holds the table and the statistics, equal to the fold runs' own numbers
    paths = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"comparison.csv", "comparison_stats.csv", "comparison.md"} <= paths
    values = {(r.data.tags["losslab.loss"], r.data.tags["losslab.fold"]): r.data.metrics["best_val/balanced_accuracy"]
              for r in folds}
    for loss in ("ce", "focal"):
        mean = (values[(loss, "0")] + values[(loss, "1")]) / 2
        assert main.data.metrics[f"compare/{loss}/balanced_accuracy_mean"] == pytest.approx(mean)
    stats = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="comparison_stats.csv"))
    row = stats[(stats["metric"] == "balanced_accuracy") & (stats["test"] == "nadeau_bengio_t")].iloc[0]
    d = [values[(row["group_a"], f)] - values[(row["group_b"], f)] for f in ("0", "1")]
    n_val = float(folds[0].data.params["data.n_val"]) / float(folds[0].data.params["data.n_train"])
    if d[0] != d[1]:
        t = (sum(d) / 2) / math.sqrt((1 / 2 + n_val) * pd.Series(d).var(ddof=1))
        assert row["p_value"] == pytest.approx(2 * sps.t.sf(abs(t), 1))
    assert main.data.tags["losslab.verdict.balanced_accuracy"].startswith(f"{row['group_a']} − {row['group_b']}")

    # the doctor looked at every fold run; the candidate alias points at a fold run of the best loss
    assert set(result.alarms) == {r.info.run_id for r in folds}
    assert all("losslab.doctor" in client.get_run(r.info.run_id).data.tags for r in folds)
    assert main.data.tags["losslab.doctor"] == (",".join(sorted({a for v in result.alarms.values() for a in v}))
                                                or "healthy")
    version = client.get_model_version_by_alias("test-demo-model", "candidate")
    assert version.run_id == main.data.tags["losslab.candidate_run"]
    assert client.get_run(version.run_id).data.tags["losslab.loss"] == result.comparison.table.index[0]
    out = capsys.readouterr().out
    assert "Verdict on balanced_accuracy" in out and f"main run {result.run_id}" in out
    # captured output is no terminal: the table is printed whole, every cell as computed
    for value in result.comparison.display.to_numpy().ravel():
        assert str(value) in out
    assert "…" not in out


def test_main_refuses_more_folds_than_the_cache_has(embedded_root, small_cache, tmp_path, mlflow_store):
    from losslab.pipelines.demo import run_demo

    overrides = _overrides(embedded_root, small_cache, tmp_path, "demo-refused")
    with pytest.raises(ConfigError, match=r"--folds 4: needs 2 <= folds <= data.num_folds \(3\)"):
        run_demo(None, overrides, ["ce"], folds=4)
