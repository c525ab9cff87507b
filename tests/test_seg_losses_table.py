"""bench/seg_losses.py's paired table (each loss against dice_ce in test mean Dice, blocks = seeds)
checked against SciPy's paired t-test, a hand Holm step and statsmodels' power solver."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.power import TTestPower

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seg_losses():
    spec = importlib.util.spec_from_file_location("seg_losses_bench", REPO / "bench" / "seg_losses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BY_SEED = {"dice_ce": {0: 0.930, 1: 0.921, 2: 0.940, 3: 0.928},
           "focal": {0: 0.850, 1: 0.790, 2: 0.860, 3: 0.820},
           "dice": {0: 0.912, 1: 0.915, 2: 0.921, 3: 0.909}}


def test_paired_table_against_scipy_and_statsmodels(seg_losses):
    table = seg_losses.paired_table(BY_SEED, "dice_ce").set_index("group_b")
    ref = np.array(list(BY_SEED["dice_ce"].values()))
    raw = {}
    for loss in ("focal", "dice"):
        d = ref - np.array(list(BY_SEED[loss].values()))
        row = table.loc[loss]
        assert row["mean_diff"] == pytest.approx(d.mean(), abs=1e-12)
        raw[loss] = stats.ttest_rel(ref, np.array(list(BY_SEED[loss].values()))).pvalue
        effect = TTestPower().solve_power(nobs=len(d), alpha=0.05, power=0.8, alternative="two-sided")
        assert row["mde"] == pytest.approx(effect * d.std(ddof=1), rel=0.02)
    low, high = sorted(raw, key=raw.get)  # Holm over the two pairs by hand
    assert table.loc[low, "p_holm"] == pytest.approx(min(1.0, 2 * raw[low]), rel=1e-6)
    assert table.loc[high, "p_holm"] == pytest.approx(min(1.0, max(2 * raw[low], raw[high])), rel=1e-6)


def test_paired_section_states_n_mde_and_budget(seg_losses):
    text = seg_losses.paired_section(BY_SEED, "dice_ce")
    table = seg_losses.paired_table(BY_SEED, "dice_ce").set_index("group_b")
    assert "a fixed design of 4 seeds, one look" in text
    row = table.loc["focal"]
    assert f"| dice_ce − focal | 4 | {row['mean_diff']:+.3f} |" in text
    assert f"| {row['mde']:.3f} |" in text
    assert seg_losses.paired_section({"focal": BY_SEED["focal"]}, "dice_ce") == ""  # no reference: no table
