"""Sweep benchmarks: what pruning saves, and what a second worker adds. Numbers only, no asserts.

1. Pruning: the same 20-trial search (RandomSampler with a fixed seed, so both searches train the same
   param sets in the same order; training is deterministic) with ``pruner: none`` and with the default
   pruner (median, 3 startup trials, 2 warm-up epochs; the pruner sees the best value so far,
   ``sweep.report: best``). Prints compute in trial-epochs (epochs actually trained), the ratio
   pruned/full (goal <= 0.5) and the best value of each (goal: within 1 %), for each ``--seeds`` seed
   (different trials), then the mean/worst over seeds. One seed says little: the best trial of a
   search is often a single good epoch, and whether a pruner keeps it varies from search to search.
   ``--replay`` replays pruners on the recorded no-pruning curves instead of training (exact, and
   seconds instead of minutes: compare many pruners, then confirm one with a real run);
   ``--workdir`` keeps the stores so that finished searches are reused. In-process, SQLite Optuna
   storage, SQLite MLflow store.
2. Workers: one worker vs two workers (separate ``losslab sweep`` processes, one torch thread each)
   on one study in a throw-away PostgreSQL cluster, logging to an MLflow server on PostgreSQL.
   Prints trials per hour from Optuna's trial timestamps (first start to last end, so process
   start-up is excluded) and the ratio (goal >= 1.8 where two cores are free).

Small trials: the embedded BraTS generator (``--cases`` cases, 48x48x16, fold 0 of 3 for validation),
``test_resnet`` backbone, bags of 4, AdamW with a cosine schedule, ``--epochs`` epochs. Usage::

    python bench/sweep.py --skip-workers --seeds 0 1 2 3 --cases 150 --epochs 12 --workdir /tmp/bsw
    python bench/sweep.py --skip-workers --seeds 0 1 2 3 --cases 150 --epochs 12 --workdir /tmp/bsw \
        --replay --pruner 'name=median n_startup_trials=5 n_warmup_steps=3' --pruner 'name=hyperband min_resource=2'
    python bench/sweep.py --skip-pruning --worker-trials 8 --worker-epochs 3
"""

from __future__ import annotations

import argparse
import json
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
        "tracking.registered_model_name=bench-sweep", "optim.lr=0.003", "optim.scheduler=cosine",
    ])


def _epochs(study) -> int:
    return sum(int(t.user_attrs.get("epochs_run", 0)) for t in study.trials)


def _pruners(args) -> list[tuple[str, dict]]:
    import yaml

    specs = [{k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in text.split())}
             for text in (args.pruner or [DEFAULT_PRUNER])]
    return [(" ".join(f"{k}={v}" for k, v in spec.items()) + f" report={args.report}", spec) for spec in specs]


def _run_search(tmp: Path, info, args, label: str, spec: dict, seed: int):
    """Run (or, with --workdir, reuse) one search; returns (study, wall seconds or None)."""
    import optuna

    from losslab.pipelines.sweep import run_sweep, sweep_settings

    cfg = base_config(Path(info.root), Path(info.cache_dir), args.epochs, "bench-sweep-pruning")
    study_name = f"{label}-seed{seed}".replace(" ", "-").replace("=", "-")
    storage = f"sqlite:///{tmp / 'optuna.db'}"
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        if len([t for t in study.trials if t.state.is_finished()]) >= args.trials:
            print(f"{study_name}: reusing the finished study in {tmp}")
            return study, None
        raise RuntimeError(f"{tmp} holds an unfinished study {study_name!r}; remove it or use another --workdir")
    except KeyError:
        pass
    cfg = cfg.model_copy(update={"sweep": {
        "study": study_name, "storage": storage, "n_trials": args.trials, "report": args.report,
        "sampler": {"name": "random", "seed": seed}, "pruner": spec, "space": SPACE, "num_threads": args.threads}})
    t0 = time.perf_counter()
    run_sweep(cfg, sweep_settings(cfg), info=info.cache)
    seconds = time.perf_counter() - t0
    study = optuna.load_study(study_name=study_name, storage=storage)
    states = [t.state.name for t in study.trials]
    if "COMPLETE" not in states:
        raise RuntimeError(f"{label}: no trial completed ({states}); see the log above")
    return study, seconds


