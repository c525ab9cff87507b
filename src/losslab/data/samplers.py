"""Samplers for imbalanced data: ``none``, ``weighted_random``, ``sqrt_weighted_random``,
``class_balanced_batch``.

``weighted_random`` draws each sample with probability ∝ 1 / n_class (torch's
``WeightedRandomSampler``, with replacement, one epoch = len(dataset) draws); ``sqrt_weighted_random``
uses 1 / sqrt(n_class). ``class_balanced_batch`` (hand-written: no library batch sampler does this)
yields batches holding the same number of samples from every class, drawn without replacement within
a class until it is exhausted, then reshuffled.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler


def sample_weights(labels: np.ndarray, power: float = 1.0) -> np.ndarray:
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    per_class = np.where(counts > 0, 1.0 / np.maximum(counts, 1) ** power, 0.0)
    return per_class[labels]


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` with ``batch_size // K`` samples per class (remainder random)."""

    def __init__(self, labels: np.ndarray, batch_size: int, num_batches: int | None = None) -> None:
        self.labels = np.asarray(labels)
        self.classes = np.unique(self.labels)
        if batch_size < len(self.classes):
            raise ValueError(f"class_balanced_batch needs batch_size >= number of classes ({len(self.classes)}), got {batch_size}")
        self.batch_size = batch_size
        self.num_batches = num_batches or int(np.ceil(len(self.labels) / batch_size))

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        pools = {c: [] for c in self.classes}

        def draw(c: int) -> int:
            if not pools[c]:
                idx = np.flatnonzero(self.labels == c)
                pools[c] = [int(idx[j]) for j in torch.randperm(len(idx), generator=gen)]
            return pools[c].pop()

        per_class = self.batch_size // len(self.classes)
        for _ in range(self.num_batches):
            batch = [draw(c) for c in self.classes for _ in range(per_class)]
            extra = torch.randint(0, len(self.classes), (self.batch_size - len(batch),), generator=gen)
            batch += [draw(self.classes[int(k)]) for k in extra]
            yield batch


def build_sampler(name: str, labels: np.ndarray, batch_size: int) -> tuple[Sampler | None, Sampler | None]:
    """Return ``(sampler, batch_sampler)`` for a DataLoader (at most one is not None)."""
    if name == "none":
        return None, None
    if name in ("weighted_random", "sqrt_weighted_random"):
        weights = sample_weights(labels, 1.0 if name == "weighted_random" else 0.5)
        return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=len(labels), replacement=True), None
    if name == "class_balanced_batch":
        return None, ClassBalancedBatchSampler(labels, batch_size)
    raise ValueError(f"data.sampler {name!r} not in none, weighted_random, sqrt_weighted_random, class_balanced_batch")
