"""compare: read runs back from MLflow and tabulate losses (mean ± std over folds), with plots.

Inputs (``mlflow.search_runs`` on one experiment, optionally narrowed by ``filter_string``):

* fold runs: ``FINISHED`` runs with ``losslab.entry_point = train`` and a ``losslab.fold`` tag that
  is one fold number (CV parents — ``losslab.cv = true``, ``losslab.fold = 0,1,2`` — are left out); their summary metrics ``best_val/*`` (logged by train
  at the end, on the best checkpoint) are the numbers compared. ``prefix`` picks another family.
* evaluate runs (``losslab.entry_point = evaluate``, ``FINISHED``): their ``latency/p50_ms`` and
  ``latency/p95_ms``, averaged per group; missing when a group has none.
* ``compare`` runs — including the one this call logs — are never inputs.

Runs are grouped by a tag or a param (``--group-by``, default the tag ``losslab.loss``; ``loss.gamma``,
``data.sampler`` or ``params.X`` / ``tags.X`` explicitly). **Like with like**: runs are pooled only when
every config param they logged matches apart from the fold, the seed and bookkeeping
(:data:`losslab.likeness.IGNORED`), and — across groups — apart from the grouping key (for a tag,
the params it stands for: :data:`TAG_SECTIONS`, e.g. the whole ``loss.*`` section for
``losslab.loss``). The majority config is compared; every other run is listed in a separate table
(``runs_not_pooled.csv``) with the keys that differ, never pooled. Per group and metric the table
holds ``<metric>_mean``, ``<metric>_std`` (sample standard deviation, ``ddof=1``; missing with one run,
so a one-run group shows its n and no ±) and ``<metric>_n`` (the runs that logged it). A run that did
not log a metric is *missing* for it: it is left out of that mean, the markdown shows ``(k/n)``, and a
group where no run logged it shows ``—`` (NaN in the CSV), never 0. ``rank`` orders groups by the first
metric (ascending for metrics where lower is better: losses, ECE, latency, dead classes); missing
values rank last.

**Paired statistics** (:mod:`losslab.stats`): each pair of groups on the (seed, fold) blocks they share
— mean difference with a bootstrap 95 % CI, the Nadeau–Bengio corrected t-test (``n_test/n_train`` from
the runs' ``data.n_val`` / ``data.n_train`` params), Wilcoxon where there are ≥ 6 pairs, Holm across
pairs, a verdict, and the power: the minimum detectable difference at the pairs there are (``mde``,
two-sided 0.05, power 0.8, with the same correction) and the pairs that would detect the observed
difference (``n_needed``; "already decided", or "not reachable" when only more data per run could);
a critical-difference diagram per metric when ≥ 3 groups have ≥ 2 runs.

Outputs: the table as ``comparison.csv`` (numbers) and ``comparison.md`` (mean ± std, the runs not
pooled and the paired statistics), the per-run values as ``runs.csv``, ``runs_not_pooled.csv``,
``comparison_stats.csv`` (``metric, group_a, group_b, n_pairs, mean_diff, ci_low, ci_high, p_value,
p_holm, test, verdict, mde, n_needed``; ``n_needed`` is ``inf`` where no number of pairs reaches the power), ``plots/metric_bars_<metric>.png`` (error bars = std),
``plots/recall_heatmap.png`` (groups × classes) and ``plots/critical_difference_<metric>.png``, logged as artifacts of a new run in the same
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

from losslab import stats
from losslab.likeness import differing_keys, signature
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


class GroupByError(ExperimentNotFoundError):
    """``--group-by`` names neither a tag nor a param of the runs."""


# a grouping tag -> the params it stands for (left out of likeness across groups)
TAG_SECTIONS: dict[str, tuple[str, ...]] = {
    "losslab.loss": ("loss.",),
    "losslab.model": ("model.",),
    "losslab.dataset": ("data.source", "data.source_kwargs", "data.generate", "data.generator_kwargs."),
    "losslab.fold": ("data.fold",),
    "losslab.seed": ("train.seed",),
}


@dataclass
class CompareResult:
    table: pd.DataFrame  # numbers, one row per group (index = group value)
    display: pd.DataFrame  # the same as strings: mean ± std, "—" for missing
    runs: pd.DataFrame  # one row per pooled fold run: group, seed, fold, run_id and each metric
    class_names: list[str] = field(default_factory=list)
    run_id: str | None = None
    stats: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=stats.COLUMNS))
    odd_runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # not pooled: their config differs
    critical: dict = field(default_factory=dict)  # metric -> stats.CriticalDifference (>= 3 groups)

    def markdown(self) -> str:
        parts = [_markdown(self.display)]
        if not self.odd_runs.empty:
            parts += ["", f"Not pooled ({len(self.odd_runs)} run(s) whose config differs from the compared runs):",
                      "", _markdown(self.odd_runs.set_index("run_id"))]
        if not self.stats.empty:
            parts += ["", f"Paired statistics over (seed, fold); Holm-corrected across pairs, alpha = {stats.ALPHA}:",
                      "", _markdown(stats_display(self.stats).set_index("metric"), disable_numparse=True)]
        return "\n".join(parts)


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


# --------------------------------------------------------------------------- like with like
def resolve_group_by(runs: pd.DataFrame, group_by: str) -> tuple[str, tuple[str, ...]]:
    """``(column of runs, params left out of likeness across groups)`` for a tag or a param:
    ``tags.X`` / ``params.X`` explicitly, else the tag ``X`` if the runs have it, else the param.

    Raises:
        GroupByError: the runs have neither a tag nor a param ``group_by``.
    """
    if group_by.startswith("params."):
        return group_by, (group_by[len("params."):],)
    name = group_by[len("tags."):] if group_by.startswith("tags.") else group_by
    if group_by.startswith("tags.") or f"tags.{name}" in runs.columns or runs.empty:
        return f"tags.{name}", TAG_SECTIONS.get(name, ())
    if f"params.{name}" in runs.columns:
        return f"params.{name}", (name,)
    tags = sorted(c[5:] for c in runs.columns if c.startswith("tags.losslab."))
    raise GroupByError(f"--group-by {group_by!r}: the fold runs have no tag or param of that name; "
                       f"tags: {', '.join(tags)}; params: e.g. loss.name, loss.gamma, data.sampler, optim.lr")


def _run_params(runs: pd.DataFrame) -> list[dict[str, object]]:
    columns = [c for c in runs.columns if c.startswith("params.")]
    return [{c[len("params."):]: v for c, v in zip(columns, row)} for row in runs[columns].itertuples(index=False)]


def _majority(signatures: list, runs: pd.DataFrame, groups: pd.Series):
    """The signature with the most runs; ties: the most groups, then the latest run."""
    frame = pd.DataFrame({"sig": signatures, "group": groups.to_numpy(),
                          "start": pd.to_numeric(runs["start_time"], errors="coerce").to_numpy()
                          if "start_time" in runs else 0})
    ranked = frame.groupby("sig", sort=False).agg(n=("group", "size"), groups=("group", "nunique"), start=("start", "max"))
    return ranked.sort_values(["n", "groups", "start"], ascending=False).index[0]


def split_like_runs(folds: pd.DataFrame, column: str, across: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(pooled runs, odd runs)``. Pooled runs share every logged config param apart from the
    fold, the seed and bookkeeping (:mod:`losslab.likeness`), and, across groups, apart from
    ``across`` (the grouping key); the majority config is kept (ties: most groups, latest run).
    The odd-runs table names each other run's group, fold and the keys that differ
    (``key: value ≠ pooled value``)."""
    empty = pd.DataFrame(columns=["run_id", "run_name", "group", "fold", "differs"])
    if folds.empty:
        return folds, empty
    params, groups = _run_params(folds), _group_values(folds, column)
    shared = [signature(p, across) for p in params]
    keep_shared = _majority(shared, folds, groups)
    full = [signature(p) for p in params]
    keep = np.array([s == keep_shared for s in shared])
    for group in groups[keep].unique():
        members = np.where(keep & (groups == group).to_numpy())[0]
        best = _majority([full[i] for i in members], folds.iloc[members], groups.iloc[members])
        keep[[i for i in members if full[i] != best]] = False
    reference = {g: params[i] for i, g in reversed(list(enumerate(groups))) if keep[i]}
    anyone = params[int(np.argmax(keep))]
    rows = []
    for i in np.where(~keep)[0]:
        group = groups.iloc[i]
        diff = differing_keys(params[i], reference[group]) if shared[i] == keep_shared and group in reference \
            else differing_keys(params[i], anyone, across)
        rows.append({"run_id": folds["run_id"].iloc[i], "run_name": _tag(folds, "mlflow.runName").iloc[i],
                     "group": group, "fold": _tag(folds, "losslab.fold").iloc[i],
                     "differs": "; ".join(f"{k}: {a} ≠ {b}" for k, (a, b) in diff.items())})
    return folds[keep], pd.DataFrame(rows, columns=empty.columns) if rows else empty


