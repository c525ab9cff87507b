"""Study benchmark: the demo study (``configs/study/demo.yaml``) with 3 variants × 3 folds × 1 seed, run
serially (``losslab study --workers 1``) and by two worker processes (``--workers 2``). Numbers only.

Each run is the ``losslab study`` command as a user types it, in its own MLflow store and Optuna storage
(both SQLite, under ``--workdir``), on one cache built beforehand (so neither run pays for it). Prints:

- the wall time of each command and of its cells (the first cell's start to the last cell's end, from
  Optuna's trial timestamps: process start-up excluded), and the ratio serial / two workers (goal >= 1.5
  on a quiet 2-core machine);
- whether every cell's metrics (every metric of its train run) are identical to the serial study's,
  and the largest difference when not. The serial command uses torch's default thread count and each of
  the two workers ``cores / 2`` threads; float sums over a different number of threads can differ in the
  last bits, so ``--threads 1`` runs the serial study on one thread too (same arithmetic as each worker).

    python bench/study.py                     # the demo config as shipped (4 epochs)
    python bench/study.py --quick             # 1 epoch, 4 batches: checks the bench, not the speed
    python bench/study.py --threads 1 --workdir /tmp/bstudy
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("LOSSLAB_CONFIG_ROOT", str(REPO / "configs"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
VARIANTS = {"ce": ["loss=ce"], "focal": ["loss=focal"], "balanced_softmax": ["loss=balanced_softmax"]}


def study_file(workdir: Path, name: str, overrides: list[str]) -> Path:
    spec = yaml.safe_load((REPO / "configs" / "study" / "demo.yaml").read_text())
    spec |= {"name": name, "config": str(REPO / "configs" / "experiment" / "demo.yaml"), "variants": VARIANTS,
             "folds": 3, "seeds": 1, "budget_seeds": 1, "storage": f"sqlite:///{workdir / name / 'studies.db'}",
             "overrides": ["tracking.log_model=false", f"train.checkpoint_dir={workdir / name / 'ckpt'}", *overrides]}
    (workdir / name).mkdir(parents=True, exist_ok=True)
    path = workdir / name / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(command: list[str], workdir: Path, store: str, extra_env: dict | None = None) -> float:
    env = os.environ | {"MLFLOW_TRACKING_URI": store} | (extra_env or {})
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "losslab.cli", *command], cwd=workdir, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def cell_seconds(path: Path) -> float:
    """First cell start to last cell end (Optuna timestamps)."""
    import optuna

    spec = yaml.safe_load(path.read_text())
    trials = [t for t in optuna.load_study(study_name=spec["name"], storage=spec["storage"]).get_trials()
              if t.state.name == "COMPLETE"]
    return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()


def cell_metrics(store: str, name: str) -> dict[str, dict[str, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("losslab-demo")
    runs = client.search_runs([exp.experiment_id], f"tags.`losslab.study` = '{name}' and "
                              "tags.`losslab.study_role` = 'cell' and attributes.status = 'FINISHED'")
    return {r.data.tags["losslab.cell"]: dict(r.data.metrics) for r in runs}


def _timing(key: str) -> bool:
    """Wall-clock metrics (epoch times, throughput, latency): they differ between any two runs."""
    return key.startswith("system/") or any(word in key for word in ("time", "latency", "per_s", "seconds"))


def compare_cells(serial: dict, parallel: dict) -> str:
    """``yes`` when every cell's metrics (timings aside) are equal; else how many cells differ, the
    largest difference and the metric it is in."""
    if sorted(serial) != sorted(parallel):
        return f"no: different cells ({sorted(serial)} vs {sorted(parallel)})"
    worst, where, differing = 0.0, "", 0
    for cell, metrics in serial.items():
        other = parallel[cell]
        diffs = {k: abs(v - other.get(k, math.nan)) for k, v in metrics.items() if not _timing(k)}
        diffs = {k: (d if not math.isnan(d) else math.inf) for k, d in diffs.items()}
        differing += any(d > 0 for d in diffs.values())
        for key, d in diffs.items():
            if d > worst:
                worst, where = d, f"{key} of {cell}"
    n_metrics = len([k for k in next(iter(serial.values()), {}) if not _timing(k)])
    if differing == 0:
        return f"yes ({len(serial)} cells, {n_metrics} metrics each, timings aside)"
    return (f"no: {differing} of {len(serial)} cells differ, largest difference {worst:.3g} ({where}); "
            "with other thread counts float sums differ in the last bits: --threads 1 compares like with like")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="default: a temporary folder (removed)")
    p.add_argument("--quick", action="store_true", help="1 epoch of 4 batches: checks the bench, not the speed")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the serial study (default: torch's)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        overrides = ["train.epochs=1", "train.max_train_batches=4"] if args.quick else []
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; demo study, 3 variants x 3 folds x 1 seed"
              + (" (quick: 1 epoch of 4 batches)" if args.quick else ""), flush=True)
        run(["preprocess", "-c", str(REPO / "configs" / "experiment" / "demo.yaml")], workdir,
            f"sqlite:///{workdir / 'preprocess.db'}")
        results = {}
        for workers, name in ((1, "serial"), (2, "two-workers")):
            path, store = study_file(workdir, name, overrides), f"sqlite:///{workdir / name / 'mlflow.db'}"
            command = ["study", "-c", str(path), "--workers", str(workers), "--no-progress"]
            command += ["--threads", str(args.threads)] if args.threads and workers == 1 else []
            wall = run(command, workdir, store)
            results[name] = (wall, cell_seconds(path), cell_metrics(store, name))
            print(f"--workers {workers}: wall {wall:.1f} s, cells {results[name][1]:.1f} s", flush=True)
        (w1, c1, m1), (w2, c2, m2) = results["serial"], results["two-workers"]
        print(f"ratio serial / two workers: wall {w1 / w2:.2f}, cells {c1 / c2:.2f} (goal >= 1.5 on a quiet 2-core machine)")
        print(f"every cell's metrics identical to the serial study's: {compare_cells(m1, m2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
