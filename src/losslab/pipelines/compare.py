"""compare: read runs back from MLflow and tabulate losses (mean ± std over folds), with plots.

Inputs (``mlflow.search_runs`` on one experiment, optionally narrowed by ``filter_string``):

* fold runs: ``FINISHED`` runs with ``losslab.entry_point = train`` and a ``losslab.fold`` tag that
  is one fold number (CV parents — ``losslab.cv = true``, ``losslab.fold = 0,1,2`` — are left out); their summary metrics ``best_val/*`` (logged by train
  at the end, on the best checkpoint) are the numbers compared. ``prefix`` picks another family.
* evaluate runs (``losslab.entry_point = evaluate``, ``FINISHED``): their ``latency/p50_ms`` and
  ``latency/p95_ms``, averaged per group; missing when a group has none.
* ``compare`` runs — including the one this call logs — are never inputs.

Runs are grouped by a tag (default ``losslab.loss``). Per group and metric the table holds
``<metric>_mean``, ``<metric>_std`` (sample standard deviation, ``ddof=1``; missing with one run) and
``<metric>_n`` (the runs that logged it). A run that did not log a metric is *missing* for it: it is
left out of that mean, the markdown shows ``(k/n)``, and a group where no run logged it shows ``—``
(NaN in the CSV), never 0. ``rank`` orders groups by the first metric (ascending for metrics where
lower is better: losses, ECE, latency, dead classes); missing values rank last.

Outputs: the table as ``comparison.csv`` (numbers) and ``comparison.md`` (mean ± std), the per-run
values as ``runs.csv``, ``plots/metric_bars_<metric>.png`` (error bars = std) and
``plots/recall_heatmap.png`` (groups × classes), logged as artifacts of a new run in the same
experiment (run name ``compare-<tag>``, tags ``losslab.entry_point = compare``,
``losslab.compare.group_by``, ``losslab.compare.metrics``).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from losslab.tracking import log_figure, managed_run, resolve_tracking_uri

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("balanced_accuracy", "f1_macro", "auc")
DEFAULT_PREFIX = "best_val/"
MISSING = "—"
_LOWER_IS_BETTER = ("loss", "ece", "latency", "dead_class", "_ms")


class ExperimentNotFoundError(LookupError):
    """The experiment to compare does not exist in the tracking store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class CompareResult:
    table: pd.DataFrame  # numbers, one row per group (index = group value)
    display: pd.DataFrame  # the same as strings: mean ± std, "—" for missing
    runs: pd.DataFrame  # one row per fold run: group, fold, run_id and each metric
    class_names: list[str] = field(default_factory=list)
    run_id: str | None = None

    def markdown(self) -> str:
        return _markdown(self.display)


# --------------------------------------------------------------------------- reading runs
def _tag_column(tag: str) -> str:
    return tag if tag.startswith("tags.") else f"tags.{tag}"


