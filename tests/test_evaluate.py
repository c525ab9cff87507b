"""evaluate: registered model / run / checkpoint sources, calibration on validation only, errors.

Real SQLite MLflow store (the session fixture), a real tiny train run, no mocks.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from losslab.config import load_config
from losslab.pipelines.evaluate import (
    CalibrationSettings,
    SourceNotFoundError,
    calibrated_metrics,
    calibration_summary,
    fit_calibrator,
    rsna_metrics,
    run_evaluate,
)
from losslab.pipelines.scoring import split_metrics
from losslab.pipelines.train import run_train
from losslab.tasks import get_task

FAST = {"tta": {"enabled": False}, "latency": {"enabled": False}}


@pytest.fixture(scope="module")
def trained(embedded_root, small_cache, mlflow_store, tmp_path_factory):
    """One tiny train run on fold 0, registered as ``test-model-<unique>@candidate``."""
    name = f"test-model-{uuid.uuid4().hex[:8]}"
    ckpt = tmp_path_factory.mktemp("eval-ckpt")
    cfg = load_config(None, [
        f"data.root={embedded_root}", f"data.cache_dir={small_cache.cache_dir}", "data.num_folds=3",
        "data.salt=test-salt", "data.bag_size=4", "data.batch_size=4", "model.backbone=test_resnet",
        "model.head_kwargs={hidden_dim: 16}", "train.epochs=2", "train.seed=0", f"train.checkpoint_dir={ckpt}",
        "tracking.experiment=evaluate-tests", f"tracking.registered_model_name={name}",
        "tracking.alias=candidate", "optim.lr=0.003", "loss.name=focal",
    ])
    result = run_train(cfg, info=small_cache)
    return cfg, name, result.folds[0]


def _eval_cfg(trained, **evaluate):
    cfg, _, _ = trained
    return cfg.model_copy(update={"evaluate": {**FAST, **evaluate}})


def _same_metrics(got: dict, logged: dict, prefix: str) -> list[str]:
    keys = [k for k in logged if k.startswith("best_val/")]
    assert len(keys) > 10
    bad = []
    for key in keys:
        mine = got[f"{prefix}/{key[len('best_val/'):]}"]
        if not (math.isclose(mine, logged[key], abs_tol=1e-6) or (math.isnan(mine) and math.isnan(logged[key]))):
            bad.append(f"{key}: {mine} != {logged[key]}")
    return bad


def test_registered_model_reproduces_the_train_runs_best_val_metrics(trained):
    cfg, name, fold = trained
    client = MlflowClient()
    logged = client.get_run(fold.run_id).data.metrics
    result = run_evaluate(_eval_cfg(trained, split="val", fold=0, tta={"passes": 1},
                                    latency={"warmup": 1, "repeats": 4}),
                          source=f"models:/{name}@candidate")
    assert _same_metrics(result.metrics, logged, "test") == []

    run = client.get_run(result.run_id)
    tags = run.data.tags
    assert tags["losslab.entry_point"] == "evaluate" and tags["losslab.loss"] == "focal"
    assert tags["losslab.source_model_name"] == name and tags["losslab.source_run_id"] == fold.run_id
    assert tags["losslab.source_model_version"] == fold.model_version and tags["losslab.eval_split"] == "val"
    assert tags["losslab.calibration_in_sample"] == "true"
    assert run.info.experiment_id == client.get_run(fold.run_id).info.experiment_id
    metrics = run.data.metrics
    for key in ("test/auc", "test_calibrated/balanced_accuracy", "test_tta/balanced_accuracy",
                "calibration/temperature", "calibration/threshold", "latency/p50_ms", "latency/p95_ms",
                "latency/throughput_per_s"):
        assert key in metrics, key
    assert 0 < metrics["latency/p50_ms"] <= metrics["latency/p95_ms"]
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"predictions.csv", "calibration.json", "evaluate_settings.json"} <= artifacts
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {f"plots/{p}.png" for p in ("roc", "precision_recall", "reliability", "confusion_matrix")} <= plots

    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="predictions.csv"))
    assert list(table.columns[:4]) == ["case_id", "patient_id", "label", "label_name"]
    assert {"prob_LGG", "prob_HGG", "prediction", "prediction_calibrated", "prediction_tta"} <= set(table.columns)
    n_val = int(run.data.params["evaluate.n_cases"])
    assert len(table) == n_val == metrics["test/pred_count_LGG"] + metrics["test/pred_count_HGG"]
    np.testing.assert_allclose(table[["prob_LGG", "prob_HGG"]].sum(axis=1), 1.0, atol=1e-5)
    recall_hgg = np.mean(table.loc[table.label_name == "HGG", "prediction"] == 1)
    assert math.isclose(recall_hgg, metrics["test/recall_HGG"], abs_tol=1e-9)


def test_run_id_and_checkpoint_sources_give_the_same_numbers(trained):
    cfg, _, fold = trained
    logged = MlflowClient().get_run(fold.run_id).data.metrics
    by_run = run_evaluate(_eval_cfg(trained, split="val", fold=0), source=fold.run_id)
    assert _same_metrics(by_run.metrics, logged, "test") == []
    checkpoint = Path(mlflow.artifacts.download_artifacts(run_id=fold.run_id, artifact_path="checkpoints/best.pt",
                                                          dst_path=str(Path(cfg.train.checkpoint_dir) / "copy")))
    by_file = run_evaluate(_eval_cfg(trained, split="val", fold=0), source=str(checkpoint))
    assert _same_metrics(by_file.metrics, logged, "test") == []
    assert MlflowClient().get_run(by_file.run_id).data.tags["losslab.source_checkpoint"] == str(checkpoint.resolve())


def _corrupted_copy(cache_dir: Path, target: Path, seed: int) -> Path:
    """The same cases with shuffled (and partly flipped) labels: arrays linked, index rewritten."""
    target.mkdir()
    (target / "arrays").symlink_to(Path(cache_dir) / "arrays")
    (target / "report.json").write_text((Path(cache_dir) / "report.json").read_text())
    index = pd.read_parquet(Path(cache_dir) / "index.parquet")
    rng = np.random.default_rng(seed)
    index["label"] = 1 - rng.permutation(index["label"].to_numpy())
    index.to_parquet(target / "index.parquet")
    return target


def test_calibration_never_looks_at_the_evaluated_labels(trained, small_cache, tmp_path):
    _, name, _ = trained
    source = f"models:/{name}@candidate"
    clean = run_evaluate(_eval_cfg(trained, split="cache", cache_dir=str(small_cache.cache_dir)), source=source)
    bad_cache = _corrupted_copy(small_cache.cache_dir, tmp_path / "corrupt", seed=1)
    corrupt = run_evaluate(_eval_cfg(trained, split="cache", cache_dir=str(bad_cache)), source=source)
    # the labels really changed the evaluated numbers ...
    assert clean.metrics["test/accuracy"] != corrupt.metrics["test/accuracy"]
    # ... but not what calibration fitted (validation of the source fold only)
    assert clean.calibrator.to_dict() == corrupt.calibrator.to_dict()
    logged = [json.loads(Path(mlflow.artifacts.download_artifacts(run_id=r.run_id, artifact_path="calibration.json"))
                         .read_text()) for r in (clean, corrupt)]
    assert logged[0] == logged[1] == clean.calibrator.to_dict()
    assert clean.tags["losslab.calibration_in_sample"] == "false"


def test_collapsed_model_shows_a_large_before_after_gap():
    """The seed audit's failure: AUC ~0.97 but every prediction in one class."""
    from losslab.losses import build_loss

    rng = np.random.default_rng(0)
    loss_fn = build_loss("ce", num_classes=2, class_counts=[80, 20])

    def outputs(n):
        y = (rng.random(n) < 0.25).astype(int)
        score = rng.normal(0, 1, n) + 2.7 * y - 8.0  # well ranked, always below 0: class 0 everywhere
        logits = np.stack([np.zeros(n), score], axis=1).astype(np.float32)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        return {"logits": logits, "probs": probs, "labels": y, "index": np.arange(n), "loss": 0.0}

    val, test = outputs(400), outputs(400)
    before = split_metrics(get_task("image_classification").step(None, loss_fn, ["neg", "pos"]), test, ["neg", "pos"],
                           loss_fn, "test")
    calibrator = fit_calibrator(val, 2, CalibrationSettings())
    after, _, _ = calibrated_metrics(calibrator, test, ["neg", "pos"], "test_calibrated", rsna=False)
    gaps = calibration_summary(calibrator, before, after)
    assert 0.95 < before["test/auc"] < 0.99 and before["test/dead_class_count"] == 1 and before["test/recall_pos"] == 0
    assert after["test_calibrated/dead_class_count"] == 0
    assert gaps["calibration/gain_balanced_accuracy"] > 0.3
    assert gaps["calibration/gain_min_class_recall"] > 0.6