def learning_curves(full_study) -> list[tuple[list, float]]:
    """Each trial of the no-pruning study: its per-epoch val/auc history (from its MLflow run, read
    once per seed) and its objective value."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return [(sorted(client.get_metric_history(t.user_attrs["mlflow_run_id"], "val/auc"), key=lambda m: m.step), t.value)
            for t in full_study.trials]


def replay(curves, spec: dict, study_name: str, report: str) -> tuple[int, float, int, int]:
    """Exact replay of a pruner on the no-pruning study's :func:`learning_curves`: training is
    deterministic and the sampler is seeded, so a pruned search trains the same trials with the same
    per-epoch values until it stops them. Feeds each epoch's value through the same
    ``OptunaReporter.value_to_report`` and pruner as a real search. Returns (trial-epochs, best
    value, pruned, best trial number)."""
    import optuna

    from losslab.pipelines.sweep import OptunaReporter, build_pruner

    study = optuna.create_study(study_name=study_name, direction="maximize", pruner=build_pruner(spec))
    epochs = 0
    for history, value in curves:
        trial = study.ask()
        reporter = OptunaReporter(trial, "val/auc", 0, "", "maximize", report)
        for m in history:
            epochs += 1
            trial.report(reporter.value_to_report(m.value), m.step)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, value)
    pruned = sum(t.state.name == "PRUNED" for t in study.trials)
    return epochs, study.best_value, pruned, study.best_trial.number


def bench_pruning(tmp: Path, info, args) -> None:
    print_header = (f"\n== pruning: {args.trials} trials x {args.epochs} epochs, {args.cases} cases, maximise val/auc, "
                    f"RandomSampler(seed in {args.seeds}), {args.threads} torch thread(s)")
    summary: dict[str, list[tuple[float, float]]] = {}
    lines = []
    for seed in args.seeds:
        full_study, full_seconds = _run_search(tmp, info, args, "no pruning", {"name": "none"}, seed)
        full = (_epochs(full_study), full_study.best_value)
        lines.append(f"-- sampler seed {seed}\nno pruning: {full[0]} trial-epochs, best val/auc {full[1]:.5f} "
                     f"(trial {full_study.best_trial.number})" + (f", {full_seconds:.1f} s wall" if full_seconds else ""))
        curves = learning_curves(full_study) if args.replay else None
        for label, spec in _pruners(args):
            if args.replay:
                epochs, best, n_pruned, best_n = replay(curves, spec, f"{label}-seed{seed}", args.report)
                seconds, label = None, label + " (replayed)"
            else:
                study, seconds = _run_search(tmp, info, args, label, spec, seed)
                epochs, best, best_n = _epochs(study), study.best_value, study.best_trial.number
                n_pruned = sum(t.state.name == "PRUNED" for t in study.trials)
            ratio, gap = epochs / full[0], 100 * (best - full[1]) / abs(full[1])
            summary.setdefault(label, []).append((ratio, gap))
            line = (f"{label}: {epochs} trial-epochs, {n_pruned} pruned, best val/auc {best:.5f} (trial {best_n})\n"
                    f"    compute ratio pruned/full = {ratio:.3f} (goal <= 0.5); best vs full best = {gap:+.2f} % "
                    f"(goal within 1 %)")
            if seconds:
                line += f"; {seconds:.1f} s wall" + (f", ratio {seconds / full_seconds:.3f}" if full_seconds else "")
            lines.append(line)
    print(print_header)
    print("\n".join(lines))
    print(f"-- over {len(args.seeds)} sampler seed(s)")
    for label, rows in summary.items():
        ratios, gaps = [r for r, _ in rows], [g for _, g in rows]
        met = sum(r <= 0.5 and g >= -1.0 for r, g in rows)
        print(f"{label}: compute ratio mean {sum(ratios) / len(ratios):.3f} (max {max(ratios):.3f}); "
              f"worst best-value gap {min(gaps):+.2f} %; both goals met on {met}/{len(rows)} seed(s)")


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
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--cases", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the pruning bench")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="RandomSampler seeds: one search pair per seed (different trials), summarised at the end")
    parser.add_argument("--report", choices=["best", "epoch"], default="best",
                        help="sweep.report: what each epoch reports to the pruner")
    parser.add_argument("--workdir", help="keep data, stores and studies here; a finished search found there is "
                                          "reused instead of re-run (default: a temporary directory)")
    parser.add_argument("--replay", action="store_true",
                        help="replay each --pruner on the no-pruning search's per-epoch values instead of training "
                             "(exact: training is deterministic and the sampler seeded); confirm with a real run")
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
        tmp = Path(args.workdir or tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        from losslab.config import DataConfig
        from losslab.data.cache import build_cache
        from losslab.data.sources import run_generator

        root = tmp / "data" / "embedded_brats"
        settings = {"cases": args.cases, "epochs": args.epochs, "trials": args.trials}  # what a reused search must share
        stamp = tmp / "bench_settings.json"
        if not stamp.exists():
            run_generator("embedded_brats", str(root), seed=3, num_cases=args.cases, shape=(48, 48, 16))
            stamp.write_text(json.dumps(settings))
        elif json.loads(stamp.read_text()) != settings:
            raise SystemExit(f"{tmp} holds searches made with {stamp.read_text()}, not {settings}; use another --workdir")
        cache = build_cache(DataConfig(root=str(root), cache_dir=str(tmp / "cache"), num_folds=3, salt="bench"))
        info = _Info(root, cache)
        if not args.skip_pruning:
            bench_pruning(tmp, info, args)
        if not args.skip_workers:
            bench_workers(tmp, info, args)

if __name__ == "__main__":
    main()
