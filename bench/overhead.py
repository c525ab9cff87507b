"""Overhead of the training engine and of MLflow logging, per epoch, in one process.

Variants (same model, data, batch size, optimiser, gradient clipping and LR schedule):

* ``bare``: a hand-written PyTorch loop (train steps, then a forward pass over validation).
* ``engine``: :func:`losslab.engine.loop.fit` with no callbacks (metrics, alarms, atomic checkpoints).
* ``engine+mlflow``: ``fit`` with :class:`losslab.tracking.MLflowCallback` as ``train`` sets it up
  (one ``log_batch`` per epoch; checkpoints uploaded every ``train.upload_checkpoint_every`` epochs,
  default 5, and at the end) on a local SQLite store, synchronous.
* ``engine+mlflow_async``: the same with ``synchronous=False``.

An epoch is timed from ``on_epoch_start`` to the end of ``on_epoch_end`` (train + validation +
metrics + checkpoints + logging). The first epoch of each fit is a warm-up and is dropped; each
variant is repeated (order rotated) and the median epoch time reported. Goals: engine / bare <= 1.03,
mlflow / engine <= 1.02. Prints numbers; asserts nothing.

    .venv/bin/python bench/overhead.py --repeats 5 --epochs 4
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


def _config(tmp: Path, args, epochs: int):
    from losslab.config import load_config

    return load_config(None, [
        f"data.root={tmp / 'data'}", f"data.cache_dir={tmp / 'cache'}", "data.num_folds=3", "data.salt=bench",
        f"data.bag_size={args.bag_size}", f"data.batch_size={args.batch_size}", "data.bag_sampling=evenly_spaced",
        f"model.backbone={args.backbone}", "model.head_kwargs={hidden_dim: 32}", f"train.epochs={epochs}",
        "train.device=cpu", f"train.checkpoint_dir={tmp / 'ckpt'}", "train.progress=false", "optim.lr=0.001",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.experiment=bench-overhead",
    ])


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
            logits, _ = model(batch["image"], batch["mask"])
            loss = loss_fn(logits.float(), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            probs = [torch.softmax(model(b["image"], b["mask"])[0], 1) for b in val_loader]
        torch.cat(probs)
        times.append(time.perf_counter() - t0)
    return times


def run_engine(cfg, info, mlflow_mode: str | None) -> list[float]:
    from losslab.engine.loop import fit

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
        fit(model, loss_fn, train_loader, val_loader, cfg.train, cfg.optim, info.class_names, callbacks=callbacks)
    finally:
        if run is not None:
            import mlflow

            mlflow.end_run()
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--bag-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)  # dead-class warnings of an untrained model are noise here
    variants = ["bare", "engine", "engine+mlflow", "engine+mlflow_async"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        info = _data(tmp, args.cases, args.size, args.depth)
        cfg = _config(tmp, args, args.epochs)
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, backbone {args.backbone}, "
              f"{len(info.index)} cases, bag {args.bag_size}, batch {args.batch_size}, {args.epochs} epochs x "
              f"{args.repeats} repeats (first epoch of each fit dropped)")
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
    print("\nmedian epoch time (s):")
    for v in variants:
        print(f"  {v:22s} {med[v]:.4f}  (n={len(times[v])}, min {min(times[v]):.4f})")
    print(f"\nengine / bare               = {med['engine'] / med['bare']:.4f}   (goal <= 1.03)")
    print(f"engine+mlflow / engine      = {med['engine+mlflow'] / med['engine']:.4f}   (goal <= 1.02)")
    print(f"engine+mlflow_async / engine= {med['engine+mlflow_async'] / med['engine']:.4f}   (goal <= 1.02)")
    print(f"min-based: engine/bare {min(times['engine']) / min(times['bare']):.4f}, "
          f"mlflow/engine {min(times['engine+mlflow']) / min(times['engine']):.4f}, "
          f"mlflow_async/engine {min(times['engine+mlflow_async']) / min(times['engine']):.4f}")


if __name__ == "__main__":
    main()
