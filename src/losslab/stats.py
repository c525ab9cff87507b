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
- **Power** at the pairs it has (two-sided ``alpha``, power :data:`POWER` = 0.8, the noncentral t of
  ``scipy.stats.nct``): under a true mean difference :math:`\\delta` the corrected statistic is
  noncentral t with :math:`\\nu = n - 1` and noncentrality
  :math:`\\lambda = \\delta / (s_d \\sqrt{1/n + n_{test}/n_{train}})`. ``mde`` (minimum detectable
  difference) is the :math:`\\delta` that gives power 0.8 at the ``n`` pairs there are;
  ``n_needed`` the fewest pairs that give power 0.8 for the observed mean difference (``inf`` when
  no number of pairs can: the correction's floor, :math:`\\delta < (z_{1-\\alpha/2} + z_{power})\\,
  s_d \\sqrt{n_{test}/n_{train}}`, means more runs on the same data cannot detect it, only more data
  can). Both take :math:`s_d` (``ddof=1``) as the true spread.
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

**Sequential studies** (:func:`sequential_thresholds`, :func:`sequential_decision`): a study that adds
seeds until its comparison is decided looks at the data after each one; to keep the false-positive
rate at ``alpha`` over all the looks it uses a group-sequential design with the Lan–DeMets
O'Brien–Fleming-type alpha-spending function (K. K. G. Lan and D. L. DeMets, "Discrete sequential
boundaries for clinical trials", *Biometrika* 70, 659–663, 1983),
:math:`\\alpha(\\tau) = 2\\,(2 - 2\\Phi(z_{1-\\alpha/4} / \\sqrt{\\tau}))` (half of ``alpha`` a side, as
R's gsDesign ``sfLDOF``), with information fraction :math:`\\tau_k = n_k / n_{max}` (pairs at look k over
the budget's): look k spends :math:`\\alpha(\\tau_k) - \\alpha(\\tau_{k-1})`. The boundaries are those of
the paired t-test itself, not of a normal statistic: the looks share one variance estimate, and
normal-theory boundaries carried over by nominal p-values (Jennison and Turnbull's significance-level
approach) let a t-test at 3..10 pairs reach 5.8 % instead of 5 %. Under no difference the t-test's
sequence of statistics does not depend on the spread, so the thresholds are quantiles of simulated null
studies of independent normal blocks (:data:`SIMULATED_STUDIES`, a fixed seed); look k rejects when
the Nadeau–Bengio corrected p-value is under its threshold (the correction stands in for the
correlation of fold blocks, as in the fixed test; a single look's threshold is ``alpha`` itself).

MLflow-free: inputs are plain tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["ALPHA", "COLUMNS", "MIN_PAIRS_WILCOXON", "POWER", "CriticalDifference", "SequentialDecision",
           "bootstrap_mean_difference", "critical_difference", "decision_line", "holm", "minimum_detectable_difference",
           "nadeau_bengio_ttest", "obrien_fleming_spending", "pairs_needed", "paired_comparisons",
           "plot_critical_difference", "power_at", "sequential_decision", "sequential_thresholds"]

ALPHA = 0.05
POWER = 0.8
MAX_PAIRS = 1_000_000  # pairs_needed searches up to this many pairs
MIN_PAIRS_WILCOXON = 6
NB_TEST = "nadeau_bengio_t"
WILCOXON_TEST = "wilcoxon"
NO_DIFFERENCE = "no detectable difference"
TOO_FEW = "too few pairs"
UNTESTED = "untested: n_test/n_train unknown (runs lack data.n_val / data.n_train params)"
NO_SPREAD = "untested: every paired difference is the same (no spread to test against)"
IDENTICAL = "identical in every pair: nothing to test (e.g. both predict one class on every fold)"
COLUMNS = ["metric", "group_a", "group_b", "n_pairs", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm",
           "test", "verdict", "mde", "n_needed"]


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


def _check_power_inputs(n_pairs: int, spread: float, test_train_ratio: float, alpha: float, power: float) -> None:
    if n_pairs < 2:
        raise ValueError(f"power needs at least 2 pairs, got n_pairs={n_pairs}")
    if not math.isfinite(spread) or spread < 0:
        raise ValueError(f"spread (the sample std of the paired differences) must be finite and >= 0, got {spread}")
    if not math.isfinite(test_train_ratio) or test_train_ratio < 0:
        raise ValueError(f"test_train_ratio must be a finite number >= 0, got {test_train_ratio}")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must lie in (0, 1), got alpha={alpha}, power={power}")


def _two_sided_power(noncentrality: float, df: int, alpha: float) -> float:
    critical = float(stats.t.ppf(1 - alpha / 2, df))
    # the wrong-sign tail: SciPy returns NaN where it underflows (far below 1e-15), so it counts as 0 there
    wrong_sign = float(np.nan_to_num(stats.nct.cdf(-critical, df, noncentrality), nan=0.0))
    return float(stats.nct.sf(critical, df, noncentrality)) + wrong_sign


def power_at(difference: float, spread: float, n_pairs: int, test_train_ratio: float = 0.0,
             alpha: float = ALPHA) -> float:
    """Power of the two-sided (Nadeau–Bengio corrected) paired t-test at ``n_pairs`` when the true
    mean difference is ``difference`` and the differences' std is ``spread``: with
    :math:`\\lambda = \\delta / (\\sigma\\sqrt{1/n + r})` and :math:`c = t_{1-\\alpha/2, n-1}`,
    :math:`P(T > c) + P(T < -c)` for :math:`T \\sim` ``scipy.stats.nct(n - 1, λ)``."""
    _check_power_inputs(n_pairs, spread, test_train_ratio, alpha, POWER)
    if spread == 0:
        return 1.0 if difference != 0 else alpha
    noncentrality = abs(difference) / (spread * math.sqrt(1.0 / n_pairs + test_train_ratio))
    return _two_sided_power(noncentrality, n_pairs - 1, alpha)


def minimum_detectable_difference(spread: float, n_pairs: int, test_train_ratio: float = 0.0,
                                  alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference the test detects with probability ``power`` at ``n_pairs``
    (the root of :func:`power_at` in the difference, ``scipy.optimize.brentq``); 0 with no spread.

    Raises:
        ValueError: fewer than 2 pairs, a negative spread or ratio, alpha/power outside (0, 1).
    """
    from scipy.optimize import brentq

    _check_power_inputs(n_pairs, spread, test_train_ratio, alpha, power)
    if spread == 0:
        return 0.0
    upper = 4.0  # doubled until it brackets the root (nct's tail is NaN far out, so no huge fixed bracket)
    while _two_sided_power(upper, n_pairs - 1, alpha) < power:
        upper *= 2.0
    noncentrality = brentq(lambda lam: _two_sided_power(lam, n_pairs - 1, alpha) - power, 0.0, upper, xtol=1e-12)
    return float(noncentrality * spread * math.sqrt(1.0 / n_pairs + test_train_ratio))


def detection_floor(spread: float, test_train_ratio: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The minimum detectable difference as the pairs grow without bound:
    :math:`(z_{1-\\alpha/2} + z_{power})\\, \\sigma \\sqrt{r}` (0 without the correction)."""
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * spread * math.sqrt(test_train_ratio))


def pairs_needed(difference: float, spread: float, test_train_ratio: float = 0.0, alpha: float = ALPHA,
                 power: float = POWER) -> float:
    """The fewest pairs (>= 2) at which :func:`power_at` reaches ``power`` for ``difference``;
    ``inf`` when no number of pairs up to :data:`MAX_PAIRS` does (a zero difference, or one at or
    under :func:`detection_floor`: only more data per run can detect it). Bisection: the power
    grows with the pairs."""
    _check_power_inputs(2, spread, test_train_ratio, alpha, power)
    if difference == 0 or abs(difference) <= detection_floor(spread, test_train_ratio, alpha, power):
        return math.inf
    if spread == 0 or power_at(difference, spread, 2, test_train_ratio, alpha) >= power:
        return 2.0
    if power_at(difference, spread, MAX_PAIRS, test_train_ratio, alpha) < power:
        return math.inf
    low, high = 2, MAX_PAIRS  # power(low) < power <= power(high)
    while high - low > 1:
        middle = (low + high) // 2
        if power_at(difference, spread, middle, test_train_ratio, alpha) >= power:
            high = middle
        else:
            low = middle
    return float(high)


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
             higher_is_better: bool, alpha: float, no_spread: bool = False, identical: bool = False) -> str:
    if n_pairs < 2:
        return TOO_FEW
    if identical:
        return IDENTICAL
    if math.isnan(p_holm):
        return NO_SPREAD if no_spread else UNTESTED
    if p_holm >= alpha or mean_diff == 0:
        return NO_DIFFERENCE
    a_wins = (mean_diff > 0) == higher_is_better
    return f"{group_a if a_wins else group_b} better"


def _power_columns(d: np.ndarray, ratio: float) -> dict:
    """``mde`` at the pairs there are and ``n_needed`` for the observed mean difference (NaN when
    the t-test cannot run: fewer than 2 pairs or an unknown ratio)."""
    if d.size < 2 or not math.isfinite(ratio) or np.all(d == 0):  # identical pairs: no spread to size a test on
        return {"mde": math.nan, "n_needed": math.nan}
    spread = float(d.std(ddof=1)) if not np.all(d == d[0]) else 0.0
    return {"mde": minimum_detectable_difference(spread, int(d.size), ratio),
            "n_needed": pairs_needed(float(d.mean()), spread, ratio)}


def _pair_rows(metric: str, a: str, b: str, x: np.ndarray, y: np.ndarray, ratio: float,
               n_resamples: int, seed: int) -> list[dict]:
    d = x - y
    base = {"metric": metric, "group_a": a, "group_b": b, "n_pairs": int(d.size),
            "mean_diff": float(d.mean()) if d.size else math.nan, "ci_low": math.nan, "ci_high": math.nan,
            "no_spread": bool(d.size >= 2 and np.all(d == d[0]) and d[0] != 0),
            "identical": bool(d.size >= 2 and np.all(d == 0))} | _power_columns(d, ratio)
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
                       seed: int = 0, reference: str | None = None) -> pd.DataFrame:
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
        reference: compare only ``(reference, g)`` for every other group ``g`` (many-to-one: Holm
            over those pairs alone); default every pair.

    Returns:
        A table with :data:`COLUMNS`, one row per pair and test (``nadeau_bengio_t``, and also
        ``wilcoxon`` where ``n_pairs >= 6``); ``mde`` and ``n_needed`` are those of the corrected
        t-test (the same on a pair's Wilcoxon row).
    """
    frame = values.dropna(subset=["value"])
    order = [str(g) for g in (groups if groups is not None else sorted(frame["group"].astype(str).unique()))]
    frame = frame.assign(group=frame["group"].astype(str))
    wide = frame.groupby(["block", "group"])["value"].mean().unstack("group")
    ratios = frame.groupby(["block", "group"])["test_train_ratio"].mean().unstack("group")
    rows: list[dict] = []
    present = [g for g in order if g in wide.columns]
    pairs = combinations(present, 2) if reference is None else [
        (reference, g) for g in present if reference in present and g != reference]
    for a, b in pairs:
        shared = wide[[a, b]].dropna()
        known = ratios.loc[shared.index, [a, b]].to_numpy().ravel()
        known = known[np.isfinite(known)]
        ratio = float(known.mean()) if known.size else math.nan
        rows += _pair_rows(metric, a, b, shared[a].to_numpy(), shared[b].to_numpy(), ratio, n_resamples, seed)
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("p_holm", "verdict")] + ["no_spread", "identical"])
    table = table.astype({"mde": float, "n_needed": float})
    table["p_holm"] = np.nan
    for _, index in table.groupby("test").groups.items():
        table.loc[index, "p_holm"] = holm(table.loc[index, "p_value"].to_numpy())
    table["verdict"] = [_verdict(r.group_a, r.group_b, r.n_pairs, r.mean_diff, r.p_holm, higher_is_better, alpha,
                                 bool(r.no_spread), bool(r.identical)) for r in table.itertuples()]
    return table[COLUMNS]


def n_needed_text(n_needed: float, verdict: str) -> str:
    """``n_needed`` in words: ``already decided`` for a verdict that names a winner, ``not reachable``
    for ``inf``, ``—`` when untested, else the number of pairs."""
    if verdict.endswith(" better"):
        return "already decided"
    if math.isnan(n_needed):
        return "—"
    return "not reachable" if math.isinf(n_needed) else f"{int(n_needed)}"


def decision_line(row) -> str:
    """One line per pair (a row of :func:`paired_comparisons`), e.g. ``focal − ce = +0.021 [-0.030,
    +0.070]; undecided: 3 pairs detect ≥ 0.09, about 14 pairs would detect 0.021``."""
    head = f"{row.group_a} − {row.group_b}"
    if math.isnan(row.p_holm) or math.isnan(row.mde):
        return f"{head}: {row.verdict} (n = {row.n_pairs})"
    head += f" = {row.mean_diff:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}]"
    detect = f"{row.n_pairs} pairs detect ≥ {row.mde:.2g}"
    if row.verdict.endswith(" better"):
        return f"{head}; {row.verdict} (Holm p {row.p_holm:.3g}; {detect})"
    size = f"{abs(row.mean_diff):.2g}"
    if math.isinf(row.n_needed):
        return (f"{head}; undecided: {detect}; no number of runs on this data would detect {size} "
                "(the Nadeau–Bengio floor is above it: only more data can)")
    return f"{head}; undecided: {detect}, about {int(row.n_needed)} pairs would detect {size}"


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


# --------------------------------------------------------------------------- sequential studies
def obrien_fleming_spending(information_fraction: float, alpha: float = ALPHA) -> float:
    """The Lan–DeMets O'Brien–Fleming-type spending function, each side spending half of ``alpha``
    (the convention of R's gsDesign ``sfLDOF`` and ldbounds):
    :math:`\\alpha(\\tau) = 2\\,(2 - 2\\Phi(z_{1-\\alpha/4}/\\sqrt{\\tau}))`, the two-sided type-I error
    spent by information fraction ``τ`` in (0, 1]; ``α(1) = alpha``."""
    if not 0 < information_fraction <= 1:
        raise ValueError(f"information_fraction must lie in (0, 1], got {information_fraction}")
    return float(4.0 * stats.norm.sf(stats.norm.isf(alpha / 4) / math.sqrt(information_fraction)))


SIMULATED_STUDIES = 200_000  # null sequences behind the boundaries of sequential_thresholds


@lru_cache(maxsize=16)
def _null_p_values(looks: tuple[int, ...], seed: int) -> np.ndarray:
    """``(SIMULATED_STUDIES, len(looks))`` paired t-test p-values of simulated studies with no
    difference (standard normal paired differences: the statistic's null law is free of the spread).
    Each look adds a block of ``m`` differences through its sufficient statistics: the block sum
    ~ N(0, m) and the within-block sum of squares ~ chi-square(m - 1)."""
    rng = np.random.default_rng(seed)
    n = np.asarray(looks, dtype=float)
    sizes = np.diff(np.concatenate([[0.0], n]))
    sums = np.cumsum(rng.normal(0.0, np.sqrt(sizes), size=(SIMULATED_STUDIES, n.size)), axis=1)
    within = rng.chisquare(np.maximum(sizes - 1, 1e-12), size=(SIMULATED_STUDIES, n.size)) * (sizes > 1)
    block_sums = np.diff(np.concatenate([np.zeros((SIMULATED_STUDIES, 1)), sums], axis=1), axis=1)
    squares = np.cumsum(within + block_sums ** 2 / sizes, axis=1)
    mean = sums / n
    variance = (squares - n * mean ** 2) / (n - 1)
    t = mean / np.sqrt(variance / n)
    return 2.0 * stats.t.sf(np.abs(t), n - 1)


def sequential_thresholds(looks: Sequence[int], alpha: float = ALPHA, seed: int = 0) -> np.ndarray:
    """Nominal p-value thresholds of :func:`nadeau_bengio_ttest`, one per look, of the
    group-sequential design in the module docstring (looks at ``looks[k]`` pairs; the last is the
    budget): look k rejects when its p-value is under ``thresholds[k]``.

    Written by hand (SciPy and statsmodels have no alpha-spending boundaries, and the normal-theory
    boundaries of gsDesign-type software let the t-test, whose looks share one variance estimate,
    exceed ``alpha`` at a few pairs: 5.8 % at looks 3..10): the boundaries are quantiles of
    :data:`SIMULATED_STUDIES` simulated null studies (fixed ``seed``), look k's threshold the
    p-value under which a share :math:`\\alpha(\\tau_k) - \\alpha(\\tau_{k-1})` of all studies
    first crosses.

    Raises:
        ValueError: looks not strictly increasing or under 2 pairs; alpha outside (0, 1).
    """
    n = tuple(int(v) for v in looks)
    if not n or n[0] < 2 or any(b <= a for a, b in zip(n, n[1:])):
        raise ValueError(f"looks must be strictly increasing pair counts >= 2, got {list(looks)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    p_values = _null_p_values(n, seed)
    alive = np.ones(SIMULATED_STUDIES, dtype=bool)
    thresholds, spent = [], 0.0
    for k, pairs in enumerate(n):
        increment = obrien_fleming_spending(pairs / n[-1], alpha) - spent
        spent += increment
        surviving = np.sort(p_values[alive, k])
        crossing = min(int(increment * SIMULATED_STUDIES), surviving.size - 1)  # rounded down: never over
        thresholds.append(float(surviving[crossing]))  # `crossing` surviving studies lie strictly under it
        alive &= ~(p_values[:, k] < thresholds[-1])
    return np.asarray(thresholds)


@dataclass
class SequentialDecision:
    """Where a sequential comparison stands: ``decided`` at ``n_pairs`` (the look that crossed its
    boundary) or not yet (``n_pairs`` = the last look done); that look's p-value and threshold."""

    decided: bool
    n_pairs: int
    p_value: float
    threshold: float
    budget_spent: bool


def sequential_decision(differences: Sequence[float], looks: Sequence[int], test_train_ratio: float = 0.0,
                        alpha: float = ALPHA) -> SequentialDecision:
    """Run the design's looks, in order, on the first ``looks[k]`` of ``differences`` (in the order
    the pairs were added) with :func:`nadeau_bengio_ttest`; stop at the first look whose p-value
    is under its :func:`sequential_thresholds` level. Looks beyond the pairs there are are not done;
    ``budget_spent`` when the last look was done without a decision.

    Raises:
        ValueError: fewer pairs than the first look.
    """
    d = np.asarray(differences, dtype=float)
    thresholds = sequential_thresholds(looks, alpha)
    done = [k for k, n in enumerate(looks) if n <= d.size]
    if not done:
        raise ValueError(f"the first look needs {looks[0]} pairs, got {d.size}")
    p = math.nan
    for k in done:
        p = nadeau_bengio_ttest(d[:looks[k]], test_train_ratio)[1]
        if p < thresholds[k]:
            return SequentialDecision(True, int(looks[k]), p, float(thresholds[k]), False)
    last = done[-1]
    return SequentialDecision(False, int(looks[last]), p, float(thresholds[last]), last == len(looks) - 1)


def sequential_design_text(first_look: int, budget: int, alpha: float, n_pairs: int, test: str) -> str:
    """The one sentence a sequential study's table opens with: design, test, looks, alpha and its split."""
    return (f"Sequential study: group-sequential design, Lan–DeMets O'Brien–Fleming-type alpha spending "
            f"(`losslab.stats.sequential_decision`, {test} at each look), a look after each seed from {first_look} "
            f"to the budget of {budget}, alpha {alpha:.2g} split over {n_pairs} planned pair(s) (Bonferroni).")


#: said under a sequential study's tables: its fixed-design p-values are not its decision
SEQUENTIAL_DECIDES = ("The sequential table decides the planned pairs; the paired table's p-values are fixed-design "
                      "p-values over every seed run, which ignore the looks that chose when to stop.")


def fixed_design_text(seeds: int, folds: int | None = None) -> str:
    """The budget sentence of a study run without a sequential design."""
    blocks = f"{seeds} seed(s)" + (f" × {folds} fold(s) a variant" if folds is not None else "")
    return f"Budget: a fixed design of {blocks}, one look"


def sequential_cells(p_value: float, threshold: float, decided: bool, budget_spent: bool, seeds: int,
                     budget: int) -> tuple[str, str, str]:
    """``(p, the look's threshold, outcome)`` of one planned pair, as a sequential table shows them."""
    outcome = (f"decided at {seeds} seeds" if decided else f"budget of {budget} seeds spent" if budget_spent
               else f"undecided after {seeds} seeds (budget {budget})")
    if math.isnan(p_value):
        return "—", "—", outcome
    return f"{p_value:.3g}", f"{threshold:.3g}", outcome
