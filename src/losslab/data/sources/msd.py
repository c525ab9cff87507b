"""``msd``: a Medical Segmentation Decathlon task folder (``dataset.json``, NIfTI via nibabel).

Layout under ``root`` (one task, e.g. ``Task01_BrainTumour``)::

    dataset.json      {"name", "labels": {"0": "background", ...}, "modality": {...},
                       "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]}
    imagesTr/*.nii.gz (X, Y, Z) or (X, Y, Z, C)
    labelsTr/*.nii.gz (X, Y, Z) integer label map

One :class:`Case` per training image: ``image`` ``float32 (Z, C, Y, X)`` (axial slices as
instances, modalities as channels), optionally resized per slice and normalised. Channels keep the
order of ``dataset.json``'s ``modality`` unless they are the four brain MRI contrasts (Task01_BrainTumour
ships ``FLAIR, T1w, t1gd, T2w``): those are stored in the one brain MRI order of every source,
``t1, t1ce, t2, flair`` (:mod:`losslab.data.sources.channels`), in the classification and the
segmentation cache alike.

Task01_BrainTumour is recognised by what it holds, not by its ``name`` (the release says ``"BRATS"``):
the four brain MRI contrasts and the labels 1 edema, 2 non-enhancing tumour, 3 enhancing tumour. Its
regions are the BraTS ones, whole tumour ``wt = 1+2+3``, tumour core ``tc = 2+3``, enhancing tumour
``et = 3`` (:data:`MSD_BRAIN_REGIONS`). Label names of ``dataset.json`` become metric-safe names
(``"non-enhancing tumor"`` -> ``non_enhancing_tumor``).

The class label is configurable:

    * ``label_mode="presence"`` (default): 1 when the label map holds at least ``min_voxels``
      voxels of ``label_class`` (default 1), else 0; ``class_names`` ``["absent", "present"]``.
    * ``label_mode="csv"``: ``labels_csv`` (a path inside the data root, relative to it; one outside
      is refused) with columns ``case,label`` where
      ``case`` is the image file name without extension; labels map through ``class_names`` or
      the sorted unique values.

``meta``: ``spacing`` (from the NIfTI header, ``[dz, dy, dx]``), ``modalities`` (as stored), ``voxels_<class>``
(presence mode). ``case_id`` and ``patient_id`` are salted hashes of the image name (one image a
patient in MSD). Missing files, unreadable NIfTI, paths outside the root, shape mismatches,
NaN/inf and all-background images are skips with reasons (see :mod:`losslab.data.dicom`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from losslab.data import dicom
from losslab.data.deid import salted_hash
from losslab.data.sources.base import (Case, PositiveSize, SegmentationItem, SegmentationSource, SkipReport, Source,
                                       confined_file, read_csv_table, register_generator,
                                       register_source, resolve_under)
from losslab.data.sources.channels import brain_mri_order, metric_safe_names, ordered_channels
from losslab.data.sources.manifest import nifti_to_stack, sorted_labels


#: regions of MSD Task01_BrainTumour (1 oedema, 2 non-enhancing tumour, 3 enhancing tumour)
MSD_BRAIN_REGIONS = {"wt": [1, 2, 3], "tc": [2, 3], "et": [3]}


def is_brain_tumour_task(modalities: Sequence[str], labels: dict[int, str]) -> bool:
    """Whether a task holds what Task01_BrainTumour holds: the four brain MRI contrasts and the labels
    0 background, 1 edema (oedema), 2 non-enhancing tumour, 3 enhancing tumour (metric-safe names)."""
    if brain_mri_order(modalities) is None or sorted(labels) != [0, 1, 2, 3]:
        return False
    return (labels[1] in ("edema", "oedema") and labels[2].startswith(("non_enhancing", "nonenhancing"))
            and labels[3].startswith("enhancing"))


def case_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@register_source
class MsdSource(Source, SegmentationSource):
    """Medical Segmentation Decathlon task as a classification source.

    Args (source kwargs):
        label_mode: ``"presence"`` (default) or ``"csv"``.
        label_class: label-map value whose presence makes a case positive (default 1).
        min_voxels: voxels of ``label_class`` needed for "present" (default 1).
        labels_csv: CSV ``case,label`` for ``label_mode="csv"``.
        class_names: class order for csv labels (default sorted unique).
        image_size: resize each slice to ``(image_size, image_size)`` (default: keep).
        normalise: ``"zscore"`` (default), ``"minmax"`` or ``"none"`` per case.

    Raises:
        FileNotFoundError / ValueError: no or malformed ``dataset.json`` / labels CSV (names the
        file and the key or column).
    """

    name = "msd"

    def __init__(self, root: str, salt: str, report: SkipReport | None = None, label_mode: str = "presence",
                 label_class: int = 1, min_voxels: int = 1, labels_csv: str | None = None,
                 class_names: Sequence[str] | None = None, image_size: PositiveSize | None = None,
                 normalise: str = "zscore") -> None:
        super().__init__(root, salt, report)
        if label_mode not in ("presence", "csv"):
            raise ValueError(f"label_mode must be 'presence' or 'csv', got {label_mode!r}")
        self.label_mode = label_mode
        self.label_class = int(label_class)
        self.min_voxels = int(min_voxels)
        self.image_size = image_size
        self.normalise = normalise
        path = Path(root) / "dataset.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: dataset.json not found (not an MSD task folder)")
        self.dataset = json.loads(path.read_text())
        if not isinstance(self.dataset.get("training"), list):
            raise ValueError(f"{path}: missing key 'training' (a list of {{image, label}})")
        modality = self.dataset.get("modality") or {}
        self.shipped_modalities = [str(modality[k]) for k in sorted(modality, key=lambda k: int(k))]
        self.modalities, self.channel_order = ordered_channels(self.shipped_modalities)
        self.csv_labels: dict[str, str] = {}
        if label_mode == "csv":
            if not labels_csv:
                raise ValueError("labels_csv is required with label_mode='csv'")
            csv_path = Path(confined_file(root, labels_csv, "data.source_kwargs.labels_csv"))
            if not csv_path.is_file():
                raise FileNotFoundError(f"{csv_path}: labels CSV not found")
            _, rows = read_csv_table(csv_path, ("case", "label"), shown=str(labels_csv))
            self.csv_labels = {r["case"]: r["label"] for r in rows}
            self.class_names = ([str(c) for c in class_names] if class_names
                                else sorted_labels([v for v in self.csv_labels.values() if v]))
        else:
            self.class_names = [str(c) for c in class_names] if class_names else ["absent", "present"]

    def iter_cases(self) -> Iterator[Case]:
        modalities = list(self.modalities)
        for entry in self.dataset["training"]:
            image_rel = str(entry.get("image", "")) if isinstance(entry, dict) else ""
            if not image_rel:
                self.report.skip("dataset.json", f"training entry without 'image': {entry!r}"[:200])
                continue
            item = image_rel[2:] if image_rel.startswith("./") else image_rel
            image_path = resolve_under(self.root, image_rel)
            if image_path is None:
                self.report.skip(item, "path escapes the data root (refused)")
                continue
            meta: dict[str, Any] = {"modalities": modalities}
            labelled = self._csv_label(item, case_name(image_rel)) if self.label_mode == "csv" \
                else self._presence_label(entry, item, meta)
            if labelled is None:
                continue
            label, label_map = labelled
            read = self._read_stack(image_path, item, label_map, meta)
            if read is None:
                continue
            self.report.read += 1
            case_hash = salted_hash(f"msd:{self.dataset.get('name', '')}:{case_name(image_rel)}", self.salt)
            yield Case(case_id=case_hash, patient_id=case_hash, label=label, patient_key=case_name(image_rel),
                       image=np.ascontiguousarray(read, dtype=np.float32), meta=meta)

    def segmentation_items(self) -> Iterator[SegmentationItem]:
        """The ``training`` entries of ``dataset.json``: one (possibly 4D) image and its label map each;
        a file missing or outside the root is None."""
        for entry in self.dataset.get("training") or []:
            image_rel = str(entry.get("image", "")) if isinstance(entry, dict) else ""
            label_rel = str(entry.get("label", "")) if isinstance(entry, dict) else ""
            image = resolve_under(self.root, image_rel) if image_rel else None
            label = resolve_under(self.root, label_rel) if label_rel else None
            item = image_rel[2:] if image_rel.startswith("./") else (image_rel or "dataset.json")
            yield (item, [Path(image) if image and Path(image).is_file() else None],
                   Path(label) if label and Path(label).is_file() else None)

    def image_channels(self) -> tuple[list[str], list[int]]:
        """The channels as cached (the brain MRI order for Task01, else ``dataset.json``'s) and where each
        sits in the shipped 4D image."""
        return list(self.modalities), list(self.channel_order)

    def default_segmentation_mapping(self, labels: str) -> dict[str, list[int]]:
        """The labels of ``dataset.json`` under metric-safe names: each a class (``classes``), or each
        non-zero one a region (``regions``; Task01_BrainTumour, recognised by its contrasts and labels:
        the nested BraTS regions wt/tc/et)."""
        where = str(Path(self.root) / "dataset.json")
        raw = {int(k): str(v) for k, v in (self.dataset.get("labels") or {}).items()}
        if not raw:
            raise ValueError(f"{where}: no 'labels'; set seg.regions or seg.classes in the config")
        names = metric_safe_names(raw, where)
        if labels == "classes":
            return {names[k]: [k] for k in sorted(names)}
        if is_brain_tumour_task(self.shipped_modalities, names):
            return dict(MSD_BRAIN_REGIONS)
        return {names[k]: [k] for k in sorted(names) if k != 0}

    def _csv_label(self, item: str, name: str) -> tuple[int, None] | None:
        """The case's class index from the labels CSV; None (skipped) when absent or unknown."""
        value = self.csv_labels.get(name, "")
        if not value:
            self.report.skip(item, "no label (case not in the labels CSV or empty)")
            return None
        index = {class_name: i for i, class_name in enumerate(self.class_names)}
        if value not in index:
            self.report.skip(item, f"unknown label value {value!r}; known: {self.class_names}")
            return None
        return index[value], None

    def _presence_label(self, entry: dict[str, Any], item: str,
                        meta: dict[str, Any]) -> tuple[int, np.ndarray] | None:
        """``(1 if the label map holds min_voxels of label_class else 0, the label map)``; the voxel count
        goes to ``meta``. None (skipped) when the label map is missing, outside the root or unreadable."""
        import nibabel as nib

        label_rel = str(entry.get("label", "") or "")
        label_path = resolve_under(self.root, label_rel) if label_rel else None
        if not label_rel or label_path is None or not Path(label_path).is_file():
            self.report.skip(item, "no label: label map missing" if label_path is not None or not label_rel
                             else "no label: label path escapes the data root (refused)")
            return None
        try:
            label_map = np.asanyarray(nib.load(label_path).dataobj)
        except Exception as exc:  # noqa: BLE001
            self.report.skip(label_rel, f"unreadable NIfTI label map: {type(exc).__name__}: {exc}")
            return None
        voxels = int(np.count_nonzero(np.rint(label_map) == self.label_class))
        meta[f"voxels_{self.label_class}"] = voxels
        return int(voxels >= self.min_voxels), label_map

    def _read_stack(self, image_path: str, item: str, label_map: np.ndarray | None,
                    meta: dict[str, Any]) -> np.ndarray | None:
        """The image as ``(Z, C, Y, X)``, checked, resized and normalised; its spacing ``[dz, dy, dx]`` and
        any check notes go to ``meta``. None (skipped, with the reason) when it cannot be used."""
        import nibabel as nib

        if not Path(image_path).is_file():
            self.report.skip(item, "image file missing")
            return None
        try:
            nifti = nib.load(image_path)
            data = np.asanyarray(nifti.dataobj)
            zooms = [float(z) for z in nifti.header.get_zooms()[:3]]
        except Exception as exc:  # noqa: BLE001
            self.report.skip(item, f"unreadable NIfTI: {type(exc).__name__}: {exc}")
            return None
        if label_map is not None and tuple(label_map.shape[:3]) != tuple(data.shape[:3]):
            self.report.skip(item, f"label map shape {label_map.shape[:3]} differs from the image {data.shape[:3]}")
            return None
        try:
            stack = self._in_channel_order(nifti_to_stack(data))
        except ValueError as exc:
            self.report.skip(item, str(exc))
            return None
        stack, extra = dicom.check_volume(stack, item, self.report)
        if stack is None:
            return None
        meta.update(extra)
        if self.image_size:
            stack = dicom.resize(stack, (self.image_size, self.image_size))
        zooms += [1.0] * (3 - len(zooms))
        meta["spacing"] = [zooms[2], zooms[1], zooms[0]]
        return dicom.normalise(stack, self.normalise)

    def _in_channel_order(self, stack: np.ndarray) -> np.ndarray:
        """``(Z, C, Y, X)`` with its channels in the cached order (:meth:`image_channels`).

        Raises:
            ValueError: the image has another number of channels than ``dataset.json`` names modalities.
        """
        if not self.channel_order:
            return stack
        if stack.shape[1] != len(self.channel_order):
            raise ValueError(f"image has {stack.shape[1]} channel(s); dataset.json names "
                             f"{len(self.channel_order)} modalities ({', '.join(self.shipped_modalities)})")
        return np.ascontiguousarray(stack[:, self.channel_order])


@register_generator("msd")
def generate_msd(root: str, seed: int = 0, cases: int = 12, size: int = 16, depth: int = 8, channels: int = 2,
                 positive_fraction: float = 0.3) -> None:
    """Write a tiny MSD task (``dataset.json``, ``imagesTr``, ``labelsTr``) with a blob in positives."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    out = Path(root)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    positives = set(rng.choice(cases, size=max(1, int(round(cases * positive_fraction))), replace=False).tolist())
    training = []
    zz, yy, xx = np.mgrid[0:size, 0:size, 0:depth]
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    for n in range(cases):
        image = rng.normal(100.0, 10.0, (size, size, depth, channels)).astype(np.float32)
        label = np.zeros((size, size, depth), dtype=np.uint8)
        if n in positives:
            centre = rng.integers(4, size - 4, size=2)
            blob = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - depth // 2) ** 2) <= 9
            label[blob] = 1
            image[blob] += 80.0
        name = f"synth_{n:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image if channels > 1 else image[..., 0], affine), out / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), out / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    dataset = {
        "name": "Synthetic", "description": "losslab msd generator", "tensorImageSize": "4D",
        "modality": {str(c): f"mod{c}" for c in range(channels)},
        "labels": {"0": "background", "1": "lesion"},
        "numTraining": cases, "numTest": 0, "training": training, "test": [],
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2))
