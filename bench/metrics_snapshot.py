"""Every metric of short runs of the shipped configs, to 6 decimals: the "nothing silently changes" check
of a refactor. Run it at two commits and diff the outputs (identical files = identical numbers).

Each config is trained through the command line (``losslab train``), the most stable interface, in a
fresh working folder (the embedded cohort generated there from its fixed seed), with a fixed salt and
seed, on a fresh SQLite store; then every metric of every run (parent and child) is printed as
``<config> <run name> <metric> <value>`` with the value to 6 decimals, sorted. Prints; asserts nothing.

    .venv/bin/python bench/metrics_snapshot.py > /tmp/after.txt      # then: diff /tmp/before.txt /tmp/after.txt
    .venv/bin/python bench/metrics_snapshot.py --configs demo seg_dice --epochs 1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: config -> overrides that keep it short (the model, loss, data and sampler are the config's own)
CONFIGS = {
    "demo": ["data.fold=0"],
    "brats_resnet3d": ["data.fold=0", "data.volume_depth=16"],
    "seg_dice": ["data.fold=0"],
}


def _train(name: str, epochs: int, work: Path, python: str) -> float:
    overrides = CONFIGS[name] + [f"train.epochs={epochs}", "data.salt=metrics-snapshot", "train.seed=0",
                                 f"tracking.experiment=snapshot-{name}", "tracking.registered_model_name=null"]
    cmd = [python, "-m", "losslab.cli", "train", "-c", str(REPO / "configs" / "experiment" / f"{name}.yaml")]
    for item in overrides:
        cmd += ["-o", item]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
               LOSSLAB_CONFIG_ROOT=str(REPO / "configs"), PYTHONHASHSEED="0")
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name}: losslab train exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def _metrics(name: str, work: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"snapshot-{name}")
    lines = []
    for run in client.search_runs([experiment.experiment_id]):
        run_name = run.info.run_name
        lines += [f"{name} {run_name} {key} {value:.6f}" for key, value in run.data.metrics.items()
                  if not key.startswith(("time/", "system/")) and "seconds" not in key and "_s" != key[-2:]]
    return sorted(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose losslab is measured")
    args = parser.parse_args()
    for name in args.configs:
        with tempfile.TemporaryDirectory(prefix=f"snapshot_{name}_") as tmp:
            seconds = _train(name, args.epochs, Path(tmp), args.python)
            print("\n".join(_metrics(name, Path(tmp))), flush=True)
            print(f"# {name}: {seconds:.1f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