def _group_values(runs: pd.DataFrame, column: str) -> pd.Series:
    values = runs[column] if column in runs.columns else pd.Series([None] * len(runs), index=runs.index, dtype=object)
    return values.fillna("(none)").astype(str)


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


def _per_run(folds: pd.DataFrame, column: str, group_by: str, columns: dict[str, str], class_names: list[str],
             prefix: str) -> pd.DataFrame:
    """One row per fold run: group, seed (tag ``losslab.seed``, else param ``train.seed``), fold,
    run id, ``test_train_ratio`` (params ``data.n_val / data.n_train``) and each metric."""
    seed = _tag(folds, "losslab.seed")
    if "params.train.seed" in folds.columns:
        seed = seed.fillna(folds["params.train.seed"])
    ratio = math.nan
    if {"params.data.n_val", "params.data.n_train"} <= set(folds.columns):
        ratio = pd.to_numeric(folds["params.data.n_val"], errors="coerce") / \
            pd.to_numeric(folds["params.data.n_train"], errors="coerce")
    per_run = pd.DataFrame({group_by: _group_values(folds, column), "seed": seed.fillna("").astype(str),
                            "fold": _tag(folds, "losslab.fold"), "run_id": folds["run_id"] if "run_id" in folds else [],
                            "test_train_ratio": ratio})
    for name, key in columns.items():
        per_run[name] = _values(folds, key)
    if "dead_class_count" in per_run:
        per_run["dead_class_count"] = _dead_class_count(folds, class_names, prefix, per_run["dead_class_count"])
    return per_run.reset_index(drop=True)


