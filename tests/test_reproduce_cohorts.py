"""scripts/reproduce_cohorts.py --quick: the dual-stream MIL loss study, the lumbar-spine plan and the
distillation-loss study run into a real SQLite MLflow store, and the tables written to results.md are
checked against the runs read back with MlflowClient (mean and sample std recomputed with the
standard library, dead classes from the raw prediction counts).

Tiny cohorts (``--set``) and a subset of the variants keep it to a few minutes on two cores."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
TINY_BRATS = "dual_stream_mil:data.generator_kwargs={num_cases: 30, hgg_ratio: 2.8, shape: [32, 32, 16]}"
TINY_LUMBAR = "lumbar_spine:data.generator_kwargs={studies: 40, size: 32}"  # 40: severe patients in 5 folds + test
TINY_MEDPIX = "distillation:data.generator_kwargs={num_samples: 120, image_size: 32}"


@pytest.fixture(scope="module")
def reproduce():
    sys.path.insert(0, str(REPO / "scripts"))  # the script is a module of that folder
    try:
        import reproduce_cohorts
    finally:
        sys.path.remove(str(REPO / "scripts"))
    yield reproduce_cohorts
    sys.modules.pop("reproduce_cohorts", None)


@pytest.fixture(scope="module")
def quick(reproduce, tmp_path_factory):
    base = tmp_path_factory.mktemp("repro_cohorts")
    uri = f"sqlite:///{base / 'repro.db'}"
    output = base / "results.md"
    output.write_text("# Reproduced results\n\nkept text\n")
    common = ["--quick", "--workdir", str(base / "work"), "--tracking-uri", uri, "--output", str(output)]
    reproduce.main(["--study", "dual_stream_mil", "--variants", "ce + weighted sampler", "logit adjustment",
                    "--set", TINY_BRATS, "--set", "dual_stream_mil:data.bag_size=4", *common])
    reproduce.main(["--study", "lumbar_spine", "--variants", "weighted ce [1, 2, 4]", "coral",
                    "--set", TINY_LUMBAR, "--set", "lumbar_spine:data.source_kwargs={stack_slices: 3, image_size: 32}",
                    "--set", "lumbar_spine:model.head_kwargs.num_slices=3", *common])
    reproduce.main(["--study", "distillation", "--seeds", "0", "1", "--set", TINY_MEDPIX,
                    "--set", "distillation:distill.teacher.model={image: {backbone: test_vit, kwargs: {img_size: 32, "
                    "patch_size: 8}}, text: {dim: 32, depth: 1, max_length: 24}}",
                    "--set", "distillation:distill.student.model={image: {backbone: test_vit, kwargs: {img_size: 32, "
                    "patch_size: 8}}, text: {dim: 16, depth: 1, max_length: 24}}", *common])
    return reproduce, uri, output.read_text()


def _runs(uri: str, experiment: str, entry_point: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id], f"tags.`losslab.entry_point` = '{entry_point}'")
            if r.data.tags.get("repro.mode") == "quick"]


def _section(text: str, study: str) -> str:
    start, end = f"<!-- study:{study}:quick:start -->", f"<!-- study:{study}:quick:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    return text[text.index(start):text.index(end)]


def _row(text: str, first_cell: str) -> dict[str, str]:
    """The first markdown table row whose first cell is ``first_cell``, keyed by its header."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell and i >= 2:
            j = i - 1
            while j > 0 and not set(lines[j].replace("|", "").strip()) <= set("-: "):
                j -= 1  # up to the |:---| line under the header
            header = [c.strip() for c in lines[j - 1].strip().strip("|").split("|")]
            return dict(zip(header, cells))
    raise AssertionError(f"no table row {first_cell!r} in\n{text}")


def _mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def test_the_other_text_of_results_md_is_kept(quick):
    _, _, text = quick
    assert text.startswith("# Reproduced results\n\nkept text\n")
    for study in ("dual_stream_mil", "lumbar_spine", "distillation"):
        assert "quick mode" in _section(text, study)


