"""losslab.stats: every statistic against a hand-worked value or a second SciPy code path."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from losslab import stats


def test_nadeau_bengio_t_by_hand():
    # d = [0.1, 0.2, 0.3]: mean 0.2, s^2 = 0.01; n_test/n_train = 0.5
    # t = 0.2 / sqrt((1/3 + 0.5) * 0.01) = 0.2 / sqrt(0.0083333) = 2.190890
    t, p = stats.nadeau_bengio_ttest([0.1, 0.2, 0.3], 0.5)
    assert t == pytest.approx(2.190890, abs=1e-6)
    # Student t with 2 degrees of freedom has the closed form sf(t) = (1 - t / sqrt(t^2 + 2)) / 2
    assert p == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-12)
    assert p == pytest.approx(0.159832, abs=1e-6)


def test_nadeau_bengio_with_no_correction_is_the_paired_t_test():
    a = np.array([0.71, 0.64, 0.80, 0.77, 0.69])
    b = np.array([0.60, 0.66, 0.71, 0.70, 0.58])
    t, p = stats.nadeau_bengio_ttest(a - b, 0.0)
    reference = sps.ttest_rel(a, b)
    assert t == pytest.approx(reference.statistic) and p == pytest.approx(reference.pvalue)
    # the correction only ever widens: same sign, larger p
    t_nb, p_nb = stats.nadeau_bengio_ttest(a - b, 0.25)
    assert t_nb == pytest.approx(reference.statistic / math.sqrt((1 / 5 + 0.25) / (1 / 5)))
    assert p_nb > p


def test_nadeau_bengio_degenerate_and_invalid():
    t, p = stats.nadeau_bengio_ttest([0.1, 0.1, 0.1], 0.5)
    assert t == math.inf and math.isnan(p)  # no spread: untested, never "significant"
    assert stats.nadeau_bengio_ttest([0.0, 0.0], 0.5) == (0.0, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        stats.nadeau_bengio_ttest([0.1], 0.5)
    with pytest.raises(ValueError, match="test_train_ratio"):
        stats.nadeau_bengio_ttest([0.1, 0.2], -1)


def test_holm_by_hand():
    # sorted p: 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    adjusted = stats.holm([0.2, math.nan, 0.01])  # NaN is not a hypothesis: m = 2
    assert adjusted[0] == pytest.approx(0.2) and adjusted[2] == pytest.approx(0.02) and math.isnan(adjusted[1])
    # sorted: 0.5*2 = 1.0, 0.6*1 = 0.6 -> running max 1.0, 1.0
    assert stats.holm([0.6, 0.5]).tolist() == pytest.approx([1.0, 1.0])


def test_bootstrap_equals_the_one_sample_bootstrap_of_the_differences():
    a = np.array([0.71, 0.64, 0.80, 0.77, 0.69, 0.75])
    b = np.array([0.60, 0.66, 0.71, 0.70, 0.58, 0.69])
    low, high = stats.bootstrap_mean_difference(a, b, n_resamples=2000, seed=3)
    reference = sps.bootstrap((a - b,), np.mean, n_resamples=2000, method="percentile",
                              rng=np.random.default_rng(3)).confidence_interval
    assert (low, high) == pytest.approx((reference.low, reference.high))
    assert low < (a - b).mean() < high
    assert stats.bootstrap_mean_difference([1.0, 2.0], [0.5, 1.5]) == (0.5, 0.5)  # no spread


def _frame(values: dict[str, list[float]], ratio: float = 0.25) -> pd.DataFrame:
    rows = [{"group": g, "block": (0, fold), "value": v, "test_train_ratio": ratio}
            for g, vs in values.items() for fold, v in enumerate(vs)]
    return pd.DataFrame(rows)


def test_paired_comparisons_rows_against_scipy():
    good = [0.80, 0.82, 0.79, 0.85, 0.81, 0.83]
    same1 = [0.60, 0.62, 0.61, 0.59, 0.63, 0.60]
    same2 = [0.61, 0.61, 0.60, 0.60, 0.62, 0.61]
    table = stats.paired_comparisons(_frame({"good": good, "same1": same1, "same2": same2}), "bal_acc",
                                     groups=["good", "same1", "same2"], n_resamples=500)
    assert list(table.columns) == stats.COLUMNS
    nb = table[table["test"] == "nadeau_bengio_t"].set_index(["group_a", "group_b"])
    wx = table[table["test"] == "wilcoxon"].set_index(["group_a", "group_b"])
    assert len(nb) == 3 and len(wx) == 3  # 6 pairs each: Wilcoxon too
    d = np.subtract(good, same1)
    t = d.mean() / math.sqrt((1 / 6 + 0.25) * d.var(ddof=1))
    assert nb.loc[("good", "same1"), "p_value"] == pytest.approx(2 * sps.t.sf(abs(t), 5))
    assert nb.loc[("good", "same1"), "mean_diff"] == pytest.approx(d.mean())
    assert wx.loc[("good", "same1"), "p_value"] == pytest.approx(2 / 64)  # exact: all 6 signs positive
    assert wx.loc[("same1", "same2"), "p_value"] == pytest.approx(sps.wilcoxon(same1, same2).pvalue)
    p = nb["p_value"].to_numpy()
    order = np.argsort(p)
    by_hand = np.maximum.accumulate(np.minimum(1, p[order] * np.array([3, 2, 1])))
    assert nb["p_holm"].to_numpy()[order] == pytest.approx(by_hand)
    assert nb.loc[("good", "same1"), "verdict"] == "good better"
    assert nb.loc[("same1", "same2"), "verdict"] == "no detectable difference"
    lower = stats.paired_comparisons(_frame({"good": good, "same1": same1}), "loss", higher_is_better=False,
                                     n_resamples=500)
    assert lower.loc[lower["test"] == "nadeau_bengio_t", "verdict"].item() == "same1 better"


def test_paired_comparisons_pair_only_shared_blocks_and_refuse_one_pair():
    frame = _frame({"a": [0.5, 0.6, 0.7], "b": [0.4, 0.5, 0.6]})
    frame.loc[(frame["group"] == "b") & (frame["block"] == (0, 2)), "value"] = np.nan
    table = stats.paired_comparisons(frame, "m", n_resamples=200)
    assert table["n_pairs"].item() == 2 and table["test"].item() == "nadeau_bengio_t"
    assert table["mean_diff"].item() == pytest.approx(0.1)
    one = stats.paired_comparisons(_frame({"a": [0.5], "b": [0.4]}), "m")
    assert one["verdict"].item() == "too few pairs" and math.isnan(one["p_value"].item())
    unknown = stats.paired_comparisons(_frame({"a": [0.5, 0.7, 0.6], "b": [0.4, 0.5, 0.6]}, ratio=np.nan), "m",
                                       n_resamples=200)
    assert math.isnan(unknown["p_value"].item()) and unknown["verdict"].item().startswith("untested")


def test_critical_difference_against_scipy_and_demsar_table():
    rng = np.random.default_rng(0)
    blocks = 10
    values = {"a": 0.8 + 0.01 * rng.standard_normal(blocks), "b": 0.6 + 0.01 * rng.standard_normal(blocks),
              "c": 0.6 + 0.01 * rng.standard_normal(blocks)}
    result = stats.critical_difference(_frame({k: list(v) for k, v in values.items()}))
    assert result.ranks["a"] == pytest.approx(1.0)  # best on every block
    assert result.ranks["b"] + result.ranks["c"] == pytest.approx(5.0)
    assert result.friedman_p == pytest.approx(sps.friedmanchisquare(*values.values()).pvalue)
    # Demsar (JMLR 2006) table 5: q_0.05 = 2.343 for k = 3; CD = q sqrt(k(k+1)/(6N))
    assert result.cd == pytest.approx(2.343 * math.sqrt(3 * 4 / (6 * blocks)), abs=2e-3)
    assert result.nemenyi.loc["a", "b"] < 0.05 and result.nemenyi.loc["b", "c"] > 0.05
    figure = stats.plot_critical_difference(result, "bal_acc")
    assert "Friedman" in figure.axes[0].get_title()
    assert stats.critical_difference(_frame({"a": [0.1, 0.2], "b": [0.2, 0.3]})) is None  # two groups


def test_identical_nonzero_differences_are_untested_not_significant():
    """Two folds on which A beats B by exactly 0.25 (both models all-majority on the same cases,
    say) are no evidence: the verdict says the differences have no spread, p stays NaN."""
    table = stats.paired_comparisons(_frame({"a": [0.75, 0.75], "b": [0.5, 0.5]}), "bal_acc", n_resamples=200)
    row = table.iloc[0]
    assert row["n_pairs"] == 2 and row["mean_diff"] == pytest.approx(0.25)
    assert math.isnan(row["p_value"]) and math.isnan(row["p_holm"])
    assert row["verdict"] == stats.NO_SPREAD


def test_many_to_one_comparisons_holm_over_the_reference_pairs_only():
    """``reference=``: only (reference, g) pairs, Holm over those (by hand from SciPy's paired t with
    test_train_ratio 0); a reference that is not there gives no pairs."""
    import pandas as pd
    from scipy import stats as sps

    from losslab.stats import paired_comparisons

    data = {"ref": [0.90, 0.92, 0.91, 0.93], "x": [0.80, 0.85, 0.79, 0.84], "y": [0.89, 0.90, 0.91, 0.90]}
    values = pd.DataFrame([{"group": g, "block": i, "value": v, "test_train_ratio": 0.0}
                           for g, vs in data.items() for i, v in enumerate(vs)])
    table = paired_comparisons(values, "m", groups=["ref", "x", "y"], reference="ref")
    table = table[table["test"] == "nadeau_bengio_t"].set_index("group_b")
    assert list(table.index) == ["x", "y"] and set(table["group_a"]) == {"ref"}
    raw = {g: sps.ttest_rel(data["ref"], data[g]).pvalue for g in ("x", "y")}
    low, high = sorted(raw, key=raw.get)
    assert table.loc[low, "p_holm"] == pytest.approx(min(1, 2 * raw[low]), rel=1e-6)
    assert table.loc[high, "p_holm"] == pytest.approx(min(1, max(2 * raw[low], raw[high])), rel=1e-6)
    assert paired_comparisons(values, "m", groups=["x", "y"], reference="ref").empty


def test_identical_pairs_say_there_is_nothing_to_test():
    """Two models that predict one class on every fold score the same on every block: the verdict says
    so, and no MDE or pairs-needed is given (there is no spread to size a test on)."""
    values = pd.DataFrame({"group": ["plan"] * 5 + ["coral"] * 5, "block": list(range(5)) * 2,
                           "value": [1 / 3] * 10, "test_train_ratio": 0.25})
    row = stats.paired_comparisons(values, "balanced_accuracy").iloc[0]
    assert row["verdict"] == stats.IDENTICAL and row["mean_diff"] == 0
    assert math.isnan(row["mde"]) and math.isnan(row["n_needed"])
    assert stats.n_needed_text(row["n_needed"], row["verdict"]) == "—"
    assert stats.decision_line(row) == f"coral − plan: {stats.IDENTICAL} (n = 5)"
