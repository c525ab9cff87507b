"""The case cache of every task: memory-mappable ``.npy`` arrays, one parquet index and ``report.json``.

:func:`build_cache` (:mod:`losslab.data.cache.build`) is the one builder: lock, fingerprint and reuse,
resume journal, parallel workers, atomic array writes, integrity records, folds, index and report.
The task supplies the per-case encoder: :class:`ImageEncoder` (:mod:`losslab.data.cache.images`: one
``(N, C, H, W)`` array per case, the classification tasks) or :class:`SegmentationEncoder`
(:mod:`losslab.data.cache.segmentation`: image, target and distance maps of a volume and its mask).
"""

from losslab.data.cache.base import CacheInfo, CaseEncoder
from losslab.data.cache.build import JOURNAL, NoUsableDataError, build_cache, load_cache
from losslab.data.cache.images import ImageEncoder
from losslab.data.cache.segmentation import SegCacheInfo, SegmentationEncoder
from losslab.data.raw_data import ensure_raw_data

__all__ = ["JOURNAL", "CacheInfo", "CaseEncoder", "ImageEncoder", "NoUsableDataError", "SegCacheInfo",
           "SegmentationEncoder", "build_cache", "ensure_raw_data", "load_cache"]