def metric_key(metric: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``balanced_accuracy`` -> ``best_val/balanced_accuracy``; a name with a ``/`` is kept."""
    return metric if "/" in metric else f"{prefix}{metric}"


def short_name(key: str, prefix: str = DEFAULT_PREFIX) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def search_experiment_runs(experiment: str, filter_string: str | None = None,
                           tracking_uri: str | None = None) -> pd.DataFrame:
    """Every run of ``experiment`` (``mlflow.search_runs``, pandas) matching ``filter_string``.

    Raises:
        ExperimentNotFoundError: naming the experiment, the store and the experiments it has.
    """
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ExperimentNotFoundError(f"experiment {experiment!r} not found in the tracking store "
                                      f"{mlflow.get_tracking_uri()}; it has: {', '.join(known) or 'none'}")
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string=filter_string or "",
                              output_format="pandas")
    return runs


def _tag(runs: pd.DataFrame, tag: str) -> pd.Series:
    column = _tag_column(tag)
    return runs[column] if column in runs.columns else pd.Series([None] * len(runs), index=runs.index, dtype=object)


def select_fold_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """FINISHED train runs whose ``losslab.fold`` tag is one fold number (a CV parent, tagged
    ``losslab.cv = true`` and ``losslab.fold = 0,1,2``, is not a fold run; nor are compare or
    evaluate runs)."""
    if runs.empty:
        return runs
    one_fold = _tag(runs, "losslab.fold").fillna("").astype(str).str.fullmatch(r"-?\d+")
    keep = (_tag(runs, "losslab.entry_point") == "train") & one_fold & (_tag(runs, "losslab.cv") != "true") \
        & (runs["status"] == "FINISHED")
    return runs[keep]


def select_evaluate_runs(runs: pd.DataFrame) -> pd.DataFrame:
    if runs.empty:
        return runs
    return runs[(_tag(runs, "losslab.entry_point") == "evaluate") & (runs["status"] == "FINISHED")]


def class_names_of(runs: pd.DataFrame, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Class names from the runs' ``losslab.class_names`` tags (first seen order), else from the
    ``<prefix>recall_<class>`` metric columns."""
    names: list[str] = []
    for value in _tag(runs, "losslab.class_names").dropna():
        for name in str(value).split(","):
            if name and name not in names:
                names.append(name)
    if not names:
        head = f"metrics.{prefix}recall_"
        names = [c[len(head):] for c in runs.columns if c.startswith(head)]
    return names


# --------------------------------------------------------------------------- the table
def _values(runs: pd.DataFrame, key: str) -> pd.Series:
    column = f"metrics.{key}"
    if column in runs.columns:
        return pd.to_numeric(runs[column], errors="coerce")
    return pd.Series(np.nan, index=runs.index, dtype=float)


def _dead_class_count(runs: pd.DataFrame, class_names: list[str], prefix: str, logged: pd.Series) -> pd.Series:
    """Per run, the classes :func:`losslab.engine.metrics.dead_class_names` calls dead from the
    run's ``<prefix>pred_count_<class>`` metrics; the logged ``dead_class_count`` where a run has
    no prediction counts."""
    from losslab.engine.metrics import dead_class_names

    counts = pd.DataFrame({c: _values(runs, f"{prefix}pred_count_{c}") for c in class_names}, index=runs.index)
    out = logged.copy()
    for index, row in counts.iterrows():
        if row.notna().any():
            out[index] = float(len(dead_class_names(row.dropna().to_dict())))
    return out


def _stats(values: pd.Series) -> tuple[float, float, int]:
    v = values.dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, int(len(v))


def lower_is_better(name: str) -> bool:
    return any(word in name for word in _LOWER_IS_BETTER)


def compare_table(runs: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS, group_by: str = "losslab.loss",
                  prefix: str = DEFAULT_PREFIX) -> CompareResult:
    """Group the fold runs among ``runs`` by the tag ``group_by``; see the module docstring."""
    folds = select_fold_runs(runs)
    evaluations = select_evaluate_runs(runs)
    keys = [metric_key(m, prefix) for m in metrics]
    names = [short_name(k, prefix) for k in keys]
    class_names = class_names_of(folds, prefix)
    extra = {"min_class_recall": f"{prefix}min_class_recall", "dead_class_count": f"{prefix}dead_class_count"}
    extra |= {f"recall_{c}": f"{prefix}recall_{c}" for c in class_names}
    extra = {n: k for n, k in extra.items() if n not in names}

    group_column = _tag_column(group_by)
    groups = _tag(folds, group_by).fillna("(none)")
    per_run = pd.DataFrame({group_by: groups, "fold": _tag(folds, "losslab.fold"),
                            "run_id": folds["run_id"] if "run_id" in folds else []})
    for name, key in list(zip(names, keys)) + list(extra.items()):
        per_run[name] = _values(folds, key)
    if "dead_class_count" in per_run:
        per_run["dead_class_count"] = _dead_class_count(folds, class_names, prefix, per_run["dead_class_count"])
    per_run = per_run.reset_index(drop=True)

    rows = []
    for group in sorted(per_run[group_by].unique(), key=str):
        members = per_run[per_run[group_by] == group]
        row: dict[str, float | int | str] = {group_by: group, "n_runs": int(len(members))}
        for name in names + list(extra):
            row[f"{name}_mean"], row[f"{name}_std"], row[f"{name}_n"] = _stats(members[name])
        evals = evaluations[_tag(evaluations, group_by) == group] if group_column in evaluations else evaluations.iloc[0:0]
        for latency in ("p50_ms", "p95_ms"):
            row[f"latency_{latency}"] = _stats(_values(evals, f"latency/{latency}"))[0]
        row["n_evaluate_runs"] = int(len(evals))
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        table = pd.DataFrame(columns=[group_by, "n_runs", "rank"])
    else:
        first = f"{names[0]}_mean"
        table["rank"] = table[first].rank(ascending=lower_is_better(names[0]), method="min", na_option="bottom")
        table.loc[table[first].isna(), "rank"] = np.nan
        table = table.sort_values(["rank", group_by], na_position="last").reset_index(drop=True)
    table = table.set_index(group_by)
    display = _display(table, names, class_names)
    return CompareResult(table, display, per_run, class_names)


def format_mean_std(mean: float, std: float, n: int, total: int, digits: int = 3) -> str:
    """``0.812 ± 0.021``; ``—`` when missing; ``(k/n)`` when only k of n runs logged it."""
    if n == 0 or mean is None or math.isnan(mean):
        return MISSING
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if not math.isnan(std) else "")
    return text + (f" ({n}/{total})" if n < total else "")


def _display(table: pd.DataFrame, names: list[str], class_names: list[str]) -> pd.DataFrame:
    out = pd.DataFrame(index=table.index)
    if table.empty:
        return out
    out["runs"] = table["n_runs"].astype(int).astype(str)
    for name in names + ["min_class_recall", "dead_class_count"]:
        if f"{name}_mean" in table:
            out[name] = [format_mean_std(m, s, int(n), int(t)) for m, s, n, t in
                         zip(table[f"{name}_mean"], table[f"{name}_std"], table[f"{name}_n"], table["n_runs"])]
    for latency in ("p50_ms", "p95_ms"):
        out[f"latency_{latency}"] = [MISSING if math.isnan(v) else f"{v:.2f}" for v in table[f"latency_{latency}"]]
    out["rank"] = [MISSING if math.isnan(r) else str(int(r)) for r in table["rank"]]
    return out


