"""rsna_lumbar source on the embedded_lumbar generator (real DICOM files, RSNA 2024 layout)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from losslab.data.sources import SkipReport, build_source, list_generators, list_sources, run_generator


@pytest.fixture(scope="module")
def lumbar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lumbar")
    run_generator("embedded_lumbar", str(root), seed=0)
    return root


@pytest.fixture(scope="module")
def lumbar_cases(lumbar_root):
    report = SkipReport()
    source = build_source("rsna_lumbar", str(lumbar_root), salt="test-salt", report=report)
    return source, list(source.iter_cases()), report


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())  # every byte: pixels, positions and the UIDs
    return digest.hexdigest()


def test_registered():
    assert "rsna_lumbar" in list_sources() and "embedded_lumbar" in list_generators()


def test_generator_layout_is_real_dicom_with_shuffled_instances(lumbar_root):
    for name in ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv"):
        assert (lumbar_root / name).is_file()
    series_dirs = sorted(p for p in (lumbar_root / "train_images").glob("*/*") if p.is_dir())
    assert len(series_dirs) == 20
    files = sorted(series_dirs[0].glob("*.dcm"))
    assert len(files) == 15
    datasets = [pydicom.dcmread(f) for f in files]
    assert datasets[0].file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert str(datasets[0].PatientName).startswith("FAKE^PATIENT^")
    # instance number (= file name) order differs from the spatial order
    by_instance = sorted(datasets, key=lambda d: int(d.InstanceNumber))
    xs = [float(d.ImagePositionPatient[0]) for d in by_instance]
    assert xs != sorted(xs) and xs != sorted(xs, reverse=True)


def test_generator_is_deterministic(tmp_path, lumbar_root):
    run_generator("embedded_lumbar", str(tmp_path / "again"), seed=0, studies=3)
    run_generator("embedded_lumbar", str(tmp_path / "again2"), seed=0, studies=3)
    run_generator("embedded_lumbar", str(tmp_path / "other"), seed=1, studies=3)
    assert _tree_digest(tmp_path / "again") == _tree_digest(tmp_path / "again2")
    assert _tree_digest(tmp_path / "again") != _tree_digest(tmp_path / "other")


def test_cases_shapes_labels_and_meta(lumbar_cases):
    source, cases, report = lumbar_cases
    assert source.class_names == ["normal_mild", "moderate", "severe"]
    assert len(cases) == 100 and report.read == 100 and report.skipped == []
    assert np.bincount([c.label for c in cases]).tolist() == [88, 7, 5]
    for case in cases:
        assert case.image.shape == (7, 3, 64, 64) and case.image.dtype == np.float32
        assert 0.0 <= case.image.min() and case.image.max() <= 1.0
        assert case.meta["condition"] == "spinal_canal_stenosis"
        assert case.meta["level"] in range(5)
        json.dumps(case.meta)
    assert sorted({c.meta["level"] for c in cases}) == [0, 1, 2, 3, 4]
    assert len({c.case_id for c in cases}) == 100
    assert len({c.patient_id for c in cases}) == 20


def test_signal_grows_with_severity(lumbar_cases):
    _, cases, _ = lumbar_cases
    # centre of the stack, the file-window channel, around the labelled point (crop centre)
    centre = {label: np.mean([c.image[3, 2, 26:38, 26:38].mean() for c in cases if c.label == label])
              for label in range(3)}
    assert centre[0] > centre[1] > centre[2]


def test_deidentified_cases_and_report(lumbar_root, lumbar_cases):
    _, cases, report = lumbar_cases
    fakes = set()
    for path in (lumbar_root / "train_images").rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                        "ReferringPhysicianName", "StudyID", "StudyInstanceUID", "SeriesInstanceUID",
                        "SOPInstanceUID"):
            fakes.add(str(ds.get(keyword)))
    fakes.discard("")
    texts = [json.dumps(report.to_dict())]
    for case in cases:
        texts += [case.case_id, case.patient_id, json.dumps(case.meta)]
    blob = "\n".join(texts)
    hits = [fake for fake in fakes if fake in blob]
    assert hits == [] and "FAKE" not in blob
    # hashes depend on the salt
    other = list(build_source("rsna_lumbar", str(lumbar_root), salt="another").iter_cases())
    assert {c.case_id for c in other}.isdisjoint({c.case_id for c in cases})


def test_options_windows_size_and_conditions(lumbar_root):
    source = build_source("rsna_lumbar", str(lumbar_root), salt="s", windows=["file"], image_size=32,
                          stack_slices=5, series_descriptions=["Sagittal T2/STIR"])
    case = next(iter(source.iter_cases()))
    assert case.image.shape == (5, 1, 32, 32)
    none = build_source("rsna_lumbar", str(lumbar_root), salt="s", series_descriptions=["Axial T2"])
    assert list(none.iter_cases()) == []
    with pytest.raises(ValueError, match="stack_slices"):
        build_source("rsna_lumbar", str(lumbar_root), salt="s", stack_slices=4)
    with pytest.raises(ValueError, match="unknown"):
        build_source("rsna_lumbar", str(lumbar_root), salt="s", conditions=["Scoliosis"])
