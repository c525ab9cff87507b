"""main: the demo pipeline on the embedded data, showing the method end to end.

Generate and preprocess the cohort, train every loss on folds ``0 .. folds-1`` (each fold a child run
of the main job's own run: the run ``mlflow run`` opened, else a new run named ``main``) as the cells of
the demo study (``configs/study/demo.yaml``, run by :func:`losslab.pipelines.study.run_study`, the code
behind ``losslab study``: its tables, ``study.md`` and one line per planned pair go to the main run), then
``compare`` those fold runs like with like with paired statistics (:mod:`losslab.stats`), and log to
the main run: the comparison artifacts (``comparison.csv``, ``comparison_stats.csv``,
``comparison.md``, plots), the metrics ``compare/<loss>/<metric>_mean`` and ``_std``, the tags
``losslab.verdict.<metric>`` (one line per pair of losses, from the Nadeau–Bengio test after Holm)
and ``losslab.doctor`` (the alarms the doctor found over the fold runs, or ``healthy``). The
registered model version of the best fold of the best loss gets the alias ``tracking.alias``
(``models:/<name>@candidate`` for ``evaluate``). Prints the table, the verdicts, the doctor's summary
and how to open the MLflow UI.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Iterator

import mlflow
from mlflow.tracking import MlflowClient

from losslab.config import ConfigError, ExperimentConfig, load_config
from losslab.pipelines.checks import check_config
from losslab.pipelines.compare import CompareResult, log_comparison, run_compare
from losslab.pipelines.doctor import run_doctor
from losslab.pipelines.preprocess import run_preprocess
from losslab.pipelines.study import CellsFailed, failure_line, run_study
from losslab.stats import NB_TEST, decision_line
from losslab.tracking import managed_run, resolve_tracking_uri, setup_tracking

# best_val/* of each fold run, and the one score of its best model on the held-out test split
DEMO_METRICS = ("balanced_accuracy", "f1_macro", "auc", "test/balanced_accuracy")


@dataclass
class DemoResult:
    run_id: str
    comparison: CompareResult
    alarms: dict[str, list[str]]  # fold run id -> alarms the doctor found
    candidate_version: str | None
    seconds: float


@contextlib.contextmanager
def _main_run() -> Iterator[str]:
    """The active run (``mlflow run`` opened it and :func:`entry_point_run` adopted it), else a new one."""
    active = mlflow.active_run()
    if active is not None:
        yield active.info.run_id
        return
    with managed_run(run_name="main", tags={"losslab.entry_point": "main"}) as run:
        yield run.info.run_id


def demo_study(config: str | None, overrides: list[str], losses: list[str], folds: int, run_id: str):
    """``configs/study/demo.yaml`` with main's losses (one variant each, ``loss=<name>``), folds ``0 ..
    folds-1`` and config, as a study of its own run (named after it: each main run is a new study)."""
    from losslab.config import config_root
    from losslab.config.study import load_study, read_study_file

    spec = read_study_file(config_root() / "study" / "demo.yaml")
    spec = spec.model_copy(update={"name": f"main-{run_id}", "config": config, "folds": folds,
                                   "variants": {loss: [f"loss={loss}"] for loss in losses}, "reference": losses[0]})
    return load_study(None, overrides, spec=spec)


def run_demo(config: str | None, overrides: list[str], losses: list[str], folds: int = 3) -> DemoResult:
    t0 = time.perf_counter()
    base = check_config(load_config(config, overrides))
    for loss in losses:  # every loss's config is checked before anything runs
        check_config(load_config(config, list(overrides) + [f"loss={loss}"]))
    if not 2 <= folds <= base.data.num_folds:
        raise ConfigError(f"main --folds {folds}: needs 2 <= folds <= data.num_folds ({base.data.num_folds}) "
                          f"to compare losses over folds")
    if len(set(losses)) < 2:
        raise ConfigError(f"main --losses {' '.join(losses)!r}: name at least two losses to compare")
    setup_tracking(base.tracking)
    with _main_run() as run_id:
        mlflow.log_params({"main.losses": " ".join(losses), "main.folds": folds})
        run_preprocess(base)
        # every loss on every fold: the cells of the demo study, children of this run (losslab.pipelines.study)
        study = run_study(demo_study(config, list(overrides), list(dict.fromkeys(losses)), folds, run_id),
                          parent_run_id=run_id)
        if study.failed:  # a table without those folds would compare fewer pairs without a word
            raise CellsFailed(failure_line(study))
        comparison = run_compare(base.tracking.experiment, f"tags.mlflow.parentRunId = '{run_id}'", DEMO_METRICS,
                                 tracking_uri=base.tracking.tracking_uri, log_run=False)
        log_comparison(comparison, DEMO_METRICS)
        _log_summary(comparison)
        doctor = run_doctor(run_id, base.tracking.tracking_uri)
        alarms = {r: [f.alarm for f in found] for r, found in doctor.findings.items()}
        found = sorted({a for names in alarms.values() for a in names})
        mlflow.set_tag("losslab.doctor", ",".join(found) or "healthy")
        version = _set_candidate(base, comparison)
    result = DemoResult(run_id, comparison, alarms, version, time.perf_counter() - t0)
    _print(result, base)
    return result


def _log_summary(comparison: CompareResult) -> None:
    """``compare/<loss>/<metric>_mean|_std`` metrics and one ``losslab.verdict.<metric>`` tag per metric."""
    metrics = {}
    for group, row in comparison.table.iterrows():
        for name in DEMO_METRICS:
            for stat in ("mean", "std"):
                value = row.get(f"{name}_{stat}", math.nan)
                if not math.isnan(value):
                    metrics[f"compare/{group}/{name}_{stat}"] = float(value)
    mlflow.log_metrics(metrics)
    for name in DEMO_METRICS:
        lines = [_verdict_line(r) for r in _headline(comparison, name).itertuples()]
        if lines:
            mlflow.set_tag(f"losslab.verdict.{name}", "; ".join(lines)[:5000])


def _headline(comparison: CompareResult, metric: str):
    table = comparison.stats
    return table[(table["metric"] == metric) & (table["test"] == NB_TEST)]


def _verdict_line(row) -> str:
    return decision_line(row)


def _set_candidate(cfg: ExperimentConfig, comparison: CompareResult) -> str | None:
    """Alias ``tracking.alias`` -> the registered version of the best fold run of the best loss."""
    name, runs = cfg.tracking.registered_model_name, comparison.runs
    if not (cfg.tracking.log_model and name and cfg.tracking.alias) or comparison.table.empty:
        return None
    best_loss = comparison.table.index[0]
    members = runs[runs[comparison.table.index.name] == best_loss].dropna(subset=[DEMO_METRICS[0]])
    if members.empty:
        return None
    best_run = members.sort_values(DEMO_METRICS[0], ascending=False)["run_id"].iloc[0]
    client = MlflowClient()
    versions = client.search_model_versions(f"name='{name}' and run_id='{best_run}'")
    if not versions:
        return None
    version = f"{max(int(v.version) for v in versions)}"
    client.set_registered_model_alias(name, cfg.tracking.alias, version)
    mlflow.set_tags({"losslab.candidate_run": best_run, "losslab.candidate_version": version})
    return version


def _print(result: DemoResult, cfg: ExperimentConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    import sys

    # a log or a pipe (e.g. under `mlflow run`) gets no terminal width: rich would squeeze the table
    # to 80 columns and cut every number ("0.6…"); print it whole there
    console = Console() if sys.stdout.isatty() else Console(width=240)
    display = result.comparison.display
    table = Table(title="Per loss, mean ± std over folds: the best epoch of each fold run on its validation fold; "
                        "test/*: that model on the held-out test split")
    table.add_column("loss")
    for column in display.columns:
        table.add_column(column, justify="right")
    for loss, row in display.iterrows():
        table.add_row(str(loss), *[str(v) for v in row])
    console.print(table)
    headline = _headline(result.comparison, DEMO_METRICS[0])
    console.print(f"Verdict on {DEMO_METRICS[0]} (paired over folds; Nadeau-Bengio corrected t-test, Holm):")
    for row in headline.itertuples():
        console.print("  " + _verdict_line(row))
    if not result.comparison.odd_runs.empty:
        console.print(f"{len(result.comparison.odd_runs)} run(s) not pooled: their config differs")
    sick = {r: a for r, a in result.alarms.items() if a}
    console.print(f"doctor: {len(result.alarms)} fold run(s), "
                  + (f"alarms in {len(sick)}: {sorted({x for a in sick.values() for x in a})} "
                     f"(see `losslab doctor {result.run_id}`)" if sick else "no alarm"))
    if result.candidate_version:
        console.print(f"models:/{cfg.tracking.registered_model_name}@{cfg.tracking.alias} -> version "
                      f"{result.candidate_version}")
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    console.print(f"main run {result.run_id}; main job wall time: {result.seconds:.1f} s")
    console.print(f"Open the MLflow UI on this store:  mlflow ui --backend-store-uri {uri} --port 5000"
                  f"   (then http://127.0.0.1:5000, experiment '{cfg.tracking.experiment}')")


__all__ = ["DEMO_METRICS", "DemoResult", "run_demo"]
