"""`losslab study` end to end on the small cohort (real training, a real SQLite MLflow store and Optuna
storage): a planted better variant is decided at an early look, a null study runs to its budget and says
so with its MDE, the tables agree with `compare` and with the runs read back, and a worker whose folds
differ is refused before it trains."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from losslab import stats
from losslab.config import ConfigError
from _study import small_overrides
from losslab.config.study import load_study, validate_study

pytestmark = pytest.mark.slow


def _loaded(name, overrides, **keys):
    spec = validate_study({"name": name, "config": None, "overrides": overrides, "reference": "ce", "split": "val",
                           "heartbeat_interval": 2} | keys, f"<{name}>")
    return load_study(None, [], spec=spec)


def _cell_runs(experiment: str, name: str, status: str | None = "FINISHED") -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    query = f"tags.`losslab.study` = '{name}' and tags.`losslab.study_role` = 'cell'"
    return [r for r in client.search_runs([exp.experiment_id], query, max_results=1000)
            if status is None or r.info.status == status]


@pytest.fixture(scope="module")
def planted(embedded_root, small_cache, tmp_path_factory, mlflow_store):
    """CE against focal loss with gamma 5 on the validation loss: focal's loss is far smaller by its
    definition, a difference planted in the metric, with the folds' and seeds' real spread around it."""
    from losslab.pipelines.study import run_study

    tmp = tmp_path_factory.mktemp("planted")
    loaded = _loaded("planted", small_overrides(embedded_root, small_cache, tmp, "study-planted"),
                     variants={"ce": ["loss=ce"], "focal": ["loss=focal", "loss.gamma=5.0"]}, folds=[0, 1], seeds=2,
                     budget_seeds=3, metrics=[{"name": "loss", "direction": "minimize"}, "balanced_accuracy"])
    result = run_study(loaded, write_results=str(tmp / "results.md"), show_progress=False)
    return loaded, result, tmp


def test_a_planted_better_variant_is_decided_at_the_first_look(planted):
    loaded, result, _ = planted
    (outcome,) = result.outcomes
    assert result.complete and outcome.decided and outcome.better == "focal"
    assert (outcome.look, outcome.seeds, outcome.pairs) == (1, 2, 4)  # before the budget of 3 seeds
    runs = _cell_runs("study-planted", "planted")
    assert sorted(r.data.tags["losslab.cell"] for r in runs) == sorted(
        f"{v}|f{f}|s{s}" for v in ("ce", "focal") for f in (0, 1) for s in (0, 1))  # no third seed
    # the decision, recomputed from the runs read back: NB-corrected t on focal − ce per (seed, fold)
    value = {(r.data.tags["losslab.variant"], r.data.tags["losslab.seed"], r.data.tags["losslab.fold"]):
             r.data.metrics["best_val/loss"] for r in runs}
    d = np.array([value[("focal", s, f)] - value[("ce", s, f)] for s in "01" for f in "01"])
    ratio = np.mean([float(r.data.params["data.n_val"]) / float(r.data.params["data.n_train"]) for r in runs])
    assert outcome.mean_diff == pytest.approx(d.mean())
    assert outcome.p_value == pytest.approx(stats.nadeau_bengio_ttest(d, ratio)[1])
    assert outcome.threshold == pytest.approx(stats.sequential_thresholds([4, 6], 0.05)[0])
    assert outcome.p_value < outcome.threshold


def test_the_study_tables_match_compare_and_live_on_the_parent_run(planted):
    from losslab.pipelines.compare import run_compare

    loaded, result, tmp = planted
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.run_name == "study-planted" and parent.info.status == "FINISHED"
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith(result.markdown)  # study.md, then the plots as images served by the MLflow server
    assert f"(get-artifact?path=plots%2Fstudy_best_val_loss.png&run_uuid={result.parent_run_id})" in note
    children = {r.info.run_id for r in _cell_runs("study-planted", "planted")}
    exp = client.get_experiment_by_name("study-planted")
    nested = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert {r.info.run_id for r in nested} == children  # every cell a child of the one parent
    # a second code path: compare over the parent's children, grouped by loss
    compared = run_compare("study-planted", f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
                           ["loss", "balanced_accuracy"], log_run=False)
    for variant in ("ce", "focal"):
        for metric in ("loss", "balanced_accuracy"):
            mean = compared.table.loc[variant, f"{metric}_mean"]
            assert parent.data.metrics[f"study/{variant}/best_val/{metric}_mean"] == pytest.approx(mean)
            assert compared.table.loc[variant, "n_runs"] == 4
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.parent_run_id, artifact_path="study_table.csv"))
    assert table.set_index("variant")["cells"].to_dict() == {"ce": 4, "focal": 4}  # each cell counted once
    paired = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.parent_run_id, artifact_path="study_paired.csv"))
    mine = paired[(paired["metric"] == "best_val/loss") & (paired["test"] == "nadeau_bengio_t")].iloc[0]
    theirs = compared.stats[(compared.stats["metric"] == "loss") & (compared.stats["test"] == "nadeau_bengio_t")].iloc[0]
    assert abs(mine["mean_diff"]) == pytest.approx(abs(theirs["mean_diff"]))
    assert mine["p_value"] == pytest.approx(theirs["p_value"]) and mine["mde"] == pytest.approx(theirs["mde"])
    paths = {a.path for a in client.list_artifacts(result.parent_run_id)} | \
        {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert {"study.md", "study_cells.csv", "study_sequential.csv", "study.yaml", "plots/study_best_val_loss.png"} <= paths
    written = (tmp / "results.md").read_text()
    assert "<!-- study:planted:start -->" in written and result.outcomes[0].line() in written


def test_the_parent_runs_box_plot_draws_each_cells_metric_read_back_from_its_run(planted, tmp_path):
    """plots/study_best_val_loss.png is drawn from study_cells.csv, logged beside it: the CSV's values are the
    cell runs' own metrics read back from MLflow, each variant's points are exactly its cells' values, and
    the logged image is, pixel for pixel, the figure drawn from that CSV."""
    from matplotlib.collections import PathCollection
    from PIL import Image

    from losslab.pipelines.study_report import metric_figure

    loaded, result, _ = planted
    key = "best_val/loss"
    cells = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.parent_run_id, artifact_path="study_cells.csv"))
    runs = {r.info.run_id: r for r in _cell_runs("study-planted", "planted")}
    assert sorted(cells["run_id"]) == sorted(runs)  # one row per finished cell run, each once
    for row in cells.to_dict("records"):
        run = runs[row["run_id"]]
        assert row["variant"] == run.data.tags["losslab.variant"] and row[key] == run.data.metrics[key]
    figure = metric_figure(loaded.spec, cells, key)
    points = [c for c in figure.axes[0].collections if isinstance(c, PathCollection)]
    assert len(points) == 2  # one scatter per variant, in the study file's order
    for position, (variant, scatter) in enumerate(zip(("ce", "focal"), points), start=1):
        xy = np.asarray(scatter.get_offsets())
        expected = sorted(r.data.metrics[key] for r in runs.values() if r.data.tags["losslab.variant"] == variant)
        assert sorted(xy[:, 1].tolist()) == expected and len(expected) == 4
        assert np.all(np.abs(xy[:, 0] - position) <= 0.12)  # jittered around the variant's box
    figure.savefig(tmp_path / "redrawn.png")
    logged = mlflow.artifacts.download_artifacts(run_id=result.parent_run_id, artifact_path="plots/study_best_val_loss.png")
    assert np.array_equal(np.asarray(Image.open(logged)), np.asarray(Image.open(tmp_path / "redrawn.png")))


def test_running_the_study_again_reuses_every_cell(planted):
    from losslab.pipelines.study import run_study

    loaded, first, _ = planted
    again = run_study(loaded, show_progress=False)
    assert again.trained_here == 0 and again.parent_run_id == first.parent_run_id
    assert len(_cell_runs("study-planted", "planted", status=None)) == 8
    assert again.outcomes[0].line() == first.outcomes[0].line()


def test_a_worker_whose_folds_differ_is_refused_before_it_trains(planted, embedded_root, tmp_path):
    """Another machine with the same study file and settings, but its copy of the data lacks one patient:
    its cache's folds differ, and it is refused in one line before anything trains."""
    import shutil

    from losslab.pipelines.study import run_study

    loaded, _, _ = planted
    copy = tmp_path / "embedded_brats"
    shutil.copytree(embedded_root, copy)
    shutil.rmtree(sorted((copy / "HGG").iterdir())[0])
    other = load_study(None, [f"data.root={copy}", f"data.cache_dir={tmp_path / 'other-cache'}"], spec=loaded.spec)
    before = len(_cell_runs("study-planted", "planted", status=None))
    with pytest.raises(ConfigError, match=r"^study planted: this worker's folds differ from the study's") as info:
        run_study(other, show_progress=False)
    assert "\n" not in str(info.value)
    assert len(_cell_runs("study-planted", "planted", status=None)) == before


