"""The sequential plan of a study: which cells it needs, what each look decides, when it is done.

A **cell** is one (variant, fold, seed): one ``train`` run (and its ``evaluate`` run where asked). The
study starts with every variant on every fold of its first seeds. When every cell of the seeds so far is
done it **looks**: each planned pair A − B is judged by :func:`losslab.stats.sequential_decision` (a
group-sequential design with Lan–DeMets O'Brien–Fleming alpha spending, a look after each seed from the
first seeds to the budget; alpha split over the planned pairs, Bonferroni) on the paired differences of
the primary metric over the (seed, fold) blocks both variants have, in the order they were added. The
next seed's cells are added for the variants of the pairs still undecided, until every pair is decided
or the seed budget is spent. :func:`required_cells` replays this from the results alone, so any worker,
at any time (and after any crash), computes the same plan.

The paired test is the Nadeau–Bengio corrected t-test with ``n_test/n_train`` of the runs when the study
has several folds (training sets overlap); with one fold every block trains on the same cases and it is
the plain paired t-test over seeds. Pure: frames in, decisions out (no MLflow, no Optuna).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from losslab import stats
from losslab.config.study import StudyConfig


@dataclass(frozen=True)
class Cell:
    variant: str
    fold: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.variant}|f{self.fold}|s{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.variant} fold {self.fold} seed {self.seed}"


def seed_cells(spec: StudyConfig, seed: int, variants: list[str]) -> list[Cell]:
    """The cells of one seed: fold by fold, every variant (so a pair's blocks complete early)."""
    return [Cell(v, f, seed) for f in spec.fold_list for v in variants]


def looks(spec: StudyConfig) -> list[int]:
    """Pairs at each look: folds × seeds, from the first seeds to the budget (a t-test needs 2)."""
    folds = len(spec.fold_list)
    return [folds * s for s in range(len(spec.seed_list), spec.budget + 1) if folds * s >= 2]


def differences(spec: StudyConfig, frame: pd.DataFrame, key: str, a: str, b: str) -> tuple[np.ndarray, float]:
    """``A − B`` of metric ``key`` per (seed, fold) block both have, in the order the blocks were added
    (seed, then fold), and the ``n_test/n_train`` of the test (0 with a single fold: see the module)."""
    part = frame[frame["variant"].isin([a, b])]
    if part.empty or key not in part:
        return np.array([]), math.nan
    seed_rank = {s: i for i, s in enumerate(spec.all_seeds)}
    part = part.assign(order=part["seed"].map(seed_rank) * 10_000 + part["fold"].astype(int),
                       value=pd.to_numeric(part[key], errors="coerce"))
    wide = part.pivot_table(index="order", columns="variant", values="value", aggfunc="mean").sort_index()
    if a not in wide or b not in wide:
        return np.array([]), math.nan
    shared = wide[[a, b]].dropna()
    if len(spec.fold_list) == 1:
        return (shared[a] - shared[b]).to_numpy(), 0.0
    ratios = part[part["order"].isin(shared.index)]["test_train_ratio"].astype(float)
    ratios = ratios[np.isfinite(ratios)]
    return (shared[a] - shared[b]).to_numpy(), float(ratios.mean()) if len(ratios) else math.nan


@dataclass
class PairOutcome:
    """Where one planned pair stands after the looks its data allows."""

    a: str
    b: str
    metric: str
    alpha: float  # this pair's share of the study's alpha
    budget: int  # seeds
    folds: int
    pairs: int = 0  # blocks at the look that decided, else at the last look done
    mean_diff: float = math.nan
    p_value: float = math.nan
    threshold: float = math.nan
    decided: bool = False
    budget_spent: bool = False
    better: str | None = None
    mde: float = math.nan  # smallest difference the pairs at that look detect (power 0.8, this alpha)
    n_needed: float = math.nan  # pairs that would detect the observed mean difference
    look: int = 0  # 1-based; 0: no look done yet
    first_look: int = 2

    @property
    def seeds(self) -> int:
        return self.pairs // max(1, self.folds)

    @property
    def name(self) -> str:
        return f"{self.a} − {self.b}"

    def line(self) -> str:
        """One line: decided (which is better, at which look) or undecided (why, MDE, pairs needed)."""
        head = f"{self.name} on {self.metric}"
        if self.look == 0:
            return f"{head}: untested: {self.pairs} pair(s), the first look needs {self.first_look}"
        at = f"look {self.look} ({self.seeds} seed(s), {self.pairs} pairs)"
        diff = f"{self.mean_diff:+.4g}, p {_num(self.p_value)} vs {_num(self.threshold)}"
        if self.decided:
            return f"{head}: decided at {at}: {self.better} better ({diff})"
        why = f"budget of {self.budget} seed(s) spent" if self.budget_spent else f"undecided after {self.seeds} seed(s)"
        need = ("no number of pairs would detect it" if not math.isfinite(self.n_needed)
                else f"about {int(self.n_needed)} pairs would detect {abs(self.mean_diff):.2g}")
        return f"{head}: undecided, {why} at {at} ({diff}); MDE {_num(self.mde)} at that look; {need}"


def _num(value: float) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.3g}"


