"""Power of the paired comparisons: the minimum detectable difference (``mde``) and the pairs needed
(``n_needed``) against statsmodels' ``TTestPower`` without the Nadeau–Bengio correction, and by hand
with it (the corrected test at n pairs is statsmodels' one-sample t-test at n with the effect size
shrunk by sqrt(1 + n r); the floor is (z_0.975 + z_0.8) sd sqrt(r))."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.power import TTestPower

from losslab import stats

SPREAD = 0.02


def _pairs(mean_diff: float, spread: float, n: int, seed: int = 0) -> np.ndarray:
    """n paired differences drawn from a normal, then standardised to exactly this mean and sample std."""
    z = np.random.default_rng(seed).normal(size=n)
    return mean_diff + spread * (z - z.mean()) / z.std(ddof=1)


def _corrected_power_statsmodels(difference: float, spread: float, n: int, ratio: float) -> float:
    effect = difference / (spread * math.sqrt(1 + n * ratio))
    return float(TTestPower().power(effect_size=effect, nobs=n, alpha=0.05, alternative="two-sided"))


@pytest.mark.parametrize("n", [2, 3, 6, 10, 40])
def test_mde_without_correction_equals_statsmodels(n):
    effect = TTestPower().solve_power(effect_size=None, nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    assert stats.minimum_detectable_difference(SPREAD, n) == pytest.approx(effect * SPREAD, rel=1e-5)


@pytest.mark.parametrize("effect", [0.3, 0.5, 1.0, 2.0])
def test_pairs_needed_without_correction_equals_statsmodels(effect):
    n = TTestPower().solve_power(effect_size=effect, nobs=None, alpha=0.05, power=0.8, alternative="two-sided")
    assert stats.pairs_needed(effect * SPREAD, SPREAD) == max(2, math.ceil(n))


@pytest.mark.parametrize("n, ratio", [(3, 0.25), (6, 0.25), (15, 1 / 9)])
def test_mde_with_correction_by_hand(n, ratio):
    mde = stats.minimum_detectable_difference(SPREAD, n, ratio)
    assert _corrected_power_statsmodels(mde, SPREAD, n, ratio) == pytest.approx(0.8, abs=1e-6)
    effect = TTestPower().solve_power(effect_size=None, nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    assert mde == pytest.approx(effect * SPREAD * math.sqrt(1 + n * ratio), rel=1e-5)


def test_pairs_needed_with_correction_by_hand_and_the_floor():
    ratio = 0.25
    floor = (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * SPREAD * math.sqrt(ratio)
    assert stats.detection_floor(SPREAD, ratio) == pytest.approx(floor) == pytest.approx(2.8016 * SPREAD * 0.5, rel=1e-4)
    difference = 1.3 * floor
    needed = stats.pairs_needed(difference, SPREAD, ratio)
    powers = {n: _corrected_power_statsmodels(difference, SPREAD, n, ratio) for n in (needed - 1, needed)}
    assert powers[needed - 1] < 0.8 <= powers[needed]
    assert stats.pairs_needed(0.99 * floor, SPREAD, ratio) == math.inf  # below the floor: no number of runs
    assert stats.pairs_needed(0.0, SPREAD) == math.inf


@pytest.mark.parametrize("ratio", [0.0, 0.25])
def test_paired_comparisons_report_mde_and_n_needed_of_known_pairs(ratio):
    """The bar: pairs drawn with a known mean difference and spread give the hand-computed mde and n_needed
    (statsmodels' noncentral-t power, with the correction folded into the effect size) within 2 %."""
    n, mean_diff = 5, 0.03
    d = _pairs(mean_diff, SPREAD, n, seed=3)
    base = np.linspace(0.6, 0.7, n)
    values = pd.DataFrame({"group": ["a"] * n + ["b"] * n, "block": list(range(n)) * 2,
                           "value": np.concatenate([base + d, base]), "test_train_ratio": ratio})
    row = stats.paired_comparisons(values, "m", groups=["a", "b"], n_resamples=999).iloc[0]
    effect = TTestPower().solve_power(effect_size=None, nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    assert row["mde"] == pytest.approx(effect * SPREAD * math.sqrt(1 + n * ratio), rel=0.02)
    by_hand = next(k for k in range(2, 10_000) if _corrected_power_statsmodels(mean_diff, SPREAD, k, ratio) >= 0.8)
    assert row["n_needed"] == pytest.approx(by_hand, rel=0.02)
    assert stats.n_needed_text(row["n_needed"], row["verdict"]) in (str(by_hand), "already decided")


def test_decision_line_says_what_would_decide():
    row = pd.Series({"group_a": "focal", "group_b": "ce", "n_pairs": 3, "mean_diff": 0.021, "ci_low": -0.03,
                     "ci_high": 0.07, "p_holm": 0.4, "verdict": stats.NO_DIFFERENCE, "mde": 0.09, "n_needed": 14.0})
    line = stats.decision_line(row)
    assert line == "focal − ce = +0.021 [-0.030, +0.070]; undecided: 3 pairs detect ≥ 0.09, about 14 pairs would detect 0.021"
    unreachable = stats.decision_line(row.copy().replace({14.0: math.inf}))
    assert "only more data can" in unreachable
    decided = row.copy()
    decided["verdict"], decided["p_holm"] = "focal better", 0.01
    assert "focal better (Holm p 0.01; 3 pairs detect ≥ 0.09)" in stats.decision_line(decided)
    assert stats.n_needed_text(14.0, "focal better") == "already decided"
    assert stats.n_needed_text(math.inf, stats.NO_DIFFERENCE) == "not reachable"


def test_bad_power_inputs_are_named():
    with pytest.raises(ValueError, match="n_pairs=1"):
        stats.minimum_detectable_difference(SPREAD, 1)
    with pytest.raises(ValueError, match="test_train_ratio"):
        stats.pairs_needed(0.1, SPREAD, -0.1)