def test_a_null_study_runs_to_its_budget_and_says_so_with_the_mde(embedded_root, small_cache, tmp_path):
    """Two variants that differ only in name: never decided; the second seed of the budget is added (one
    fold: the first seed's one pair allows no look) and the study stops there, saying so."""
    from losslab.pipelines.study import run_study

    loaded = _loaded("null", small_overrides(embedded_root, small_cache, tmp_path, "study-null"),
                     variants={"ce": ["loss=ce"], "ce again": ["loss=ce"]}, folds=[0], seeds=1, budget_seeds=2,
                     metrics=["balanced_accuracy"])
    result = run_study(loaded, show_progress=False)
    (outcome,) = result.outcomes
    assert result.complete and not outcome.decided and outcome.budget_spent and outcome.seeds == 2
    runs = _cell_runs("study-null", "null")
    assert len(runs) == 4
    value = {(r.data.tags["losslab.variant"], r.data.tags["losslab.seed"]): r.data.metrics["best_val/balanced_accuracy"]
             for r in runs}
    d = np.array([value[("ce again", s)] - value[("ce", s)] for s in "01"])
    spread = float(d.std(ddof=1)) if not np.all(d == d[0]) else 0.0
    assert outcome.mde == pytest.approx(stats.minimum_detectable_difference(spread, 2, 0.0, 0.05))
    assert math.isinf(outcome.n_needed) or outcome.n_needed == stats.pairs_needed(d.mean(), spread, 0.0, 0.05)
    line = outcome.line()
    assert "undecided, budget of 2 seed(s) spent" in line and f"MDE {outcome.mde:.3g}" in line


