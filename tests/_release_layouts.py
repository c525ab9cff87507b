"""Tiny copies of public brain-tumour releases, laid out as each release ships (file names, CSV headers,
``dataset.json``, known quirks), filled with the embedded generator's synthetic volumes.

* BraTS 2018 (``MICCAI_BraTS_2018_Data_Training``): ``{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``,
  ``survival_data.csv``.
* BraTS 2019 (``MICCAI_BraTS_2019_Data_Training``): the same folders, ``name_mapping.csv``
  (``Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID``).
* BraTS 2020 (``MICCAI_BraTS2020_TrainingData``): flat ``BraTS20_Training_NNN/BraTS20_Training_NNN_<m>.nii``
  (uncompressed), ``name_mapping.csv`` (``...,BraTS_2020_subject_ID``), ``survival_info.csv``; subject
  355's mask is ``W39_1998.09.19_Segm.nii``.
* BraTS 2021 (``RSNA_ASNR_MICCAI_BraTS2021_TrainingData``): flat ``BraTS2021_NNNNN/BraTS2021_NNNNN_<m>.nii.gz``,
  no grade anywhere.
* MSD Task01 (``Task01_BrainTumour``): ``dataset.json`` as the release ships it (``"name": "BRATS"``),
  4D ``imagesTr/BRATS_NNN.nii.gz`` with the channels FLAIR, T1w, t1gd, T2w, ``labelsTr`` with labels
  1 edema, 2 non-enhancing tumour, 3 enhancing tumour, ``imagesTs``, and the macOS ``._BRATS_NNN.nii.gz``
  files the archive carries beside the images.

Every writer returns ``{case name: (grade, volumes)}`` with the synthetic volumes (``t1, t1ce, t2, flair,
seg`` as ``(X, Y, Z)`` arrays, BraTS labels 1/2/4), so tests can check what a reader made of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from losslab.data.sources.brats import synthesize_case

SHAPE = (32, 32, 16)
MODALITY_FILES = ("t1", "t1ce", "t2", "flair")
#: MSD Task01's dataset.json as the release ships it, without its training/test lists
TASK01_DATASET = {
    "name": "BRATS",
    "description": "Gliomas segmentation tumour and oedema in on brain images",
    "reference": "https://www.med.upenn.edu/sbia/brats2017.html",
    "licence": "CC-BY-SA 4.0",
    "release": "2.0 04/05/2018",
    "tensorImageSize": "4D",
    "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
    "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
}
#: Task01's channel order as shipped, in BraTS file names
TASK01_CHANNELS = ("flair", "t1", "t1ce", "t2")


def grades(n: int) -> list[str]:
    """``n`` grades, HGG and LGG alternating (both present from two cases on)."""
    return ["HGG" if i % 2 == 0 else "LGG" for i in range(n)]


def cohort(names: list[str], seed: int = 0) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    """``{name: (grade, volumes)}``: one synthetic case per name, alternating grades."""
    return {name: (grade, synthesize_case(np.random.default_rng([seed, i]), grade, SHAPE))
            for i, (name, grade) in enumerate(zip(names, grades(len(names))))}


def _save(array: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, np.diag([-1.0, -1.0, 1.0, 1.0]))
    image.header.set_zooms((1.0,) * array.ndim)
    nib.save(image, str(path))


def _case_folder(folder: Path, name: str, volumes: dict[str, np.ndarray], ext: str, seg_file: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for modality in MODALITY_FILES:
        _save(volumes[modality], folder / f"{name}_{modality}{ext}")
    _save(volumes["seg"], folder / (seg_file or f"{name}_seg{ext}"))


def write_brats2018(root: Path, cases: int = 4, seed: int = 0) -> dict:
    names = [f"Brats18_2013_{i}_1" for i in range(cases)]
    data = cohort(names, seed)
    for name, (grade, volumes) in data.items():
        _case_folder(root / grade / name, name, volumes, ".nii.gz")
    (root / "survival_data.csv").write_text("Brats18ID,Age,Survival,ResectionStatus\n"
                                            f"{names[0]},60.463,289,GTR\n")
    return data


def write_brats2019(root: Path, cases: int = 4, seed: int = 0) -> dict:
    names = [f"BraTS19_CBICA_A{chr(65 + i)}B_1" for i in range(cases)]
    data = cohort(names, seed)
    lines = ["Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID"]
    for i, (name, (grade, volumes)) in enumerate(data.items()):
        _case_folder(root / grade / name, name, volumes, ".nii.gz")
        old = name.replace("BraTS19", "Brats17") if i % 3 else "NA"
        lines.append(f"{grade},{old},{name.replace('BraTS19', 'Brats18')},NA,{name}")
    (root / "name_mapping.csv").write_text("\n".join(lines) + "\n")
    return data


def write_brats2020(root: Path, cases: int = 4, seed: int = 0) -> dict:
    """``cases`` subjects; the last is subject 355, whose mask has the name the release gave it."""
    numbers = list(range(1, cases)) + [355]
    names = [f"BraTS20_Training_{n:03d}" for n in numbers]
    data = cohort(names, seed)
    lines = ["Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID,"
             "BraTS_2020_subject_ID"]
    for i, (name, (grade, volumes)) in enumerate(data.items()):
        quirk = "W39_1998.09.19_Segm.nii" if name.endswith("_355") else None
        _case_folder(root / name, name, volumes, ".nii", seg_file=quirk)
        tcga = f"TCGA-02-00{i:02d}" if grade == "LGG" else "NA"
        lines.append(f"{grade},NA,Brats18_CBICA_A{chr(65 + i)}B_1,{tcga},BraTS19_CBICA_A{chr(65 + i)}B_1,{name}")
    (root / "name_mapping.csv").write_text("\n".join(lines) + "\n")
    (root / "survival_info.csv").write_text("Brats20ID,Age,Survival_days,Extent_of_Resection\n"
                                            f"{names[0]},60.463,289,GTR\n")
    return data


def write_brats2021(root: Path, cases: int = 4, seed: int = 0) -> dict:
    names = [f"BraTS2021_{n:05d}" for n in range(cases)]
    data = cohort(names, seed)
    for name, (_, volumes) in data.items():
        _case_folder(root / name, name, volumes, ".nii.gz")
    return data


def task01_labels(seg: np.ndarray) -> np.ndarray:
    """BraTS labels (1 necrotic / non-enhancing, 2 oedema, 4 enhancing) as MSD Task01 numbers them
    (1 edema, 2 non-enhancing tumour, 3 enhancing tumour)."""
    out = np.zeros_like(seg, dtype=np.uint8)
    out[seg == 2], out[seg == 1], out[seg == 4] = 1, 2, 3
    return out


def write_msd_task01(root: Path, cases: int = 4, seed: int = 0, test_cases: int = 1) -> dict:
    """Task01_BrainTumour as shipped: the same synthetic cases as :func:`cohort` under ``BRATS_NNN`` names."""
    names = [f"BRATS_{n:03d}" for n in range(1, cases + 1)]
    data = cohort(names, seed)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    training = []
    for name, (_, volumes) in data.items():
        image = np.stack([volumes[m] for m in TASK01_CHANNELS], axis=-1).astype(np.float32)
        _save(image, root / "imagesTr" / f"{name}.nii.gz")
        _save(task01_labels(volumes["seg"]), root / "labelsTr" / f"{name}.nii.gz")
        for folder in ("imagesTr", "labelsTr"):  # AppleDouble files of the release's archive
            (root / folder / f"._{name}.nii.gz").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    test = []
    for n in range(cases + 1, cases + 1 + test_cases):
        _save(np.zeros(SHAPE + (4,), dtype=np.float32), root / "imagesTs" / f"BRATS_{n:03d}.nii.gz")
        test.append(f"./imagesTs/BRATS_{n:03d}.nii.gz")
    dataset = TASK01_DATASET | {"numTraining": cases, "numTest": test_cases, "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(dataset, indent=4))
    return data