def test_rsna_metric_for_three_ordinal_classes():
    from losslab.engine.metrics import rsna_weighted_log_loss
    from losslab.losses import build_loss

    loss_fn = build_loss("coral", num_classes=3, class_counts=[5, 3, 2])
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(10, 2)).astype(np.float32)
    import torch

    probs = loss_fn.probabilities(torch.as_tensor(logits)).numpy()
    labels = rng.integers(0, 3, 10)
    out = {"logits": logits, "probs": probs, "labels": labels, "index": np.arange(10), "loss": 0.0}
    metrics = rsna_metrics(out, "test", rsna=True)
    assert metrics["test/rsna_weighted_log_loss"] == pytest.approx(rsna_weighted_log_loss(labels, probs))
    w = np.array([1.0, 2.0, 4.0])[labels]
    p_true = np.clip(probs[np.arange(10), labels] / probs.sum(1), np.finfo(float).eps, 1 - np.finfo(float).eps)
    hand = -(w * np.log(p_true)).sum() / w.sum()
    assert metrics["test/rsna_weighted_log_loss"] == pytest.approx(hand, rel=1e-6)


@pytest.mark.parametrize("source, message", [
    ("models:/no-such-model-xyz@candidate", "registered model 'no-such-model-xyz' not found"),
    ("{name}@no_such_alias", "alias 'no_such_alias' of registered model '{name}' not found"),
    ("{name}/999", "version 999 of registered model '{name}' not found"),
    ("0123456789abcdef0123456789abcdef", "run 0123456789abcdef0123456789abcdef not found"),
    ("/nonexistent/best.pt", "checkpoint file /nonexistent/best.pt not found"),
])
def test_missing_sources_are_clear_errors(trained, source, message):
    _, name, _ = trained
    source = source.replace("{name}", f"models:/{name}")
    with pytest.raises(SourceNotFoundError) as info:
        run_evaluate(_eval_cfg(trained), source=source)
    assert message.replace("{name}", name) in str(info.value)


