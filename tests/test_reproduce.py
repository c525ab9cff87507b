"""scripts/reproduce.py --quick: the runs land in the store and the tables in docs/results.md are
computed from them (checked here against the store with the MLflow client and numpy)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("reproduce", None)


def _test_metrics(uri: str, study: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(study)
    return client.search_runs([experiment.experiment_id], "tags.`losslab.entry_point` = 'evaluate'")


def _row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in\n{text}")


def test_quick_reproduction_tables_come_from_the_store(reproduce, tmp_path):
    uri = f"sqlite:///{tmp_path / 'repro.db'}"
    output = tmp_path / "results.md"
    common = ["--quick", "--workdir", str(tmp_path / "work"), "--tracking-uri", uri, "--output", str(output),
              "--epochs", "1"]
    reproduce.main(["--study", "mnist_bags", "--heads", "attention", "--train-bags", "20", "40", "--test-bags", "30",
                    *common])
    reproduce.main(["--study", "long_tailed", "--losses", "ce", "ldam + DRW", "--ratios", "10", "--repetitions", "2",
                    *common])
    text = output.read_text()
    assert "<!-- BEGIN mnist_bags:quick -->" in text and "<!-- BEGIN long_tailed:quick -->" in text

    bags = _test_metrics(uri, reproduce.MNIST_BAGS)
    assert sorted(r.data.tags["repro.train_bags"] for r in bags) == ["20", "40"]
    for run in bags:
        assert run.data.params["evaluate.n_cases"] == "30"  # the source's test bags, nothing else
        auc = run.data.metrics["test/auc"]
        cells = _row(text, run.data.tags["repro.train_bags"])
        assert cells[1:3] == [f"{auc:.3f} ± 0.000 (n=1, MDE —)", "—"]  # no paper value for 20 or 40 bags

    digits = _test_metrics(uri, reproduce.LONG_TAILED)
    assert len(digits) == 4
    for variant in ("ce", "ldam + DRW"):
        runs = [r for r in digits if r.data.tags["repro.loss_variant"] == variant]
        bal = np.array([r.data.metrics["test/balanced_accuracy"] for r in runs])
        low = np.array([min(v for k, v in r.data.metrics.items() if re.fullmatch(r"test/recall_\d", k)) for r in runs])
        cells = _row(text, variant)
        assert cells[1] == f"{bal.mean():.3f} ± {bal.std(ddof=1):.3f} (n=2)"
        assert cells[2] == f"{low.mean():.3f} ± {low.std(ddof=1):.3f}"
    delta = np.mean([r.data.metrics["test/balanced_accuracy"] for r in digits if r.data.tags["repro.loss_variant"] == "ldam + DRW"]) \
        - np.mean([r.data.metrics["test/balanced_accuracy"] for r in digits if r.data.tags["repro.loss_variant"] == "ce"])
    assert f"ce by {delta:+.3f} (n=2 seed(s))" in text
    client = MlflowClient(tracking_uri=uri)
    trained = [r for r in client.search_runs([client.get_experiment_by_name(reproduce.LONG_TAILED).experiment_id],
                                             "tags.`losslab.entry_point` = 'train'")
               if r.data.tags.get("repro.loss_variant") == "ldam + DRW"]
    early = sum(r.data.metrics["best_epoch"] < float(r.data.params["loss.drw_start_epoch"]) for r in trained)
    assert f"came before DRW started in {early} of 2 run(s)" in text
    paired = _row(text, "10")  # the paired table: ce − ldam + DRW over the two seeds
    assert paired[1] == "ce − ldam + DRW" and paired[2] == "2" and paired[3] == f"{-delta:+.3f}"

    # a second call finds every setting in the store and runs nothing (the study's parent run aside)
    cells = "tags.`losslab.entry_point` != 'study'"
    before = len(MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name(reproduce.LONG_TAILED).experiment_id], cells))
    reproduce.main(["--study", "long_tailed", "--losses", "ce", "ldam + DRW", "--ratios", "10", "--repetitions", "2",
                    *common])
    after = len(MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name(reproduce.LONG_TAILED).experiment_id], cells))
    assert before == after == 8  # 4 training + 4 test runs

    # sequentially with a budget of 3 seeds: a third seed runs unless the pair was decided at 2
    reproduce.main(["--study", "long_tailed", "--losses", "ce", "ldam + DRW", "--ratios", "10", "--repetitions", "2",
                    "--budget-seeds", "3", *common])
    text = output.read_text()
    runs = _test_metrics(uri, reproduce.LONG_TAILED)
    d = reproduce.seed_differences(reproduce.test_runs(reproduce.LONG_TAILED, "quick", [uri]), "10", "ldam + DRW")
    from losslab.stats import sequential_decision

    decision = sequential_decision(d.to_numpy(), [2, 3])  # one planned pair present: the whole alpha
    outcome = f"decided at {decision.n_pairs} seeds" if decision.decided else "budget of 3 seeds spent"
    assert f"| 10 | ldam + DRW − ce | {decision.n_pairs} | {d.iloc[:decision.n_pairs].mean():+.3f} |" in text
    assert outcome in text and "O'Brien–Fleming" in text
    assert len(runs) == (4 if decision.decided and decision.n_pairs == 2 else 6)


def _runs_frame(differences: dict[str, list[float]], ratio: str = "100") -> "pd.DataFrame":
    import pandas as pd

    base = np.linspace(0.80, 0.84, len(next(iter(differences.values()))))
    rows = [{"tags.repro.ratio": ratio, "tags.repro.loss_variant": "ce", "tags.repro.repetition": str(i),
             "metrics.test/balanced_accuracy": b} for i, b in enumerate(base)]
    for variant, d in differences.items():
        rows += [{"tags.repro.ratio": ratio, "tags.repro.loss_variant": variant, "tags.repro.repetition": str(i),
                  "metrics.test/balanced_accuracy": b + x} for i, (b, x) in enumerate(zip(base, d))]
    return pd.DataFrame(rows)


def test_sequential_outcomes_against_the_decision_by_hand(reproduce):
    from scipy import stats as sps

    from losslab.stats import sequential_thresholds

    clear = [0.05, 0.048, 0.052, 0.049, 0.051, 0.050]  # decided at the first look that allows it
    noise = [0.01, -0.012, 0.004, -0.006, 0.009, -0.003]  # no difference: the budget is spent
    outcomes = reproduce.sequential_outcomes(_runs_frame({"logit_adjusted": clear, "ldam + DRW": noise}), 3, 6)
    thresholds = sequential_thresholds([3, 4, 5, 6], 0.025)  # alpha split over the two pairs
    for variant, d in (("logit_adjusted", clear), ("ldam + DRW", noise)):
        p = [2 * sps.t.sf(abs(np.mean(d[:n]) / (np.std(d[:n], ddof=1) / np.sqrt(n))), n - 1) for n in (3, 4, 5, 6)]
        crossed = [n for n, pv, t in zip((3, 4, 5, 6), p, thresholds) if pv < t]
        row = outcomes[outcomes["comparison"] == f"{variant} − ce"].iloc[0]
        assert bool(row["decided"]) == bool(crossed)
        assert row["seeds"] == (crossed[0] if crossed else 6)
    text = reproduce.sequential_markdown(outcomes, 3, 6)
    assert "| 100 | ldam + DRW − ce | 6 |" in text and "budget of 6 seeds spent" in text
    assert "decided at" in text  # the clear difference


def test_the_sequential_study_looks_only_at_its_own_ratios(reproduce):
    """A store that also holds the fixed-design ratio-10 runs: the ratio-100 sequential study neither
    tests those pairs nor splits its alpha over them, so it stops when ratio 100 is decided."""
    import pandas as pd

    clear = [0.05, 0.048, 0.052, 0.049, 0.051, 0.050]
    noise = [0.01, -0.012, 0.004, -0.006, 0.009, -0.003]
    frame = pd.concat([_runs_frame({"logit_adjusted": clear, "ldam + DRW": clear}),
                       _runs_frame({"logit_adjusted": noise, "ldam + DRW": noise}, ratio="10")])
    both = reproduce.sequential_outcomes(frame, 3, 6)
    only = reproduce.sequential_outcomes(frame, 3, 6, ratios=[100.0])
    assert sorted(both["ratio"].unique()) == [10.0, 100.0] and not both["decided"].all()
    assert list(only["ratio"].unique()) == [100.0] and only["decided"].all()
    assert only["alpha"].tolist() == pytest.approx([0.025, 0.025])  # split over the two planned pairs only


def test_mnist_bags_cells_carry_the_mde_against_the_paper(reproduce):
    """A cell's MDE: the gap to the paper's AUC a one-sample t-test over the repetitions detects with
    power 0.8 at two-sided 0.05 (statsmodels' solver times the std)."""
    import pandas as pd
    from statsmodels.stats.power import TTestPower

    summary = pd.DataFrame([{"head": "attention", "train_bags": 50, "auc_mean": 0.853, "auc_std": 0.046, "n": 5,
                             "paper": 0.768}])
    effect = TTestPower().solve_power(nobs=5, alpha=0.05, power=0.8, alternative="two-sided")
    cell = _row(reproduce.mnist_bags_markdown(summary), "50")[1]
    assert cell == f"0.853 ± 0.046 (n=5, MDE {effect * 0.046:.3f})"


def test_quick_runs_never_write_docs_results_md(reproduce, tmp_path):
    with pytest.raises(SystemExit, match="refusing to write .*docs/results.md"):
        reproduce.main(["--quick", "--tables-only", "--study", "long_tailed", "--output", str(REPO / "docs" / "results.md"),
                        "--workdir", str(tmp_path / "work")])
    reproduce.main(["--quick", "--tables-only", "--study", "long_tailed", "--workdir", str(tmp_path / "work"),
                    "--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}"])
    assert "long_tailed:quick" in (tmp_path / "work" / "results-quick.md").read_text()