def test_dual_stream_table_matches_the_evaluate_runs(quick):
    module, uri, text = quick
    section = _section(text, "dual_stream_mil")
    runs = _runs(uri, module.EXPERIMENTS["dual_stream_mil"], "evaluate")
    assert len(runs) == 4  # 2 variants x 2 folds, each evaluated once
    for variant in ("ce + weighted sampler", "logit adjustment"):
        mine = [r for r in runs if r.data.tags["repro.variant"] == variant]
        assert sorted(r.data.tags["repro.fold"] for r in mine) == ["0", "1"]
        assert all(r.data.tags["losslab.eval_split"] == "test" for r in mine)
        row = _row(section, variant)
        assert row["folds"] == "2"
        assert row["AUC"] == _mean_std([r.data.metrics["test/auc"] for r in mine])
        assert row["F1 before"] == _mean_std([r.data.metrics["test/f1_macro"] for r in mine])
        assert row["F1 calibrated"] == _mean_std([r.data.metrics["test_calibrated/f1_macro"] for r in mine])
        dead = sum(min(r.data.metrics["test/pred_count_LGG"], r.data.metrics["test/pred_count_HGG"]) == 0
                   for r in mine)
        assert row["dead-class folds before"] == f"{dead}/2"
    assert "Paired against ce + weighted sampler" in section and "nadeau_bengio_t" in section


def test_lumbar_table_matches_the_runs(quick):
    module, uri, text = quick
    section = _section(text, "lumbar_spine")
    evaluations = _runs(uri, module.EXPERIMENTS["lumbar_spine"], "evaluate")
    client = MlflowClient(tracking_uri=uri)
    for variant in ("weighted ce [1, 2, 4]", "coral"):
        mine = [r for r in evaluations if r.data.tags["repro.variant"] == variant]
        assert len(mine) == 2
        row = _row(section, variant)
        assert row["weighted log loss"] == _mean_std([r.data.metrics["test/rsna_weighted_log_loss"] for r in mine])
        assert row["bal. acc."] == _mean_std([r.data.metrics["test/balanced_accuracy"] for r in mine])
        classes = mine[0].data.tags["losslab.class_names"].split(",")
        assert len(classes) == 3
        assert row[f"recall {classes[2]}"] == _mean_std([r.data.metrics[f"test/recall_{classes[2]}"] for r in mine])
        dead_epochs = []
        for r in mine:  # epochs whose validation counts have a zero, from the raw metric history
            history = {}
            for name in classes:
                for m in client.get_metric_history(r.data.tags["repro.train_run"], f"val/pred_count_{name}"):
                    history.setdefault(m.step, []).append(m.value)
            dead_epochs.append(float(sum(0.0 in counts for counts in history.values())))
        assert row["epochs with a dead class"] == _mean_std(dead_epochs)
        assert "Budget: a fixed design of 1 seed(s) × 2 fold(s) a variant, one look" in section
    assert row["competition score"] == _mean_std([r.data.metrics["test/rsna_score"] for r in mine])
    _check_competition_score_from_predictions(uri, evaluations[0])


def _check_competition_score_from_predictions(uri: str, run) -> None:
    """The run's test/rsna_score recomputed from its predictions.csv (pandas groupby + scikit-learn,
    as the competition's scorer does): the embedded cohort is spinal canal stenosis only, a study is
    a patient_id."""
    import numpy as np
    import pandas as pd
    from mlflow.artifacts import download_artifacts
    from sklearn.metrics import log_loss

    table = pd.read_csv(download_artifacts(run_id=run.info.run_id, artifact_path="predictions.csv",
                                           tracking_uri=uri))
    probs = table[[c for c in table.columns if c.startswith("prob_")]].to_numpy()
    probs = probs / probs.sum(axis=1, keepdims=True)
    weight = np.array([1.0, 2.0, 4.0])[table["label"]]
    spinal = log_loss(table["label"], probs, sample_weight=weight, labels=[0, 1, 2])
    per_study = pd.DataFrame({"study": table["patient_id"], "severe": table["label"] == 2, "p": probs[:, 2],
                              "w": weight}).groupby("study").max()
    any_severe = log_loss(per_study["severe"].astype(int), per_study["p"], sample_weight=per_study["w"], labels=[0, 1])
    assert run.data.metrics["test/rsna_score"] == pytest.approx((spinal + any_severe) / 2, rel=1e-5)


