"""compare: numbers equal a hand computation over runs created directly with mlflow (no training)."""

from __future__ import annotations

import math
import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from losslab.pipelines.compare import MISSING, ExperimentNotFoundError, format_mean_std, run_compare

CLASSES = ["normal_mild", "moderate", "severe"]

# loss -> one dict of best_val metrics per fold; focal's fold 2 did not log f1_macro
FOLDS = {
    "ce": [
        {"balanced_accuracy": 0.60, "f1_macro": 0.55, "auc": 0.80, "recall_normal_mild": 0.9,
         "recall_moderate": 0.5, "recall_severe": 0.4, "min_class_recall": 0.4, "dead_class_count": 0},
        {"balanced_accuracy": 0.50, "f1_macro": 0.45, "auc": 0.70, "recall_normal_mild": 1.0,
         "recall_moderate": 0.5, "recall_severe": 0.0, "min_class_recall": 0.0, "dead_class_count": 1},
        {"balanced_accuracy": 0.70, "f1_macro": 0.65, "auc": 0.90, "recall_normal_mild": 0.8,
         "recall_moderate": 0.7, "recall_severe": 0.6, "min_class_recall": 0.6, "dead_class_count": 0},
    ],
    "focal": [
        {"balanced_accuracy": 0.75, "f1_macro": 0.70, "auc": 0.85, "recall_normal_mild": 0.7,
         "recall_moderate": 0.8, "recall_severe": 0.75, "min_class_recall": 0.7, "dead_class_count": 0},
        {"balanced_accuracy": 0.65, "auc": 0.75, "recall_normal_mild": 0.6,
         "recall_moderate": 0.6, "recall_severe": 0.75, "min_class_recall": 0.6, "dead_class_count": 0},
    ],
    # a loss whose only run never logged balanced accuracy: missing, ranked last, never 0
    "ldam": [
        {"f1_macro": 0.30, "auc": 0.60, "recall_normal_mild": 1.0, "recall_moderate": 0.0,
         "recall_severe": 0.0, "min_class_recall": 0.0, "dead_class_count": 2},
    ],
}


def _run(name, tags, metrics=None, status="FINISHED"):
    with mlflow.start_run(run_name=name, tags=tags) as run:
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    if status != "FINISHED":
        MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def experiment(mlflow_store):
    name = f"compare-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(name)
    for loss, folds in FOLDS.items():
        for fold, metrics in enumerate(folds):
            _run(f"{loss}-f{fold}", {"losslab.entry_point": "train", "losslab.loss": loss, "losslab.fold": str(fold),
                                      "losslab.class_names": ",".join(CLASSES)},
                 {f"best_val/{k}": v for k, v in metrics.items()} | {"val/balanced_accuracy": 0.01})
    # not inputs: a CV parent (its fold tag lists the folds), a failed fold, evaluate runs only give latency
    _run("ce-cv", {"losslab.entry_point": "train", "losslab.loss": "ce", "losslab.cv": "true",
                   "losslab.fold": "0,1,2"}, {"best_val/balanced_accuracy": 0.0})
    _run("ce-f9", {"losslab.entry_point": "train", "losslab.loss": "ce", "losslab.fold": "9"},
         {"best_val/balanced_accuracy": 0.0}, status="FAILED")
    for p50 in (10.0, 14.0):
        _run("eval-ce", {"losslab.entry_point": "evaluate", "losslab.loss": "ce", "losslab.fold": "0"},
             {"latency/p50_ms": p50, "latency/p95_ms": p50 + 5, "test/balanced_accuracy": 0.0})
    mlflow.end_run()
    return name


