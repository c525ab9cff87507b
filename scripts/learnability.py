"""Is an embedded cohort learnable, and could a loss study on it decide? A simple model before the plan.

Before a plan or a loss study is run (again) on an embedded cohort, this script asks whether the data
carries the signal at all, with something much simpler than the plan: a class-balanced logistic regression
(scikit-learn) on the plan's own cache, at a few cohort sizes (``--sizes``, the generator's size argument).

* ``--cohort lumbar``: the lumbar-spine plan (configs/experiment/rsna_lumbar_v8.yaml; ``studies`` studies of
  5 levels each). Features: the cached 2.5D crops (7 slices around the labelled level, 64² pixels, the
  per-case z-score), downsampled 4× in-plane, plus the level one-hot.
* ``--cohort brats``: the dual-stream MIL loss study (configs/study/dual_stream_mil.yaml on
  configs/experiment/brats_dual_stream_mil.yaml; ``num_cases`` cases, HGG : LGG 2.8 : 1, 5 folds, 20 % test).
  The lesion moves from case to case, so the features do not depend on where it is: per modality, quantiles
  of the per-case z-scored voxels and of each slice's 99th percentile (an enhancing rim is a few bright
  t1ce voxels in a few slices).

Two scores per cohort size: out-of-fold predictions over the plan's validation folds (each fold predicted by
a model fitted on the other folds; the test patients never used), and one fit on every non-test case scored
on the held-out test patients (fold −1, the plan's own test split). For each: cases per class, per-class
recall with its 95 % Wilson interval, balanced accuracy, macro F1. A cohort counts as learnable when the
lower Wilson bound of the out-of-fold recall of each class that matters (lumbar: Moderate and Severe; BraTS:
LGG and HGG) is above chance (1/K): the test split alone holds too few rare cases for an interval to exclude
chance. The smallest learnable cohort is the one the plan is run on.

What a study could decide (``--reach``, BraTS): a study's cells are scored on the held-out test split, and
its Nadeau–Bengio corrected test cannot go below a floor set by the spread of the paired differences and
``n_test / n_train`` (which the cohort's size does not change: the fractions are fixed). So what a larger
cohort buys is a smaller spread. The script measures the test split's own standard deviation of macro F1 at
each size (the out-of-fold predictions resampled to the test split's size and class counts), and scales the
spread of each documented pair of the 90-case study (backed out of its MDE) by the ratio of those
deviations. For each size and pair: the MDE at one seed (5 pairs) and at the seed budget, the floor (MDE as
the seeds grow without bound) and the pairs that would detect the documented difference
(:func:`losslab.stats.minimum_detectable_difference`, :func:`losslab.stats.pairs_needed`, at the study's
alpha split over its planned pairs).

    python scripts/learnability.py --cohort lumbar --sizes 40 80 160 --workdir outputs/learnability
    python scripts/learnability.py --cohort brats --sizes 90 180 360 --reach --write-results docs/results.md
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SECTION = "dual_stream_learnability"


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (statsmodels' ``proportion_confint(method="wilson")``)."""
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return float("nan"), float("nan")
    low, high = proportion_confint(successes, n, alpha=2 * (1 - _norm_cdf(z)), method="wilson")
    return float(low), float(high)


def _norm_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _stacks(info):
    """Each case's cached stack ``(S, C, H, W)``, z-scored over the whole case, in the index's order."""
    for path in info.index.reset_index(drop=True)["array_path"]:
        arr = np.load(Path(info.cache_dir) / path).astype(np.float32)
        yield (arr - arr.mean()) / (arr.std() + 1e-6)