def test_bad_source_settings_and_a_missing_test_split_are_clear_errors(trained):
    with pytest.raises(ValueError, match="not a models:/ URI, a run id or an existing checkpoint file"):
        run_evaluate(_eval_cfg(trained), source="not-a-thing")
    with pytest.raises(ValueError, match=r"evaluate\.splitt"):
        run_evaluate(_eval_cfg(trained, splitt="val"), source="x")
    _, name, _ = trained
    with pytest.raises(ValueError, match="no held-out test split"):
        run_evaluate(_eval_cfg(trained, split="test"), source=f"models:/{name}@candidate")


def test_cli_evaluate_names_a_missing_alias(trained):
    from typer.testing import CliRunner

    from losslab.cli import app

    _, name, _ = trained
    result = CliRunner().invoke(app, ["evaluate", "--model", f"models:/{name}@nope"])
    assert result.exit_code == 2 and f"alias 'nope' of registered model '{name}' not found" in result.output


def _kaggle_rsna_score(frame: "pd.DataFrame") -> float:
    """The competition's scorer as published (Kaggle, rsna-lumbar-metric), written with pandas
    groupby and scikit-learn on one-hot targets: a second code path for rsna_competition_score."""
    import pandas as pd
    from sklearn.metrics import log_loss

    levels = ["normal_mild", "moderate", "severe"]
    solution = pd.get_dummies(frame["label"]).reindex(columns=[0, 1, 2], fill_value=0).set_axis(levels, axis=1)
    solution = solution.astype(int).assign(study_id=frame["study"].to_numpy(), condition=frame["group"].to_numpy())
    solution["sample_weight"] = frame["label"].map({0: 1, 1: 2, 2: 4}).to_numpy()
    submission = pd.DataFrame(frame[["p0", "p1", "p2"]].to_numpy(), columns=levels)
    submission = submission.div(submission.sum(axis=1), axis=0)
    losses, weights = [], []
    for condition in ["spinal", "foraminal", "subarticular"]:
        idx = solution.index[solution["condition"] == condition]
        if len(idx):
            losses.append(log_loss(solution.loc[idx, levels].to_numpy(), submission.loc[idx, levels].to_numpy(),
                                   sample_weight=solution.loc[idx, "sample_weight"].to_numpy()))
            weights.append(1)
    spinal = solution["condition"] == "spinal"
    labels = solution[spinal].groupby("study_id")["severe"].max()
    sample_weight = solution[spinal].groupby("study_id")["sample_weight"].max()
    preds = submission[spinal.to_numpy()].assign(study_id=solution.loc[spinal, "study_id"].to_numpy()) \
        .groupby("study_id")["severe"].max()
    losses.append(log_loss(labels, preds.loc[labels.index], sample_weight=sample_weight, labels=[0, 1]))
    weights.append(1)
    return float(np.average(losses, weights=weights))


