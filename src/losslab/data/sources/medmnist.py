"""``medmnist``: MedMNIST ``.npz`` files from a local folder (the medmnist package's format).

Each ``<name>.npz`` under ``root`` holds ``train_images``, ``train_labels``, ``val_images``,
``val_labels``, ``test_images``, ``test_labels``. Images are ``uint8``: grey ``(N, H, W)``, RGB
``(N, H, W, 3)`` or 3D ``(N, D, H, W)`` (the ``*mnist3d`` sets); labels ``(N, 1)`` (multi-class)
or ``(N, K)`` (multi-label: choose a column with ``label_index``).

Case: ``image`` ``float32`` in ``[0, 1]``: ``(1, 1, H, W)`` grey, ``(1, 3, H, W)`` RGB,
``(D, 1, H, W)`` 3D; ``meta``: ``split`` (the npz split: train/val/test), ``dataset`` (file
stem), ``index``. MedMNIST has no patient ids, so ``patient_id`` is per image (a salted hash of
dataset, split and index). The official ``test`` split is the cache's held-out test (fold -1); the
``train`` and ``val`` images are spread over the cross-validation folds. Default normalisation: none. The medmnist
package cannot download here: place the files yourself (or use the ``medmnist`` generator).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from losslab.data.deid import salted_hash
from losslab.data.sources.base import Case, SkipReport, Source, confined_file, register_generator, register_source

SPLITS = ("train", "val", "test")


def _labels(array: np.ndarray, label_index: int | None, item: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 1:
        array = array[:, None]
    if array.shape[1] == 1:
        return array[:, 0].astype(np.int64)
    if label_index is None:
        raise ValueError(f"{item}: labels have {array.shape[1]} columns (multi-label); set label_index")
    return array[:, int(label_index)].astype(np.int64)


def to_stack(image: np.ndarray) -> np.ndarray:
    """One MedMNIST image to ``float32 (N, C, H, W)`` in ``[0, 1]``."""
    image = np.asarray(image)
    scale = np.float32(255.0) if image.dtype == np.uint8 else np.float32(1.0)
    image = image.astype(np.float32) / scale
    if image.ndim == 2:
        return image[None, None]
    if image.ndim == 3 and image.shape[-1] == 3:
        return np.ascontiguousarray(image.transpose(2, 0, 1))[None]
    if image.ndim == 3:
        return image[:, None]
    raise ValueError(f"unsupported MedMNIST image shape {image.shape}")


@register_source
class MedMnistSource(Source):
    """MedMNIST npz files.

    Args (source kwargs):
        files: npz names relative to root, inside it (default every ``*.npz`` under root; one outside is refused).
        splits: splits to read (default train, val, test).
        class_names: names in label order (default ``class_<i>`` up to the largest label).
        label_index: column of multi-label ``labels`` to use as a binary label.
        max_per_split: read at most this many images a split (default all; for quick runs).
    """

    name = "medmnist"
    default_normalize = "none"  # images are already in [0, 1]

    def __init__(self, root: str, salt: str, report: SkipReport | None = None, files: Sequence[str] | None = None,
                 splits: Sequence[str] = SPLITS, class_names: Sequence[str] | None = None,
                 label_index: int | None = None, max_per_split: int | None = None) -> None:
        super().__init__(root, salt, report)
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            raise ValueError(f"splits: unknown {unknown}; allowed: {list(SPLITS)}")
        self.splits = list(splits)
        self.label_index = label_index
        self.max_per_split = max_per_split
        self.files = sorted(confined_file(root, f, "data.source_kwargs.files") for f in files) if files else sorted(
            str(p) for p in Path(root).rglob("*.npz"))
        if class_names:
            self.class_names = [str(c) for c in class_names]
        else:
            largest = -1
            for path in self.files:
                try:
                    with np.load(path, allow_pickle=False) as data:
                        for split in self.splits:
                            if f"{split}_labels" in data.files:
                                labels = _labels(data[f"{split}_labels"], label_index, path)
                                if labels.size:
                                    largest = max(largest, int(labels.max()))
                except (OSError, ValueError, KeyError) as exc:
                    if "multi-label" in str(exc):
                        raise
                    continue  # reported in iter_cases
            self.class_names = [f"class_{i}" for i in range(largest + 1)]

    def fingerprint_files(self) -> list[str]:
        return list(self.files)

    def iter_cases(self) -> Iterator[Case]:
        report = self.report
        n_classes = len(self.class_names)
        for path in self.files:
            item = str(Path(path).relative_to(self.root)) if Path(path).is_relative_to(self.root) else path
            stem = Path(path).stem
            try:
                data = np.load(path, allow_pickle=False)
            except Exception as exc:  # noqa: BLE001
                report.skip(item, f"unreadable npz: {type(exc).__name__}: {exc}")
                continue
            with data:
                for split in self.splits:
                    images_key, labels_key = f"{split}_images", f"{split}_labels"
                    if images_key not in data.files or labels_key not in data.files:
                        report.skip(item, f"missing key {images_key!r} or {labels_key!r} (keys: {data.files})")
                        continue
                    images, labels = data[images_key], _labels(data[labels_key], self.label_index, item)
                    if len(images) != len(labels):
                        report.skip(item, f"{split}: {len(images)} images but {len(labels)} labels")
                        continue
                    count = len(images) if self.max_per_split is None else min(len(images), self.max_per_split)
                    for index in range(count):
                        label = int(labels[index])
                        if not 0 <= label < n_classes:
                            report.skip(item, f"{split}[{index}]: unknown label value {label}; "
                                              f"{n_classes} classes")
                            continue
                        image = to_stack(images[index])
                        if not np.isfinite(image).all():
                            report.skip(item, f"{split}[{index}]: non-finite pixels")
                            continue
                        case_hash = salted_hash(f"medmnist:{stem}:{split}:{index}", self.salt)
                        meta: dict[str, Any] = {"split": split, "dataset": stem, "index": index}
                        report.read += 1
                        yield Case(case_id=case_hash, patient_id=case_hash, label=label, image=image, meta=meta,
                                   patient_key=f"{stem}:{split}:{index}")


@register_generator("medmnist")
def generate_medmnist(root: str, seed: int = 0, name: str = "synthmnist", size: int = 28, rgb: bool = False,
                      counts: Sequence[int] = (60, 20, 20), class_frequencies: Sequence[float] = (0.8, 0.15, 0.05)
                      ) -> None:
    """Write a synthetic ``<name>.npz`` in the MedMNIST format: class k is a blob of radius 3 + 3k."""
    rng = np.random.default_rng(seed)
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    yy, xx = np.mgrid[0:size, 0:size]
    for split, count in zip(SPLITS, counts):
        labels = rng.choice(len(class_frequencies), size=count, p=np.asarray(class_frequencies) / sum(class_frequencies))
        images = np.empty((count, size, size), dtype=np.uint8)
        for i, label in enumerate(labels):
            cy, cx = rng.integers(size // 3, 2 * size // 3, size=2)
            blob = ((yy - cy) ** 2 + (xx - cx) ** 2) <= (3 + 3 * label) ** 2
            images[i] = np.clip(40 + 150 * blob + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
        arrays[f"{split}_images"] = np.repeat(images[..., None], 3, axis=-1) if rgb else images
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    np.savez_compressed(out / f"{name}.npz", **arrays)
