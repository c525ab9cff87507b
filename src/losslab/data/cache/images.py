"""The image encoder of the case cache: one ``(N, C, H, W)`` array per case, as the source reads it.

Each case's array is ``arrays/<case_id>.npy`` in ``data.cache_dtype``; its index row holds case_id,
patient_id, label, class_name, the array's ``array_path``/``array_bytes``/``array_sha256``,
n_instances, shape, channel_mean, channel_std and meta (JSON). Folds are stratified on the label; a
source's own test split (``meta["split"] == "test"``) is the held-out test. ``report.json`` adds
class_names, class_counts and modalities.

``data.cache_dtype``: ``auto`` (default) stores float16 when the source says its cases are
windowed into [0, 1] with windows of width up to 2048 (``Source.float16_safe``; rsna_lumbar),
float32 otherwise; datasets read either and hand out float32. A value ``v`` in [0, 1] stored as
float16 is off by at most ``2**-12 = 2.44e-4`` (half the float16 step just below 1). Measured
max |float16 - float32| of windowed values (soft tissue 50/350, bone 400/2000, the file's
window): 2.435e-4 on the embedded lumbar cases; 2.438e-4 on pydicom's CT_small.dcm, 2.428e-4 on
MR_small.dcm and emri_small.dcm (``tests/test_preprocess.py`` checks the bound). That is below
half a grey level of any window up to 2048 wide (soft tissue: one level = 1/350 = 2.9e-3; bone:
1/2000 = 5.0e-4), at half the disk. Raw intensities stay float32: MR_small's raw values (up to
2145) already lose 1.0 in float16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from losslab.data.cache.base import CaseEncoder, array_columns
from losslab.data.integrity import record_file, save_atomic
from losslab.data.sources import Case, ReadJob, SkipReport, Source
from losslab.data.splits import split_key

FLOAT16_MAX = float(np.finfo(np.float16).max)


def cache_dtype(setting: str, source: Source) -> str:
    """``data.cache_dtype`` resolved: ``auto`` is float16 when ``source.float16_safe``, else float32."""
    if setting == "auto":
        return "float16" if getattr(source, "float16_safe", False) else "float32"
    if setting not in ("float16", "float32"):
        raise ValueError(f"data.cache_dtype must be auto, float16 or float32, got {setting!r}")
    return setting


@dataclass(frozen=True)
class ImageEncoder(CaseEncoder):
    """A source's :class:`~losslab.data.sources.Case` images ``(N, C, H, W)``, one array each (the
    classification tasks' cache). Bound: the class names (``data.class_names`` or the source's) and the
    stored dtype (float16 | float32; float16 values beyond its range are an error, never clipped)."""

    name = "images"
    class_names: list[str] = field(default_factory=list)
    dtype: str = "float32"

    def bind(self, data_cfg: Any, source: Source) -> ImageEncoder:
        return replace(self, class_names=list(data_cfg.class_names or source.class_names),
                       dtype=cache_dtype(data_cfg.cache_dtype, source))

    def read_jobs(self, source: Source) -> list[ReadJob]:
        return source.read_jobs()

    def worker_setup(self) -> None:
        if self.dtype == "float16":
            import torch

            # the float16 conversion is torch's: entering the parent's OpenMP pool from a forked worker
            # hangs (GNU libgomp after fork), one thread runs it inline
            torch.set_num_threads(1)

    def encode(self, source: Source, job: ReadJob, arrays: Path, report: SkipReport) -> list[dict[str, Any]]:
        return [row for case in source.run_job(job) if (row := self.store(case, arrays, report)) is not None]

    def store(self, case: Case, arrays: Path, report: SkipReport) -> dict[str, Any] | None:
        """Write one case's array; its index row (statistics of the stored values), or None if skipped."""
        if not (0 <= case.label < len(self.class_names)):
            report.skip(case.case_id, f"label {case.label} outside 0..{len(self.class_names) - 1}")
            return None
        image = np.ascontiguousarray(case.image, dtype=np.float32)
        if self.dtype == "float16":
            peak = max(float(image.max()), -float(image.min())) if image.size else 0.0
            if peak > FLOAT16_MAX:
                raise ValueError(f"data.cache_dtype=float16: case {case.case_id} has values up to {peak:g}, beyond "
                                 f"float16's {FLOAT16_MAX:g}; use data.cache_dtype=float32")
            stored, image = _float16_round_trip(image)
        else:
            stored = image
        path = arrays / f"{case.case_id}.npy"
        save_atomic(path, stored)
        mean, std = channel_statistics(image)
        return {"case_id": case.case_id, "patient_id": case.patient_id, "split_key": split_key(case.patient_key),
                "label": int(case.label), "class_name": self.class_names[case.label],
                **array_columns("array", record_file(arrays.parent, path)),
                "n_instances": int(image.shape[0]), "shape": list(image.shape), "channel_mean": mean,
                "channel_std": std, "meta": json.dumps(case.meta, sort_keys=True)}

    def fold_strata(self, index: pd.DataFrame, num_folds: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The labels; the source's own test cases (``meta["split"] == "test"``)."""
        return index["label"].to_numpy(), np.array([json.loads(m).get("split") == "test" for m in index["meta"]])

    def report(self, index: pd.DataFrame, source: Source) -> dict[str, Any]:
        counts = index["class_name"].value_counts().reindex(self.class_names, fill_value=0)
        return {"class_names": list(self.class_names), "class_counts": {k: int(v) for k, v in counts.items()},
                # the channels' names, in the one brain MRI order for MRI sources (losslab.data.sources.channels)
                "modalities": list(getattr(source, "modalities", None) or [])}


def _float16_round_trip(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(float16 copy, its float32 values)`` of a float32 array. torch's conversion (F16C, round to
    nearest even) gives the same bits as ``ndarray.astype(np.float16)`` about 4x faster (numpy
    converts in software: 6.6 ms against 1.4 ms for a 15 x 3 x 256 x 256 stack, measured here)."""
    import torch

    half = torch.from_numpy(image).to(torch.float16)
    return half.numpy(), half.to(torch.float32).numpy()


def channel_statistics(image: np.ndarray) -> tuple[list[float], list[float]]:
    """Per channel of ``(N, C, H, W)``: mean and standard deviation over the non-zero voxels.

    Sums in float64 (zeros add nothing, so no boolean gather): ``mean = S1 / n``,
    ``std = sqrt(S2 / n - mean**2)``. A channel with no non-zero voxel gets ``(0, 1)``; a zero
    std becomes 1 (the z-score of a constant channel is then 0).
    """
    axes = (0,) + tuple(range(2, image.ndim))  # reduced in place: no channel-first copy (2x faster at 256²)
    count = np.count_nonzero(image, axis=axes)
    total = image.sum(axis=axes, dtype=np.float64)
    rows = np.ascontiguousarray(image).reshape(image.shape[0], image.shape[1], -1)  # a view when contiguous
    squares = np.einsum("ncx,ncx->c", rows, rows, dtype=np.float64)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    variance = np.divide(squares, count, out=np.zeros_like(total), where=count > 0) - mean**2
    std = np.sqrt(np.maximum(variance, 0.0))
    return [float(m) for m in mean], [float(s) if s > 0 else 1.0 for s in std]
