"""Training data loader throughput vs the model's training-step throughput (bags per second).

Goal: the loader delivers at least 3x the bags per second that the model consumes, so training is
never input-bound. Uses the demo experiment (embedded BraTS cohort, resnet10t attention-MIL).

    python bench/loader.py [--config configs/experiment/demo.yaml] [--workers 0 2] [-o key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/experiment/demo.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-o", "--override", action="append", default=[])
    args = parser.parse_args()

    from losslab.config import load_config
    from losslab.data.cache import build_cache
    from losslab.engine.loop import build_optimizer
    from losslab.pipelines.train import build_components, make_datasets, make_loaders
    from losslab.tasks import task_of

    cfg = load_config(args.config, args.override)
    info = build_cache(cfg.data)
    train_ds, val_ds = make_datasets(cfg, info, cfg.data.fold)
    counts = torch.bincount(torch.as_tensor(train_ds.labels), minlength=info.num_classes).tolist()
    loss_fn, model = build_components(cfg, counts)
    print(f"torch threads: {torch.get_num_threads()}, batch size {cfg.data.batch_size}, bag size {cfg.data.bag_size}, "
          f"model {cfg.model.backbone}/{cfg.model.head}, {len(train_ds)} training bags")

    loader_rates = {}
    for workers in args.workers:
        c = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_workers": workers})})
        loader, _ = make_loaders(c, train_ds, val_ds)
        rates = []
        for _ in range(args.repeats):
            t0, n = time.perf_counter(), 0
            for batch in loader:
                n += batch["image"].shape[0]
            rates.append(n / (time.perf_counter() - t0))
        loader_rates[workers] = statistics.median(rates)

    loader, _ = make_loaders(cfg, train_ds, val_ds)
    batches = [b for _, b in zip(range(args.steps), loader)]
    optimizer = build_optimizer(model, loss_fn, cfg.optim)
    device, task = torch.device("cpu"), task_of(cfg)
    model.train()
    step_rates = []
    for r in range(args.repeats + 1):
        t0, n = time.perf_counter(), 0
        for batch in batches:
            loss = task.loss(loss_fn, task.forward(model, batch, device), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            n += batch["image"].shape[0]
        if r:  # first pass is warm-up
            step_rates.append(n / (time.perf_counter() - t0))
    step_rate = statistics.median(step_rates)

    print("| measure | bags/s | ratio to model step |")
    print("| --- | ---: | ---: |")
    print(f"| model training step | {step_rate:.1f} | 1.00 |")
    for workers, rate in loader_rates.items():
        print(f"| loader, num_workers={workers} | {rate:.1f} | {rate / step_rate:.1f} |")
    best = max(loader_rates.values()) / step_rate
    print(f"goal >= 3x: {'met' if best >= 3 else 'NOT met'} ({best:.1f}x)")


if __name__ == "__main__":
    main()
