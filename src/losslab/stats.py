"""Paired statistics for comparing groups of runs (losses, settings) over the same folds and seeds.

Two groups are compared on the *blocks* they share: a block is one (seed, fold) pair, so both
groups were trained and validated on the same data. For each pair of groups and each metric:

- ``mean_diff``: mean over the blocks of ``value_A - value_B``, with a 95 % bootstrap confidence
  interval (``scipy.stats.bootstrap``, ``paired=True``, percentile method, fixed ``rng``).
- The Nadeau–Bengio corrected resampled t-test (C. Nadeau and Y. Bengio, "Inference for the
  Generalization Error", *Machine Learning* 52, 239–281, 2003). Fold runs share most of their
  training data, so their differences are positively correlated and the plain paired t-test is
  far too confident. The correction inflates the variance of the mean difference from
  :math:`\\sigma^2 / n` to :math:`\\sigma^2 (1/n + n_{test}/n_{train})`:

  .. math:: t = \\bar d \\,/\\, \\sqrt{(1/n + n_{test}/n_{train})\\, s_d^2}, \\quad \\nu = n - 1

  with :math:`s_d^2` the sample variance (``ddof=1``) of the differences; the two-sided p-value is
  ``2 * scipy.stats.t.sf(|t|, n - 1)``.
- The Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) when there are at least
  :data:`MIN_PAIRS_WILCOXON` = 6 blocks (with fewer, even a perfectly consistent difference cannot
  reach p < 0.05 two-sided: the smallest exact p-value with n = 5 is 0.0625).
- Holm's step-down correction across the pairs of groups, separately for each (metric, test)
  family (``statsmodels.stats.multitest.multipletests(method="holm")``).
- A verdict from the Holm-corrected p-value at ``alpha`` (0.05): ``"<A> better"``,
  ``"<B> better"`` (which one depends on whether higher is better for the metric) or
  ``"no detectable difference"``; ``"too few pairs"`` with fewer than two blocks; ``"untested: ..."``
  when no run of the pair logged its ``n_test/n_train`` (the p-value is then NaN: no uncorrected
  t-test is substituted).

With three or more groups, :func:`critical_difference` ranks the groups within each complete block
(rank 1 = best), runs the Friedman test (``scipy.stats.friedmanchisquare``) and the Nemenyi post-hoc
test (``scikit_posthocs.posthoc_nemenyi_friedman``), and :func:`plot_critical_difference` draws the
critical-difference diagram of J. Demšar ("Statistical Comparisons of Classifiers over Multiple Data
Sets", JMLR 7, 1–30, 2006) with ``scikit_posthocs.critical_difference_diagram``; the critical
difference itself is :math:`q_\\alpha \\sqrt{k(k+1)/(6N)}` with :math:`q_\\alpha` the studentized
range quantile (``scipy.stats.studentized_range``) over :math:`\\sqrt 2`. (``aeon`` also draws these
diagrams but pins numpy/pandas below the versions losslab uses; scikit-posthocs installs cleanly.)

MLflow-free: inputs are plain tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["ALPHA", "COLUMNS", "MIN_PAIRS_WILCOXON", "CriticalDifference", "bootstrap_mean_difference",
           "critical_difference", "holm", "nadeau_bengio_ttest", "paired_comparisons", "plot_critical_difference"]

ALPHA = 0.05
MIN_PAIRS_WILCOXON = 6
NB_TEST = "nadeau_bengio_t"
WILCOXON_TEST = "wilcoxon"
NO_DIFFERENCE = "no detectable difference"
TOO_FEW = "too few pairs"
UNTESTED = "untested: n_test/n_train unknown (runs lack data.n_val / data.n_train params)"
NO_SPREAD = "untested: every paired difference is the same (no spread to test against)"
COLUMNS = ["metric", "group_a", "group_b", "n_pairs", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm",
           "test", "verdict"]


def nadeau_bengio_ttest(differences: Sequence[float], test_train_ratio: float) -> tuple[float, float]:
    """The corrected resampled t-test of Nadeau & Bengio (Machine Learning 52, 2003) on paired
    differences; returns ``(t, two-sided p)``.

    Args:
        differences: ``value_A - value_B`` per block (seed, fold), at least two.
        test_train_ratio: :math:`n_{test}/n_{train}` of one run (validation cases over training
            cases; ``1/(k-1)`` for k-fold CV), > 0. With 0 this is the ordinary paired t-test.

    When every difference is the same the variance is 0 and the test has nothing to judge the
    mean against: ``t = ±inf`` with ``p = NaN`` (untested, not "significant": two folds on which
    both models predict one class differ by the same amount without that being evidence) for a
    non-zero difference, and ``t = 0, p = 1`` when all are zero.

    Raises:
        ValueError: fewer than two differences, or a negative / non-finite ratio.
    """
    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        raise ValueError(f"the Nadeau-Bengio t-test needs at least 2 paired differences, got {d.size}")
    if not math.isfinite(test_train_ratio) or test_train_ratio < 0:
        raise ValueError(f"test_train_ratio must be a finite number >= 0, got {test_train_ratio}")
    n, mean, variance = d.size, float(d.mean()), float(d.var(ddof=1))
    if np.all(d == d[0]):  # no spread (np.var may leave rounding noise instead of 0)
        return (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), math.nan)
    t = mean / math.sqrt((1.0 / n + test_train_ratio) * variance)
    return t, float(2.0 * stats.t.sf(abs(t), n - 1))


def bootstrap_mean_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                              n_resamples: int = 9999, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(a - b)`` with the pairs resampled together
    (``scipy.stats.bootstrap(..., paired=True)``); ``(d, d)`` when every difference is ``d``."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = x - y
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    result = stats.bootstrap((x, y), lambda u, v, axis=-1: np.mean(u - v, axis=axis), paired=True,
                             vectorized=True, n_resamples=n_resamples, confidence_level=confidence,
                             method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (``statsmodels ... multipletests(method="holm")``);
    NaN entries stay NaN and do not count as hypotheses."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        out[finite] = multipletests(p[finite], method="holm")[1]
    return out


def _verdict(group_a: str, group_b: str, n_pairs: int, mean_diff: float, p_holm: float,
             higher_is_better: bool, alpha: float, no_spread: bool = False) -> str:
    if n_pairs < 2:
        return TOO_FEW
    if math.isnan(p_holm):
        return NO_SPREAD if no_spread else UNTESTED
    if p_holm >= alpha or mean_diff == 0:
        return NO_DIFFERENCE
    a_wins = (mean_diff > 0) == higher_is_better
    return f"{group_a if a_wins else group_b} better"


def _pair_rows(metric: str, a: str, b: str, x: np.ndarray, y: np.ndarray, ratio: float,
               n_resamples: int, seed: int) -> list[dict]:
    d = x - y
    base = {"metric": metric, "group_a": a, "group_b": b, "n_pairs": int(d.size),
            "mean_diff": float(d.mean()) if d.size else math.nan, "ci_low": math.nan, "ci_high": math.nan,
            "no_spread": bool(d.size >= 2 and np.all(d == d[0]) and d[0] != 0)}
    if d.size < 2:
        return [base | {"p_value": math.nan, "test": NB_TEST}]
    base["ci_low"], base["ci_high"] = bootstrap_mean_difference(x, y, n_resamples=n_resamples, seed=seed)
    p_nb = nadeau_bengio_ttest(d, ratio)[1] if math.isfinite(ratio) else math.nan
    rows = [base | {"p_value": p_nb, "test": NB_TEST}]
    if d.size >= MIN_PAIRS_WILCOXON:
        p_w = 1.0 if np.all(d == 0) else float(stats.wilcoxon(x, y).pvalue)
        rows.append(base | {"p_value": p_w, "test": WILCOXON_TEST})
    return rows


def paired_comparisons(values: pd.DataFrame, metric: str, higher_is_better: bool = True,
                       groups: Sequence[str] | None = None, alpha: float = ALPHA, n_resamples: int = 9999,
                       seed: int = 0) -> pd.DataFrame:
    """Every pair of groups compared on their shared blocks; see the module docstring.

    Args:
        values: one row per run with columns ``group``, ``block`` (hashable: the (seed, fold) pair),
            ``value`` (the metric; NaN = not logged) and ``test_train_ratio`` (the run's
            ``n_val / n_train``; NaN when unknown, which leaves the t-test's p-value NaN). Runs
            of one group in the same block are averaged.
        metric: the name written in the ``metric`` column.
        higher_is_better: which sign of ``mean_diff`` is better.
        groups: the groups in order (pairs are ``(groups[i], groups[j])`` with ``i < j``);
            default: sorted.

    Returns:
        A table with :data:`COLUMNS`, one row per pair and test (``nadeau_bengio_t``, and also
        ``wilcoxon`` where ``n_pairs >= 6``).
    """
    frame = values.dropna(subset=["value"])
    order = [str(g) for g in (groups if groups is not None else sorted(frame["group"].astype(str).unique()))]
    frame = frame.assign(group=frame["group"].astype(str))
    wide = frame.groupby(["block", "group"])["value"].mean().unstack("group")
    ratios = frame.groupby(["block", "group"])["test_train_ratio"].mean().unstack("group")
    rows: list[dict] = []
    for a, b in combinations([g for g in order if g in wide.columns], 2):
        shared = wide[[a, b]].dropna()
        known = ratios.loc[shared.index, [a, b]].to_numpy().ravel()
        known = known[np.isfinite(known)]
        ratio = float(known.mean()) if known.size else math.nan
        rows += _pair_rows(metric, a, b, shared[a].to_numpy(), shared[b].to_numpy(), ratio, n_resamples, seed)
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("p_holm", "verdict")] + ["no_spread"])
    table["p_holm"] = np.nan
    for _, index in table.groupby("test").groups.items():
        table.loc[index, "p_holm"] = holm(table.loc[index, "p_value"].to_numpy())
    table["verdict"] = [_verdict(r.group_a, r.group_b, r.n_pairs, r.mean_diff, r.p_holm, higher_is_better, alpha,
                                 bool(r.no_spread)) for r in table.itertuples()]
    return table[COLUMNS]


@dataclass
class CriticalDifference:
    """Average ranks (1 = best), Nemenyi p-values between groups, the Friedman p-value, the
    critical difference of average ranks and the number of complete blocks."""

    ranks: pd.Series
    nemenyi: pd.DataFrame
    friedman_p: float
    cd: float
    n_blocks: int


def critical_difference(values: pd.DataFrame, higher_is_better: bool = True,
                        alpha: float = ALPHA) -> CriticalDifference | None:
    """Friedman + Nemenyi over the blocks where every group has a value (``values`` as in
    :func:`paired_comparisons`; groups with fewer than 2 values are left out); None with fewer
    than 3 groups or 2 complete blocks."""
    import scikit_posthocs as sp

    wide = values.dropna(subset=["value"]).assign(group=lambda f: f["group"].astype(str)) \
        .groupby(["block", "group"])["value"].mean().unstack("group")
    wide = wide.loc[:, wide.notna().sum() >= 2].dropna()  # groups with one run cannot be ranked reliably
    k, n = wide.shape[1], wide.shape[0]
    if k < 3 or n < 2:
        return None
    ranks = (-wide if higher_is_better else wide).rank(axis=1, method="average").mean(axis=0)
    friedman_p = float(stats.friedmanchisquare(*[wide[c].to_numpy() for c in wide.columns]).pvalue)
    nemenyi = sp.posthoc_nemenyi_friedman(wide.reset_index(drop=True))
    q_alpha = float(stats.studentized_range.ppf(1 - alpha, k, np.inf)) / math.sqrt(2)
    cd = q_alpha * math.sqrt(k * (k + 1) / (6.0 * n))
    return CriticalDifference(ranks.sort_values(), nemenyi, friedman_p, cd, n)


def plot_critical_difference(result: CriticalDifference, metric: str, alpha: float = ALPHA):
    """The critical-difference diagram (scikit-posthocs): groups joined by a bar are not
    significantly different by the Nemenyi test at ``alpha``."""
    import scikit_posthocs as sp

    from losslab.plots import _figure

    fig = _figure(7.0, 1.4 + 0.35 * len(result.ranks))
    ax = fig.add_subplot(1, 1, 1)
    sp.critical_difference_diagram(result.ranks, result.nemenyi, ax=ax, alpha=alpha)
    ax.set_title(f"{metric}: average rank over {result.n_blocks} blocks (1 = best); "
                 f"Friedman p = {result.friedman_p:.3g}, CD = {result.cd:.2f}", fontsize=9)
    return fig
