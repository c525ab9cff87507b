"""Bad input: every case is a skip (or a note) with a reason in the report, never a bare traceback."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.uid import generate_uid

from losslab.data import dicom
from losslab.data.sources import SkipReport, build_source, run_generator
from losslab.data.sources.embedded_lumbar import make_dataset

from _data_factories import AXIAL, ramp_volume, write_series


def reasons(report: SkipReport) -> str:
    return "\n".join(s["reason"] for s in report.skipped)


def notes(report: SkipReport) -> str:
    return "\n".join(report.notes)


def float_slice(path: Path, values: np.ndarray, z: float, series_uid: str) -> None:
    ds = make_dataset(np.zeros(values.shape), series_uid=series_uid, study_uid="1.2.3", position=(0, 0, z),
                      orientation=AXIAL)
    del ds.PixelData, ds.PixelRepresentation
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.FloatPixelData = values.astype(np.float32).tobytes()
    ds.save_as(path, enforce_file_format=True)


# ----------------------------------------------------------------------------- DICOM files
def test_truncated_dicom(tmp_path):
    paths = write_series(tmp_path / "s", ramp_volume(depth=4))
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 100])  # pixel data cut short
    paths[2].write_bytes(paths[2].read_bytes()[:200])  # header cut short
    report = SkipReport()
    volume, _ = dicom.read_series(paths, report)
    assert volume.shape[0] == 2
    assert reasons(report).count("truncated") == 2


def test_file_that_is_not_dicom(tmp_path):
    paths = write_series(tmp_path / "s", ramp_volume(depth=3))
    (tmp_path / "s" / "notes.txt").write_text("this is not an image\n")
    report = SkipReport()
    groups = dicom.find_series(tmp_path / "s", report)
    assert [len(v) for v in groups.values()] == [3]
    assert report.skipped == [{"item": "notes.txt", "reason": "not a DICOM file (no DICM preamble)"}]
    volume, _ = dicom.read_series([*paths, tmp_path / "s" / "notes.txt"], report)
    assert volume.shape[0] == 3


def test_dicom_without_pixel_data(tmp_path):
    paths = write_series(tmp_path / "s", ramp_volume(depth=3))
    ds = make_dataset(np.zeros((16, 16)), series_uid="1.2.3.4", study_uid="1.2.3", position=(0, 0, 99))
    del ds.PixelData
    ds.save_as(tmp_path / "s" / "nopixels.dcm", enforce_file_format=True)
    report = SkipReport()
    volume, _ = dicom.read_series([tmp_path / "s" / "nopixels.dcm"], report)
    assert volume is None and "no pixel data" in reasons(report)
    report = SkipReport()
    volume, _ = dicom.read_series([*paths, tmp_path / "s" / "nopixels.dcm"], report)
    assert volume.shape[0] == 3 and "no pixel data" in reasons(report)


def test_two_series_mixed_in_one_folder(tmp_path):
    folder = tmp_path / "mixed"
    big = write_series(folder, ramp_volume(depth=5), seed=1, name_prefix="a")
    small = write_series(folder, ramp_volume(depth=2), seed=2, name_prefix="b")
    report = SkipReport()
    groups = dicom.find_series(folder, report)
    assert sorted(len(v) for v in groups.values()) == [2, 5]  # each its own series
    volume, _ = dicom.read_series([*big, *small], report)
    assert volume.shape[0] == 5
    assert reasons(report).count("series mixed; kept the largest") == 2


def test_mixed_series_in_an_rsna_folder(tmp_path):
    run_generator("embedded_lumbar", str(tmp_path), seed=0, studies=2)
    series_dir = sorted((tmp_path / "train_images").glob("*/*"))[0]
    write_series(series_dir, ramp_volume(depth=3, size=64), seed=5, name_prefix="x")
    report = SkipReport()
    cases = list(build_source("rsna_lumbar", str(tmp_path), salt="s", report=report).iter_cases())
    assert len(cases) == 10 and "series mixed in one folder" in reasons(report)
    report = SkipReport()
    cases = list(build_source("rsna_lumbar", str(tmp_path), salt="s", report=report, mixed_series="skip").iter_cases())
    assert len(cases) == 5 and reasons(report).count("mixed_series='skip'") == 5


def test_inconsistent_orientation_skips_the_series(tmp_path):
    orientations = [AXIAL] * 3 + [(0, 1, 0, 0, 0, -1)]
    paths = write_series(tmp_path / "s", ramp_volume(depth=4), orientations=orientations)
    report = SkipReport()
    volume, _ = dicom.read_series(paths, report)
    assert volume is None and "inconsistent ImageOrientationPatient" in reasons(report)


def test_inconsistent_slice_spacing_is_reported(tmp_path):
    positions = [(0, 0, z) for z in (0.0, 2.0, 4.0, 5.2, 7.4)]
    paths = write_series(tmp_path / "s", ramp_volume(depth=5), positions=positions)
    report = SkipReport()
    volume, meta = dicom.read_series(paths, report)
    assert volume.shape[0] == 5 and meta["inconsistent_spacing"] is True
    assert "inconsistent slice spacing" in notes(report)


def test_missing_slice_detected_from_spacing(tmp_path):
    paths = write_series(tmp_path / "s", ramp_volume(depth=6), skip_slices=[3])
    report = SkipReport()
    volume, meta = dicom.read_series(paths, report)
    assert volume.shape[0] == 5 and meta["missing_slices"] == 1
    assert "missing slice: 1 slice(s) missing" in notes(report)
    report = SkipReport()
    volume, _ = dicom.read_series(paths, report, on_gap="skip")
    assert volume is None and "missing slice" in reasons(report)


def test_nan_and_inf_voxels(tmp_path):
    # a few non-finite voxels are replaced by the minimum and noted
    values = np.arange(64, dtype=np.float32).reshape(8, 8) + 10
    few = values.copy()
    few[0, 0], few[1, 1] = np.nan, np.inf
    uid = generate_uid()
    float_slice(tmp_path / "a.dcm", few, 0.0, uid)
    float_slice(tmp_path / "b.dcm", values, 1.0, uid)
    report = SkipReport()
    volume, meta = dicom.read_series([tmp_path / "a.dcm", tmp_path / "b.dcm"], report,
                                     max_nonfinite_fraction=0.05)
    assert np.isfinite(volume).all() and volume[0, 0, 0] == 10.0 and meta["nonfinite_replaced"] == 2
    assert "non-finite voxels: 2 NaN/inf voxels replaced" in notes(report)
    # more than the allowed fraction: the series is skipped
    report = SkipReport()
    volume, _ = dicom.read_series([tmp_path / "a.dcm", tmp_path / "b.dcm"], report)
    assert volume is None and "non-finite voxels" in reasons(report)
    # through the manifest (npy) as well
    array = np.ones((4, 4), np.float32)
    array[0] = np.nan
    np.save(tmp_path / "nan.npy", array)
    (tmp_path / "manifest.csv").write_text("path,label,patient_id\nnan.npy,a,p\n")
    report = SkipReport()
    assert list(build_source("manifest", str(tmp_path), salt="s", report=report).iter_cases()) == []
    assert "non-finite voxels" in reasons(report)


def test_empty_or_all_background_volume(tmp_path):
    paths = write_series(tmp_path / "s", np.zeros((3, 8, 8), np.uint16))
    report = SkipReport()
    volume, _ = dicom.read_series(paths, report)
    assert volume is None and "empty or all-background volume" in reasons(report)
    run_generator("msd", str(tmp_path / "msd"), seed=0, cases=2)
    image = tmp_path / "msd" / "imagesTr" / "synth_000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8, 2), np.float32), np.eye(4)), image)
    report = SkipReport()
    cases = list(build_source("msd", str(tmp_path / "msd"), salt="s", report=report).iter_cases())
    assert len(cases) == 1 and report.skipped[0]["item"] == "imagesTr/synth_000.nii.gz"
    assert "empty or all-background volume" in report.skipped[0]["reason"]


# ----------------------------------------------------------------------------- RSNA tables
@pytest.fixture()
def small_lumbar(tmp_path) -> Path:
    run_generator("embedded_lumbar", str(tmp_path), seed=0, studies=2)
    return tmp_path


def edit_csv(path: Path, edit) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_case_with_no_label(small_lumbar):
    def blank(rows):
        rows[1][rows[0].index("spinal_canal_stenosis_l3_l4")] = ""
        return rows

    edit_csv(small_lumbar / "train.csv", blank)
    report = SkipReport()
    cases = list(build_source("rsna_lumbar", str(small_lumbar), salt="s", report=report).iter_cases())
    assert len(cases) == 9
    assert "L3/L4: no label: empty train.csv cell 'spinal_canal_stenosis_l3_l4'" in reasons(report)
    # manifest: empty label
    np.save(small_lumbar / "x.npy", np.arange(4.0).reshape(2, 2))
    (small_lumbar / "manifest.csv").write_text("path,label,patient_id\nx.npy,,p\n")
    report = SkipReport()
    assert list(build_source("manifest", str(small_lumbar), salt="s", report=report).iter_cases()) == []
    assert reasons(report) == "no label"


def test_unknown_label_value(small_lumbar):
    def odd(rows):
        rows[1][rows[0].index("spinal_canal_stenosis_l1_l2")] = "Very Severe"
        return rows

    edit_csv(small_lumbar / "train.csv", odd)
    report = SkipReport()
    cases = list(build_source("rsna_lumbar", str(small_lumbar), salt="s", report=report).iter_cases())
    assert len(cases) == 9 and "unknown label value 'Very Severe'" in reasons(report)
    np.save(small_lumbar / "x.npy", np.arange(4.0).reshape(2, 2))
    (small_lumbar / "manifest.csv").write_text("path,label,patient_id\nx.npy,cat,p\n")
    report = SkipReport()
    source = build_source("manifest", str(small_lumbar), salt="s", report=report, class_names=["dog"])
    assert list(source.iter_cases()) == [] and "unknown label value 'cat'" in reasons(report)


@pytest.mark.parametrize("name,column", [("train_label_coordinates.csv", "instance_number"),
                                         ("train.csv", "study_id"),
                                         ("train.csv", "spinal_canal_stenosis_l5_s1"),
                                         ("train_series_descriptions.csv", "series_description")])
def test_missing_or_misnamed_csv_column(small_lumbar, name, column):
    def rename(rows):
        rows[0][rows[0].index(column)] = column.upper()
        return rows

    edit_csv(small_lumbar / name, rename)
    source = build_source("rsna_lumbar", str(small_lumbar), salt="s")
    with pytest.raises(ValueError, match=f"{name}: missing column '{column}'"):
        list(source.iter_cases())


def test_manifest_missing_column(tmp_path):
    (tmp_path / "manifest.csv").write_text("file,label,patient_id\nx.npy,a,p\n")
    with pytest.raises(ValueError, match="manifest.csv: missing column 'path'"):
        build_source("manifest", str(tmp_path), salt="s")


def test_manifest_path_outside_the_data_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.npy"
    np.save(outside, np.arange(4.0).reshape(2, 2))
    np.save(root / "ok.npy", np.arange(4.0).reshape(2, 2))
    os.symlink(outside, root / "link.npy")
    (root / "manifest.csv").write_text(
        "path,label,patient_id\n../secret.npy,a,p\n" + f"{outside},a,p\nlink.npy,a,p\nok.npy,a,p\n")
    report = SkipReport()
    cases = list(build_source("manifest", str(root), salt="s", report=report).iter_cases())
    assert len(cases) == 1 and report.read == 1
    assert [s["item"] for s in report.skipped] == ["../secret.npy", str(outside), "link.npy"]
    assert reasons(report).count("path escapes the data root") == 3


def test_coordinate_outside_the_image(small_lumbar):
    def move(rows):
        rows[1][rows[0].index("x")] = "500.0"
        rows[2][rows[0].index("y")] = "-3"
        return rows

    edit_csv(small_lumbar / "train_label_coordinates.csv", move)
    report = SkipReport()
    cases = list(build_source("rsna_lumbar", str(small_lumbar), salt="s", report=report).iter_cases())
    assert len(cases) == 8
    assert "coordinate (500, " in reasons(report) and reasons(report).count("outside the image (64x64)") == 2


def test_conflicting_duplicate_labels_fail_or_skip_and_identical_duplicates_pass(small_lumbar):
    def duplicate(change):
        def edit(rows):
            again = list(rows[1])
            if change:
                col = rows[0].index("spinal_canal_stenosis_l2_l3")
                again[col] = "Severe" if again[col] != "Severe" else "Moderate"
            return rows + [again]
        return edit

    edit_csv(small_lumbar / "train.csv", duplicate(change=False))  # an identical duplicate row: no conflict
    assert len(list(build_source("rsna_lumbar", str(small_lumbar), salt="s").iter_cases())) == 10
    edit_csv(small_lumbar / "train.csv", duplicate(change=True))  # line 5 contradicts line 2
    with pytest.raises(ValueError, match=r"conflicting labels for study \d+ in train.csv column "
                                         r"'spinal_canal_stenosis_l2_l3': '[\w/]+' on line 2, '[\w/]+' on line 5"):
        list(build_source("rsna_lumbar", str(small_lumbar), salt="s").iter_cases())
    report = SkipReport()
    source = build_source("rsna_lumbar", str(small_lumbar), salt="s", report=report, on_label_conflict="skip")
    cases = list(source.iter_cases())
    assert len(cases) == 9 and reasons(report).count("conflicting labels") == 1
    assert "L2/L3: conflicting labels for study" in reasons(report)


def test_fractional_instance_number_is_rejected_naming_file_and_line(small_lumbar):
    def fractional(rows):
        col = rows[0].index("instance_number")
        rows[3][col] = rows[3][col] + ".7"
        rows[4][col] = rows[4][col] + ".0"  # an integer written as a float is fine
        return rows

    edit_csv(small_lumbar / "train_label_coordinates.csv", fractional)
    report = SkipReport()
    cases = list(build_source("rsna_lumbar", str(small_lumbar), salt="s", report=report).iter_cases())
    assert len(cases) == 9
    assert [s["item"] for s in report.skipped] == ["train_label_coordinates.csv line 4"]
    assert report.skipped[0]["reason"].startswith("instance_number '") and ".7' is not an integer" in reasons(report)