def test_distillation_table_matches_the_student_runs(quick):
    module, uri, text = quick
    section = _section(text, "distillation")
    runs = _runs(uri, module.EXPERIMENTS["distillation"], "train")  # distill's students are train runs
    tagged = [r for r in runs if "repro.variant" in r.data.tags]
    assert sorted((r.data.tags["repro.variant"], r.data.tags["repro.seed"]) for r in tagged) == [
        ("student alone", "0"), ("student alone", "1"), ("vanilla kd", "0"), ("vanilla kd", "1")]
    for variant, loss in (("student alone", "none"), ("vanilla kd", "vanilla")):
        mine = [r for r in tagged if r.data.tags["repro.variant"] == variant]
        assert all(r.data.tags["losslab.loss"] == loss for r in mine)
        row = _row(section, variant)
        assert row["mean_accuracy"] == _mean_std([r.data.metrics["test/mean_accuracy"] for r in mine])
    parent = MlflowClient(tracking_uri=uri).get_run(tagged[0].data.tags["repro.parent_run"]).data.params
    assert f"labels of {parent['data.n_train_labelled']} of {parent['data.n_train']} training cases" in section
    assert f"Held-out test split (fold −1, {parent['data.n_test']} cases" in section  # not the epoch-picking split


def test_a_second_quick_run_adds_no_runs_and_rewrites_the_same_table(quick, tmp_path):
    module, uri, text = quick
    before = len(_runs(uri, module.EXPERIMENTS["dual_stream_mil"], "train"))
    output = tmp_path / "again.md"
    # the same settings (a study reuses a cell of the same config and folds; other --set values are other cells)
    module.main(["--study", "dual_stream_mil", "--quick", "--variants", "ce + weighted sampler", "logit adjustment",
                 "--set", TINY_BRATS, "--set", "dual_stream_mil:data.bag_size=4",
                 "--tracking-uri", uri, "--output", str(output), "--workdir", str(tmp_path / "unused")])
    assert len(_runs(uri, module.EXPERIMENTS["dual_stream_mil"], "train")) == before
    assert _section(output.read_text(), "dual_stream_mil") == _section(text, "dual_stream_mil")


def test_reproduce_py_runs_the_cohort_studies(quick, tmp_path, monkeypatch):
    """``scripts/reproduce.py --study dual_stream_mil`` hands the study to reproduce_cohorts (here
    ``--tables-only`` on the quick store: the same table)."""
    _, uri, text = quick
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # reproduce.py sets it; restored after the test
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts" / "reproduce.py")
    main_script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "reproduce", main_script)
    spec.loader.exec_module(main_script)
    assert {"dual_stream_mil", "lumbar_spine", "distillation"} <= set(main_script.COHORT_STUDIES)
    output = tmp_path / "results.md"
    main_script.main(["--study", "dual_stream_mil", "--quick", "--tables-only", "--tracking-uri", uri,
                      "--output", str(output), "--workdir", str(tmp_path / "work")])
    assert _section(output.read_text(), "dual_stream_mil") == _section(text, "dual_stream_mil")


def test_a_second_setting_of_a_study_gets_its_own_section(quick, tmp_path):
    """``--section``/``--title``: the same store's table under another marker and heading; the
    study's own section is left as it was."""
    reproduce, uri, text = quick
    output = tmp_path / "results.md"
    output.write_text(text)
    reproduce.main(["--study", "lumbar_spine", "--quick", "--tables-only", "--tracking-uri", uri, "--output", str(output),
                    "--workdir", str(tmp_path / "work"), "--section", "lumbar_spine_small", "--title", "Small lumbar"])
    after = output.read_text()
    assert _section(after, "lumbar_spine") == _section(text, "lumbar_spine")
    second = _section(after, "lumbar_spine_small")
    assert second.splitlines()[1].startswith("## Small lumbar")
    original = _section(text, "lumbar_spine").splitlines()
    assert second.splitlines()[2:] == original[2:]  # the same table below the heading


def test_a_study_without_runs_leaves_its_section_alone(reproduce, tmp_path):
    output = tmp_path / "results.md"
    output.write_text("# Results\n\n<!-- study:lumbar_spine:start -->\nearlier table\n<!-- study:lumbar_spine:end -->\n")
    before = output.read_text()
    reproduce.main(["--study", "lumbar_spine", "--tables-only", "--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}",
                    "--output", str(output), "--workdir", str(tmp_path / "work")])
    assert output.read_text() == before


