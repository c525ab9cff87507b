"""A study's tables, plots and ``study.md``, computed from the MLflow store and logged to its parent run.

From the finished cells (:func:`losslab.pipelines.study_store.cells_frame`):

- **per variant**: mean ± sample std over the cells of each metric
  (:func:`losslab.pipelines.compare.format_mean_std`), the cells counted once each;
- **paired**: :func:`losslab.stats.paired_comparisons` per metric, blocks = (seed, fold): mean difference
  with its bootstrap CI, the corrected t-test (Wilcoxon from 6 pairs), Holm, verdict, the MDE and the
  pairs needed (each variant against the reference, or every pair when ``planned`` names pairs); a
  fixed-design table over every cell run;
- **sequential**: each planned pair where the looks left it (:mod:`losslab.pipelines.study_plan`),
  which decides;
- plots: the metric per variant (a box per variant, each cell a point) and, with three or more variants,
  the critical-difference diagram (:func:`losslab.stats.plot_critical_difference`).

Logged to the parent run: ``study.md`` (also its description, ``mlflow.note.content``, which the MLflow
UI shows on the run's page, followed there by the plots as images), ``study_cells.csv``, ``study_table.csv``, ``study_paired.csv``,
``study_sequential.csv``, ``plots/study_<metric>.png``, ``plots/critical_difference_<metric>.png``, the
metrics ``study/<variant>/<metric>_mean|_std`` and ``study/cells``, the tag ``losslab.study_verdict``.
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from losslab import stats
from losslab.config.study import StudyConfig
from losslab.pipelines.compare import format_mean_std, stats_display
from losslab.pipelines.study_plan import PairOutcome

NOTE_TAG = "mlflow.note.content"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def variant_order(spec: StudyConfig, frame: pd.DataFrame) -> list[str]:
    present = set(frame["variant"]) if len(frame) else set()
    return [v for v in spec.variants if v in present]


def values_for(spec: StudyConfig, frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """The input of :mod:`losslab.stats`: group, block (seed/fold), value, test_train_ratio."""
    return pd.DataFrame({"group": frame["variant"], "block": frame["seed"].astype(str) + "/" + frame["fold"].astype(str),
                         "value": pd.to_numeric(frame[key], errors="coerce") if key in frame else np.nan,
                         "test_train_ratio": frame["test_train_ratio"].astype(float)})


def variant_table(spec: StudyConfig, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: its cells, and mean ± std over them of each metric (``—`` when missing)."""
    rows = []
    for variant in variant_order(spec, frame):
        part = frame[frame["variant"] == variant]
        row: dict = {"variant": variant, "cells": len(part)}
        for metric in spec.metrics:
            key = metric.key(spec.split)
            values = pd.to_numeric(part[key], errors="coerce").dropna() if key in part else pd.Series(dtype=float)
            mean = float(values.mean()) if len(values) else math.nan
            std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            row |= {f"{key}_mean": mean, f"{key}_std": std, key: format_mean_std(mean, std, len(values), len(part))}
        rows.append(row)
    return pd.DataFrame(rows)


def paired_table(spec: StudyConfig, frame: pd.DataFrame) -> pd.DataFrame:
    """:func:`losslab.stats.paired_comparisons` of every metric over the (seed, fold) blocks."""
    order, tables = variant_order(spec, frame), []
    reference = spec.reference if spec.planned is None else None
    for metric in spec.metrics:
        key = metric.key(spec.split)
        values = values_for(spec, frame, key)
        if len(spec.fold_list) == 1:
            values["test_train_ratio"] = 0.0  # one fold: every block trains on the same cases (plain paired t)
        tables.append(stats.paired_comparisons(values, key, metric.higher_is_better, groups=order, alpha=spec.alpha,
                                               reference=reference))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=stats.COLUMNS)


def sequential_table(outcomes: list[PairOutcome]) -> pd.DataFrame:
    rows = []
    for o in outcomes:
        p, threshold, outcome = stats.sequential_cells(o.p_value, o.threshold, o.decided, o.budget_spent, o.seeds, o.budget)
        rows.append({"comparison": o.name, "metric": o.metric, "alpha": o.alpha, "seeds": o.seeds, "pairs": o.pairs,
                     "mean_diff": o.mean_diff, "p": p, "threshold": threshold, "outcome": outcome,
                     "better": o.better or "", "mde": o.mde, "n_needed": o.n_needed})
    return pd.DataFrame(rows)


def _markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "(none)"
    shown = table.copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = [("—" if not math.isfinite(v) else f"{v:.4g}") for v in shown[column]]
    return shown.to_markdown(index=False, disable_numparse=True)


def study_markdown(spec: StudyConfig, frame: pd.DataFrame, outcomes: list[PairOutcome], paired: pd.DataFrame,
                   failed: list[str]) -> str:
    seeds = sorted({int(s) for s in frame["seed"]}) if len(frame) else []
    table = variant_table(spec, frame)
    shown = table[["variant", "cells"] + [m.key(spec.split) for m in spec.metrics]] if len(table) else table
    design = stats.sequential_design_text(len(spec.seed_list), spec.budget, spec.alpha, len(outcomes),
                                          "Nadeau–Bengio corrected t-test" if len(spec.fold_list) > 1 else "paired t-test")
    lines = [f"# Study `{spec.name}`", "",
             f"{len(spec.variants)} variants ({', '.join(spec.variants)}), folds {spec.fold_list}, seeds {seeds} "
             f"(budget {spec.budget}); cells scored on the `{spec.split}` split; {len(frame)} finished cell(s)"
             + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else "") + ".", "",
             "## Decisions", "", *[f"- {o.line()}" for o in outcomes], "",
             "## Per variant (mean ± sample std over its cells)", "", _markdown(shown), "",
             "## Sequential study (decides the planned pairs)", "", design, "", _markdown(sequential_table(outcomes)), "",
             "## Paired comparisons (every cell; fixed-design p-values)", "",
             f"Blocks = seed/fold; MDE: the smallest difference these pairs detect with power 0.8 at two-sided "
             f"{spec.alpha:g}, one comparison before the Holm step; n_needed: pairs that would detect the observed "
             "difference.", "", _markdown(stats_display(paired)) if len(paired) else "(no pairs)", "",
             stats.SEQUENTIAL_DECIDES]
    return "\n".join(lines) + "\n"


