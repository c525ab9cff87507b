"""scripts/learnability.py: the learnability check of an embedded cohort (a linear model on the plan's cache,
out of fold) and what a loss study on it could detect at each size.

A tiny BraTS cohort end to end (30 cases, 48×48×16) through main(), the lumbar features on a crafted cache,
and the study's reach checked against losslab.stats' own power function."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def learnability():
    spec = importlib.util.spec_from_file_location("learnability", REPO / "scripts" / "learnability.py")
    module = sys.modules["learnability"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("learnability", None)


def test_tiny_brats_cohort_end_to_end(learnability, tmp_path, monkeypatch):
    tiny = dataclasses.replace(learnability.COHORTS["brats"], overrides=(
        *learnability.COHORTS["brats"].overrides, "data.generator_kwargs.shape=[48, 48, 16]"))
    monkeypatch.setitem(learnability.COHORTS, "brats", tiny)
    monkeypatch.setattr(learnability, "DOCUMENTED_SIZE", 30)  # the reach is projected from the size run here
    results = tmp_path / "results.md"
    results.write_text("# Results\n\nkept text\n")
    table = learnability.main(["--cohort", "brats", "--sizes", "30", "--workdir", str(tmp_path / "work"),
                               "--reach", "--budget-seeds", "3", "--write-results", str(results)])
    row = table.iloc[0]
    index = pd.read_parquet(tmp_path / "work" / "cache_30" / "index.parquet")
    test = index["fold"] == -1
    assert row["cases"] == len(index) == 30 and row["n_test"] == int(test.sum())
    assert row["cv_n_LGG"] + row["cv_n_HGG"] == int((~test).sum())
    assert row["test_n_LGG"] == int(((index["label"] == 0) & test).sum())
    for prefix in ("cv_", "test_"):
        assert 0.0 <= row[f"{prefix}balanced_accuracy"] <= 1.0 and 0.0 <= row[f"{prefix}f1_macro"] <= 1.0
    assert row["cv_recall_LGG_low"] <= row["cv_recall_LGG"] <= row["cv_recall_LGG_high"]
    assert row["learnable"] == (row["cv_recall_LGG_low"] > 0.5 and row["cv_recall_HGG_low"] > 0.5)
    assert row["test_split_f1_sd"] > 0 and row["cv_f1_macro_fold_sd"] >= 0
    n_train = [int(((index["fold"] != -1) & (index["fold"] != k)).sum()) for k in range(5)]
    assert row["test_train_ratio"] == pytest.approx(np.mean([test.sum() / n for n in n_train]))
    text = results.read_text()
    assert text.startswith("# Results\n\nkept text\n")
    assert "<!-- study:dual_stream_learnability:start -->" in text and "| 30 (30) | " in text
    reach_rows = re.findall(r"^\|\s+30 \| (.+?) \|", text, re.M)
    assert "mde_3_seeds" in text and [r.strip() for r in reach_rows] == list(learnability.DOCUMENTED_PAIRS)
    assert "cases (3 seed(s))" not in text  # one size: no slope to extrapolate with


def test_lumbar_features_pool_the_crops_and_add_the_level(learnability, tmp_path):
    stack = np.arange(7 * 3 * 8 * 8, dtype=np.float32).reshape(7, 3, 8, 8)
    np.save(tmp_path / "case.npy", stack)
    info = SimpleNamespace(cache_dir=str(tmp_path), index=pd.DataFrame(
        {"array_path": ["case.npy"], "meta": [json.dumps({"level": 3})]}))
    x = learnability.lumbar_features(info)
    z = (stack - stack.mean()) / (stack.std() + 1e-6)
    assert x.shape == (1, 7 * 3 * 2 * 2 + 5)
    assert x[0, 0] == pytest.approx(z[0, 0, :4, :4].mean(), abs=1e-5)
    assert list(x[0, -5:]) == [0, 0, 0, 1, 0]


def test_reach_backs_out_the_documented_spread_and_sizes_the_study(learnability):
    from losslab import stats

    size = learnability.DOCUMENTED_SIZE
    table = pd.DataFrame({"size": [size, 4 * size], "test_split_f1_sd": [0.1, 0.05], "test_train_ratio": [0.31, 0.30]})
    reach = learnability.study_reach(table, budget_seeds=4).set_index(["size", "variant"])
    alpha = 0.05 / len(learnability.DOCUMENTED_PAIRS)
    for variant, (difference, mde) in learnability.DOCUMENTED_PAIRS.items():
        at, big = reach.loc[(size, variant)], reach.loc[(4 * size, variant)]
        # the backed-out spread gives back the documented MDE (5 pairs, alpha 0.05, the 90-case ratio)
        assert stats.minimum_detectable_difference(at["spread"], 5, 0.31, 0.05) == pytest.approx(mde, rel=1e-6)
        assert big["spread"] == pytest.approx(at["spread"] / 2)
        assert big["floor"] == pytest.approx(stats.detection_floor(big["spread"], 0.30, alpha))
        assert big["mde_1_seed"] > big["mde_4_seeds"] > big["floor"]
        needed = big["pairs_needed"]
        if math.isfinite(needed):
            assert stats.power_at(difference, big["spread"], int(needed), 0.30, alpha) >= 0.8
            assert needed == 2 or stats.power_at(difference, big["spread"], int(needed) - 1, 0.30, alpha) < 0.8
            assert big["seeds_needed"] == math.ceil(needed / 5)
        else:
            assert abs(difference) <= big["floor"] or stats.power_at(
                difference, big["spread"], stats.MAX_PAIRS, 0.30, alpha) < 0.8


def test_sizes_needed_is_the_smallest_cohort_whose_projected_spread_detects_the_difference(learnability):
    from losslab import stats

    size = learnability.DOCUMENTED_SIZE
    table = pd.DataFrame({"size": [size, 2 * size, 4 * size], "test_split_f1_sd": [0.1, 0.07, 0.05],
                          "test_train_ratio": [0.3125] * 3})
    needed = learnability.sizes_needed(table, budget_seeds=5).set_index("variant")
    reach = learnability.study_reach(table, budget_seeds=5).set_index(["size", "variant"])
    slope = np.polyfit(np.log(table["size"]), np.log(table["test_split_f1_sd"]), 1)[0]
    alpha = 0.05 / len(learnability.DOCUMENTED_PAIRS)
    for variant, (difference, _) in learnability.DOCUMENTED_PAIRS.items():
        spread = reach.loc[(size, variant), "spread"]
        for seeds in (1, 5):
            cases = needed.loc[variant, f"cases ({seeds} seed(s))"]
            def power(n):
                return stats.power_at(difference, spread * (n / size) ** slope, 5 * seeds, 0.3125, alpha)
            assert power(cases) >= 0.8 - 1e-9 and power(cases - 1) < 0.8
            assert needed.loc[variant, f"runs of the pair ({seeds} seed(s))"] == 10 * seeds
