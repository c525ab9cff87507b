"""Channel names across sources: one canonical order of the brain MRI contrasts, and names safe for metrics.

Every brain MRI source stores its four contrasts in one order, :data:`BRAIN_MRI_ORDER`
(``t1, t1ce, t2, flair``), whatever order its release ships them in (BraTS files are named per
contrast; MSD Task01 ships one 4D image in the order ``FLAIR, T1w, t1gd, T2w``). The order is recorded
in each cache's ``report.json`` (``modalities``) and logged with every run as the param
``data.modalities``; ``evaluate`` refuses data whose order differs from the model's
(:func:`losslab.pipelines.scoring.check_modalities`).

Names a release gives its labels (``dataset.json``: ``"non-enhancing tumor"``) become metric names
(``val/dice_<name>``): :func:`metric_safe_name` keeps letters, digits and underscores only
(``non_enhancing_tumor``).
"""

from __future__ import annotations

import re
from typing import Sequence

#: the one channel order of brain MRI in every cache
BRAIN_MRI_ORDER = ("t1", "t1ce", "t2", "flair")

#: what releases call each contrast (lower case, without separators) -> its canonical name:
#: BraTS 2018-2021 (t1, t1ce, t2, flair), BraTS 2023 (t1n, t1c, t2w, t2f), MSD Task01 (T1w, t1gd, T2w, FLAIR)
BRAIN_MRI_ALIASES = {
    "t1": "t1", "t1w": "t1", "t1n": "t1", "nativet1": "t1",
    "t1ce": "t1ce", "t1gd": "t1ce", "t1c": "t1ce", "t1contrast": "t1ce", "t1post": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair", "t2flair": "flair",
}


def brain_mri_name(name: str) -> str | None:
    """The canonical name of a brain MRI contrast as a release names it (``"T1w"`` -> ``t1``), else None."""
    return BRAIN_MRI_ALIASES.get(re.sub(r"[^0-9a-z]", "", str(name).lower()))


def brain_mri_order(names: Sequence[str]) -> list[int] | None:
    """Where each contrast of :data:`BRAIN_MRI_ORDER` sits in ``names`` (the shipped channel names), when
    ``names`` are exactly the four brain MRI contrasts; else None (the channels stay as shipped).

    >>> brain_mri_order(["FLAIR", "T1w", "t1gd", "T2w"])
    [1, 2, 3, 0]
    """
    canonical = [brain_mri_name(n) for n in names]
    if sorted(c or "" for c in canonical) != sorted(BRAIN_MRI_ORDER):
        return None
    return [canonical.index(c) for c in BRAIN_MRI_ORDER]


def ordered_channels(names: Sequence[str]) -> tuple[list[str], list[int]]:
    """``(channel names as cached, position of each in the shipped image)``: the canonical brain MRI order
    when ``names`` are the four contrasts, else the shipped names and order."""
    order = brain_mri_order(names)
    if order is None:
        return [str(n) for n in names], list(range(len(names)))
    return list(BRAIN_MRI_ORDER), order


def metric_safe_name(name: str) -> str:
    """A label or channel name as it may appear in a metric name: lower case, runs of anything but letters
    and digits as one ``_`` (``"non-enhancing tumor"`` -> ``non_enhancing_tumor``).

    Raises:
        ValueError: nothing of the name is left (names the name).
    """
    safe = re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_")
    if not safe:
        raise ValueError(f"label name {name!r} has no letter or digit to name a metric with")
    return safe


def metric_safe_names(names: dict[int, str], where: str) -> dict[int, str]:
    """:func:`metric_safe_name` of each; two names that become one are refused.

    Raises:
        ValueError: two labels with the same metric-safe name (names both, and ``where`` they come from).
    """
    safe: dict[int, str] = {}
    for key in sorted(names):
        name = metric_safe_name(names[key])
        clash = [k for k, v in safe.items() if v == name]
        if clash:
            raise ValueError(f"{where}: labels {clash[0]} ({names[clash[0]]!r}) and {key} ({names[key]!r}) both "
                             f"name metrics {name!r}; rename one")
        safe[key] = name
    return safe


def mapping_text(mapping: dict[str, Sequence[int]]) -> str:
    """A label mapping as one param value: ``{"wt": [1, 2, 3], "et": [3]}`` -> ``wt=1+2+3;et=3``."""
    return ";".join(f"{name}={'+'.join(str(int(v)) for v in values)}" for name, values in mapping.items())


def modality_params(report: dict) -> dict[str, str]:
    """``{"data.modalities": "t1,t1ce,t2,flair"}``: the channel order a cache's ``report.json`` records, as
    the param every run logs (nothing for a cache that names no channels)."""
    names = [str(n) for n in report.get("modalities") or []]
    return {"data.modalities": ",".join(names)} if names else {}