def metric_figure(spec: StudyConfig, frame: pd.DataFrame, key: str):
    """The metric per variant: a box per variant and each cell a point (jittered, one colour a fold)."""
    from matplotlib.figure import Figure

    order = variant_order(spec, frame)
    fig = Figure(figsize=(max(4.5, 1.6 + 1.2 * len(order)), 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    data = [pd.to_numeric(frame.loc[frame["variant"] == v, key], errors="coerce").dropna().to_numpy() for v in order]
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(order) + 1), order)
    rng = np.random.default_rng(0)
    for i, variant in enumerate(order, start=1):
        part = frame[frame["variant"] == variant]
        x = i + rng.uniform(-0.12, 0.12, len(part))
        ax.scatter(x, pd.to_numeric(part[key], errors="coerce"), c=part["fold"].astype(int), cmap="tab10",
                   vmin=0, vmax=9, s=22, zorder=3, edgecolors="black", linewidths=0.4)
    ax.set_ylabel(key)
    ax.set_title(f"study {spec.name}: {key} per variant\n(box: quartiles; each point a cell, colour = fold)", fontsize=9)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    return fig


def figures(spec: StudyConfig, frame: pd.DataFrame) -> dict:
    out = {}
    if frame.empty:
        return out
    for metric in spec.metrics:
        key = metric.key(spec.split)
        out[f"plots/study_{_safe(key)}.png"] = metric_figure(spec, frame, key)
        critical = stats.critical_difference(values_for(spec, frame, key), metric.higher_is_better, spec.alpha)
        if critical is not None:
            out[f"plots/critical_difference_{_safe(key)}.png"] = stats.plot_critical_difference(critical, key, spec.alpha)
    return out


def plot_links(run_id: str, paths: list[str]) -> str:
    """The plots as images in the run's description: links to the MLflow server's ``get-artifact`` endpoint,
    relative to the UI's address (so the Overview shows them, under any ``--static-prefix``)."""
    from urllib.parse import quote

    if not paths:
        return ""
    return "\n## Plots\n\n" + "\n\n".join(
        f"![{path}](get-artifact?path={quote(path, safe='')}&run_uuid={run_id})" for path in paths) + "\n"


def log_report(parent_id: str, spec: StudyConfig, frame: pd.DataFrame, outcomes: list[PairOutcome],
               paired: pd.DataFrame, markdown: str) -> None:
    """Everything of the module docstring, on the parent run (re-logged by whoever finishes last)."""
    from losslab.tracking import log_metrics_batch

    client = MlflowClient()
    table = variant_table(spec, frame)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "study.md").write_text(markdown)
        frame.to_csv(root / "study_cells.csv", index=False)
        table.to_csv(root / "study_table.csv", index=False)
        paired.to_csv(root / "study_paired.csv", index=False)
        sequential_table(outcomes).to_csv(root / "study_sequential.csv", index=False)
        for name in ("study.md", "study_cells.csv", "study_table.csv", "study_paired.csv", "study_sequential.csv"):
            client.log_artifact(parent_id, str(root / name))
    plots = figures(spec, frame)
    for path, fig in plots.items():
        client.log_figure(parent_id, fig, path)
    metrics = {"study/cells": float(len(frame))}
    for row in table.to_dict("records"):
        for m in spec.metrics:
            for stat in ("mean", "std"):
                value = row.get(f"{m.key(spec.split)}_{stat}", math.nan)
                if math.isfinite(value):
                    metrics[f"study/{_safe(row['variant'])}/{m.key(spec.split)}_{stat}"] = float(value)
    log_metrics_batch(parent_id, metrics, step=0)
    client.set_tag(parent_id, NOTE_TAG, (markdown + plot_links(parent_id, list(plots)))[:60000])
    client.set_tag(parent_id, "losslab.study_verdict", "; ".join(o.line() for o in outcomes)[:5000])


GENERATED = "_Generated from the MLflow store by `losslab study`; do not edit by hand._"


def write_section(path: str | Path, name: str, markdown: str, footer: str | None = GENERATED,
                  title: str = "# Results") -> None:
    """Replace (or append) the text between ``<!-- study:<name>:start -->`` and ``<!-- study:<name>:end -->``
    (``footer`` after the markdown; ``title`` heads a new file)."""
    file = Path(path)
    start, end = f"<!-- study:{name}:start -->", f"<!-- study:{name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n" + (f"\n{footer}\n" if footer else "") + end
    text = file.read_text() if file.exists() else title + "\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)


__all__ = ["figures", "log_report", "metric_figure", "paired_table", "plot_links", "sequential_table", "study_markdown",
           "values_for", "variant_table", "write_section"]
