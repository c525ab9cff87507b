"""Sweep benchmarks: what pruning saves, and what a second worker adds. Numbers only, no asserts.

1. Pruning: the same search (RandomSampler with one seed, so both runs train the same param sets in
   the same order; training is deterministic) with ``pruner: none`` and with the default
   ``MedianPruner``. Prints compute in trial-epochs (epochs actually trained), the ratio pruned/full
   (goal <= 0.5) and the best value of each (goal: within 1 %). In-process, SQLite Optuna storage,
   SQLite MLflow store.
2. Workers: one worker vs two workers (separate ``losslab sweep`` processes, one torch thread each)
   on one study in a throw-away PostgreSQL cluster, logging to an MLflow server on PostgreSQL.
   Prints trials per hour from Optuna's trial timestamps (first start to last end, so process
   start-up is excluded) and the ratio (goal >= 1.8 where two cores are free).

Tiny trials: the embedded BraTS generator (``--cases`` cases, 48x48x16), ``test_resnet`` backbone,
bags of 4. Usage: ``python bench/sweep.py [--trials 20] [--epochs 6] [--pruner 'name=median n_startup_trials=4']
[--worker-trials 8] [--skip-pruning] [--skip-workers]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("LOSSLAB_CONFIG_ROOT", str(REPO / "configs"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

DEFAULT_PRUNER = "name=median n_startup_trials=3 n_warmup_steps=2"
SPACE = {
    "loss": {"type": "categorical", "choices": ["ce", "focal"]},
    "loss.gamma": {"type": "float", "low": 0.0, "high": 5.0, "when": {"loss": "focal"}},
    "loss.label_smoothing": {"type": "float", "low": 0.0, "high": 0.3, "when": {"loss": "ce"}},
    "optim.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
}


def base_config(root: Path, cache_dir: Path, epochs: int, experiment: str):
    from losslab.config import load_config

    return load_config(None, [
        f"data.root={root}", f"data.cache_dir={cache_dir}", "data.num_folds=3", "data.salt=bench",
        "data.bag_size=4", "data.batch_size=4", "model.backbone=test_resnet", "model.head_kwargs={hidden_dim: 16}",
        f"train.epochs={epochs}", "train.seed=0", "train.monitor=val/auc", "train.monitor_mode=max",
        f"train.checkpoint_dir={root.parent / 'ckpt'}", f"tracking.experiment={experiment}",
        "tracking.registered_model_name=bench-sweep", "optim.lr=0.003", "optim.scheduler=none",
    ])


def _epochs(study) -> int:
    return sum(int(t.user_attrs.get("epochs_run", 0)) for t in study.trials)


def bench_pruning(tmp: Path, info, args) -> None:
    import optuna

    from losslab.pipelines.sweep import run_sweep, sweep_settings

    import yaml

    results = {}
    pruners = [{k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in text.split())}
               for text in (args.pruner or [DEFAULT_PRUNER])]
    runs = [("no pruning", {"name": "none"})] + [(" ".join(f"{k}={v}" for k, v in p.items()), p) for p in pruners]
    for label, spec in runs:
        cfg = base_config(Path(info.root), Path(info.cache_dir), args.epochs, "bench-sweep-pruning")
        cfg = cfg.model_copy(update={"sweep": {
            "study": label.replace(" ", "-").replace("=", "-"), "storage": f"sqlite:///{tmp / 'optuna.db'}", "n_trials": args.trials,
            "sampler": {"name": "random", "seed": 0}, "pruner": spec, "space": SPACE, "num_threads": args.threads}})
        t0 = time.perf_counter()
        run_sweep(cfg, sweep_settings(cfg), info=info.cache)
        seconds = time.perf_counter() - t0
        study = optuna.load_study(study_name=cfg.sweep["study"], storage=cfg.sweep["storage"])
        states = [t.state.name for t in study.trials]
        if "COMPLETE" not in states:
            raise RuntimeError(f"{label}: no trial completed ({states}); see the log above")
        results[label] = (_epochs(study), study.best_value, seconds, states.count("PRUNED"), study.best_trial.number)
    full = results["no pruning"]
    print(f"\n== pruning: {args.trials} trials x {args.epochs} epochs, maximise val/auc, RandomSampler(seed=0), "
          f"{args.threads} torch thread(s)")
    for label, (epochs, best, seconds, n_pruned, best_n) in results.items():
        print(f"{label}: {epochs} trial-epochs, {n_pruned} pruned, best val/auc {best:.5f} (trial {best_n}), "
              f"{seconds:.1f} s wall")
        if label != "no pruning":
            print(f"    compute ratio pruned/full = {epochs / full[0]:.3f} (goal <= 0.5); best vs full best = "
                  f"{100 * (best - full[1]) / abs(full[1]):+.2f} % (goal within 1 %); wall ratio = {seconds / full[2]:.3f}")


def _throughput(study) -> tuple[int, float]:
    trials = [t for t in study.trials if t.datetime_complete is not None]
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    return len(trials), len(trials) / ((end - start).total_seconds() / 3600)


def bench_workers(tmp: Path, info, args) -> None:
    import optuna

    sys.path.insert(0, str(REPO / "tests"))
    import _pg  # the same throw-away PostgreSQL cluster and MLflow server as the scale-out test
    from losslab.config import dump_yaml

    reason = _pg.unavailable_reason()
    if reason:
        print(f"\n== workers: skipped ({reason})")
        return
    cluster = _pg.PostgresCluster().start()
    server = None
    try:
        server = _pg.MLflowServer(cluster.create_database("mlflow", driver="psycopg2"), tmp / "artifacts",
                                  tmp / "server.log")
        server.wait_healthy()
        env = os.environ | {"MLFLOW_TRACKING_URI": server.uri, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        rates = {}
        for n_workers in (1, 2):
            storage = cluster.create_database(f"optuna{n_workers}")
            cfg = base_config(Path(info.root), Path(info.cache_dir), args.worker_epochs, "bench-sweep-workers")
            space = {k: v for k, v in SPACE.items() if k != "loss.label_smoothing"}
            cfg = cfg.model_copy(update={"sweep": {"space": space, "pruner": {"name": "none"}, "num_threads": 1,
                                                   "sampler": {"name": "random"}, "heartbeat_interval": 5}})
            config_file = tmp / f"workers{n_workers}.yaml"
            config_file.write_text(dump_yaml(cfg))
            per_worker = args.worker_trials // n_workers
            procs = [subprocess.Popen([sys.executable, "-m", "losslab.cli", "sweep", "-c", str(config_file),
                                       "--storage", storage, "--study", "bench", "--n-trials", str(per_worker)],
                                      env=env, stdout=open(tmp / f"w{n_workers}-{i}.log", "w"), stderr=subprocess.STDOUT)
                     for i in range(n_workers)]
            for p in procs:
                if p.wait() != 0:
                    raise RuntimeError(f"worker failed; see {tmp}/w{n_workers}-*.log")
            from losslab.pipelines.sweep import storage_url

            study = optuna.load_study(study_name="bench", storage=storage_url(storage))
            rates[n_workers] = _throughput(study)
        print(f"\n== workers: {args.worker_trials} trials x {args.worker_epochs} epochs, one torch thread per worker, "
              f"PostgreSQL study + MLflow server; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
        for n, (count, rate) in rates.items():
            print(f"{n} worker(s): {count} trials, {rate:7.1f} trials/hour")
        print(f"ratio 2/1 = {rates[2][1] / rates[1][1]:.2f} (goal >= 1.8 where two cores are free)")
    finally:
        if server is not None:
            server.stop()
        cluster.stop()


class _Info:
    def __init__(self, root: Path, cache) -> None:
        self.root, self.cache, self.cache_dir = root, cache, cache.cache_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the pruning bench")
    parser.add_argument("--pruner", action="append",
                        help="a pruner to compare with no pruning, as sweep.pruner keys (repeatable), e.g. "
                             "'name=hyperband min_resource=1'; default: " + DEFAULT_PRUNER)
    parser.add_argument("--worker-trials", type=int, default=8)
    parser.add_argument("--worker-epochs", type=int, default=3)
    parser.add_argument("--skip-pruning", action="store_true")
    parser.add_argument("--skip-workers", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        from losslab.config import DataConfig
        from losslab.data.cache import build_cache
        from losslab.data.sources import run_generator

        root = tmp / "data" / "embedded_brats"
        run_generator("embedded_brats", str(root), seed=3, num_cases=args.cases, shape=(48, 48, 16))
        cache = build_cache(DataConfig(root=str(root), cache_dir=str(tmp / "cache"), num_folds=3, salt="bench"))
        info = _Info(root, cache)
        if not args.skip_pruning:
            bench_pruning(tmp, info, args)
        if not args.skip_workers:
            bench_workers(tmp, info, args)


if __name__ == "__main__":
    main()
