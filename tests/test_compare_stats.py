"""compare, like with like and paired statistics, on an MLflow store of fold runs with known numbers
(created directly with mlflow, no training): focal is better than ce and ldam on every (seed, fold)
by 0.15; ce and ldam are equal up to noise; one ce run was trained for 2 epochs instead of 6 and one
focal run used another gamma: neither may be pooled."""

from __future__ import annotations

import math
import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats as sps
from statsmodels.stats.power import TTestPower

from losslab.pipelines.compare import run_compare

SEEDS, FOLDS = (0, 1), (0, 1, 2)
BLOCKS = [(s, f) for s in SEEDS for f in FOLDS]
BASE = np.array([0.60, 0.55, 0.66, 0.58, 0.62, 0.57])  # per block: the folds differ a lot
NOISE = np.random.default_rng(7).normal(0, 0.004, size=(3, len(BLOCKS)))
VALUES = {"focal": BASE + 0.15 + NOISE[0], "ce": BASE + NOISE[1], "ldam": BASE + NOISE[2]}
RATIO = 15 / 60  # data.n_val / data.n_train


def _params(loss: str, seed: int, fold: int, **changes) -> dict[str, str]:
    params = {"loss.name": loss, "train.epochs": "6", "optim.lr": "0.001", "data.sampler": "none",
              "data.fold": str(fold), "train.seed": str(seed), "data.n_train": "60", "data.n_val": "15",
              "tracking.run_name": "None", "train.checkpoint_dir": f"/tmp/ckpt/{uuid.uuid4().hex}"}
    if loss == "focal":
        params["loss.gamma"] = "2.0"
    return params | {k.replace("__", "."): str(v) for k, v in changes.items()}


def _run(loss: str, seed: int, fold: int, value: float, **changes) -> str:
    tags = {"losslab.entry_point": "train", "losslab.loss": loss, "losslab.fold": str(fold), "losslab.seed": str(seed)}
    with mlflow.start_run(run_name=f"{loss}-f{fold}", tags=tags) as run:
        mlflow.log_params(_params(loss, seed, fold, **changes))
        mlflow.log_metrics({"best_val/balanced_accuracy": float(value), "best_val/auc": float(value) + 0.1})
    return run.info.run_id


@pytest.fixture(scope="module")
def store(mlflow_store):
    name = f"compare-stats-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(name)
    for loss, values in VALUES.items():
        for (seed, fold), value in zip(BLOCKS, values):
            _run(loss, seed, fold, value)
    odd = {"epochs": _run("ce", 0, 0, 0.99, train__epochs=2), "gamma": _run("focal", 0, 1, 0.10, loss__gamma=1.0)}
    single = _run("poly", 0, 0, 0.70)  # a group with one run
    mlflow.end_run()
    return name, odd, single


def _nb_p(d: np.ndarray) -> float:
    t = d.mean() / math.sqrt((1 / len(d) + RATIO) * d.var(ddof=1))
    return float(2 * sps.t.sf(abs(t), len(d) - 1))