def _power(out: PairOutcome, d: np.ndarray, ratio: float) -> None:
    """MDE at the look's pairs and the pairs that would detect the observed difference (this alpha)."""
    if d.size < 2 or not math.isfinite(ratio):
        return
    spread = float(d.std(ddof=1)) if not np.all(d == d[0]) else 0.0
    out.mde = stats.minimum_detectable_difference(spread, int(d.size), ratio, out.alpha)
    out.n_needed = stats.pairs_needed(float(d.mean()), spread, ratio, out.alpha)


def pair_outcome(spec: StudyConfig, frame: pd.DataFrame, a: str, b: str) -> PairOutcome:
    metric = spec.primary
    design = looks(spec)
    out = PairOutcome(a, b, metric.key(spec.split), spec.alpha / len(spec.planned_pairs), spec.budget,
                      len(spec.fold_list), first_look=design[0] if design else 2)
    d, ratio = differences(spec, frame, out.metric, a, b)
    out.pairs, out.mean_diff = int(d.size), float(d.mean()) if d.size else math.nan
    if not design or d.size < design[0] or not math.isfinite(ratio):
        return out
    decision = stats.sequential_decision(d, design, ratio, out.alpha)
    used = d[:decision.n_pairs]
    out.pairs, out.mean_diff, out.look = decision.n_pairs, float(used.mean()), design.index(decision.n_pairs) + 1
    out.p_value, out.threshold = decision.p_value, decision.threshold
    out.decided, out.budget_spent = decision.decided, decision.budget_spent
    if decision.decided:
        out.better = a if (out.mean_diff > 0) == metric.higher_is_better else b
    _power(out, used, ratio)
    return out


def outcomes(spec: StudyConfig, frame: pd.DataFrame) -> list[PairOutcome]:
    return [pair_outcome(spec, frame, a, b) for a, b in spec.planned_pairs]


def _variants_of(pending: list[PairOutcome], order: list[str]) -> list[str]:
    names = {p.a for p in pending} | {p.b for p in pending}
    return [v for v in order if v in names]


def required_cells(spec: StudyConfig, frame: pd.DataFrame, finished: set[str]) -> tuple[list[Cell], bool]:
    """The cells the study needs given the results so far (``frame``: one row per finished cell with
    ``variant``, ``fold``, ``seed``, ``test_train_ratio`` and the metrics; ``finished``: the keys of the
    cells done, failed ones included), and whether the study is complete: every needed cell done and
    every planned pair decided or the budget spent. Replays the looks seed by seed."""
    seeds, first = spec.all_seeds, len(spec.seed_list)
    cells = [c for s in seeds[:first] for c in seed_cells(spec, s, list(spec.variants))]
    for k in range(first, len(seeds) + 1):
        if any(c.key not in finished for c in cells):
            return cells, False
        pending = [o for o in outcomes(spec, frame[frame["seed"].isin(seeds[:k])]) if not o.decided]
        if not pending or k == len(seeds):
            return cells, True
        cells += seed_cells(spec, seeds[k], _variants_of(pending, list(spec.variants)))
    return cells, True


__all__ = ["Cell", "PairOutcome", "differences", "looks", "outcomes", "pair_outcome", "required_cells", "seed_cells"]