def lumbar_features(info, downsample: int = 4) -> np.ndarray:
    """Each case's stack mean-pooled ``downsample``× in-plane, then the level one-hot (the plan's level
    embedding): ``(cases, S·C·H·W/downsample² + 5)``."""
    xs = []
    for arr in _stacks(info):
        s, c, h, w = arr.shape
        xs.append(arr.reshape(s, c, h // downsample, downsample, w // downsample, downsample).mean(axis=(3, 5)).ravel())
    levels = np.array([int(json.loads(m or "{}").get("level", 0)) for m in info.index.reset_index(drop=True)["meta"]])
    return np.hstack([np.stack(xs), np.eye(5)[levels]])


QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0)


def intensity_features(info) -> np.ndarray:
    """Where-free features of a volume's bag of slices: per channel, :data:`QUANTILES` of its voxels and of
    its slices' 99th percentiles: ``(cases, 2 · C · len(QUANTILES))``."""
    rows = []
    for arr in _stacks(info):
        voxels = arr.transpose(1, 0, 2, 3).reshape(arr.shape[1], -1)  # (C, S·H·W)
        slice_tops = np.quantile(arr.reshape(arr.shape[0], arr.shape[1], -1), 0.99, axis=2).T  # (C, S)
        rows.append(np.concatenate([np.quantile(voxels, QUANTILES, axis=1).ravel(),
                                    np.quantile(slice_tops, QUANTILES, axis=1).ravel()]))
    return np.stack(rows)


@dataclass(frozen=True)
class Cohort:
    """An embedded cohort and the plan that trains on it: its config, generator and the generator's size
    argument, its classes (label order), the classes whose recall decides learnability, the features."""

    config: str
    generator: str
    size_key: str
    classes: tuple[str, ...]
    decisive: tuple[str, ...]
    features: Callable[..., np.ndarray]
    overrides: tuple[str, ...] = ()


COHORTS = {
    "lumbar": Cohort("configs/experiment/rsna_lumbar_v8.yaml", "embedded_lumbar", "studies",
                     ("normal_mild", "moderate", "severe"), ("moderate", "severe"), lumbar_features),
    # the study file's data overrides (configs/study/dual_stream_mil.yaml): 5 folds, 20 % test patients
    "brats": Cohort("configs/experiment/brats_dual_stream_mil.yaml", "embedded_brats", "num_cases",
                    ("LGG", "HGG"), ("LGG", "HGG"), intensity_features, ("data.num_folds=5", "data.test_fraction=0.2")),
}


def build_cohort(cohort: Cohort, size: int, workdir: Path, seed: int):
    """Generate the embedded cohort at ``size`` and its cache (the plan's source settings)."""
    from losslab.config import load_config
    from losslab.data.cache import build_cache

    root, cache = workdir / f"{cohort.generator}_{size}", workdir / f"cache_{size}"
    cfg = load_config(REPO / cohort.config, [f"data.root={root}", f"data.cache_dir={cache}",
                                             f"data.generator_kwargs.{cohort.size_key}={size}", f"data.seed={seed}",
                                             f"data.generate={cohort.generator}", *cohort.overrides])
    return build_cache(cfg.data)


def _model(seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.05, class_weight="balanced", max_iter=2000,
                                                              random_state=seed))


def _macro_f1(y: np.ndarray, pred: np.ndarray, classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, labels=list(range(classes)), average="macro", zero_division=0))


def _recalls(y: np.ndarray, pred: np.ndarray, prefix: str, classes: tuple[str, ...]) -> dict[str, float]:
    """Per-class recall with its 95 % Wilson interval, the case count per class, balanced accuracy, macro F1."""
    from sklearn.metrics import balanced_accuracy_score

    out = {f"{prefix}balanced_accuracy": float(balanced_accuracy_score(y, pred)),
           f"{prefix}f1_macro": _macro_f1(y, pred, len(classes))}
    for c, name in enumerate(classes):
        n_c = int((y == c).sum())
        hits = int(((pred == c) & (y == c)).sum())
        low, high = wilson_interval(hits, n_c)
        out |= {f"{prefix}n_{name}": n_c, f"{prefix}recall_{name}": hits / n_c if n_c else float("nan"),
                f"{prefix}recall_{name}_low": low, f"{prefix}recall_{name}_high": high}
    return out