def _group_rows(per_run: pd.DataFrame, evaluations: pd.DataFrame, column: str, group_by: str,
                names: list[str]) -> pd.DataFrame:
    rows = []
    eval_groups = _group_values(evaluations, column)
    for group in sorted(per_run[group_by].unique(), key=str):
        members = per_run[per_run[group_by] == group]
        row: dict[str, float | int | str] = {group_by: group, "n_runs": int(len(members))}
        for name in names:
            row[f"{name}_mean"], row[f"{name}_std"], row[f"{name}_n"] = _stats(members[name])
        evals = evaluations[eval_groups == group] if column in evaluations else evaluations.iloc[0:0]
        for latency in ("p50_ms", "p95_ms"):
            row[f"latency_{latency}"] = _stats(_values(evals, f"latency/{latency}"))[0]
        row["n_evaluate_runs"] = int(len(evals))
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=[group_by, "n_runs", "rank"]).set_index(group_by)
    first = f"{names[0]}_mean"
    table["rank"] = table[first].rank(ascending=lower_is_better(names[0]), method="min", na_option="bottom")
    table.loc[table[first].isna(), "rank"] = np.nan
    return table.sort_values(["rank", group_by], na_position="last").reset_index(drop=True).set_index(group_by)


def comparison_stats(per_run: pd.DataFrame, group_by: str, names: Sequence[str],
                     order: Sequence[str]) -> tuple[pd.DataFrame, dict]:
    """Paired statistics (:func:`losslab.stats.paired_comparisons`) for each metric, pairs in
    ``order`` (best first), blocks = (seed, fold); and the critical-difference ranks per metric
    where there are >= 3 groups."""
    frames, critical = [], {}
    for name in names:
        values = pd.DataFrame({"group": per_run[group_by], "block": per_run["seed"] + "/" + per_run["fold"].astype(str),
                               "value": per_run[name], "test_train_ratio": per_run["test_train_ratio"]})
        higher = not lower_is_better(name)
        frames.append(stats.paired_comparisons(values, name, higher, groups=order))
        result = stats.critical_difference(values, higher)
        if result is not None:
            critical[name] = result
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=stats.COLUMNS)
    return table, critical


def compare_table(runs: pd.DataFrame, metrics: Sequence[str] = DEFAULT_METRICS, group_by: str = "losslab.loss",
                  prefix: str = DEFAULT_PREFIX) -> CompareResult:
    """Group the fold runs among ``runs`` by the tag or param ``group_by``, pooling only like
    with like; see the module docstring."""
    folds = select_fold_runs(runs)
    column, across = resolve_group_by(folds, group_by)
    group_by = column.split(".", 1)[1]  # the label: the tag or param name
    folds, odd = split_like_runs(folds, column, across)
    keys = [metric_key(m, prefix) for m in metrics]
    names = [short_name(k, prefix) for k in keys]
    class_names = class_names_of(folds, prefix)
    extra = {"min_class_recall": f"{prefix}min_class_recall", "dead_class_count": f"{prefix}dead_class_count"}
    extra |= {f"recall_{c}": f"{prefix}recall_{c}" for c in class_names}
    columns = dict(zip(names, keys)) | {n: k for n, k in extra.items() if n not in names}
    per_run = _per_run(folds, column, group_by, columns, class_names, prefix)
    table = _group_rows(per_run, select_evaluate_runs(runs), column, group_by, list(columns))
    pair_stats, critical = comparison_stats(per_run, group_by, names, [str(g) for g in table.index])
    display = _display(table, names, class_names)
    return CompareResult(table, display, per_run, class_names, stats=pair_stats, odd_runs=odd, critical=critical)