def _markdown(display: pd.DataFrame) -> str:
    try:
        return display.to_markdown()
    except ImportError:  # tabulate missing
        return display.to_string()


# --------------------------------------------------------------------------- plots
def comparison_figures(result: CompareResult, metrics: Sequence[str], prefix: str = DEFAULT_PREFIX) -> dict:
    """``{artifact path: Figure}``: one bar chart per metric and the per-class recall heat map."""
    from losslab import plots

    table = result.table
    figures = {}
    if table.empty:
        return figures
    for metric in metrics:
        name = short_name(metric_key(metric, prefix), prefix)
        safe = name.replace("/", "_")
        frame = pd.DataFrame({name: table[f"{name}_mean"], "std": table[f"{name}_std"].fillna(0.0)})
        figures[f"plots/metric_bars_{safe}.png"] = plots.plot_metric_bars(frame, name, "std")
    if result.class_names:
        matrix = np.stack([table[f"recall_{c}_mean"].to_numpy(dtype=float) if f"recall_{c}_mean" in table
                           else np.full(len(table), np.nan) for c in result.class_names], axis=1)
        figures["plots/recall_heatmap.png"] = plots.plot_recall_heatmap(
            matrix, [str(i) for i in table.index], result.class_names)
    return figures


# --------------------------------------------------------------------------- the pipeline
def run_compare(experiment: str, filter_string: str | None = None, metrics: Sequence[str] | None = None,
                group_by: str = "losslab.loss", prefix: str = DEFAULT_PREFIX, tracking_uri: str | None = None,
                log_run: bool = True) -> CompareResult:
    """Compare the fold runs of ``experiment`` (see the module docstring); log a compare run."""
    metrics = list(metrics or DEFAULT_METRICS)
    group_by = group_by[len("tags."):] if group_by.startswith("tags.") else group_by
    runs = search_experiment_runs(experiment, filter_string, tracking_uri)
    if not runs.empty:
        runs = runs[_tag(runs, "losslab.entry_point") != "compare"]
    result = compare_table(runs, metrics, group_by, prefix)
    if result.table.empty and not runs.empty and (_tag(runs, "losslab.entry_point") == "distill").any():
        return _compare_distillation(experiment, log_run)
    if result.table.empty:
        log.warning("experiment %r has no finished fold runs (entry point train, tag losslab.fold)%s",
                    experiment, f" matching {filter_string!r}" if filter_string else "")
    if not log_run:
        return result
    exp_id = MlflowClient().get_experiment_by_name(experiment).experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    tags = {"losslab.entry_point": "compare", "losslab.compare.group_by": group_by,
            "losslab.compare.metrics": ",".join(metric_key(m, prefix) for m in metrics),
            "losslab.compare.n_fold_runs": str(len(result.runs))}
    if filter_string:
        tags["losslab.compare.filter"] = filter_string[:5000]
    with managed_run(run_name=f"compare-{group_by}", tags=tags, nested=mlflow.active_run() is not None) as run:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            result.table.reset_index().to_csv(root / "comparison.csv", index=False)
            (root / "comparison.md").write_text(result.markdown() + "\n")
            result.runs.to_csv(root / "runs.csv", index=False)
            for name in ("comparison.csv", "comparison.md", "runs.csv"):
                mlflow.log_artifact(str(root / name))
        for path, figure in comparison_figures(result, metrics, prefix).items():
            log_figure(figure, path)
        result.run_id = run.info.run_id
    return result


def _compare_distillation(experiment: str, log_run: bool) -> CompareResult:
    """A distillation experiment: the seed's table (one row per loss, per task Acc / F1 / AUC and
    latency, plus the teacher's row and the student alone) from the latest distill run."""
    from losslab.pipelines.distill import distillation_table

    table = distillation_table(experiment)
    display = table.drop(columns=["run_id"], errors="ignore").set_index("loss")
    display = display.apply(lambda col: col.map(lambda v: MISSING if isinstance(v, float) and math.isnan(v)
                                                 else (f"{v:.3f}" if isinstance(v, float) else v)))
    result = CompareResult(table.set_index("loss"), display, table)
    if not log_run:
        return result
    exp_id = MlflowClient().get_experiment_by_name(experiment).experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    tags = {"losslab.entry_point": "compare", "losslab.compare.kind": "distillation"}
    with managed_run(run_name="compare-distillation", tags=tags, nested=mlflow.active_run() is not None) as run:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            table.to_csv(root / "distillation_table.csv", index=False)
            (root / "distillation_table.md").write_text(result.markdown() + "\n")
            for name in ("distillation_table.csv", "distillation_table.md"):
                mlflow.log_artifact(str(root / name))
        result.run_id = run.info.run_id
    return result


__all__ = ["CompareResult", "DEFAULT_METRICS", "ExperimentNotFoundError", "MISSING", "compare_table",
           "comparison_figures", "format_mean_std", "run_compare", "search_experiment_runs", "select_fold_runs"]
