"""Which logged config params make two runs comparable ("like with like").

Every train run logs its resolved config as flat params (``loss.gamma``, ``train.epochs``, ...;
:func:`losslab.tracking.config_params`). Two runs are the *same experiment* when every param
matches apart from the keys in :data:`IGNORED`: the fold, the seed and run bookkeeping (names,
paths, counts that follow from the fold, tracking settings). ``compare`` pools runs on this rule and
:func:`config_hash` is the short fingerprint of the rest, set as the tag ``losslab.config_hash`` on
every run so the MLflow UI can filter on it.

MLflow-free and torch-free.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable, Mapping

__all__ = ["IGNORED", "config_hash", "differing_keys", "is_ignored", "signature"]

# key (exact) or prefix (ending in "." or "_") -> why it does not make runs different experiments
IGNORED: dict[str, str] = {
    "data.fold": "the fold (runs are paired on it)",
    "train.seed": "the seed (runs are paired on it)",
    "train.seeds": "the list of seeds a parent launched",
    "cv.": "how many folds / repeats a parent launched; not what one fold run is",
    "tracking.": "where and under which names runs are logged",
    "sweep.": "the search a trial belonged to; its sampled values are params of their own",
    "overrides": "a sweep trial's overrides, already in the resolved params",
    "evaluate.": "settings of a later evaluate run",
    "distill.": "settings of the distill entry point",
    "data.root": "a path",
    "data.cache_dir": "a path",
    "data.salt": "de-identification salt (a secret; never part of a fingerprint)",
    "data.num_workers": "loader processes; same batches",
    "train.checkpoint_dir": "a path",
    "train.progress": "a progress bar",
    "train.plot_every": "how often plots are logged",
    "train.upload_checkpoint_every": "how often checkpoints are uploaded",
    "data.n_": "case counts that follow from the fold (n_train, n_val, n_test)",
    "data.class_counts_": "class counts that follow from the fold",
    "data.effective_batch_size": "derived from data.batch_size and ddp.world_size",
    "loss.formula": "the loss printed with fold-dependent class counts",
    "data.normalize_mean": "statistics of the training fold (data.normalize: dataset); the mode is compared",
    "data.normalize_std": "statistics of the training fold (data.normalize: dataset); the mode is compared",
}


def is_ignored(key: str, also: Iterable[str] = ()) -> bool:
    """True when ``key`` is in :data:`IGNORED` or ``also`` (an exact key, or a prefix ending in
    ``.`` or ``_``)."""
    for pattern in (*IGNORED, *also):
        if key == pattern or (pattern[-1:] in (".", "_") and key.startswith(pattern)):
            return True
    return False


def signature(params: Mapping[str, object], also: Iterable[str] = ()) -> tuple[tuple[str, str], ...]:
    """The params that decide likeness, as a sorted tuple of ``(key, value)`` strings; a missing
    value (None / NaN from a run that never logged the key) is left out, so it differs from any
    logged value."""
    also = tuple(also)
    return tuple(sorted((k, str(v)) for k, v in params.items()
                        if not is_ignored(k, also) and v is not None and v == v))


def config_hash(params: Mapping[str, object]) -> str:
    """12 hex digits of the SHA-256 of :func:`signature` (the config minus fold, seed and
    bookkeeping): equal for the folds and seeds of one experiment."""
    text = json.dumps(signature(params), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def differing_keys(params: Mapping[str, object], reference: Mapping[str, object],
                   also: Iterable[str] = ()) -> dict[str, tuple[str | None, str | None]]:
    """``{key: (value, reference value)}`` for the likeness params that differ (None = not logged)."""
    mine, theirs = dict(signature(params, also)), dict(signature(reference, also))
    return {k: (mine.get(k), theirs.get(k)) for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)}
