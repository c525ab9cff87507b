"""Reproduce the cohort studies of the reproductions list with losslab's own pipelines, and write their
tables into ``docs/results.md`` from the MLflow store (never typed).

Studies (``--study``):

- ``dual_stream_mil``: **the dual-stream MIL loss study** on the embedded BraTS cohort (HGG : LGG
  2.8 : 1, patient-level folds, 20 % of patients held out as the test split). CE + weighted sampler
  (that study's choice) against CE + class weights, focal, LDAM-DRW and logit adjustment. Each fold
  model is trained (``losslab train``, the fold's validation split picks the best epoch) and scored
  on the held-out test split by ``losslab evaluate`` before and after its threshold calibration
  (temperature + threshold fitted on the fold's validation split only). Folds with a dead class
  (a class never predicted on the test split, :func:`losslab.engine.metrics.dead_class_names`) are
  counted before and after calibration.
- ``lumbar_spine``: **the lumbar-spine plan** on the embedded RSNA 2024 lumbar cohort (Normal/Mild :
  Moderate : Severe ≈ 88 : 7 : 5, 2.5D stacks): competition-weighted CE [1, 2, 4] against plain CE
  + weighted sampler, CORAL and CORN; per-class test recall, balanced accuracy, the competition's
  weighted log loss (``evaluate``'s ``test/rsna_weighted_log_loss``) and the training epochs whose
  validation predictions have a dead class.
- ``distillation``: **the distillation-loss study** where distillation should help: the student sees
  the labels of only ``--label-fraction`` of the training cases (``distill.student_label_fraction``)
  while vanilla KD distils the teacher on every training case; KD against the student alone (same
  initial weights and batch order), over several seeds.

The dual-stream MIL loss study and the lumbar-spine plan are study files (``configs/study/dual_stream_mil.yaml``,
``configs/study/lumbar_spine.yaml``) run by ``losslab study``'s code (:func:`losslab.pipelines.study.run_study`,
a study named ``<study>-<mode>-<digest of the settings>``): its cells, the reuse of finished cells, the resume
of a killed one and the sequential seeds are the study's; this script sets the epochs, folds, seeds and cohort
and keeps what is its own: the tables of docs/results.md. Every run is tagged ``repro.study``,
``repro.variant``, ``repro.mode`` (``quick`` | ``full``), ``repro.fold`` and ``repro.seed`` (the
distillation study, which runs ``losslab distill``, still skips a seed whose runs are in the store). The tables are computed from the store only
(mean ± sample std over the runs, :func:`losslab.pipelines.compare.format_mean_std`; paired
statistics with :func:`losslab.stats.paired_comparisons`, blocks = (seed, fold), with the minimum
detectable difference ``mde`` and the pairs ``n_needed`` to detect the observed one) and written between
``<!-- study:<name>:start -->`` and ``<!-- study:<name>:end -->`` in ``--output`` (default
``docs/results.md``, which holds results only: a ``--quick`` run writes ``<name>:quick`` sections into
``<workdir>/results-quick.md`` and refuses ``docs/results.md``).

**Sequential study** (``--budget-seeds N``: the study's ``budget_seeds``): after the ``--seeds`` given,
one seed at a time is added (every fold of it, for the variants of undecided pairs), up to ``N`` seeds, until the study's planned comparison (:data:`PLANNED`:
each variant against the reference, alpha split over the pairs by Bonferroni) is decided by
:func:`losslab.stats.sequential_decision` — a group-sequential design with Lan–DeMets O'Brien–Fleming
alpha spending, looks after each seed, so the repeated looks keep the false-positive rate at alpha — or
the budget is spent; the table says which happened.

    python scripts/reproduce_cohorts.py --study all --quick     # one seed, 1-2 epochs, 2 folds
    nice -n 10 python scripts/reproduce_cohorts.py --study dual_stream_mil --folds 0 1 2 --epochs 4
    python scripts/reproduce_cohorts.py --study all --tables-only
    nice -n 10 python scripts/reproduce_cohorts.py --study distillation --seeds 0 1 2 --budget-seeds 8
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "experiment"

STUDY_TITLES = {
    "dual_stream_mil": "The dual-stream MIL loss study (embedded BraTS cohort)",
    "lumbar_spine": "The lumbar-spine plan (embedded RSNA 2024 lumbar cohort)",
    "distillation": "The distillation-loss study: a student with few labels, distilling on every case",
}
EXPERIMENTS = {"dual_stream_mil": "repro-dual-stream-mil", "lumbar_spine": "repro-lumbar-spine",
               "distillation": "repro-distillation"}

def _study_keys(name: str) -> dict:
    """The keys of ``configs/study/<name>.yaml``: the variants and reference are the study file's own."""
    import yaml

    return yaml.safe_load((REPO / "configs" / "study" / f"{name}.yaml").read_text())


# variant -> overrides on the study's experiment config (configs/study/dual_stream_mil.yaml: DSMIL over resnet10t,
# bags of 32, 5 folds; lumbar_spine.yaml: rsna_lumbar_v8.yaml)
MIL_VARIANTS, REFERENCE_MIL = _study_keys("dual_stream_mil")["variants"], _study_keys("dual_stream_mil")["reference"]
LUMBAR_VARIANTS, REFERENCE_LUMBAR = _study_keys("lumbar_spine")["variants"], _study_keys("lumbar_spine")["reference"]
DISTILL_VARIANTS = {"student alone": "none", "vanilla kd": "vanilla"}  # variant -> losslab.loss of the student run