def test_rsna_competition_score_by_hand_and_by_the_published_scorer():
    """A hand-worked value (5 spinal rows, 2 studies), then random rows of three conditions in a
    shuffled evaluation order against the scorer rewritten with pandas + scikit-learn; the rows reach
    rsna_metrics the way evaluate passes them (index rows with patient_id and a JSON meta)."""
    import json

    import pandas as pd

    from losslab.engine.metrics import rsna_competition_score
    from losslab.pipelines.evaluate import rsna_cases

    y = np.array([0, 1, 2, 0, 0])
    p = np.array([[.7, .2, .1], [.3, .4, .3], [.2, .3, .5], [.9, .05, .05], [.6, .3, .1]])
    got = rsna_competition_score(y, p, ["a"] * 3 + ["b"] * 2, ["spinal_canal_stenosis"] * 5)
    any_severe = (4 * -np.log(0.5) + 1 * -np.log(0.9)) / 5  # study a: severe, max p 0.5, weight 4; b: max p 0.1
    spinal = -(np.log(.7) + 2 * np.log(.4) + 4 * np.log(.5) + np.log(.9) + np.log(.6)) / 9
    assert got["rsna_any_severe_spinal_log_loss"] == pytest.approx(any_severe, rel=1e-9)
    assert got["rsna_score"] == pytest.approx((spinal + any_severe) / 2, rel=1e-9)

    rng = np.random.default_rng(7)
    n = 60
    conditions = rng.choice(["spinal_canal_stenosis", "left_neural_foraminal_narrowing",
                             "right_subarticular_stenosis"], n)
    rows = pd.DataFrame({"patient_id": rng.choice([f"s{i}" for i in range(8)], n),
                         "meta": [json.dumps({"condition": c, "level": 0}) for c in conditions]})
    labels, probs = rng.integers(0, 3, n), rng.dirichlet([1, 1, 1], n)
    order = rng.permutation(n)  # outputs come in loader order; "index" points into the rows
    outputs = {"labels": labels[order], "probs": probs[order], "index": order}
    metrics = rsna_metrics(outputs, "test", rsna=True, cases=rsna_cases(rows))
    frame = pd.DataFrame({"label": labels, "study": rows["patient_id"], "p0": probs[:, 0], "p1": probs[:, 1],
                          "p2": probs[:, 2], "group": [c.split("_")[0] if c.startswith("spinal") else
                                                      ("foraminal" if "foraminal" in c else "subarticular")
                                                      for c in conditions]})
    assert metrics["test/rsna_score"] == pytest.approx(_kaggle_rsna_score(frame), rel=1e-9)
    assert "test/rsna_weighted_log_loss" in metrics
    assert set(rsna_metrics(outputs, "test", rsna=True)) == {"test/rsna_weighted_log_loss"}  # no rows: no score
