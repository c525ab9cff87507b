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


def sampled_class_distribution(name: str, class_counts) -> np.ndarray:
    """The class distribution the training batches are drawn from under sampler ``name``: the counts
    themselves for ``none``, ∝ n_c · n_c^-1 (uniform over the present classes) for ``weighted_random``
    and ``class_balanced_batch``, ∝ n_c · n_c^-0.5 = sqrt(n_c) for ``sqrt_weighted_random``. Sums to 1.

    A classifier whose bias starts at the log prior should start at *this* prior: with a balancing
    sampler the data's own prior (e.g. HGG : LGG 2.8 : 1) makes the first epochs predict only the
    majority class although every batch is balanced."""
    counts = np.asarray(class_counts, dtype=float)
    present = counts > 0
    if name in ("weighted_random", "class_balanced_batch"):
        mass = present.astype(float)
    elif name == "sqrt_weighted_random":
        mass = np.sqrt(counts)
    elif name == "none":
        mass = counts
    else:
        raise ValueError(f"data.sampler {name!r} not in none, weighted_random, sqrt_weighted_random, class_balanced_batch")
    return mass / mass.sum()


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


# ------------------------------------------------------------------------------ distributed (torchrun)
# Each rank of a DDP run sees its own shard of every epoch, and the shards together follow the same
# class sampling strategy as a single process. Every rank builds the *same* epoch from a generator
# seeded by (seed, epoch) and keeps its strided share; ``set_epoch(epoch)`` must be called before
# each epoch (fit() does), as with torch's DistributedSampler.


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1)


class DistributedWeightedRandomSampler(Sampler[int]):
    """Weighted sampling with replacement, sharded over ranks (``weighted_random`` /
    ``sqrt_weighted_random`` under torchrun).

    Hand-written (torch has no distributed weighted sampler): every rank draws the same multinomial
    sample of ``len(weights)`` indices (rounded up to a multiple of ``num_replicas``) from a generator
    seeded by ``(seed, epoch)``, then keeps ``draw[rank::num_replicas]``. The union of the shards is
    that one single-process draw, so the class balance is the same as with one process.
    """

    def __init__(self, weights, num_replicas: int, rank: int, seed: int = 0, num_samples: int | None = None) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.weights = torch.as_tensor(np.asarray(weights), dtype=torch.double)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        total = num_samples or len(self.weights)
        self.num_samples = int(np.ceil(total / num_replicas))  # per rank
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_draw(self) -> list[int]:
        """The epoch's draw over all ranks (the same on every rank)."""
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        return torch.multinomial(self.weights, self.total_size, replacement=True, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_draw()[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class DistributedClassBalancedBatchSampler(Sampler[list[int]]):
    """``class_balanced_batch`` under torchrun: an identically-seeded :class:`ClassBalancedBatchSampler`
    yields ``num_replicas × ceil(len / (batch_size × num_replicas))`` class-balanced batches of
    ``batch_size`` on every rank; rank ``r`` keeps batches ``r::num_replicas``. Every batch (hence every
    rank's share) keeps the per-class quota, and each rank has the same number of batches."""

    def __init__(self, labels: np.ndarray, batch_size: int, num_replicas: int, rank: int, seed: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_batches = int(np.ceil(len(labels) / (batch_size * num_replicas)))  # per rank
        self.inner = ClassBalancedBatchSampler(labels, batch_size, num_batches=self.num_batches * num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """The epoch's batches over all ranks (the same on every rank). The inner sampler seeds its
        generator from the global torch RNG, so that RNG is forked and seeded by (seed, epoch)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_epoch_seed(self.seed, self.epoch))
            return list(self.inner)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.global_batches()[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return self.num_batches


def build_distributed_sampler(name: str, labels: np.ndarray, batch_size: int, num_replicas: int, rank: int,
                              seed: int = 0) -> tuple[Sampler | None, Sampler | None]:
    """:func:`build_sampler` for one rank of ``num_replicas`` (``batch_size`` is per rank); returns
    ``(sampler, batch_sampler)``, each with ``set_epoch``. ``none`` is torch's
    ``DistributedSampler(shuffle=True)`` (pads by repeating a few indices so that ranks are equal)."""
    if name == "none":
        from torch.utils.data import DistributedSampler

        return DistributedSampler(range(len(labels)), num_replicas=num_replicas, rank=rank, shuffle=True,
                                  seed=seed, drop_last=False), None
    if name in ("weighted_random", "sqrt_weighted_random"):
        weights = sample_weights(labels, 1.0 if name == "weighted_random" else 0.5)
        return DistributedWeightedRandomSampler(weights, num_replicas, rank, seed), None
    if name == "class_balanced_batch":
        return None, DistributedClassBalancedBatchSampler(labels, batch_size, num_replicas, rank, seed)
    raise ValueError(f"data.sampler {name!r} not in none, weighted_random, sqrt_weighted_random, class_balanced_batch")