NO_RUNS = "(no runs in the store)"
# the embedded cohort each study writes into its own data.root (--set STUDY:data.generate=null for real data)
GENERATORS = {"dual_stream_mil": "embedded_brats", "lumbar_spine": "embedded_lumbar", "distillation": "embedded_medpix"}
QUICK = {"epochs": 1, "folds": [0, 1], "seeds": [0]}


@dataclass
class Run:
    """One (variant, fold, seed) of a study: the overrides of its config."""

    study: str
    variant: str
    config: Path
    overrides: list[str]
    fold: int
    seed: int
    tags: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- running
def _common_overrides(args, study: str) -> list[str]:
    work = Path(args.workdir).resolve()
    return [f"tracking.tracking_uri={args.tracking_uri}", f"tracking.experiment={EXPERIMENTS[study]}",
            "tracking.registered_model_name=null", "tracking.log_model=false",
            f"data.root={work}/data/{study}", f"data.cache_dir={work}/cache/{study}", f"data.generate={GENERATORS[study]}",
            *_extra(args, study)]


def _repro_tags(run: Run, mode: str, extra: list[str] | None = None) -> dict[str, str]:
    """The run's tags; ``repro.extra`` holds the ``--set`` overrides (e.g. a smaller cohort) so the
    tables can say so."""
    return {"repro.study": run.study, "repro.variant": run.variant, "repro.mode": mode, "repro.fold": str(run.fold),
            "repro.seed": str(run.seed), "repro.extra": "; ".join(extra or [])[:4000], **run.tags}


def _extra(args, study: str) -> list[str]:
    return [s.split(":", 1)[1] for s in args.set if s.split(":", 1)[0] == study]


def _client(args):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=args.tracking_uri)


def _done(client, run: Run, mode: str, entry_point: str) -> bool:
    experiment = client.get_experiment_by_name(EXPERIMENTS[run.study])
    if experiment is None:
        return False
    found = client.search_runs([experiment.experiment_id], _filter(run.study, mode, entry_point)
                               + f" and tags.`repro.variant` = '{run.variant}' and tags.`repro.fold` = '{run.fold}'"
                               + f" and tags.`repro.seed` = '{run.seed}' and attributes.status = 'FINISHED'")
    return bool(found)


STUDY_FILES = {"dual_stream_mil": REPO / "configs" / "study" / "dual_stream_mil.yaml",
               "lumbar_spine": REPO / "configs" / "study" / "lumbar_spine.yaml"}