def test_failed_cells_fail_the_command_with_their_reason(embedded_root, small_cache, tmp_path):
    """A variant whose training diverges (learning rate 1e12: the non-finite loss stops it): its cell fails
    for real; the command exits 1 with one line naming the cell and the reason, the parent run is FAILED,
    and the study's tables hold only the cell that finished. (Before: exit 0, "complete", parent FINISHED.)"""
    import yaml

    from losslab.cli import run

    spec = {"name": "diverging", "config": None, "reference": "ce", "split": "val", "heartbeat_interval": 2,
            "overrides": small_overrides(embedded_root, small_cache, tmp_path, "study-diverging"),
            "variants": {"ce": ["loss=ce"], "diverges": ["loss=ce", "optim.lr=1e12", "optim.name=sgd"]},
            "folds": [0], "seeds": 1, "budget_seeds": 1, "metrics": ["balanced_accuracy"]}
    path = tmp_path / "diverging.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run(["study", "-c", str(path), "--no-progress"]) == 1
    client = MlflowClient()
    exp = client.get_experiment_by_name("study-diverging")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`losslab.study_role` = 'parent'")
    assert parent.info.status == "FAILED"
    cells = {r.data.tags["losslab.variant"]: r.info.status for r in _cell_runs("study-diverging", "diverging", None)}
    assert cells == {"ce": "FINISHED", "diverges": "FAILED"}


def test_failure_line_names_each_failed_cell_and_the_first_reason():
    from losslab.pipelines.study import StudyResult, failure_line

    result = StudyResult("s", "r", True, [], pd.DataFrame(), pd.DataFrame(), "", failed=["a|f0|s0", "b|f1|s0"],
                         errors={"a|f0|s0": "FloatingPointError: loss is nan at epoch 0"})
    line = failure_line(result)
    assert line.startswith("study s: 2 cell(s) failed (a|f0|s0, b|f1|s0); a|f0|s0: FloatingPointError: loss is nan")
    assert "\n" not in line
