"""Patient-level stratified (group) k-fold splits, stored in the cache index, and the training pool.

Uses scikit-learn's ``StratifiedGroupKFold`` so that no patient is in two folds and class ratios
are kept per fold. Folds depend only on the source's own patient identifiers and ``data.seed``, never
on the de-identification salt: patients enter the draw in the order of their split keys
(:func:`split_key`: a hash of the source's identifier with no salt), so two fresh caches of the same
data on two machines put every patient in the same fold, and :func:`split_fingerprint` (over the
split keys, not the salted case ids) says so. The held-out test split (fold ``-1``) is the source's own test split when it
defines one (``meta["split"] == "test"``), else an optional patient-level share carved out first.

:func:`training_rows` gives a run's training cases: the folds other than the validation fold, then
(optionally) long-tailed subsampling (``data.imbalance``) and a stratified subsample of
``data.train_cases``. Both are seeded and never touch the validation fold or the test split.
"""

from __future__ import annotations

import numpy as np

TEST_FOLD = -1


def split_key(identifier: str) -> str:
    """16 hex digits of ``sha256("losslab-split:" + identifier)``, ``identifier`` being the source's own
    patient identifier (a BraTS case folder, an MSD image name, a manifest's patient column, a study id).

    No salt on purpose: it orders patients for the fold draw, so that folds are the same on every
    machine. It lives only in a build's journal (next to ``.salt``, which with the salted ids already
    allows the same brute force) and is dropped before the index is written.
    """
    import hashlib

    if not str(identifier):
        raise ValueError("a case without its source's patient identifier: cannot place it in a fold")
    return hashlib.sha256(f"losslab-split:{identifier}".encode()).hexdigest()[:16]