def held_out_f1_spread(y: np.ndarray, pred: np.ndarray, test_counts: np.ndarray, classes: int, seed: int,
                      resamples: int = 2000) -> float:
    """The test split's own standard deviation of macro F1: ``pred`` (out-of-fold) resampled with
    replacement to a split of ``test_counts`` cases per class, ``resamples`` times."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in range(classes)]
    scores = []
    for _ in range(resamples):
        pick = np.concatenate([rng.choice(idx, size=n, replace=True) for idx, n in zip(by_class, test_counts) if n])
        scores.append(_macro_f1(y[pick], pred[pick], classes))
    return float(np.std(scores, ddof=1))


def score_cohort(info, cohort: Cohort, seed: int) -> dict[str, float]:
    """Out-of-fold predictions over the plan's validation folds (train on the other folds, never on the
    test patients), and one fit on every non-test case scored on the test patients; the spread of macro
    F1 over the validation folds and on a test split of this cohort's size; ``n_test / n_train``."""
    rows = info.index.reset_index(drop=True)
    x, y, fold = cohort.features(info), rows["label"].to_numpy(), rows["fold"].to_numpy()
    oof, fold_f1, n_train = np.full(len(y), -1), [], []
    for k in sorted(set(fold) - {-1}):
        train, held = (fold != -1) & (fold != k), fold == k
        oof[held] = _model(seed).fit(x[train], y[train]).predict(x[held])
        fold_f1.append(_macro_f1(y[held], oof[held], len(cohort.classes)))
        n_train.append(int(train.sum()))
    cv = fold != -1
    test_pred = _model(seed).fit(x[cv], y[cv]).predict(x[~cv])
    test_counts = np.bincount(y[~cv], minlength=len(cohort.classes))
    out = {"cases": len(y), **_recalls(y[cv], oof[cv], "cv_", cohort.classes),
           **_recalls(y[~cv], test_pred, "test_", cohort.classes),
           "cv_f1_macro_fold_sd": float(np.std(fold_f1, ddof=1)),
           "test_split_f1_sd": held_out_f1_spread(y[cv], oof[cv], test_counts, len(cohort.classes), seed),
           "n_test": int((~cv).sum()), "test_train_ratio": float(np.mean([(~cv).sum() / n for n in n_train]))}
    chance = 1.0 / len(cohort.classes)
    out["learnable"] = bool(all(out[f"cv_recall_{name}_low"] > chance for name in cohort.decisive))
    return out


# The 90-case dual-stream MIL study (docs/results.md, section dual_stream_mil: 6 epochs, 5 folds, seed 0,
# calibrated macro F1 on the test split, 5 pairs, alpha 0.05): each planned pair's mean difference
# (ce + weighted sampler − variant) and MDE, from which its spread is backed out.
DOCUMENTED_PAIRS = {"ce + class weights": (-0.042, 0.319), "focal": (-0.017, 0.469),
                    "ldam-drw": (+0.148, 0.678), "logit adjustment": (+0.065, 0.680)}
DOCUMENTED_SIZE, DOCUMENTED_PAIRS_N, DOCUMENTED_ALPHA = 90, 5, 0.05


def study_reach(table: pd.DataFrame, budget_seeds: int, folds: int = 5, alpha: float = 0.05) -> pd.DataFrame:
    """Per cohort size and documented pair: the projected spread, the MDE at one seed and at the budget, the
    floor and the pairs (and seeds) that would detect the documented difference, at ``alpha`` split over
    the planned pairs as the study does. ``table`` needs a row at :data:`DOCUMENTED_SIZE`."""
    from losslab import stats

    reference = table.set_index("size").loc[DOCUMENTED_SIZE]
    pair_alpha = alpha / len(DOCUMENTED_PAIRS)
    rows = []
    for size, row in table.set_index("size").iterrows():
        shrink = row["test_split_f1_sd"] / reference["test_split_f1_sd"]
        ratio = row["test_train_ratio"]
        for variant, (difference, mde) in DOCUMENTED_PAIRS.items():
            spread = shrink * mde / stats.minimum_detectable_difference(
                1.0, DOCUMENTED_PAIRS_N, reference["test_train_ratio"], DOCUMENTED_ALPHA)
            needed = stats.pairs_needed(difference, spread, ratio, pair_alpha)
            rows.append({"size": int(size), "variant": variant, "difference": difference, "spread": spread,
                         "mde_1_seed": stats.minimum_detectable_difference(spread, folds, ratio, pair_alpha),
                         f"mde_{budget_seeds}_seeds": stats.minimum_detectable_difference(
                             spread, folds * budget_seeds, ratio, pair_alpha),
                         "floor": stats.detection_floor(spread, ratio, pair_alpha),
                         "pairs_needed": needed, "seeds_needed": math.ceil(needed / folds) if math.isfinite(needed)
                         else math.inf})
    return pd.DataFrame(rows)