def stats_display(table: pd.DataFrame) -> pd.DataFrame:
    """The paired statistics as text: differences to 3 decimals, p-values to 3 significant digits,
    ``mde`` to 3 decimals and ``n_needed`` in words where it is not a number
    (:func:`losslab.stats.n_needed_text`)."""
    out = table.copy()
    for column in ("mean_diff", "ci_low", "ci_high"):
        out[column] = [MISSING if math.isnan(v) else f"{v:+.3f}" for v in table[column]]
    for column in ("p_value", "p_holm"):
        out[column] = [MISSING if math.isnan(v) else f"{v:.3g}" for v in table[column]]
    out["mde"] = [MISSING if math.isnan(v) else f"{v:.3f}" for v in table["mde"]]
    out["n_needed"] = [stats.n_needed_text(n, verdict) for n, verdict in zip(table["n_needed"], table["verdict"])]
    return out


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


def _markdown(display: pd.DataFrame, **kwargs) -> str:
    try:
        return display.to_markdown(**kwargs)
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
    for name, critical in result.critical.items():
        figures[f"plots/critical_difference_{name.replace('/', '_')}.png"] = stats.plot_critical_difference(critical, name)
    return figures


def epoch_curves(result: CompareResult, key: str = "val/balanced_accuracy") -> pd.DataFrame:
    """Per-epoch values of ``key`` for every pooled run (``MlflowClient.get_metric_history``): one row
    per run and step with columns ``<group_by>``, ``run_id``, ``fold``, ``step``, ``value``."""
    group_by = result.table.index.name or "group"
    client = MlflowClient()
    rows = [{group_by: run[group_by], "run_id": run["run_id"], "fold": run["fold"], "step": m.step, "value": m.value}
            for run in result.runs.to_dict("records") for m in client.get_metric_history(run["run_id"], key)]
    return pd.DataFrame(rows, columns=[group_by, "run_id", "fold", "step", "value"])


# --------------------------------------------------------------------------- the pipeline
def run_compare(experiment: str, filter_string: str | None = None, metrics: Sequence[str] | None = None,
                group_by: str = "losslab.loss", prefix: str = DEFAULT_PREFIX, tracking_uri: str | None = None,
                log_run: bool = True) -> CompareResult:
    """Compare the fold runs of ``experiment`` (see the module docstring); log a compare run."""
    metrics = list(metrics or DEFAULT_METRICS)
    runs = search_experiment_runs(experiment, filter_string, tracking_uri)
    if not runs.empty:
        runs = runs[_tag(runs, "losslab.entry_point") != "compare"]
    result = compare_table(runs, metrics, group_by, prefix)
    group_by = result.table.index.name or group_by
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
        log_comparison(result, metrics, prefix)
        result.run_id = run.info.run_id
    return result


def log_comparison(result: CompareResult, metrics: Sequence[str], prefix: str = DEFAULT_PREFIX) -> None:
    """Log ``result`` to the active run: the CSV/markdown artifacts and plots of the module docstring
    and the tag ``losslab.compare.n_not_pooled``."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result.table.reset_index().to_csv(root / "comparison.csv", index=False)
        (root / "comparison.md").write_text(result.markdown() + "\n")
        result.runs.to_csv(root / "runs.csv", index=False)
        result.stats.to_csv(root / "comparison_stats.csv", index=False)
        result.odd_runs.to_csv(root / "runs_not_pooled.csv", index=False)
        for name in ("comparison.csv", "comparison.md", "runs.csv", "comparison_stats.csv", "runs_not_pooled.csv"):
            mlflow.log_artifact(str(root / name))
    for path, figure in comparison_figures(result, metrics, prefix).items():
        log_figure(figure, path)
    mlflow.set_tag("losslab.compare.n_not_pooled", str(len(result.odd_runs)))


__all__ = ["CompareResult", "DEFAULT_METRICS", "ExperimentNotFoundError", "GroupByError", "MISSING", "compare_table",
           "comparison_figures", "comparison_stats", "epoch_curves", "format_mean_std", "log_comparison",
           "resolve_group_by", "run_compare", "search_experiment_runs", "select_fold_runs", "split_like_runs", "stats_display"]
