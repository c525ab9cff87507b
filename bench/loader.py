"""Loader-only throughput (batches per second on one CPU core), per setting of issue #23.

Settings (the embedded BraTS-layout cohort, generated into a temporary folder):

* ``demo``: configs/experiment/demo.yaml (attention-MIL resnet10t, 64², bag 12, batch 4).
* ``mil128``: MIL resnet18 at 128², bag 32, batch 16 (cohort generated at 128 × 128 × 48).
* ``vol3d``: the 3D MONAI ResNet-10 (configs/experiment/brats_resnet3d.yaml) at 64² × 32, batch 8.

Each setting builds the training loader as ``train`` does (:func:`losslab.pipelines.train.make_loaders`)
with ``num_workers`` from ``--workers`` (default 0: the loader's own cost, in this process), one
torch thread, and times whole epochs; the median of ``--repeats`` epochs (after one warm-up epoch)
is printed. ``--model-step`` also times the model's training step on the same batches (bags/s) and
prints the loader / step ratio (goal >= 3).

    nice -n 10 python bench/loader.py [--setting demo mil128 vol3d] [--workers 0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "demo": ("configs/experiment/demo.yaml", (64, 64, 32), []),
    "mil128": ("configs/experiment/demo.yaml", (128, 128, 48),
               ["model.backbone=resnet18", "data.image_size=128", "data.bag_size=32", "data.batch_size=16"]),
    "vol3d": ("configs/experiment/brats_resnet3d.yaml", (64, 64, 48),
              ["data.volume_depth=32", "data.volume_size=[64, 64]", "data.batch_size=8"]),
}


def setting_config(name: str, tmp: Path, extra: list[str]):
    """The config of setting ``name`` on a cohort generated under ``tmp`` (its own data and cache)."""
    from losslab.config import load_config

    path, shape, overrides = SETTINGS[name]
    data = [f"data.root={tmp / name / 'data'}", "data.generate=embedded_brats",
            f"data.generator_kwargs={{num_cases: 90, hgg_ratio: 2.8, shape: {list(shape)}}}",
            f"data.cache_dir={tmp / name / 'cache'}", "data.salt=bench", "train.device=cpu"]
    return load_config(REPO / path, data + overrides + extra)


def epoch_rates(loader, repeats: int) -> tuple[float, float, int]:
    """Median batches/s and samples/s over ``repeats`` epochs after one warm-up epoch."""
    batch_rates, sample_rates, batches = [], [], 0
    for r in range(repeats + 1):
        t0, samples, batches = time.perf_counter(), 0, 0
        for batch in loader:
            samples += batch["image"].shape[0]
            batches += 1
        elapsed = time.perf_counter() - t0
        if r:
            batch_rates.append(batches / elapsed)
            sample_rates.append(samples / elapsed)
    return statistics.median(batch_rates), statistics.median(sample_rates), batches


def model_step_rate(cfg, info, train_ds, loader, steps: int, repeats: int) -> float:
    """Median samples/s of the model's training step (forward, loss, backward, step) on CPU."""
    from losslab.engine.loop import build_optimizer
    from losslab.pipelines.train import build_components
    from losslab.tasks import task_of

    counts = torch.bincount(torch.as_tensor(train_ds.labels), minlength=info.num_classes).tolist()
    loss_fn, model = build_components(cfg, counts)
    batches = [b for _, b in zip(range(steps), loader)]
    optimizer = build_optimizer(model, loss_fn, cfg.optim)
    device, task = torch.device("cpu"), task_of(cfg).step(cfg, loss_fn, info.class_names)
    model.train()
    rates = []
    for r in range(repeats + 1):
        t0, n = time.perf_counter(), 0
        for batch in batches:
            loss = task.loss(loss_fn, task.forward(model, batch, device), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            n += batch["image"].shape[0]
        if r:  # first pass is warm-up
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def bench_setting(name: str, tmp: Path, args) -> None:
    from losslab.data.cache import build_cache
    from losslab.pipelines.train import make_datasets, make_loaders

    cfg = setting_config(name, tmp, args.override)
    info = build_cache(cfg.data)
    t0 = time.perf_counter()
    train_ds, val_ds = make_datasets(cfg, info, cfg.data.fold)
    build_s = time.perf_counter() - t0
    for workers in args.workers:
        c = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_workers": workers})})
        loader, _ = make_loaders(c, train_ds, val_ds)
        batches_s, samples_s, n_batches = epoch_rates(loader, args.repeats)
        print(f"| {name} | {cfg.model.kind}/{cfg.model.backbone} | {cfg.data.batch_size} | {workers} | "
              f"{build_s:.2f} | {n_batches} | {batches_s:.2f} | {samples_s:.1f} |", flush=True)
    if args.model_step:
        loader, _ = make_loaders(cfg, train_ds, val_ds)
        step = model_step_rate(cfg, info, train_ds, loader, args.steps, args.repeats)
        print(f"  {name}: model training step {step:.1f} samples/s; loader / step = {samples_s / step:.1f} "
              f"(goal >= 3)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: per CPU core)")
    parser.add_argument("--model-step", action="store_true", help="also time the model's training step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("-o", "--override", action="append", default=[])
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| setting | model | batch | workers | dataset build s | batches/epoch | batches/s | samples/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp_name:
        for name in args.setting:
            bench_setting(name, Path(tmp_name), args)


if __name__ == "__main__":
    main()
