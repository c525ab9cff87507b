"""Overhead of the training engine and of MLflow logging, per epoch, in one process.

Two tasks (``--task mil``, ``volume3d`` or ``both``, the default): attention-MIL on bags of slices and a
MONAI ResNet-10 on whole volumes ``(B, 4, D, H, W)`` (``model.kind: volume3d``). Per task, variants
(same model, data, batch size, optimiser, gradient clipping and LR schedule):

* ``bare``: a hand-written PyTorch loop (train steps, then a forward pass over validation).
* ``engine``: :func:`losslab.engine.loop.fit` with no callbacks (metrics, alarms, atomic checkpoints).
* ``engine+mlflow``: ``fit`` with :class:`losslab.tracking.MLflowCallback` as ``train`` sets it up
  (one ``log_batch`` per epoch; checkpoints uploaded every ``train.upload_checkpoint_every`` epochs,
  default 5, and at the end) on a local SQLite store, synchronous.
* ``engine+mlflow_async``: the same with ``synchronous=False``.

An epoch is timed from ``on_epoch_start`` to the end of ``on_epoch_end`` (train + validation +
metrics + checkpoints + logging). The first epoch of each fit is a warm-up and is dropped; each
variant is repeated (order rotated) and the median epoch time reported. Goals: engine / bare <= 1.03,
mlflow / engine <= 1.02. With ``--peak-memory`` it also runs a 2-epoch ``losslab train`` of
``configs/experiment/brats_resnet3d.yaml`` on the embedded cohort in a child process and prints its
peak resident memory (goal < 4 GiB). Prints numbers; asserts nothing.

    .venv/bin/python bench/overhead.py --repeats 5 --epochs 4 --peak-memory
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from losslab.engine.callbacks import Callback


def _data(tmp: Path, cases: int, size: int, depth: int):
    from losslab.config import DataConfig
    from losslab.data.cache import build_cache
    from losslab.data.sources import run_generator

    root = tmp / "data"
    run_generator("embedded_brats", str(root), seed=3, num_cases=cases, shape=(size, size, depth))
    return build_cache(DataConfig(root=str(root), cache_dir=str(tmp / "cache"), num_folds=3, salt="bench"))


def _config(tmp: Path, args, epochs: int, task: str = "mil"):
    from losslab.config import load_config

    volume = ["model.kind=volume3d", f"model.backbone={args.volume_backbone}", "model.head_kwargs={}",
              f"data.volume_depth={args.depth}"] if task == "volume3d" else []
    return load_config(None, [
        f"data.root={tmp / 'data'}", f"data.cache_dir={tmp / 'cache'}", "data.num_folds=3", "data.salt=bench",
        f"data.bag_size={args.bag_size}", f"data.batch_size={args.batch_size}", "data.bag_sampling=evenly_spaced",
        f"model.backbone={args.backbone}", "model.head_kwargs={hidden_dim: 32}", f"train.epochs={epochs}",
        "train.device=cpu", f"train.checkpoint_dir={tmp / 'ckpt'}", "train.progress=false", "optim.lr=0.001",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.experiment=bench-overhead",
    ] + volume)


def _bare_logits(cfg, model, batch):
    """The plain PyTorch call of each model kind (no task object)."""
    if cfg.model.kind == "volume3d":
        return model(batch["image"])[0]
    return model(batch["image"], batch["mask"])[0]


class _EpochTimer(Callback):
    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_epoch_start(self, state):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, state, metrics):
        self.times.append(time.perf_counter() - self._t0)


def _components(cfg, info):
    from losslab.engine.loop import seed_everything
    from losslab.pipelines.train import build_components, make_datasets, make_loaders

    seed_everything(0)
    train_ds, val_ds = make_datasets(cfg, info, 0)
    loss_fn, model = build_components(cfg, [int((train_ds.labels == c).sum()) for c in range(len(info.class_names))])
    train_loader, val_loader = make_loaders(cfg, train_ds, val_ds)
    return model, loss_fn, train_loader, val_loader


def run_bare(cfg, info) -> list[float]:
    from losslab.engine.loop import cosine_with_warmup

    model, loss_fn, train_loader, val_loader = _components(cfg, info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    total = len(train_loader) * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, 0, cfg.optim.min_lr_ratio))
    times = []
    for _ in range(cfg.train.epochs):
        t0 = time.perf_counter()
        model.train()
        for batch in train_loader:
            loss = loss_fn(_bare_logits(cfg, model, batch).float(), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            probs = [torch.softmax(_bare_logits(cfg, model, b), 1) for b in val_loader]
        torch.cat(probs)
        times.append(time.perf_counter() - t0)
    return times


def run_engine(cfg, info, mlflow_mode: str | None) -> list[float]:
    from losslab.engine.loop import fit
    from losslab.tasks import task_of

    model, loss_fn, train_loader, val_loader = _components(cfg, info)
    timer = _EpochTimer()
    callbacks = []
    run = None
    if mlflow_mode is not None:
        import mlflow

        from losslab.tracking import MLflowCallback, setup_tracking

        setup_tracking(cfg.tracking)
        run = mlflow.start_run(run_name=f"bench-{mlflow_mode}")
        cb = MLflowCallback(run.info.run_id, info.class_names, synchronous=mlflow_mode == "sync",
                            checkpoint_every=cfg.train.upload_checkpoint_every)
        cb.on_fit_end = lambda state: cb._flush()  # end-of-run plots are not per-epoch cost
        callbacks.append(cb)
    callbacks.append(timer)  # last: its on_epoch_end runs after the MLflow logging
    try:
        fit(model, loss_fn, train_loader, val_loader, cfg.train, cfg.optim, info.class_names, callbacks=callbacks,
            step=task_of(cfg).step(cfg, loss_fn, info.class_names))
    finally:
        if run is not None:
            import mlflow

            mlflow.end_run()
    return timer.times


def bench_task(task: str, args, tmp: Path, info) -> dict[str, float]:
    """Median epoch time per variant for one task; prints the table and the ratios."""
    variants = ["bare", "engine", "engine+mlflow", "engine+mlflow_async"] if not args.skip_mlflow else ["bare", "engine"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    cfg = _config(tmp, args, args.epochs, task)
    print(f"\n== task {task}: model {cfg.model.kind}/{cfg.model.backbone}, {len(info.index)} cases, "
          f"batch {args.batch_size}, {args.epochs} epochs x {args.repeats} repeats (first epoch of each fit dropped)")
    for r in range(args.repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            if v == "bare":
                t = run_bare(cfg, info)
            else:
                mode = {"engine": None, "engine+mlflow": "sync", "engine+mlflow_async": "async"}[v]
                t = run_engine(cfg, info, mode)
            times[v].extend(t[1:])
        print(f"repeat {r}: " + ", ".join(f"{v} {statistics.median(times[v]):.3f}s" for v in variants), flush=True)
    med = {v: statistics.median(t) for v, t in times.items()}
    for v in variants:
        print(f"  {v:22s} {med[v]:.4f}  (n={len(times[v])}, min {min(times[v]):.4f})")
    print(f"engine / bare               = {med['engine'] / med['bare']:.4f}   (goal <= 1.03)")
    for v in variants[2:]:
        print(f"{v} / engine = {med[v] / med['engine']:.4f}   (goal <= 1.02)")
    return {v: med[v] for v in variants}


def peak_memory_resnet3d(tmp: Path) -> float:
    """Peak RSS (GiB) of a child ``losslab train`` of brats_resnet3d for 2 epochs on the embedded cohort."""
    import os
    import resource
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "losslab.cli", "train", "-c", str(repo / "configs/experiment/brats_resnet3d.yaml"),
           "-o", "train.epochs=2", "-o", f"data.root={tmp / 'brats'}", "-o", "data.generate=embedded_brats",
           "-o", f"data.cache_dir={tmp / 'brats_cache'}",
           "-o", f"train.checkpoint_dir={tmp / 'ckpt3d'}", "-o", f"tracking.tracking_uri=sqlite:///{tmp / 'mem.db'}",
           "-o", "train.progress=false"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=tmp, env=dict(os.environ, PYTHONPATH=str(repo / "src")),
                   stdout=subprocess.DEVNULL)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    print(f"\nbrats_resnet3d, 2 epochs, embedded cohort: wall {time.perf_counter() - t0:.0f} s, "
          f"peak RSS {peak_kib / 2**20:.2f} GiB (goal < 4 GiB)")
    return peak_kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["mil", "volume3d", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--volume-backbone", default="monai_resnet10")
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--bag-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--skip-mlflow", action="store_true", help="only bare and engine")
    parser.add_argument("--peak-memory", action="store_true", help="also the 2-epoch brats_resnet3d peak memory")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)  # dead-class warnings of an untrained model are noise here
    tasks = ["mil", "volume3d"] if args.task == "both" else [args.task]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        info = _data(tmp, args.cases, args.size, args.depth)
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
        medians = {task: bench_task(task, args, tmp, info) for task in tasks}
        print("\nside by side, median epoch time (s):")
        print(f"  {'task':10s} {'bare':>8s} {'engine':>8s} {'engine/bare':>12s}")
        for task, med in medians.items():
            print(f"  {task:10s} {med['bare']:8.4f} {med['engine']:8.4f} {med['engine'] / med['bare']:12.4f}")
        if args.peak_memory:
            peak_memory_resnet3d(tmp)


if __name__ == "__main__":
    main()