def sizes_needed(table: pd.DataFrame, budget_seeds: int, folds: int = 5, alpha: float = 0.05) -> pd.DataFrame:
    """Per documented pair: the smallest cohort at which one seed (``folds`` pairs) and the seed budget would
    detect its difference (power 0.8, ``alpha`` split over the planned pairs), and the runs the study then
    takes. Extrapolated: the test split's macro F1 deviation is fitted as ``sd ∝ size^slope`` over the
    measured sizes, so a pair's spread is ``spread(DOCUMENTED_SIZE) · (size / DOCUMENTED_SIZE)^slope``,
    and the MDE at ``k`` pairs is ``spread · MDE(1, k)``."""
    from losslab import stats

    slope = float(np.polyfit(np.log(table["size"]), np.log(table["test_split_f1_sd"]), 1)[0])
    ratio = float(table["test_train_ratio"].mean())
    reach = study_reach(table, budget_seeds, folds, alpha)
    pair_alpha = alpha / len(DOCUMENTED_PAIRS)
    rows = []
    for variant, (difference, _) in DOCUMENTED_PAIRS.items():
        spread = reach[(reach["size"] == DOCUMENTED_SIZE) & (reach["variant"] == variant)]["spread"].item()
        row = {"variant": variant, "difference": difference, "slope": slope}
        for seeds in (1, budget_seeds):
            largest = abs(difference) / stats.minimum_detectable_difference(1.0, folds * seeds, ratio, pair_alpha)
            size = math.ceil(DOCUMENTED_SIZE * (largest / spread) ** (1.0 / slope))
            row |= {f"cases ({seeds} seed(s))": size, f"runs of the pair ({seeds} seed(s))": 2 * folds * seeds,
                    f"runs of the study ({seeds} seed(s))": (len(DOCUMENTED_PAIRS) + 1) * folds * seeds}
        rows.append(row)
    return pd.DataFrame(rows)


def learnability_markdown(table: pd.DataFrame, cohort: Cohort) -> str:
    """One row per size: out-of-fold and test scores, per-class recall [Wilson 95 %] (n), the spreads."""
    def recall(row, prefix: str, name: str) -> str:
        interval = (f" [{row[f'{prefix}recall_{name}_low']:.3f}, {row[f'{prefix}recall_{name}_high']:.3f}]"
                    if prefix == "cv_" else "")
        return f"{row[f'{prefix}recall_{name}']:.3f}{interval} ({row[f'{prefix}n_{name}']})"

    head = ["size (cases)", "test patients", "out-of-fold bal. acc.", "out-of-fold macro F1",
            *[f"{n} recall (n)" for n in cohort.classes], "test bal. acc.", "test macro F1",
            *[f"test {n} (n)" for n in cohort.classes], "macro F1 SD over folds", "macro F1 SD of the test split",
            "n_test/n_train", "learnable"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [f"{r['size']} ({r['cases']})", str(r["n_test"]), f"{r['cv_balanced_accuracy']:.3f}",
                 f"{r['cv_f1_macro']:.3f}", *[recall(r, "cv_", n) for n in cohort.classes],
                 f"{r['test_balanced_accuracy']:.3f}", f"{r['test_f1_macro']:.3f}",
                 *[recall(r, "test_", n) for n in cohort.classes], f"{r['cv_f1_macro_fold_sd']:.3f}",
                 f"{r['test_split_f1_sd']:.3f}", f"{r['test_train_ratio']:.3f}", "yes" if r["learnable"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reach_markdown(reach: pd.DataFrame) -> str:
    def count(value: float) -> str:
        return "not reachable" if not math.isfinite(value) else f"{int(value)}"

    shown = reach.assign(**{c: reach[c].map(count) for c in ("pairs_needed", "seeds_needed")})
    return shown.to_markdown(index=False, floatfmt=".3f")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", choices=sorted(COHORTS), default="lumbar")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="cohort sizes: the generator's size argument (lumbar: studies; brats: cases)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--reach", action="store_true",
                        help=f"brats: project the documented {DOCUMENTED_SIZE}-case study's pairs to each size")
    parser.add_argument("--budget-seeds", type=int, default=5)
    parser.add_argument("--write-results", default=None,
                        help=f"write the tables into this markdown file's section '{SECTION}' (with --reach)")
    args = parser.parse_args(argv)
    cohort = COHORTS[args.cohort]
    sizes = args.sizes or ([40, 80, 160] if args.cohort == "lumbar" else [90, 180, 360])
    workdir = Path(args.workdir or REPO / "outputs" / f"{args.cohort}_learnability")
    rows = []
    for size in sizes:
        info = build_cohort(cohort, size, workdir, args.seed)
        rows.append({"size": size, **score_cohort(info, cohort, args.seed)})
        print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    text = learnability_markdown(table, cohort)
    if args.reach:
        text += "\n\n" + reach_markdown(study_reach(table, args.budget_seeds))
        if table["size"].nunique() >= 2:  # the slope of the deviation needs two sizes
            text += "\n\n" + sizes_needed(table, args.budget_seeds).to_markdown(index=False, floatfmt=".3f")
    print(text)
    if args.write_results:
        from losslab.pipelines.study_report import write_section

        write_section(args.write_results, SECTION, text, footer="_Written by `scripts/learnability.py`._")
    return table


if __name__ == "__main__":
    main()
