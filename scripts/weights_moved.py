"""How much the evaluation weights move a study's test numbers: every train run of a study scored
twice on the held-out test split, once with the weights its run validated and registered (the EMA or
SWA average: what ``evaluate <run id>`` scores since commit 20024a2) and once with the raw trained
weights of the same checkpoint (what ``evaluate <run id>`` scored before it). Same runs, same folds,
same test patients: the difference is the weights alone.

    python scripts/weights_moved.py --study dual_stream_mil --stores sqlite:///work/dsmil/mlflow.db
    python scripts/weights_moved.py --study lumbar_spine --stores sqlite:///work/lumbar40/mlflow.db

Both scores go through ``losslab.pipelines.scoring`` (``load_source``, ``score_test_split``); the raw
weights are ``checkpoint["model"]`` loaded with ``weights_only=True``. Writes a markdown table between
``<!-- weights_moved:<study>:start -->`` / ``end`` markers of ``--output`` (default docs/results.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
METRICS = {"test/balanced_accuracy": "bal. acc.", "test/auc": "AUC", "test/loss": "test loss"}


def score_both(run_id: str) -> dict[str, dict[str, float]]:
    """``{"averaged": test metrics, "raw": test metrics}`` of one train run's best checkpoint."""
    import torch

    from losslab.engine.checkpoint import load_checkpoint
    from losslab.pipelines.scoring import download_best_checkpoint, load_source, run_config, score_test_split

    loaded = load_source(run_id, run_config(run_id))
    info = loaded.task.load_cache(loaded.cfg)
    device = torch.device("cpu")

    def score() -> dict[str, float]:
        return score_test_split(loaded.cfg, info, loaded.task, loaded.step, loaded.model, loaded.loss_fn, device)

    averaged = score()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = load_checkpoint(download_best_checkpoint(run_id, tmp))
    loaded.model.load_state_dict(ckpt["model"])
    return {"averaged": averaged, "raw": score(), "eval_source": ckpt.get("eval_source", "model")}


def study_scores(study: str, stores: list[str]) -> pd.DataFrame:
    """One row per (train run, weights) of the study's full-mode runs in ``stores``."""
    import mlflow

    from reproduce_cohorts import study_runs

    rows = []
    for store, run in study_runs(stores, study, "full", "train"):
        mlflow.set_tracking_uri(store)
        scores = score_both(run.info.run_id)
        for weights in ("averaged", "raw"):
            rows.append({"variant": run.data.tags["repro.variant"], "fold": run.data.tags["repro.fold"],
                         "seed": run.data.tags["repro.seed"], "weights": weights,
                         "eval_source": scores["eval_source"]} | {k: scores[weights].get(k, np.nan) for k in METRICS})
        print(f"[{study}] {run.data.tags['repro.variant']} fold {run.data.tags['repro.fold']}: scored", flush=True)
    return pd.DataFrame(rows)


def moved_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Per variant and metric: mean over folds with the averaged and the raw weights, the mean paired
    difference (averaged − raw) and the largest absolute one."""
    out = []
    for variant, part in scores.groupby("variant", sort=False):
        wide = part.pivot_table(index=["seed", "fold"], columns="weights", values=list(METRICS))
        averaged = part[part["weights"] == "averaged"]
        counts = averaged["eval_source"].value_counts()
        row = {"variant": variant, "folds": str(len(wide)),
               "best checkpoint's weights": ", ".join(f"{k} {v}/{len(averaged)}" for k, v in sorted(counts.items()))}
        for metric, label in METRICS.items():
            d = wide[(metric, "averaged")] - wide[(metric, "raw")]
            row[f"{label} averaged"] = f"{wide[(metric, 'averaged')].mean():.3f}"
            row[f"{label} raw"] = f"{wide[(metric, 'raw')].mean():.3f}"
            row[f"{label} Δ mean (largest)"] = f"{d.mean():+.3f} ({d.abs().max():.3f})"
        out.append(row)
    return pd.DataFrame(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, choices=["dual_stream_mil", "lumbar_spine"])
    parser.add_argument("--stores", nargs="+", required=True, metavar="URI")
    parser.add_argument("--output", default=str(REPO / "docs" / "results.md"))
    parser.add_argument("--scores", help="CSV of the scores: read when it exists, else written (table only once)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "scripts"))  # reproduce_cohorts: the study's runs and its section markers
    from reproduce_cohorts import write_section

    if args.scores and Path(args.scores).is_file():
        scores = pd.read_csv(args.scores, dtype={"fold": str, "seed": str})
    else:
        scores = study_scores(args.study, args.stores)
        if args.scores:
            scores.to_csv(args.scores, index=False)
    if scores.empty:
        raise SystemExit(f"no finished full-mode train runs of {args.study} in {', '.join(args.stores)}")
    body = ("### The same runs scored with the raw weights (the defect `evaluate <run id>` had)\n\n"
            "Every train run above scored on the held-out test split twice: with the weights it validated and "
            "registered (`averaged`: its EMA or SWA weights where the best epoch had them — the column says in how many folds —, as the table above) and with the raw trained weights "
            "of the same best checkpoint (`raw`: what `evaluate <run id>` scored before commit 20024a2). Same runs, "
            "folds and test patients; Δ = averaged − raw, mean over folds and the largest absolute one. Written by "
            "`scripts/weights_moved.py`.\n\n" + moved_table(scores).to_markdown(index=False, disable_numparse=True))
    write_section(Path(args.output), f"weights_moved:{args.study}", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
