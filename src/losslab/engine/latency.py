"""One latency measurement for every entry point (``evaluate``, ``distill``): the model alone, data
loading excluded, through the task's step (so a bag, a volume and an image + text pair are timed the
same way)."""

from __future__ import annotations

import time

import numpy as np
import torch

from typing import Any, Callable

from losslab.engine.steps import Step

__all__ = ["measure_latency"]


def measure_latency(model, dataset, device: torch.device, batch_size: int, warmup: int = 5,
                    repeats: int = 30, *, step: Step, collate: Callable[[list[Any]], dict[str, Any]]
                    ) -> dict[str, float]:
    """Per-sample latency at batch size 1 (p50, p95 in ms, after ``warmup`` calls) and throughput
    (samples/s) of the model alone at ``batch_size`` (data loading excluded): the task's ``step``
    runs the forward pass on batches of ``dataset``'s items made by the task's ``collate``."""
    model.eval()
    one = collate([dataset[0]])
    batch = collate([dataset[i % len(dataset)] for i in range(batch_size)])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timings(b, n) -> list[float]:
        out = []
        with torch.no_grad():
            for _ in range(warmup):
                step.forward(model, b, device)
            sync()
            for _ in range(n):
                start = time.perf_counter()
                step.forward(model, b, device)
                sync()
                out.append(time.perf_counter() - start)
        return out

    single = np.asarray(timings(one, repeats)) * 1000.0
    batched = np.asarray(timings(batch, max(2, repeats // 4)))
    return {"latency/p50_ms": float(np.percentile(single, 50)), "latency/p95_ms": float(np.percentile(single, 95)),
            "latency/throughput_per_s": float(batch_size * len(batched) / batched.sum()),
            "latency/batch_size": float(batch_size)}