def test_compare_equals_a_hand_computation(experiment):
    result = run_compare(experiment)
    table = result.table
    assert list(table.index) == ["focal", "ce", "ldam"]  # ranked by balanced accuracy
    for loss, folds in FOLDS.items():
        row = table.loc[loss]
        assert row["n_runs"] == len(folds)
        for metric in ("balanced_accuracy", "f1_macro", "auc", "min_class_recall", "dead_class_count",
                       "recall_severe"):
            values = [f[metric] for f in folds if metric in f]
            mean = sum(values) / len(values) if values else math.nan
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
            assert row[f"{metric}_n"] == len(values)
            for got, want in ((row[f"{metric}_mean"], mean), (row[f"{metric}_std"], std)):
                assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12), (loss, metric)
    assert table.loc["ce", "latency_p50_ms"] == pytest.approx(12.0)
    assert table.loc["ce", "latency_p95_ms"] == pytest.approx(17.0)
    assert math.isnan(table.loc["focal", "latency_p50_ms"])  # no evaluate run: missing
    assert table["rank"].tolist()[:2] == [1, 2] and math.isnan(table.loc["ldam", "rank"])

    # missing is shown as missing, never as 0
    display = result.display
    assert display.loc["ldam", "balanced_accuracy"] == MISSING
    assert math.isnan(table.loc["ldam", "balanced_accuracy_mean"])
    assert display.loc["focal", "f1_macro"] == "0.700 (1/2)"
    assert display.loc["ce", "balanced_accuracy"] == "0.600 ± 0.100"
    assert display.loc["focal", "latency_p50_ms"] == MISSING and display.loc["ce", "latency_p50_ms"] == "12.00"

    # per-run values: NaN for the missing metric, not 0
    runs = result.runs
    assert len(runs) == 6
    focal_f1 = runs[runs["losslab.loss"] == "focal"]["f1_macro"].tolist()
    assert focal_f1[0] == pytest.approx(0.70) or focal_f1[1] == pytest.approx(0.70)
    assert sum(math.isnan(v) for v in focal_f1) == 1

    # logged as a compare run's artifacts; CSV keeps NaN, markdown shows "—"
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.tags["losslab.entry_point"] == "compare"
    paths = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"comparison.csv", "comparison.md", "runs.csv"} <= paths
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {"plots/metric_bars_balanced_accuracy.png", "plots/recall_heatmap.png"} <= plots
    csv = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="comparison.csv"))
    assert np.isnan(csv.set_index("losslab.loss").loc["ldam", "balanced_accuracy_mean"])
    md = open(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="comparison.md")).read()
    assert MISSING in md and "0.600 ± 0.100" in md

    # a second comparison does not read the first one back
    again = run_compare(experiment, log_run=False)
    assert len(again.runs) == 6
    pd.testing.assert_frame_equal(again.table, table)


def test_compare_chosen_metric_group_by_and_filter(experiment):
    result = run_compare(experiment, metrics=["auc"], filter_string="tags.`losslab.loss` != 'ldam'", log_run=False)
    assert list(result.table.index) == ["ce", "focal"]
    assert result.table.loc["focal", "auc_mean"] == pytest.approx(0.80)
    by_fold = run_compare(experiment, metrics=["best_val/auc"], group_by="tags.losslab.fold", log_run=False)
    assert by_fold.table.loc["0", "auc_mean"] == pytest.approx((0.80 + 0.85 + 0.60) / 3)
    assert by_fold.table.loc["2", "n_runs"] == 1


def test_missing_experiment_is_a_clear_error(mlflow_store):
    with pytest.raises(ExperimentNotFoundError, match="experiment 'no-such-experiment-xyz' not found"):
        run_compare("no-such-experiment-xyz")


def test_format_mean_std():
    assert format_mean_std(float("nan"), float("nan"), 0, 3) == MISSING
    assert format_mean_std(0.5, float("nan"), 1, 1) == "0.500"
    assert format_mean_std(0.5, 0.25, 2, 3) == "0.500 ± 0.250 (2/3)"


def test_cli_compare_prints_the_table_and_names_a_missing_experiment(experiment):
    from typer.testing import CliRunner

    from losslab.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["compare", "--experiment", experiment, "--metric", "auc", "--no-log"])
    assert result.exit_code == 0, result.output
    assert "0.800 ± 0.100" in result.output and "focal" in result.output
    missing = runner.invoke(app, ["compare", "--experiment", "no-such-experiment-xyz"])
    assert missing.exit_code == 2 and "no-such-experiment-xyz" in missing.output


def test_dead_classes_in_the_table_come_from_the_prediction_counts(mlflow_store):
    """A run's dead classes are counted from its ``best_val/pred_count_*`` (the one rule of
    :func:`losslab.engine.metrics.dead_class_names`), also where it logged no dead_class_count."""
    name = f"compare-dead-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(name)
    counts = [(10, 0, 0), (4, 3, 3), (0, 9, 1)]  # dead: 2, 0, 1 -> mean 1.0, std 1.0
    for fold, fold_counts in enumerate(counts):
        _run(f"ce-f{fold}", {"losslab.entry_point": "train", "losslab.loss": "ce", "losslab.fold": str(fold),
                             "losslab.class_names": ",".join(CLASSES)},
             {"best_val/balanced_accuracy": 0.5} | {f"best_val/pred_count_{c}": n for c, n in zip(CLASSES, fold_counts)})
    mlflow.end_run()
    result = run_compare(name)
    assert result.runs.sort_values("fold")["dead_class_count"].tolist() == [2.0, 0.0, 1.0]
    assert result.table.loc["ce", "dead_class_count_mean"] == pytest.approx(1.0)
    assert result.table.loc["ce", "dead_class_count_std"] == pytest.approx(1.0)
