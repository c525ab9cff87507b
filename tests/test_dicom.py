"""DICOM series reading, windowing and de-identification (losslab.data.dicom)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pydicom
import pytest

from losslab.data import dicom
from losslab.data.sources.base import SkipReport

from _data_factories import ramp_volume, write_series


def _testdata(name: str) -> str | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.data.get_testdata_file(name)
        except Exception:  # noqa: BLE001 - download failure without pydicom-data
            return None


def test_slices_ordered_by_position_not_instance_number_or_file_name(tmp_path):
    volume = ramp_volume(depth=8)
    paths = write_series(tmp_path / "s", volume, seed=3)
    shuffled = list(np.random.default_rng(1).permutation([str(p) for p in paths]))
    report = SkipReport()
    out, meta = dicom.read_series(shuffled, report)
    assert out.dtype == np.float32 and out.shape == (8, 16, 16)
    np.testing.assert_array_equal(out, volume.astype(np.float32))
    # the instance numbers were shuffled: sorting by them would not give this order
    assert meta["instance_numbers"] != sorted(meta["instance_numbers"])
    assert meta["spacing"] == [2.0, 1.0, 1.0]
    assert report.skipped == [] and report.notes == []


def test_sagittal_order_uses_the_normal_of_the_orientation(tmp_path):
    # sagittal normal is -x: slices placed at increasing x come out in reverse
    volume = ramp_volume(depth=5)
    positions = [(float(k) * 3, 0.0, 0.0) for k in range(5)]
    paths = write_series(tmp_path / "s", volume, orientation=(0, 1, 0, 0, 0, -1), positions=positions)
    out, _ = dicom.read_series(paths, SkipReport())
    np.testing.assert_array_equal(out, volume[::-1].astype(np.float32))


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    volume = ramp_volume(depth=3)
    paths = write_series(tmp_path / "s", volume, rescale=(2.0, -1024.0))
    out, meta = dicom.read_series(paths, SkipReport())
    np.testing.assert_allclose(out, volume * 2.0 - 1024.0)
    assert meta["RescaleSlope"] == 2.0


def test_monochrome1_is_inverted_with_its_window(tmp_path):
    volume = ramp_volume(depth=3)
    paths = write_series(tmp_path / "s", volume, photometric="MONOCHROME1", window=(200.0, 100.0))
    out, meta = dicom.read_series(paths, SkipReport())
    k = float(volume.min()) + float(volume.max())
    np.testing.assert_allclose(out, k - volume.astype(np.float32))
    assert meta["inverted_monochrome1"] is True
    assert meta["window"] == [k - 200.0, 100.0]


def test_multi_frame_emri_small():
    path = _testdata("emri_small.dcm")
    if path is None:
        pytest.skip("emri_small.dcm needs the pydicom-data package")
    report = SkipReport()
    out, meta = dicom.read_series([path], report)
    assert out.shape == (10, 64, 64) and out.dtype == np.float32
    np.testing.assert_array_equal(out, pydicom.dcmread(path).pixel_array.astype(np.float32))
    assert meta["spacing"][0] == pytest.approx(1.2)
    assert any("frame order kept" in note for note in report.notes)


def test_multi_frame_positions_from_grid_frame_offsets():
    path = _testdata("rtdose.dcm")
    ds = pydicom.dcmread(path)
    out, meta = dicom.read_series([path], SkipReport())
    assert out.shape == (15, 10, 10)
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    order = np.argsort(offsets)
    np.testing.assert_array_equal(out, ds.pixel_array[order].astype(np.float32))
    assert meta["n_slices"] == 15


def test_find_series_groups_by_series_uid(tmp_path):
    folder = tmp_path / "mixed"
    write_series(folder, ramp_volume(depth=4), seed=1, name_prefix="a")
    write_series(folder, ramp_volume(depth=3), seed=2, name_prefix="b")
    groups = dicom.find_series(folder, SkipReport())
    assert sorted(len(v) for v in groups.values()) == [3, 4]


def test_safe_metadata_keeps_only_technical_fields():
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    meta = dicom.safe_metadata(ds)
    assert meta["Modality"] == "CT" and "PixelSpacing" in meta
    assert not set(meta) & dicom.PHI_KEYWORDS
    assert set(meta) <= set(dicom.SAFE_KEYWORDS)
    text = json.dumps(meta)
    for keyword in ("PatientName", "PatientID", "InstitutionName"):
        value = str(ds.get(keyword, ""))
        if value:
            assert value not in text
    assert {"PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs",
            "InstitutionName", "ReferringPhysicianName", "StudyID"} <= dicom.PHI_KEYWORDS


def test_read_series_meta_has_no_identifier(tmp_path):
    paths = write_series(tmp_path / "s", ramp_volume(depth=3))
    _, meta = dicom.read_series(paths, SkipReport())
    text = json.dumps(meta)
    assert "FAKE" not in text and not set(meta) & dicom.PHI_KEYWORDS


def test_multi_window_applies_linear_windows():
    volume = np.linspace(-1000, 2000, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    edges = dicom.multi_window(np.array([[[-125.0, 50.0, 225.0]]]), [(50, 350)])
    np.testing.assert_allclose(edges[0, 0, 0], [0, 0.5, 1])
    stacked = dicom.multi_window(volume, file_window=(500.0, 1000.0))
    assert stacked.shape == (4, 3, 8, 8) and stacked.dtype == np.float32
    assert stacked.min() >= 0 and stacked.max() <= 1
    for channel, (centre, width) in enumerate([(50.0, 350.0), (400.0, 2000.0), (500.0, 1000.0)]):
        expected = np.clip((volume.astype(np.float64) - (centre - width / 2)) / width, 0, 1)
        np.testing.assert_allclose(stacked[:, channel], expected, atol=1e-6)
    # no file window: "file" falls back to the automatic window
    auto = dicom.multi_window(volume, windows=["file"])
    assert auto.shape == (4, 1, 8, 8) and auto.max() == 1.0 and auto.min() == 0.0
    with pytest.raises(ValueError, match="unknown window"):
        dicom.multi_window(volume, windows=["lung"])


def test_crop_around_resize_normalise_clahe():
    stack = np.zeros((2, 3, 40, 40), dtype=np.float32)
    stack[..., 10, 30] = 1.0
    crop = dicom.crop_around(stack, x=30, y=10)
    assert crop.shape == (2, 3, 30, 30)  # 0.75 * 40
    assert crop[0, 0, 15, 15] == 1.0  # the centre pixel
    edge = dicom.crop_around(stack, x=0, y=0, radius_factor=0.5)
    assert edge.shape == (2, 3, 20, 20) and edge[0, 0, 10, 10] == 0.0
    small = dicom.resize(crop, (16, 16))
    assert small.shape == (2, 3, 16, 16) and small.dtype == np.float32
    norm = dicom.normalise(np.array([2.0, 4.0, 6.0]), "minmax")
    np.testing.assert_allclose(norm, [0, 0.5, 1])
    z = dicom.normalise(np.array([2.0, 4.0, 6.0]), "zscore")
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6
    rng = np.random.default_rng(0)
    equalised = dicom.clahe(rng.random((2, 32, 32)).astype(np.float32) * 0.3)
    assert equalised.shape == (2, 32, 32) and equalised.max() > 0.3


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                                  "rtdose.dcm", "emri_small.dcm", "MR_small_RLE.dcm"])
def test_native_fast_path_equals_pixel_array(name):
    path = _testdata(name)
    if path is None:
        pytest.skip(f"{name} needs the pydicom-data package")
    ds = pydicom.dcmread(path)
    fast = dicom.native_pixels(ds)
    if name.endswith("RLE.dcm"):
        assert fast is None  # compressed: falls back to pixel_array
        return
    np.testing.assert_array_equal(fast, ds.pixel_array.reshape(fast.shape))


@pytest.mark.parametrize("signed", [0, 1])
def test_native_fast_path_masks_bits_stored(tmp_path, signed):
    from losslab.data.sources.embedded_lumbar import make_dataset

    ds = make_dataset(np.array([[0xF123, 5], [0x0800, 0x0FFF]], dtype=np.uint16), series_uid="1.2",
                      study_uid="1.3", position=(0, 0, 0))
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, signed
    ds.save_as(tmp_path / "b12.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(tmp_path / "b12.dcm")
    np.testing.assert_array_equal(dicom.native_pixels(ds)[0], ds.pixel_array)
