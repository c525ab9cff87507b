"""Is the embedded lumbar cohort learnable? A simple model before the plan.

The lumbar-spine plan (configs/experiment/rsna_lumbar_v8.yaml) predicted Normal/Mild for every case on
40 embedded studies. Before re-running the plan, this script asks whether the data carries the signal at
all, with something much simpler than the plan: a class-balanced multinomial logistic regression
(scikit-learn) on the cached 2.5D crops (the same cache the plan trains on: 7 slices around the labelled
level, 64² pixels, the per-case z-score), downsampled 4× in-plane, plus the level one-hot.

Two scores per cohort size (``--studies``): out-of-fold predictions over the plan's validation folds
(each fold predicted by a model fitted on the other folds; the test patients never used), and one fit on
every non-test case scored on the held-out test patients (fold −1, the plan's own test split). For each:
cases per grade, per-class recall with its 95 % Wilson interval, balanced accuracy. A cohort counts as
learnable when the lower Wilson bound of the out-of-fold Moderate and Severe recalls are both above the
1/3 of a three-way guess: the test split alone holds too few rare cases (2 Moderate and 2 Severe at 40
studies) for an interval to exclude chance. The smallest learnable cohort is the one the plan is run on.

    python scripts/lumbar_learnability.py --studies 40 80 160 --workdir outputs/lumbar_learnability
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "experiment" / "rsna_lumbar_v8.yaml"
CHANCE = 1.0 / 3.0
GRADES = ("normal_mild", "moderate", "severe")


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (statsmodels' ``proportion_confint(method="wilson")``)."""
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return float("nan"), float("nan")
    low, high = proportion_confint(successes, n, alpha=2 * (1 - _norm_cdf(z)), method="wilson")
    return float(low), float(high)


def _norm_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def build_cohort(studies: int, workdir: Path, seed: int):
    """Generate the embedded cohort of ``studies`` studies and its cache (the plan's source settings)."""
    from losslab.config import load_config
    from losslab.data.cache import build_cache

    root, cache = workdir / f"lumbar_{studies}", workdir / f"cache_{studies}"
    cfg = load_config(CONFIG, [f"data.root={root}", f"data.cache_dir={cache}",
                               f"data.generator_kwargs.studies={studies}", f"data.seed={seed}",
                               "data.generate=embedded_lumbar"])
    return build_cache(cfg.data)


def features(info, downsample: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(X, y, fold, level)``: each case's stack, per-case z-scored, mean-pooled ``downsample``× in-plane."""
    rows = info.index.reset_index(drop=True)
    xs = []
    for path in rows["array_path"]:
        arr = np.load(Path(info.cache_dir) / path).astype(np.float32)  # (S, C, H, W)
        arr = (arr - arr.mean()) / (arr.std() + 1e-6)
        s, c, h, w = arr.shape
        pooled = arr.reshape(s, c, h // downsample, downsample, w // downsample, downsample).mean(axis=(3, 5))
        xs.append(pooled.ravel())
    levels = np.array([int(json.loads(m or "{}").get("level", 0)) for m in rows["meta"]])
    return np.stack(xs), rows["label"].to_numpy(), rows["fold"].to_numpy(), levels


def _model(seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.05, class_weight="balanced", max_iter=2000,
                                                              random_state=seed))


def _recalls(y: np.ndarray, pred: np.ndarray, prefix: str) -> dict[str, float]:
    """Per-class recall with its 95 % Wilson interval, the case count per grade, balanced accuracy."""
    from sklearn.metrics import balanced_accuracy_score

    out = {f"{prefix}balanced_accuracy": float(balanced_accuracy_score(y, pred))}
    for c, name in enumerate(GRADES):
        n_c = int((y == c).sum())
        hits = int(((pred == c) & (y == c)).sum())
        low, high = wilson_interval(hits, n_c)
        out |= {f"{prefix}n_{name}": n_c, f"{prefix}recall_{name}": hits / n_c if n_c else float("nan"),
                f"{prefix}recall_{name}_low": low, f"{prefix}recall_{name}_high": high}
    return out


def score_cohort(info, seed: int) -> dict[str, float]:
    """Out-of-fold predictions over the plan's validation folds (train on the other folds, never on the
    test patients), and one fit on every non-test case scored on the test patients."""
    x, y, fold, level = features(info)
    x = np.hstack([x, np.eye(5)[level]])  # the level, one-hot (the plan's level embedding)
    oof = np.full(len(y), -1)
    for k in sorted(set(fold) - {-1}):
        train, held = (fold != -1) & (fold != k), fold == k
        oof[held] = _model(seed).fit(x[train], y[train]).predict(x[held])
    cv = fold != -1
    test_pred = _model(seed).fit(x[cv], y[cv]).predict(x[~cv])
    out = {"cases": len(y), **_recalls(y[cv], oof[cv], "cv_"), **_recalls(y[~cv], test_pred, "test_")}
    out["learnable"] = bool(out["cv_recall_moderate_low"] > CHANCE and out["cv_recall_severe_low"] > CHANCE)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, nargs="+", default=[40, 80, 160])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "lumbar_learnability"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    rows = []
    for studies in args.studies:
        info = build_cohort(studies, workdir, args.seed)
        rows.append({"studies": studies, **score_cohort(info, args.seed)})
        print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
