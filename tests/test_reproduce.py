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
        assert cells[1:3] == [f"{auc:.3f} ± 0.000 (n=1)", "—"]  # no paper value for 20 or 40 bags

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

    # a second call finds every setting in the store and runs nothing
    before = len(MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name(reproduce.LONG_TAILED).experiment_id]))
    reproduce.main(["--study", "long_tailed", "--losses", "ce", "ldam + DRW", "--ratios", "10", "--repetitions", "2",
                    *common])
    after = len(MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name(reproduce.LONG_TAILED).experiment_id]))
    assert before == after == 8  # 4 training + 4 test runs