def assign_folds(labels, groups, num_folds: int = 5, seed: int = 0, test_fraction: float = 0.0,
                 fixed_test=None) -> np.ndarray:
    """Return a fold number per sample: ``0..num_folds-1``, or ``-1`` for the held-out test split.

    Args:
        labels: ``(N,)`` integer class labels.
        groups: ``(N,)`` patient identifiers; all samples of a patient share a fold. The draw depends
            on their sorted order (scikit-learn numbers groups by ``np.unique``): pass split keys
            (:func:`split_key`), not salted hashes, for folds that do not depend on the salt.
        num_folds: number of cross-validation folds (>= 2).
        seed: shuffling seed (deterministic).
        test_fraction: fraction of patients held out as a test split before the folds (0 = none).
        fixed_test: ``(N,)`` bool, the source's own test cases: they are the test split (fold -1)
            and never enter a fold; ``test_fraction`` must then be 0.

    Raises:
        ValueError: when a class has fewer patients than folds (the message names the class).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    groups = np.asarray(groups)
    folds = np.full(len(labels), TEST_FOLD, dtype=np.int64)
    pool = np.arange(len(labels))
    if fixed_test is not None and np.asarray(fixed_test).any():
        if test_fraction > 0:
            raise ValueError(f"data.test_fraction={test_fraction}: the source defines its own test split; "
                             "set data.test_fraction=0")
        pool = pool[~np.asarray(fixed_test, dtype=bool)]
    elif test_fraction > 0:
        n_splits = max(2, int(round(1.0 / test_fraction)))
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        train_idx, _ = next(sgkf.split(pool, labels, groups))
        pool = pool[train_idx]
    if len(pool) == 0:
        raise ValueError("no case is left for the cross-validation folds (every case is in the test split)")
    for cls in np.unique(labels[pool]):
        n_patients = len(np.unique(groups[pool][labels[pool] == cls]))
        if n_patients < num_folds:
            raise ValueError(f"class {int(cls)} has {n_patients} patient(s), fewer than num_folds={num_folds}")
    sgkf = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    for fold, (_, val_idx) in enumerate(sgkf.split(pool, labels[pool], groups[pool])):
        folds[pool[val_idx]] = fold
    return folds


def split_fingerprint(keys, folds) -> str:
    """12 hex digits of the SHA-256 of the sorted distinct ``(split key, fold)`` pairs of a cache's
    cases (:func:`split_key`): equal exactly when two caches put every patient in the same fold and
    the same held-out test split, whatever their salts. Computed when a cache is built and kept in its
    ``report.json`` (``split_fingerprint``), since the index holds no split key."""
    import hashlib

    pairs = sorted({(str(k), int(f)) for k, f in zip(keys, folds)})
    return hashlib.sha256(repr(pairs).encode()).hexdigest()[:12]


def long_tailed_counts(available, ratio: float, profile: str = "exponential") -> np.ndarray:
    """Per-class counts ``n_i`` of a long-tailed subsample (class ``i`` in label order is the ``i``-th).

    ``exponential``: ``n_i = floor(n_max * ratio ** (-i / (K - 1)))``; ``step``: ``n_max`` for the first
    ``ceil(K / 2)`` classes, ``floor(n_max / ratio)`` for the rest (Cao et al., NeurIPS 2019,
    arXiv:1906.07413). ``n_max`` is the largest head count every class can supply:
    ``min_i floor(available_i / f_i)`` with ``f_i = n_i / n_max`` (the head class's count when the
    pool is balanced).

    Raises:
        ValueError: fewer than 2 classes, or a class with no case in the pool.
    """
    available = np.asarray(available, dtype=np.int64)
    k = len(available)
    if k < 2:
        raise ValueError(f"data.imbalance needs at least 2 classes, got {k}")
    if (available == 0).any():
        raise ValueError(f"data.imbalance: class(es) {np.flatnonzero(available == 0).tolist()} have no training case")
    i = np.arange(k)
    if profile == "exponential":
        factor = float(ratio) ** (-i / (k - 1))
    elif profile == "step":
        factor = np.where(i < (k + 1) // 2, 1.0, 1.0 / float(ratio))
    else:
        raise ValueError(f"data.imbalance.profile={profile!r}: expected exponential or step")
    n_max = int(np.min(np.floor(available / factor + 1e-9)))
    return np.floor(n_max * factor + 1e-9).astype(np.int64)


def long_tailed_subsample(labels, ratio: float, profile: str, seed: int, num_classes: int) -> np.ndarray:
    """Sorted positions of a seeded long-tailed subsample of ``labels`` (counts: :func:`long_tailed_counts`)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    counts = long_tailed_counts(np.bincount(labels, minlength=num_classes), ratio, profile)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=int(n), replace=False) for c, n in enumerate(counts)]
    return np.sort(np.concatenate(chosen))


def stratified_subsample(labels, size: int, seed: int) -> np.ndarray:
    """Sorted positions of ``size`` samples keeping the class proportions (scikit-learn's stratified split).

    Raises:
        ValueError: ``size`` exceeds the number of samples.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    if size > len(labels):
        raise ValueError(f"data.train_cases={size} but the training folds hold {len(labels)} cases")
    if size == len(labels):
        return np.arange(len(labels))
    positions = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 and size >= len(counts[counts > 0]) else None
    chosen, _ = train_test_split(positions, train_size=size, random_state=seed, stratify=stratify)
    return np.sort(chosen)


def training_rows(data_cfg, index, fold: int, num_classes: int):
    """The training cases of validation fold ``fold``: the other folds (never the test split), then
    ``data.imbalance`` and ``data.train_cases`` (in that order), both seeded (default ``data.seed``)."""
    rows = index[(index["fold"] != fold) & (index["fold"] >= 0)]
    if data_cfg.imbalance is not None:
        imb = data_cfg.imbalance
        seed = data_cfg.seed if imb.seed is None else imb.seed
        keep = long_tailed_subsample(rows["label"].to_numpy(), imb.ratio, imb.profile, seed, num_classes)
        rows = rows.iloc[keep]
    if data_cfg.train_cases is not None:
        rows = rows.iloc[stratified_subsample(rows["label"].to_numpy(), data_cfg.train_cases, data_cfg.seed)]
    return rows
