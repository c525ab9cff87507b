"""Patient-level stratified (group) k-fold splits, stored in the cache index.

Uses scikit-learn's ``StratifiedGroupKFold`` so that no patient is in two folds and class ratios
are kept per fold. An optional held-out test split is carved out first, also patient-level.
"""

from __future__ import annotations

import numpy as np

TEST_FOLD = -1


def assign_folds(labels, groups, num_folds: int = 5, seed: int = 0, test_fraction: float = 0.0) -> np.ndarray:
    """Return a fold number per sample: ``0..num_folds-1``, or ``-1`` for the held-out test split.

    Args:
        labels: ``(N,)`` integer class labels.
        groups: ``(N,)`` patient identifiers (hashes); all samples of a patient share a fold.
        num_folds: number of cross-validation folds (>= 2).
        seed: shuffling seed (deterministic).
        test_fraction: fraction of patients held out as a test split before the folds (0 = none).

    Raises:
        ValueError: when a class has fewer patients than folds (the message names the class).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    groups = np.asarray(groups)
    folds = np.full(len(labels), TEST_FOLD, dtype=np.int64)
    pool = np.arange(len(labels))
    if test_fraction > 0:
        n_splits = max(2, int(round(1.0 / test_fraction)))
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        train_idx, _ = next(sgkf.split(pool, labels, groups))
        pool = pool[train_idx]
    for cls in np.unique(labels[pool]):
        n_patients = len(np.unique(groups[pool][labels[pool] == cls]))
        if n_patients < num_folds:
            raise ValueError(f"class {int(cls)} has {n_patients} patient(s), fewer than num_folds={num_folds}")
    sgkf = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    for fold, (_, val_idx) in enumerate(sgkf.split(pool, labels[pool], groups[pool])):
        folds[pool[val_idx]] = fold
    return folds


def split_fingerprint(index) -> str:
    """12 hex digits of the SHA-256 of the sorted ``(case_id, fold)`` pairs of a cache index: equal
    exactly when two caches put every case in the same fold and the same held-out test split."""
    import hashlib

    pairs = sorted(zip(index["case_id"].astype(str), index["fold"].astype(int)))
    return hashlib.sha256(repr(pairs).encode()).hexdigest()[:12]
