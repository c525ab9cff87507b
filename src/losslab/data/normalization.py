"""Image intensity normalisation, chosen in the config (``data.normalize``).

Modes (``x`` is a case array ``(N, C, H, W)``, statistics are per channel ``c``):

- ``none``: ``x`` unchanged (e.g. MedMNIST or digits already in ``[0, 1]``).
- ``per_case_nonzero_zscore``: ``(x - mu_case) / sigma_case`` over the case's non-zero voxels, the
  background (``x == 0``) stays 0. Suits skull-stripped MRI; the statistics are stored in the cache
  index (``channel_mean``, ``channel_std``).
- ``{fixed: {mean, std}}``: ``(x - mean) / std`` with given numbers (a float for every channel or one
  per channel), e.g. MNIST's ``0.1307 / 0.3081`` as in Ilse et al.'s code.
- ``dataset``: ``(x - mu) / sigma`` with ``mu, sigma`` over every pixel of the **training** cases
  (the training folds of the run, after any subsampling; never the validation or test cases).

``data.normalize: null`` takes the source's default (``Source.default_normalize``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Normalizer:
    """A resolved normalisation: ``mode`` and, for ``fixed``/``dataset``, ``mean``/``std`` ``(C,)``."""

    mode: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __call__(self, arr: np.ndarray, row: pd.Series | None = None) -> np.ndarray:
        """Normalise ``arr (N, C, H, W)``; ``row`` (the case's index row) is needed per case."""
        arr = np.asarray(arr, dtype=np.float32)
        if self.mode == "none":
            return arr.copy()
        if self.mode == "per_case_nonzero_zscore":
            if row is None:
                raise ValueError("per_case_nonzero_zscore needs the case's index row (channel_mean, channel_std)")
            mean = np.asarray(row["channel_mean"], dtype=np.float32)[None, :, None, None]
            std = np.asarray(row["channel_std"], dtype=np.float32)[None, :, None, None]
            return np.where(arr != 0, (arr - mean) / std, 0.0).astype(np.float32)
        channels = arr.shape[1]
        mean = np.broadcast_to(np.asarray(self.mean, dtype=np.float32), (channels,))[None, :, None, None]
        std = np.broadcast_to(np.asarray(self.std, dtype=np.float32), (channels,))[None, :, None, None]
        return ((arr - mean) / std).astype(np.float32)

    def params(self) -> dict[str, str]:
        """MLflow params naming the resolved mode and its statistics."""
        out = {"data.normalize_resolved": self.mode}
        if self.mean:
            out["data.normalize_mean"] = ",".join(f"{v:.6g}" for v in self.mean)
            out["data.normalize_std"] = ",".join(f"{v:.6g}" for v in self.std)
        return out


def dataset_statistics(rows: pd.DataFrame, cache_dir: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation (population) over every pixel of ``rows``' arrays.

    Accumulated in float64 as sums of ``x`` and ``x**2``, one case at a time (memory-mapped)."""
    if len(rows) == 0:
        raise ValueError("data.normalize=dataset: no training cases to compute statistics from")
    total = total_sq = None
    count = 0
    for path in rows["array_path"]:
        arr = np.load(Path(cache_dir) / path, mmap_mode="r")
        x = np.asarray(arr, dtype=np.float64)
        sums, sums_sq = x.sum(axis=(0, 2, 3)), (x * x).sum(axis=(0, 2, 3))
        total = sums if total is None else total + sums
        total_sq = sums_sq if total_sq is None else total_sq + sums_sq
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def build_normalizer(spec: Any, train_rows: pd.DataFrame, cache_dir: str | Path) -> Normalizer:
    """The :class:`Normalizer` for ``spec`` (a mode name, or ``{"fixed": {"mean", "std"}}``).

    Raises:
        ValueError: an unknown mode, or a ``fixed`` std that is not positive.
    """
    if isinstance(spec, dict) or hasattr(spec, "fixed"):
        fixed = spec["fixed"] if isinstance(spec, dict) else spec.fixed
        fixed = fixed if isinstance(fixed, dict) else fixed.model_dump()
        mean = tuple(float(v) for v in np.atleast_1d(fixed["mean"]))
        std = tuple(float(v) for v in np.atleast_1d(fixed["std"]))
        if any(s <= 0 for s in std):
            raise ValueError(f"data.normalize.fixed.std must be > 0, got {list(std)}")
        return Normalizer("fixed", mean, std)
    if spec == "dataset":
        return Normalizer("dataset", *dataset_statistics(train_rows, cache_dir))
    if spec in ("none", "per_case_nonzero_zscore"):
        return Normalizer(spec)
    raise ValueError(f"data.normalize={spec!r}: expected one of none, per_case_nonzero_zscore, dataset, "
                     "or {fixed: {mean, std}}")