def _epoch_overrides(study: str, args) -> tuple[list[str], dict[str, list[str]]]:
    """What follows ``--epochs``: overrides for every variant, and for one variant."""
    warmup = "optim.warmup_epochs=0" if args.epochs < 3 else "optim.warmup_epochs=1"
    if study == "dual_stream_mil":  # DRW from the paper's 160 of 200 epochs, scaled (0-based)
        return [f"train.epochs={args.epochs}", warmup], {"ldam-drw": [f"loss.drw_start_epoch={max(1, int(0.75 * args.epochs))}"]}
    frozen = 1 if args.epochs >= 4 else 0
    swa = max(0, min(4, args.epochs // 3)) if args.epochs >= 4 else 0
    return [f"train.epochs={args.epochs}", f"train.freeze_backbone_epochs={frozen}", f"train.swa_epochs={swa}", warmup], {}


def cohort_study(study: str, args):
    """``configs/study/<study>.yaml`` with this run's variants, folds, seeds, seed budget, epochs and
    ``--set`` overrides; its name carries the mode and a digest of the settings (another setting in the
    same store is another study, never refused as a changed one)."""
    import hashlib
    import json

    from losslab.config.study import load_study, read_study_file

    spec = read_study_file(STUDY_FILES[study])
    common, per_variant = _epoch_overrides(study, args)
    variants = {v: [*o, *per_variant.get(v, [])] for v, o in spec.variants.items() if v in args.variants_for(study)}
    if spec.reference not in variants:
        raise SystemExit(f"--variants: the study compares against {spec.reference!r}; include it")
    digest = hashlib.sha256(json.dumps([common, _extra(args, study)]).encode()).hexdigest()[:8]
    spec = spec.model_copy(update={"name": f"{study}-{args.mode}-{digest}", "variants": variants,
                                   "folds": list(args.folds), "seeds": list(args.seeds),
                                   "budget_seeds": args.budget_seeds or len(args.seeds)})
    return load_study(STUDY_FILES[study], [*common, *_common_overrides(args, study)], spec=spec)


def run_cohort_study(study: str, args, mode: str) -> None:
    """The study through ``losslab study`` (its cells, the reuse of finished ones, the resume of a killed
    one, the sequential seeds up to ``--budget-seeds``); then its runs get the ``repro.*`` tags the
    tables read (``repro.train_run`` on each evaluate run)."""
    from losslab.pipelines.study import run_study

    result = run_study(cohort_study(study, args), show_progress=False)
    client = _client(args)
    for cell in result.frame.itertuples():
        tags = _repro_tags(Run(study, cell.variant, STUDY_FILES[study], [], int(cell.fold), int(cell.seed)), mode,
                           _extra(args, study))
        for run_id, extra in ((cell.run_id, {}), (cell.eval_run_id, {"repro.train_run": cell.run_id})):
            for key, value in (tags | extra).items() if run_id else ():
                client.set_tag(run_id, key, value)


def run_dual_stream_mil(args, mode: str) -> None:
    run_cohort_study("dual_stream_mil", args, mode)


def run_lumbar_spine(args, mode: str) -> None:
    run_cohort_study("lumbar_spine", args, mode)


def run_distillation(args, mode: str) -> None:
    """One ``losslab distill`` per seed (fold 0): the teacher on every label, vanilla KD and the
    student alone with ``distill.student_label_fraction``; the runs are tagged afterwards."""
    from losslab.config import load_config
    from losslab.pipelines.distill import run_distill

    client = _client(args)
    for seed in args.seeds:
        marker = Run("distillation", "vanilla kd", CONFIGS / "distill_medpix.yaml", [], 0, seed)
        if _done(client, marker, mode, "train"):
            continue
        print(f"[distillation] seed {seed}", flush=True)
        cfg = load_config(marker.config, [
            *_common_overrides(args, "distillation"), "distill.losses=[vanilla]", "distill.student_alone=true",
            f"distill.student_label_fraction={args.label_fraction}", f"train.epochs={args.epochs}",
            f"distill.student.epochs={args.epochs}",
            f"distill.teacher.epochs={args.teacher_epochs}", f"train.seed={seed}", "data.fold=0",
            f"distill.teacher.registered_model_name=repro-distill-teacher-{mode}"])
        result = run_distill(cfg)
        for variant, loss in DISTILL_VARIANTS.items():
            tags = _repro_tags(Run("distillation", variant, marker.config, [], 0, seed), mode, _extra(args, "distillation"))
            tags["repro.parent_run"] = result.parent_run_id
            for key, value in tags.items():
                client.set_tag(result.student_run_ids[loss], key, value)


# ------------------------------------------------------------------------------------- reading back
def _filter(study: str, mode: str, entry_point: str) -> str:
    return (f"tags.`repro.study` = '{study}' and tags.`repro.mode` = '{mode}' "
            f"and tags.`losslab.entry_point` = '{entry_point}'")


def study_runs(stores: list[str], study: str, mode: str, entry_point: str) -> list[tuple[str, object]]:
    """``(store, run)`` for the FINISHED runs of ``study`` in ``mode`` with ``entry_point`` in every
    store (MlflowClient.search_runs; one store per process of a parallel study)."""
    from mlflow.tracking import MlflowClient

    found = []
    for store in stores:
        client = MlflowClient(tracking_uri=store)
        experiment = client.get_experiment_by_name(EXPERIMENTS[study])
        if experiment is None:
            continue
        runs = client.search_runs([experiment.experiment_id], _filter(study, mode, entry_point), max_results=5000)
        found += [(store, r) for r in runs if r.info.status == "FINISHED"]
    return found


def mean_std(values) -> tuple[float, float, int]:
    """``(mean, sample std (ddof=1; NaN with one value), n)`` of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def cell(values, total: int | None = None) -> str:
    from losslab.pipelines.compare import format_mean_std

    values = list(values)
    mean, std, n = mean_std(values)
    return format_mean_std(mean, std, n, len(values) if total is None else total)


def _dead(metrics: dict[str, float], prefix: str, class_names: list[str]) -> float:
    """1.0 when :func:`dead_class_names` finds a class with no prediction among ``<prefix>pred_count_*``."""
    from losslab.engine.metrics import dead_class_names

    counts = {c: metrics[f"{prefix}pred_count_{c}"] for c in class_names if f"{prefix}pred_count_{c}" in metrics}
    return float(bool(dead_class_names(counts))) if counts else math.nan


def _class_names(run) -> list[str]:
    return [c for c in run.data.tags.get("losslab.class_names", "").split(",") if c]


def _train_params(tracking_uri: str, run) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri).get_run(run.data.tags["repro.train_run"]).data.params


def evaluated_frame(stores: list[str], study: str, mode: str) -> pd.DataFrame:
    """One row per evaluate run of ``study``: variant, seed, fold, block, ``test_train_ratio``
    (test cases / training cases), every ``test/*`` and ``test_calibrated/*`` metric, and
    ``dead/test`` / ``dead/test_calibrated`` (1 when a class is never predicted)."""
    rows = []
    for store, run in study_runs(stores, study, mode, "evaluate"):
        tags, metrics, names = run.data.tags, run.data.metrics, _class_names(run)
        params = _train_params(store, run)
        n_train = float(params.get("data.n_train", "nan"))
        row = {"store": store, "variant": tags["repro.variant"], "extra": tags.get("repro.extra", ""), "seed": tags["repro.seed"], "fold": tags["repro.fold"],
               "block": f"{tags['repro.seed']}/{tags['repro.fold']}", "run_id": run.info.run_id,
               "train_run": tags["repro.train_run"], "epochs_set": params.get("train.epochs", "?"),
               "bag_size": params.get("data.bag_size", "?"), "head": params.get("model.head", "?"),
               "ema": params.get("train.ema_decay", "?"),
               "frozen": params.get("train.freeze_backbone_epochs", "?"), "swa": params.get("train.swa_epochs", "?"),
               "num_folds": params.get("data.num_folds", "?"),
               "test_train_ratio": float(run.data.params.get("evaluate.n_cases", "nan")) / n_train}
        row |= {k: v for k, v in metrics.items() if k.startswith(("test/", "test_calibrated/"))}
        row |= {"dead/test": _dead(metrics, "test/", names),
                "dead/test_calibrated": _dead(metrics, "test_calibrated/", names)}
        rows.append(row)
    return pd.DataFrame(rows)


def paired(frame: pd.DataFrame, metric: str, order: list[str], reference: str | None = None,
           higher_is_better: bool = True, label: str | None = None) -> pd.DataFrame:
    """:func:`losslab.stats.paired_comparisons` of ``metric`` across ``frame['variant']``: every pair,
    or only the pairs with ``reference`` when it is given (many-to-one; Holm over those pairs)."""
    from losslab import stats

    column = frame[metric] if metric in frame else pd.Series(np.nan, index=frame.index)  # not logged by these runs
    values = pd.DataFrame({"group": frame["variant"], "block": frame["block"],
                           "value": pd.to_numeric(column, errors="coerce"),
                           "test_train_ratio": frame["test_train_ratio"]})
    groups = [g for g in order if g in set(values["group"])]
    return stats.paired_comparisons(values, label or metric, higher_is_better, groups=groups, reference=reference)


def stats_markdown(table: pd.DataFrame) -> str:
    from losslab.pipelines.compare import stats_display

    if table.empty:
        return "(no pairs with shared folds)"
    shown = stats_display(table)[["metric", "group_a", "group_b", "n_pairs", "mean_diff", "ci_low", "ci_high",
                                  "p_value", "p_holm", "test", "verdict", "mde", "n_needed"]]
    return shown.to_markdown(index=False, disable_numparse=True)


def _ordered(frame: pd.DataFrame, variants) -> list[str]:
    present = set(frame["variant"]) if not frame.empty else set()
    return [v for v in variants if v in present]


def dual_stream_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: test AUC, macro F1, balanced accuracy and minimum class recall before
    and after calibration (mean ± std over the folds), and the folds with a dead class."""
    rows = []
    for variant in _ordered(frame, MIL_VARIANTS):
        part = frame[frame["variant"] == variant]
        row = {"variant": variant, "folds": str(len(part)), "AUC": cell(part.get("test/auc", []))}
        for metric, name in (("f1_macro", "F1"), ("balanced_accuracy", "bal. acc."), ("min_class_recall", "min recall")):
            row[f"{name} before"] = cell(part.get(f"test/{metric}", []))
            row[f"{name} calibrated"] = cell(part.get(f"test_calibrated/{metric}", []))
        for when, key in (("before", "dead/test"), ("calibrated", "dead/test_calibrated")):
            dead = part[key].dropna()
            row[f"dead-class folds {when}"] = f"{int(dead.sum())}/{len(dead)}"
        rows.append(row)
    return pd.DataFrame(rows)


def calibration_pairs(frame: pd.DataFrame, metric: str = "f1_macro") -> pd.DataFrame:
    """Per variant, calibrated against uncalibrated ``metric`` on the same folds (paired)."""
    tables = []
    for variant in _ordered(frame, MIL_VARIANTS):
        part = frame[frame["variant"] == variant]
        long = pd.concat([part.assign(variant="calibrated", value=part.get(f"test_calibrated/{metric}")),
                          part.assign(variant="before", value=part.get(f"test/{metric}"))])
        table = paired(long, "value", ["calibrated", "before"], label=f"{metric} [{variant}]")
        tables.append(table)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def table_dual_stream_mil(stores: list[str], mode: str) -> str:
    frame = evaluated_frame(stores, "dual_stream_mil", mode)
    if frame.empty:
        return NO_RUNS
    order = _ordered(frame, MIL_VARIANTS)
    against = pd.concat([paired(frame, f"test_calibrated/{m}", order, REFERENCE_MIL, label=f"{m} (calibrated)")
                         for m in ("f1_macro", "balanced_accuracy")]
                        + [paired(frame, "test/auc", order, REFERENCE_MIL, label="auc")], ignore_index=True)
    return "\n".join([
        protocol("dual_stream_mil", frame), "",
        "Held-out test split (fold −1), one model per validation fold; mean ± sample std over the folds. "
        "\"calibrated\": `evaluate`'s temperature + decision threshold fitted on the fold's validation split "
        "(objective balanced accuracy), applied to the test split. A dead-class fold never predicts one class "
        "on the test split (`engine.metrics.dead_class_names`).", "",
        dual_stream_table(frame).to_markdown(index=False, disable_numparse=True), "",
        f"Paired against {REFERENCE_MIL} (blocks = seed/fold; Nadeau–Bengio corrected t-test, Holm over the "
        f"pairs with {REFERENCE_MIL}, per metric):", "", stats_markdown(against), "",
        "Does calibration change macro F1? (calibrated − before, paired over folds, per variant):", "",
        stats_markdown(calibration_pairs(frame))])


def dead_epochs(tracking_uri: str, train_run_id: str, class_names: list[str]) -> float:
    """The number of epochs whose validation predictions have a dead class (history of
    ``val/pred_count_<class>``)."""
    from mlflow.tracking import MlflowClient

    from losslab.engine.metrics import dead_class_names

    client = MlflowClient(tracking_uri=tracking_uri)
    per_epoch: dict[int, dict[str, float]] = {}
    for name in class_names:
        for m in client.get_metric_history(train_run_id, f"val/pred_count_{name}"):
            per_epoch.setdefault(m.step, {})[name] = m.value
    return float(sum(bool(dead_class_names(counts)) for counts in per_epoch.values()))


def lumbar_table(frame: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    rows = []
    for variant in _ordered(frame, LUMBAR_VARIANTS):
        part = frame[frame["variant"] == variant]
        row = {"variant": variant, "folds": str(len(part))}
        row |= {f"recall {c}": cell(part.get(f"test/recall_{c}", [])) for c in class_names}
        row["bal. acc."] = cell(part.get("test/balanced_accuracy", []))
        row["weighted log loss"] = cell(part.get("test/rsna_weighted_log_loss", []))
        if "test/rsna_score" in frame:  # runs evaluated before evaluate logged it have none
            row["competition score"] = cell(part["test/rsna_score"])
            row["any-severe term"] = cell(part.get("test/rsna_any_severe_spinal_log_loss", []))
        row["epochs with a dead class"] = cell(part["dead_epochs"])
        row["epochs"] = cell(part["epochs"])
        row["dead-class folds (test)"] = f"{int(part['dead/test'].dropna().sum())}/{len(part['dead/test'].dropna())}"
        rows.append(row)
    return pd.DataFrame(rows)


def table_lumbar_spine(stores: list[str], mode: str) -> str:
    from mlflow.tracking import MlflowClient

    frame = evaluated_frame(stores, "lumbar_spine", mode)
    if frame.empty:
        return NO_RUNS
    class_names = _class_names(MlflowClient(tracking_uri=frame["store"].iloc[0]).get_run(frame["run_id"].iloc[0]))
    frame["dead_epochs"] = [dead_epochs(s, r, class_names) for s, r in zip(frame["store"], frame["train_run"])]
    frame["epochs"] = [float(len(MlflowClient(tracking_uri=s).get_metric_history(r, "val/balanced_accuracy")))
                       for s, r in zip(frame["store"], frame["train_run"])]
    order = _ordered(frame, LUMBAR_VARIANTS)
    against = pd.concat([paired(frame, "test/balanced_accuracy", order, REFERENCE_LUMBAR, label="balanced_accuracy"),
                         paired(frame, "test/rsna_weighted_log_loss", order, REFERENCE_LUMBAR,
                                higher_is_better=False, label="rsna_weighted_log_loss"),
                         paired(frame, "test/rsna_score", order, REFERENCE_LUMBAR,
                                higher_is_better=False, label="rsna_score")], ignore_index=True)
    return "\n".join([
        protocol("lumbar_spine", frame), "",
        "Held-out test split (fold −1), one model per validation fold; mean ± sample std over the folds. "
        "Weighted log loss: the competition's sample-weighted log loss (weights 1, 2, 4; lower is better). "
        "Competition score: the RSNA 2024 scorer on these (study, level) rows, the mean of that weighted log "
        "loss and the any-severe spinal term (per study: label any level severe, prediction the largest "
        "severe probability over its levels, weight the largest row weight; weighted binary log loss), the "
        "embedded cohort having spinal canal stenosis only (`engine.metrics.rsna_competition_score`). "
        "Epochs with a dead class: validation epochs in which one grade was never predicted.", "",
        lumbar_table(frame, class_names).to_markdown(index=False, disable_numparse=True), "",
        f"Paired against {REFERENCE_LUMBAR} (blocks = seed/fold; Nadeau–Bengio corrected t-test, Holm over "
        f"the pairs with {REFERENCE_LUMBAR}, per metric):", "", stats_markdown(against)])


def distill_frame(stores: list[str], mode: str) -> pd.DataFrame:
    """One row per student run: variant, seed, block, ``test_train_ratio`` (held-out test / training
    cases, from the parent run) and the ``test/*`` metrics (the held-out test split; each run's best epoch
    was picked on fold 0's validation split).

    Raises:
        SystemExit: a run scored before distill scored the test split (no ``test/*``): rerun the study."""
    from mlflow.tracking import MlflowClient

    rows = []
    for store, run in study_runs(stores, "distillation", mode, "train"):
        parent = MlflowClient(tracking_uri=store).get_run(run.data.tags["repro.parent_run"]).data.params
        if "test/mean_accuracy" not in run.data.metrics or "data.n_test" not in parent:
            raise SystemExit(f"distillation run {run.info.run_id} in {store} has no held-out test scores (test/*; "
                             "distilled before distill scored the test split, or data.test_fraction=0): rerun the study "
                             "into a new store")
        rows.append({"extra": run.data.tags.get("repro.extra", ""), "epochs_set": run.data.params.get("epochs", "?"),
                     "label_fraction": run.data.params.get("student_label_fraction", "?"),
                     "teacher_epochs": parent.get("distill.teacher.epochs", parent.get("train.epochs", "?")),"variant": run.data.tags["repro.variant"], "seed": run.data.tags["repro.seed"],
                     "block": f"{run.data.tags['repro.seed']}/0", "run_id": run.info.run_id,
                     "test_train_ratio": float(parent["data.n_test"]) / float(parent["data.n_train"]),
                     "labelled": float(parent["data.n_train_labelled"]), "n_train": float(parent["data.n_train"]),
                     "n_test": float(parent["data.n_test"]),
                     **{k: v for k, v in run.data.metrics.items() if k.startswith("test/")}})
    return pd.DataFrame(rows)


def table_distillation(stores: list[str], mode: str) -> str:
    frame = distill_frame(stores, mode)
    if frame.empty:
        return NO_RUNS
    metrics = ["mean_accuracy", "mean_f1_macro"] + sorted(
        {k[len("test/"):] for k in frame.columns if k.startswith("test/") and k.count("/") == 2
         and k.endswith(("/accuracy", "/auc"))})
    rows = []
    for variant in _ordered(frame, DISTILL_VARIANTS):
        part = frame[frame["variant"] == variant]
        rows.append({"student": variant, "seeds": str(len(part)),
                     **{m: cell(part.get(f"test/{m}", [])) for m in metrics}})
    order = _ordered(frame, DISTILL_VARIANTS)
    pairs = pd.concat([paired(frame, f"test/{m}", order, label=m) for m in ("mean_accuracy", "mean_f1_macro")],
                      ignore_index=True)
    labelled, n_train, n_test = frame["labelled"].iloc[0], frame["n_train"].iloc[0], frame["n_test"].iloc[0]
    return "\n".join([
        protocol("distillation", frame), "",
        f"The student sees the labels of {int(labelled)} of {int(n_train)} training cases (per class, "
        "`distill.student_label_fraction`); vanilla KD distils the teacher (trained on every label) on all "
        f"{int(n_train)}. Held-out test split (fold −1, {int(n_test)} cases, never trained on); the best epoch "
        "is picked on the validation split of fold 0, the same way for both; mean ± sample std over seeds.", "",
        pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), "",
        "Paired (blocks = seeds; Nadeau–Bengio corrected t-test):", "", stats_markdown(pairs)])


STUDIES: dict[str, tuple[Callable, Callable]] = {
    "dual_stream_mil": (run_dual_stream_mil, table_dual_stream_mil),
    "lumbar_spine": (run_lumbar_spine, table_lumbar_spine),
    "distillation": (run_distillation, table_distillation),
}


PLANNED = {  # study -> (the compared metric, the reference): each other variant against the reference
    "dual_stream_mil": ("test_calibrated/f1_macro", REFERENCE_MIL),
    "lumbar_spine": ("test/balanced_accuracy", REFERENCE_LUMBAR),
    "distillation": ("test/mean_accuracy", "student alone"),
}


def study_frame(stores: list[str], study: str, mode: str) -> pd.DataFrame:
    return distill_frame(stores, mode) if study == "distillation" else evaluated_frame(stores, study, mode)


def _ordered_differences(frame: pd.DataFrame, metric: str, reference: str, challenger: str) -> tuple[np.ndarray, float]:
    """``challenger − reference`` per (seed, fold) block in the order the blocks were added (seed,
    then fold), over the blocks both have; and the blocks' mean ``n_test/n_train``."""
    folds = frame["fold"].astype(int) if "fold" in frame else 0  # the distillation study runs fold 0 only
    frame = frame.assign(seed_number=frame["seed"].astype(int), fold_number=folds,
                         value=pd.to_numeric(frame.get(metric), errors="coerce"))
    wide = frame.pivot_table(index=["seed_number", "fold_number"], columns="variant", values="value").sort_index()
    if reference not in wide or challenger not in wide:
        return np.array([]), math.nan
    shared = wide[[reference, challenger]].dropna()
    ratio = frame[frame["variant"].isin([reference, challenger])]["test_train_ratio"].mean()
    return (shared[challenger] - shared[reference]).to_numpy(), float(ratio)


def fixed_budget_text(frame: pd.DataFrame) -> str:
    """The budget of a study run without ``--budget-seeds``: its seeds and folds, one look."""
    from losslab.stats import fixed_design_text

    folds = len({int(f) for f in frame["fold"]}) if "fold" in frame else 1
    return (fixed_design_text(len({int(s) for s in frame["seed"]}), folds)
            + " (no sequential study); the MDE column says what these pairs could detect.")


def sequential_outcomes(frame: pd.DataFrame, study: str, first_seeds: int, budget: int) -> pd.DataFrame:
    """Per planned pair, :func:`losslab.stats.sequential_decision` with a look after each seed from
    ``first_seeds`` to ``budget`` (a seed adds one block per fold), alpha split over the pairs."""
    from losslab.stats import ALPHA, sequential_decision

    metric, reference = PLANNED[study]
    folds = max(1, frame["fold"].nunique()) if "fold" in frame else 1
    looks = [folds * seeds for seeds in range(first_seeds, budget + 1) if folds * seeds >= 2]  # a t-test needs 2
    challengers = [v for v in frame["variant"].unique() if v != reference] if not frame.empty else []
    rows = []
    for challenger in challengers:
        d, ratio = _ordered_differences(frame, metric, reference, challenger)
        row = {"comparison": f"{challenger} − {reference}", "metric": metric, "pairs": d.size, "decided": False,
               "budget_spent": False, "p_value": math.nan, "threshold": math.nan}
        if looks and d.size >= looks[0] and math.isfinite(ratio):
            decision = sequential_decision(d, looks, ratio, ALPHA / len(challengers))
            row |= {"decided": decision.decided, "budget_spent": decision.budget_spent, "pairs": decision.n_pairs,
                    "p_value": decision.p_value, "threshold": decision.threshold}
        rows.append(row | {"seeds": row["pairs"] // folds, "mean_diff": float(d[:row["pairs"]].mean()) if d.size else math.nan})
    return pd.DataFrame(rows)


def sequential_markdown(outcomes: pd.DataFrame, first_seeds: int, budget: int) -> str:
    from losslab.stats import sequential_cells, sequential_design_text

    if outcomes.empty:
        return ""
    lines = [sequential_design_text(first_seeds, budget, 0.05, len(outcomes), "Nadeau–Bengio corrected t-test"), "",
             "| comparison | metric | seeds | pairs | mean difference | p | look's threshold | outcome |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in outcomes.itertuples():
        p, threshold, outcome = sequential_cells(r.p_value, r.threshold, r.decided, r.budget_spent, r.seeds, budget)
        lines.append(f"| {r.comparison} | {r.metric} | {r.seeds} | {r.pairs} | {r.mean_diff:+.3f} | {p} | {threshold} "
                     f"| {outcome} |")
    return "\n".join(lines)


def run_sequentially(study: str, args) -> None:
    """The distillation-loss study (``distill`` runs, not study cells): run ``args.seeds``, then add one
    seed at a time until every planned pair is decided or ``--budget-seeds`` seeds have run; ``args.seeds``
    ends as every seed run. (The other studies are sequential as ``losslab study`` studies.)"""
    runner = STUDIES[study][0]
    seeds = list(args.seeds)
    runner(args, args.mode)
    while len(seeds) < args.budget_seeds:
        outcomes = sequential_outcomes(study_frame(args.read_stores, study, args.mode), study, args.first_seeds,
                                       args.budget_seeds)
        if len(outcomes) and outcomes["decided"].all():
            print(f"[{study}] every planned comparison decided at {len(seeds)} seeds", flush=True)
            break
        seeds.append(max(seeds) + 1)
        print(f"[{study}] undecided at {len(seeds) - 1} seeds: adding seed {seeds[-1]}", flush=True)
        args.seeds = [seeds[-1]]
        runner(args, args.mode)
    args.seeds = seeds


# ------------------------------------------------------------------------------------- results.md
def write_section(path: Path, study: str, body: str) -> None:
    """Replace (or append) the text between ``<!-- study:<study>:start -->`` and ``:end -->`` (the study
    command's writer, without its footer: these sections carry their own provenance)."""
    from losslab.pipelines.study_report import write_section as write_study_section

    write_study_section(path, study, body, footer=None, title="# Reproduced results")


def section(study: str, body: str, mode: str, title: str | None = None) -> str:
    note = " — quick mode (checks the machinery, not the result)" if mode == "quick" else ""
    return (f"## {title or STUDY_TITLES[study]}{note}\n\n{body}\n\n_Generated from the MLflow store by "
            "`scripts/reproduce_cohorts.py`; do not edit by hand._")


def _values(series) -> str:
    return ", ".join(sorted({str(v) for v in series}, key=lambda v: (len(v), v)))


def protocol(study: str, frame: pd.DataFrame) -> str:
    """What was run, read from the runs themselves (epochs, folds, seeds, label fraction, ``--set``)."""
    extra = sorted({e for e in frame["extra"] if e})
    changed = f" Config changed for these runs (`--set`): {' | '.join(extra)}." if extra else ""
    return _protocol(study, frame) + changed


def _protocol(study: str, frame: pd.DataFrame) -> str:
    if study == "distillation":
        return (f"Run (from the store): `configs/experiment/distill_medpix.yaml` (tiny ViT + text teacher, smaller "
                f"student), student label fraction {_values(frame['label_fraction'])}, student "
                f"{_values(frame['epochs_set'])} epoch(s), teacher {_values(frame['teacher_epochs'])} epoch(s), "
                f"seed(s) {_values(frame['seed'])}.")
    config = f"brats_dual_stream_mil.yaml` ({_values(frame['head'])} MIL head over resnet10t, bags of " \
        f"{_values(frame['bag_size'])} slices, EMA decay {_values(frame['ema'])})" \
        if study == "dual_stream_mil" else \
        (f"rsna_lumbar_v8.yaml` (2.5D stacks of 7 slices, level embedding; frozen backbone for "
         f"{_values(frame['frozen'])} epoch(s), SWA over the last {_values(frame['swa'])})")
    return (f"Run (from the store): `configs/experiment/{config}, {_values(frame['epochs_set'])} epoch(s), "
            f"validation fold(s) {_values(frame['fold'])} of {_values(frame['num_folds'])} (one model each), "
            f"training seed(s) "
            f"{_values(frame['seed'])}; {len(frame)} model(s).")


RESULTS = REPO / "docs" / "results.md"


def resolve_output(output: str | None, quick: bool, workdir: str) -> str:
    """``--output``, by default ``docs/results.md`` (full runs) or ``<workdir>/results-quick.md``
    (``--quick``); a quick run never writes ``docs/results.md``, which holds results only.

    Raises:
        SystemExit: ``--quick`` with ``--output docs/results.md``.
    """
    if output is None:
        return str(Path(workdir).resolve() / "results-quick.md") if quick else str(RESULTS)
    if quick and Path(output).resolve() == RESULTS.resolve():
        raise SystemExit(f"--quick runs check the machinery, not the result: refusing to write {output} "
                         "(docs/results.md holds results only); pass another --output or leave it unset")
    return output


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=[*STUDIES, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="one seed, 1 epoch, folds 0 and 1")
    parser.add_argument("--tables-only", action="store_true", help="only rewrite the tables from the store")
    parser.add_argument("--no-tables", action="store_true", help="only run (a parallel process; tables later)")
    parser.add_argument("--folds", type=int, nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--teacher-epochs", type=int)
    parser.add_argument("--label-fraction", type=float, default=0.1)
    parser.add_argument("--variants", nargs="+", help="run only these variants (names as in the tables)")
    parser.add_argument("--set", action="append", default=[], metavar="STUDY:KEY=VALUE",
                        help="an extra config override for one study's runs, e.g. dual_stream_mil:data.bag_size=8")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (1: no spinning OpenMP threads on a shared machine)")
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "reproduce_cohorts"))
    parser.add_argument("--tracking-uri", help="the store the runs go to (default sqlite:///<workdir>/mlflow.db)")
    parser.add_argument("--read-stores", nargs="+", metavar="URI",
                        help="the stores the tables are read from (default: --tracking-uri); one per parallel process")
    parser.add_argument("--output", default=None,
                        help="default docs/results.md; with --quick <workdir>/results-quick.md (never docs/results.md)")
    parser.add_argument("--section", help="the section's marker name (default the study's): a second setting of a "
                        "study, e.g. a larger cohort from its own --workdir, gets its own section")
    parser.add_argument("--title", help="the section's heading (default the study's title)")
    parser.add_argument("--budget-seeds", type=int, default=None,
                        help="add seeds after --seeds, one at a time up to this many, until the planned comparison "
                             "is decided (group-sequential design)")
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    defaults = QUICK if args.quick else {"epochs": 4, "folds": [0, 1, 2, 3, 4], "seeds": [0]}
    args.folds = args.folds or defaults["folds"]
    args.seeds = args.seeds or defaults["seeds"]
    args.epochs = args.epochs or defaults["epochs"]
    args.teacher_epochs = args.teacher_epochs or (1 if args.quick else 10)
    args.tracking_uri = args.tracking_uri or f"sqlite:///{Path(args.workdir).resolve() / 'mlflow.db'}"
    args.read_stores = args.read_stores or [args.tracking_uri]
    args.output = resolve_output(args.output, args.quick, args.workdir)
    args.first_seeds = len(args.seeds)
    if args.budget_seeds is not None and not args.first_seeds <= args.budget_seeds:
        raise SystemExit(f"--budget-seeds {args.budget_seeds} is below the {args.first_seeds} --seeds to start with")
    args.variants_for = lambda study: args.variants or list(
        {"dual_stream_mil": MIL_VARIANTS, "lumbar_spine": LUMBAR_VARIANTS}.get(study, {}))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    import torch

    from losslab import stats

    torch.set_num_threads(args.threads)
    studies = list(STUDIES) if args.study == "all" else [args.study]
    initial_seeds = list(args.seeds)
    for study in studies:
        runner, table = STUDIES[study]
        args.seeds = list(initial_seeds)
        if not args.tables_only:
            run_sequentially(study, args) if args.budget_seeds and study == "distillation" else runner(args, args.mode)
        if args.no_tables:
            continue
        body = table(args.read_stores, args.mode)
        if args.budget_seeds and body != NO_RUNS:
            outcomes = sequential_outcomes(study_frame(args.read_stores, study, args.mode), study, args.first_seeds,
                                           args.budget_seeds)
            body += ("\n\n" + sequential_markdown(outcomes, args.first_seeds, args.budget_seeds) + "\n\n"
                     + stats.SEQUENTIAL_DECIDES)
        elif body != NO_RUNS:
            body += "\n\n" + fixed_budget_text(study_frame(args.read_stores, study, args.mode))
        if body == NO_RUNS:  # e.g. --tables-only on another study's stores: leave the section as it is
            print(f"[{study}] no {args.mode} runs of this study in {', '.join(args.read_stores)}; "
                  f"{args.output} left as it is", flush=True)
            continue
        key = args.section or study
        key = key if args.mode == "full" else f"{key}:quick"  # a quick run never overwrites the full table
        write_section(Path(args.output), key, section(study, body, args.mode, args.title))
        print(f"[{study}] table written to {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