def test_sequential_outcomes_count_seeds_of_folds_and_use_the_correction(reproduce):
    """Two folds a seed: a look after each seed sees 2, 4, 6 blocks; the decision equals
    losslab.stats.sequential_decision on the blocks in seed-then-fold order with the runs' ratio."""
    import numpy as np
    import pandas as pd

    from losslab.stats import sequential_decision

    rng = np.random.default_rng(4)
    rows = []
    for seed in range(3):
        for fold in range(2):
            base = 0.7 + 0.01 * fold
            for variant, shift in (("ce + weighted sampler", 0.0), ("focal", 0.08 + rng.normal(0, 0.01)),
                                   ("logit adjustment", rng.normal(0, 0.02))):
                rows.append({"variant": variant, "seed": str(seed), "fold": str(fold), "test_train_ratio": 0.25,
                             "test_calibrated/f1_macro": base + shift})
    frame = pd.DataFrame(rows)
    outcomes = reproduce.sequential_outcomes(frame, "dual_stream_mil", 1, 3)
    for variant in ("focal", "logit adjustment"):
        part = frame.set_index(["seed", "fold", "variant"])["test_calibrated/f1_macro"].unstack("variant")
        d = (part[variant] - part["ce + weighted sampler"]).to_numpy()
        decision = sequential_decision(d, [2, 4, 6], 0.25, 0.025)
        row = outcomes[outcomes["comparison"] == f"{variant} − ce + weighted sampler"].iloc[0]
        assert (bool(row["decided"]), row["pairs"], row["seeds"]) == (decision.decided, decision.n_pairs,
                                                                       decision.n_pairs // 2)
    text = reproduce.sequential_markdown(outcomes, 1, 3)
    assert "a look after each seed from 1 to the budget of 3" in text


def test_quick_runs_never_write_docs_results_md(reproduce, tmp_path):
    with pytest.raises(SystemExit, match="refusing to write .*docs/results.md"):
        reproduce.main(["--study", "lumbar_spine", "--quick", "--tables-only", "--workdir", str(tmp_path / "work"),
                        "--output", str(REPO / "docs" / "results.md")])
    assert reproduce.parse_args(["--quick", "--workdir", str(tmp_path / "w")]).output == str(
        (tmp_path / "w").resolve() / "results-quick.md")
    assert reproduce.parse_args([]).output == str(REPO / "docs" / "results.md")


def test_budget_seeds_table_on_the_quick_store(quick, tmp_path):
    """``--budget-seeds 2`` with seeds 0 and 1 already in the store: nothing runs, and the sequential
    table's outcome is losslab.stats.sequential_decision on the student runs read back with MlflowClient."""
    from losslab.stats import sequential_decision

    module, uri, _ = quick
    output = tmp_path / "results.md"
    module.main(["--study", "distillation", "--quick", "--seeds", "0", "1", "--budget-seeds", "2", "--tracking-uri", uri,
                 "--output", str(output), "--workdir", str(tmp_path / "unused")])
    runs = [r for r in _runs(uri, module.EXPERIMENTS["distillation"], "train") if "repro.variant" in r.data.tags]
    assert len(runs) == 4  # no seed was added: the budget was already reached
    value = {(r.data.tags["repro.variant"], int(r.data.tags["repro.seed"])): r.data.metrics["test/mean_accuracy"]
             for r in runs}
    d = [value[("vanilla kd", s)] - value[("student alone", s)] for s in (0, 1)]
    parent = MlflowClient(tracking_uri=uri).get_run(runs[0].data.tags["repro.parent_run"]).data.params
    decision = sequential_decision(d, [2], float(parent["data.n_test"]) / float(parent["data.n_train"]))
    outcome = f"decided at {decision.n_pairs} seeds" if decision.decided else "budget of 2 seeds spent"
    row = _row(_section(output.read_text(), "distillation"), "vanilla kd − student alone")
    assert row["outcome"] == outcome and row["p"] == f"{decision.p_value:.3g}"
    assert row["mean difference"] == f"{sum(d) / 2:+.3f}"
