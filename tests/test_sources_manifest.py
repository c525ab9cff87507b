"""manifest source: CSV of path,label,patient_id[,text,...] over PNG/NPY/DICOM/NIfTI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from losslab.data.sources import SkipReport, build_source

from _data_factories import ramp_volume, write_series


@pytest.fixture()
def manifest_root(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((12, 10)) * 255).astype(np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray((rng.random((12, 10, 3)) * 255).astype(np.uint8)).save(tmp_path / "rgb.png")
    np.save(tmp_path / "vol.npy", rng.random((4, 12, 10)).astype(np.float32))
    nib.save(nib.Nifti1Image(rng.random((10, 12, 3)).astype(np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    dcm = write_series(tmp_path / "dcm", ramp_volume(depth=1, size=12))[0]
    rows = [
        "path,label,patient_id,text,grade,patient_name",
        "grey.png,benign,p1,small nodule,1,FAKE^NAME",
        "rgb.png,malignant,p2,,2,FAKE^NAME",
        "vol.npy,benign,p3,,1.5,FAKE^NAME",
        "vol.nii.gz,malignant,p1,,x,FAKE^NAME",
        f"{dcm.relative_to(tmp_path)},benign,p4,,0,FAKE^NAME",
    ]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_manifest_reads_every_format(manifest_root):
    report = SkipReport()
    source = build_source("manifest", str(manifest_root), salt="s", report=report)
    cases = list(source.iter_cases())
    assert source.class_names == ["benign", "malignant"]
    assert report.skipped == [] and report.read == 5
    shapes = [c.image.shape for c in cases]
    assert shapes == [(1, 1, 12, 10), (1, 3, 12, 10), (4, 1, 12, 10), (3, 1, 12, 10), (1, 1, 12, 12)]
    assert [c.label for c in cases] == [0, 1, 0, 1, 0]
    assert cases[0].meta["text"] == "small nodule"
    assert [c.meta["task_grade"] for c in cases] == [1, 2, 1.5, "x", 0]
    assert cases[0].patient_id == cases[3].patient_id != cases[1].patient_id
    assert 0 <= cases[0].image.min() and cases[0].image.max() <= 1
    blob = json.dumps([c.meta for c in cases] + [report.to_dict()]) + "".join(c.patient_id for c in cases)
    assert "FAKE" not in blob and "p1" not in [c.patient_id for c in cases]
    assert any("look like identifiers" in note for note in report.notes)


def test_manifest_class_names_kwarg_and_resize(manifest_root):
    source = build_source("manifest", str(manifest_root), salt="s", class_names=["malignant", "benign"],
                          image_size=8, normalise="minmax")
    cases = list(source.iter_cases())
    assert [c.label for c in cases] == [1, 0, 1, 0, 1]
    assert all(c.image.shape[-2:] == (8, 8) for c in cases)


def test_numeric_labels_sort_numerically(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", np.arange(4.0).reshape(2, 2) + i)
    (tmp_path / "manifest.csv").write_text("path,label,patient_id\n0.npy,10,a\n1.npy,2,b\n2.npy,2,c\n")
    source = build_source("manifest", str(tmp_path), salt="s")
    assert source.class_names == ["2", "10"]
    assert [c.label for c in source.iter_cases()] == [1, 0, 0]
