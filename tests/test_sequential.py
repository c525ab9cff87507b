"""The sequential design: looking again after each added seed keeps the false-positive rate at alpha
(simulated studies with no true difference), while looking naively at 0.05 every time does not; the
spending function against its formula and gsDesign's published boundaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from losslab import stats

LOOKS = list(range(3, 11))  # a study of 3 seeds, extended one seed at a time up to a budget of 10


def _look_p_values(differences: np.ndarray, ratio: float) -> np.ndarray:
    """(studies, looks) corrected t-test p-values computed directly with numpy/scipy (a second code path)."""
    out = []
    for n in LOOKS:
        d = differences[:, :n]
        t = d.mean(axis=1) / np.sqrt((1 / n + ratio) * d.var(axis=1, ddof=1))
        out.append(2 * sps.t.sf(np.abs(t), n - 1))
    return np.stack(out, axis=1)


@pytest.mark.parametrize("ratio", [0.0, 0.25])
def test_false_positive_rate_stays_at_alpha_and_naive_looks_exceed_it(ratio):
    studies = 20_000
    differences = np.random.default_rng(2026).normal(0.0, 0.03, size=(studies, LOOKS[-1]))  # no true difference
    p = _look_p_values(differences, ratio)
    thresholds = stats.sequential_thresholds(LOOKS)
    sequential = float((p < thresholds).any(axis=1).mean())
    naive = float((p < 0.05).any(axis=1).mean())
    standard_error = math.sqrt(0.05 * 0.95 / studies)
    assert sequential <= 0.05 + 2 * standard_error  # 0.053: Monte Carlo noise only
    if ratio == 0:  # looking at 0.05 after every seed: about three times alpha (with the correction on
        assert naive > 0.10  # independent differences the fixed test is conservative and hides it)
        assert sequential >= 0.05 - 3 * standard_error  # the budget of alpha is spent, not wasted
    for k in (0, 3):  # sequential_decision makes the same calls as the direct computation
        decision = stats.sequential_decision(differences[k], LOOKS, ratio)
        crossed = np.flatnonzero(p[k] < thresholds)
        assert decision.decided == bool(crossed.size)
        assert decision.n_pairs == (LOOKS[crossed[0]] if crossed.size else LOOKS[-1])
        assert decision.budget_spent == (not crossed.size)


def test_a_real_difference_is_decided_early():
    differences = np.random.default_rng(1).normal(0.04, 0.02, size=(200, LOOKS[-1]))
    decisions = [stats.sequential_decision(d, LOOKS) for d in differences]
    assert np.mean([d.decided for d in decisions]) > 0.9
    assert np.median([d.n_pairs for d in decisions]) < LOOKS[-1]
    partial = stats.sequential_decision(differences[0][:4], LOOKS)  # only looks 3 and 4 are done
    assert partial.n_pairs <= 4 and not partial.budget_spent


def test_spending_function_and_published_boundaries():
    # Lan-DeMets O'Brien-Fleming spending, two-sided 0.05 spent 0.025 a side (gsDesign sfLDOF):
    # alpha(t) = 2 * (2 - 2 Phi(z_{1 - 0.0125} / sqrt(t)))
    for t in (0.2, 0.5, 1.0):
        assert stats.obrien_fleming_spending(t) == pytest.approx(4 * sps.norm.sf(sps.norm.isf(0.0125) / math.sqrt(t)))
    assert stats.obrien_fleming_spending(1.0) == pytest.approx(0.05)
    # with many pairs a look the t-test is the z-test: five equally spaced looks give gsDesign's
    # boundaries 4.877, 3.357, 2.680, 2.290, 2.031 (the first spends 1e-6, too few simulated studies to say)
    z = sps.norm.isf(stats.sequential_thresholds([200, 400, 600, 800, 1000]) / 2)
    assert z[1:] == pytest.approx([3.357, 2.680, 2.290, 2.031], abs=0.04)


def test_one_look_is_the_fixed_test():
    assert stats.sequential_thresholds([5]) == pytest.approx([0.05], abs=2e-3)


def test_bad_looks_are_named():
    with pytest.raises(ValueError, match=r"strictly increasing.*\[3, 3\]"):
        stats.sequential_thresholds([3, 3])
    with pytest.raises(ValueError, match="needs 3 pairs, got 2"):
        stats.sequential_decision([0.1, 0.2], [3, 4])
