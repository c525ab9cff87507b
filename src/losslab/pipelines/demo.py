"""main: the demo pipeline on the embedded data — generate, preprocess, train fold 0 per loss (best
epoch on validation, then one score on the held-out test split), print per-class recall per loss and
the test balanced accuracy with its interval, and how to open the MLflow UI."""

from __future__ import annotations

import time

from losslab.config import ExperimentConfig, load_config
from losslab.pipelines.preprocess import run_preprocess
from losslab.pipelines.train import run_train
from losslab.tracking import resolve_tracking_uri


def run_demo(config: str | None, overrides: list[str], losses: list[str]) -> dict[str, dict[str, float]]:
    t0 = time.perf_counter()
    base = load_config(config, overrides)
    info = run_preprocess(base)
    results: dict[str, dict[str, float]] = {}
    for loss in losses:
        cfg: ExperimentConfig = load_config(config, list(overrides) + [f"loss={loss}"])
        result = run_train(cfg, info=info)
        results[loss] = result.folds[0].metrics
    _print_table(results, info.class_names, time.perf_counter() - t0, base)
    return results


def _print_table(results, class_names, seconds, cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Validation fold {cfg.data.fold}: best epoch per loss; test: that model on the "
                        "held-out test split (95 % patient-bootstrap interval)")
    table.add_column("loss")
    for c in class_names:
        table.add_column(f"recall {c}", justify="right")
    for key in ("balanced_accuracy", "f1_macro", "auc", "test balanced_accuracy"):
        table.add_column(key, justify="right")
    for loss, m in results.items():
        test = (f"{m['test/balanced_accuracy']:.3f} [{m['test/balanced_accuracy_ci_low']:.3f}, "
                f"{m['test/balanced_accuracy_ci_high']:.3f}]" if "test/balanced_accuracy" in m else "no test split")
        table.add_row(loss, *[f"{m.get(f'val/recall_{c}', float('nan')):.3f}" for c in class_names],
                      *[f"{m.get(f'val/{k}', float('nan')):.3f}" for k in ("balanced_accuracy", "f1_macro", "auc")],
                      test)
    console = Console()
    console.print(table)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    console.print(f"main job wall time: {seconds:.1f} s")
    console.print(f"Open the MLflow UI on this store:  mlflow ui --backend-store-uri {uri} --port 5000"
                  f"   (then http://127.0.0.1:5000, experiment '{cfg.tracking.experiment}')")