def test_verdicts_p_values_and_pooling(store):
    name, odd, single = store
    result = run_compare(name, metrics=["balanced_accuracy", "auc"])
    table, display = result.table, result.display

    # n per group; the one-run group shows its n and no ±; the odd runs are not pooled
    assert table.loc["focal", "n_runs"] == 6 and table.loc["ce", "n_runs"] == 6 and table.loc["poly", "n_runs"] == 1
    assert display.loc["ce", "runs"] == "6" and display.loc["poly", "runs"] == "1"
    assert display.loc["poly", "balanced_accuracy"] == "0.700" and "±" in display.loc["ce", "balanced_accuracy"]
    assert table.loc["ce", "balanced_accuracy_mean"] == pytest.approx(VALUES["ce"].mean())
    assert set(result.runs["run_id"]).isdisjoint(odd.values())
    odd_rows = result.odd_runs.set_index("run_id")
    assert odd_rows.loc[odd["epochs"], "differs"] == "train.epochs: 2 ≠ 6"
    assert odd_rows.loc[odd["gamma"], "differs"] == "loss.gamma: 1.0 ≠ 2.0"
    assert odd_rows.loc[odd["gamma"], "group"] == "focal"

    rows = result.stats[result.stats["metric"] == "balanced_accuracy"].set_index(["test", "group_a", "group_b"])
    assert ("nadeau_bengio_t", "focal", "ce") in rows.index  # pairs run best first
    for a, b in (("focal", "ce"), ("focal", "ldam"), ("ce", "ldam")):
        if ("nadeau_bengio_t", a, b) not in rows.index:
            a, b = b, a
        d = VALUES[a] - VALUES[b]
        nb, wx = rows.loc[("nadeau_bengio_t", a, b)], rows.loc[("wilcoxon", a, b)]
        assert nb["n_pairs"] == 6 and nb["mean_diff"] == pytest.approx(d.mean())
        assert nb["p_value"] == pytest.approx(_nb_p(d))
        assert wx["p_value"] == pytest.approx(sps.wilcoxon(VALUES[a], VALUES[b]).pvalue)
        assert nb["ci_low"] <= d.mean() <= nb["ci_high"]
    assert rows.loc[("nadeau_bengio_t", "focal", "ce"), "verdict"] == "focal better"
    # exact Wilcoxon with 6 pairs all one way: p = 2/2^6; after Holm over 3 pairs (0.094) not significant
    assert rows.loc[("wilcoxon", "focal", "ldam"), "p_value"] == pytest.approx(2 / 64)
    assert rows.loc[("wilcoxon", "focal", "ldam"), "verdict"] == "no detectable difference"
    ce_ldam = rows[[("ce" in k and "ldam" in k) for k in rows.index]]
    assert len(ce_ldam) == 2 and (ce_ldam["verdict"] == "no detectable difference").all()
    assert (rows[[("poly" in k) for k in rows.index]]["verdict"] == "too few pairs").all()
    # Holm over the 6 pairs of the NB family (4 groups), by hand
    family = result.stats[(result.stats["metric"] == "balanced_accuracy") & (result.stats["test"] == "nadeau_bengio_t")]
    p = family["p_value"].to_numpy()
    finite = np.isfinite(p)
    m = finite.sum()
    order = np.argsort(p[finite])
    by_hand = np.minimum(1, np.maximum.accumulate(p[finite][order] * (m - np.arange(m))))
    assert family["p_holm"].to_numpy()[finite][order] == pytest.approx(by_hand)
    # three groups with >= 2 runs: a critical-difference diagram
    assert set(result.critical["balanced_accuracy"].ranks.index) == {"focal", "ce", "ldam"}

    client = MlflowClient()
    csv = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="comparison_stats.csv"))
    assert list(csv.columns) == ["metric", "group_a", "group_b", "n_pairs", "mean_diff", "ci_low", "ci_high",
                                 "p_value", "p_holm", "test", "verdict", "mde", "n_needed"]
    # power of ce − ldam by hand: statsmodels' one-sample power with the effect size shrunk by sqrt(1 + n r)
    ce_ldam_row = csv[(csv["group_a"] == "ce") & (csv["group_b"] == "ldam") & (csv["test"] == "nadeau_bengio_t")].iloc[0]
    d = VALUES["ce"] - VALUES["ldam"]
    n, spread = len(d), d.std(ddof=1)
    effect = TTestPower().solve_power(effect_size=None, nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    assert ce_ldam_row["mde"] == pytest.approx(effect * spread * math.sqrt(1 + n * RATIO), rel=1e-4)
    floor = (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * spread * math.sqrt(RATIO)
    assert (ce_ldam_row["n_needed"] == math.inf) == (abs(d.mean()) <= floor)
    assert len(csv) == len(result.stats)
    md = open(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="comparison.md")).read()
    assert "focal better" in md and "already decided" in md and "Not pooled (2 run(s)" in md and "train.epochs: 2 ≠ 6" in md
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert "plots/critical_difference_balanced_accuracy.png" in plots


def test_group_by_a_param(store):
    name, odd, _ = store
    result = run_compare(name, metrics=["balanced_accuracy"], group_by="loss.gamma", log_run=False)
    # only focal runs share everything but loss.gamma: gamma 2.0 (6 runs) against gamma 1.0 (1 run)
    assert result.table["n_runs"].to_dict() == {"2.0": 6, "1.0": 1}
    assert result.table.index.name == "loss.gamma"
    assert len(result.odd_runs) == 6 + 6 + 1 + 1  # ce, ldam, the 2-epoch ce run, poly
    assert (result.stats["verdict"] == "too few pairs").all()


def test_cli_prints_the_verdicts_and_refuses_an_unknown_group_by(store):
    from typer.testing import CliRunner

    from losslab.cli import app

    name, _, _ = store
    runner = CliRunner()
    out = runner.invoke(app, ["compare", "--experiment", name, "--metric", "balanced_accuracy", "--no-log"])
    assert out.exit_code == 0, out.output
    assert "focal better" in out.output and "no detectable difference" in out.output
    bad = runner.invoke(app, ["compare", "--experiment", name, "--group-by", "no.such.key", "--no-log"])
    assert bad.exit_code == 2 and "--group-by 'no.such.key'" in bad.output
