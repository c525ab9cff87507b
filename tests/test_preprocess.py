"""Preprocessing at the speed of the disk (issue 17): one read per file, parallel and resumable
builds, the float16 cache and the fast paths checked against pydicom / scikit-image."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pydicom
import pytest
import torch

import losslab
from losslab.config import DataConfig, load_config
from losslab.data import dicom
from losslab.data.cache import JOURNAL, build_cache
from losslab.data.datasets import SliceStackDataset
from losslab.data.sources import SkipReport, build_source, run_generator
from losslab.pipelines.preprocess import run_preprocess

FLOAT16_BOUND = 2.0**-12  # half the float16 step just below 1.0: the largest rounding error in [0, 1]
STUDIES = 24  # 24 series of 15 files: 120 cases


def _testdata(name: str) -> str | None:
    from pydicom.data import get_testdata_file

    try:
        return get_testdata_file(name)
    except Exception:  # noqa: BLE001 - pydicom-data missing or offline
        return None


@pytest.fixture(scope="module")
def lumbar(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lumbar24")
    run_generator("embedded_lumbar", str(root), seed=3, studies=STUDIES)
    return root


def _config(root: Path, cache_dir: Path, **extra) -> DataConfig:
    return DataConfig(source="rsna_lumbar", root=str(root), generate=None, cache_dir=str(cache_dir), num_folds=2,
                      salt="preprocess-test-salt", **extra)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(lumbar, tmp_path_factory) -> Path:
    """An uninterrupted, in-process build."""
    cache_dir = tmp_path_factory.mktemp("reference")
    info = build_cache(_config(lumbar, cache_dir, preprocess_workers=1))
    assert len(info.index) == STUDIES * 5 and info.resumed_tasks == 0
    return cache_dir


# ----------------------------------------------------------------------------- one read per file
def test_each_dicom_file_is_opened_once(lumbar, monkeypatch):
    opened: collections.Counter[str] = collections.Counter()
    real = pydicom.dcmread

    def counting(path, *args, **kwargs):
        opened[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    source = build_source("rsna_lumbar", str(lumbar), salt="s", report=SkipReport())
    cases = list(source.iter_cases())
    files = sorted(str(p) for p in (lumbar / "train_images").rglob("*.dcm"))
    assert len(cases) == STUDIES * 5
    assert sorted(opened) == files and set(opened.values()) == {1}


def test_group_series_equals_find_series_and_read_series(tmp_path, lumbar):
    folder = sorted((lumbar / "train_images").glob("*/*"))[0]
    report = SkipReport()
    groups = dicom.group_series(folder, report, root=lumbar)
    assert {uid: [p for _, p in members] for uid, members in groups.items()} == dicom.find_series(folder, report)
    (members,) = groups.values()
    volume, meta = dicom.series_volume(members, report, root=lumbar, item="s")
    expected, expected_meta = dicom.read_series([p for _, p in members], report)
    np.testing.assert_array_equal(volume, expected)
    assert meta == expected_meta and report.skipped == []


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                                  "emri_small.dcm", "rtdose.dcm"])
def test_raw_field_parser_equals_pydicom(name):
    path = _testdata(name)
    if path is None:
        pytest.skip(f"{name} needs pydicom's test files")
    fast, slow = pydicom.dcmread(path), pydicom.dcmread(path)
    from losslab.data.dicom.read import _FAST_VR

    for keyword in _FAST_VR:
        ours, theirs = dicom.field(fast, keyword), slow.get(keyword)
        if isinstance(theirs, pydicom.multival.MultiValue):
            theirs = [float(v) for v in theirs]
        elif theirs is not None and keyword not in ("SeriesInstanceUID",):
            theirs = float(theirs)
        assert ours == theirs, keyword


@pytest.mark.parametrize("shape,size", [((7, 3, 48, 48), (64, 64)), ((7, 3, 192, 192), (64, 64)),
                                        ((2, 3, 30, 30), (16, 16)), ((1, 1, 5, 7), (13, 3)), ((40, 40), (17, 23))])
def test_resize_equals_scikit_image(shape, size):
    from skimage.transform import resize as sk_resize

    image = np.random.default_rng(0).random(shape).astype(np.float32) * 3.0
    expected = sk_resize(image, shape[:-2] + size, order=1, preserve_range=True, anti_aliasing=size[0] < shape[-2])
    out = dicom.resize(image, size)
    assert out.shape == shape[:-2] + size and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("x,y", [(32.0, 30.0), (2.0, 60.0), (63.0, 0.4), (-5.0, 20.0)])
@pytest.mark.parametrize("windows", [dicom.DEFAULT_WINDOWS, [(50.0, 350.0), "auto"], ["file"]])
def test_windowed_crop_equals_window_then_crop(x, y, windows):
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 1500, (9, 64, 64)).astype(np.float32)
    index = np.array([0, 0, 1, 2, 3, 4, 5])  # edge-padded like a stack at the end of a series
    for file_window in ((600.0, 1200.0), None):
        expected = dicom.crop_around(dicom.multi_window(volume[index], windows, file_window), x, y, 0.75)
        out = dicom.windowed_crop(volume, index, x, y, windows, file_window, 0.75)
        np.testing.assert_array_equal(out, expected)


# ----------------------------------------------------------------------------- float16 cache
def _float16_error(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float32)
    return float(np.abs(values.astype(np.float16).astype(np.float32) - values).max())


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm"])
def test_float16_error_of_windowed_pydicom_files(name):
    path = _testdata(name)
    if path is None:
        pytest.skip(f"{name} needs pydicom's test files")
    volume, meta = dicom.read_series([path], SkipReport())
    windowed = dicom.multi_window(volume, dicom.DEFAULT_WINDOWS, meta["window"])
    error = _float16_error(windowed)
    assert FLOAT16_BOUND / 2 < error <= FLOAT16_BOUND  # attained up to a hair, never exceeded
    assert error < 0.5 / 2000  # below half a grey level of the widest default window (bone, 2000)


def test_float16_would_round_raw_intensities():
    path = _testdata("MR_small.dcm")
    if path is None:
        pytest.skip("needs pydicom's test files")
    volume, _ = dicom.read_series([path], SkipReport())
    assert volume.max() > 2048 and _float16_error(volume) >= 1.0  # why raw sources stay float32


def test_float16_and_float32_caches(lumbar, reference, tmp_path):
    half_dir = reference  # auto: rsna_lumbar's windows are float16-safe
    full = build_cache(_config(lumbar, tmp_path / "f32", preprocess_workers=1, cache_dtype="float32"))
    half = build_cache(_config(lumbar, half_dir, preprocess_workers=1))
    assert half.reused and list(full.index["case_id"]) == list(half.index["case_id"])
    worst = 0.0
    for (_, row16), (_, row32) in zip(half.index.iterrows(), full.index.iterrows()):
        a16 = np.load(half_dir / row16["array_path"])
        a32 = np.load(full.cache_dir / row32["array_path"])
        assert a16.dtype == np.float16 and a32.dtype == np.float32
        worst = max(worst, float(np.abs(a16.astype(np.float32) - a32).max()))
        # the index statistics describe the stored (float16) values: recomputed in float64
        stored = a16.astype(np.float64)
        for c in range(stored.shape[1]):
            nonzero = stored[:, c][stored[:, c] != 0]
            assert row16["channel_mean"][c] == pytest.approx(nonzero.mean(), rel=1e-9)
            assert row16["channel_std"][c] == pytest.approx(nonzero.std(), rel=1e-6)
    assert 0 < worst <= FLOAT16_BOUND
    size16 = sum(p.stat().st_size for p in (half_dir / "arrays").iterdir())
    size32 = sum(p.stat().st_size for p in (full.cache_dir / "arrays").iterdir())
    assert size16 < 0.52 * size32
    for info in (half, full):
        item = SliceStackDataset(info.index, info.cache_dir)[0]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (7, 3, 64, 64)
    a = SliceStackDataset(half.index, half.cache_dir)[3]["image"]
    b = SliceStackDataset(full.index, full.cache_dir)[3]["image"]
    assert float((a - b).abs().max()) < 0.01  # z-scored: 2.44e-4 over a std of ~0.1-0.3


def test_float16_refuses_values_beyond_its_range(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    np.save(root / "big.npy", np.linspace(0, 1e5, 16, dtype=np.float32).reshape(1, 1, 4, 4))
    (root / "manifest.csv").write_text("path,label,patient_id\nbig.npy,a,p\n")
    cfg = DataConfig(source="manifest", root=str(root), generate=None, cache_dir=str(tmp_path / "c"), salt="s",
                     num_folds=2, cache_dtype="float16", class_names=["a"])
    with pytest.raises(ValueError, match=r"data.cache_dtype=float16: case .* values up to 100000"):
        build_cache(cfg)


# ----------------------------------------------------------------------------- parallel, resumable
def test_parallel_build_equals_serial(lumbar, reference, tmp_path):
    info = build_cache(_config(lumbar, tmp_path / "parallel", preprocess_workers=2))
    assert _tree(tmp_path / "parallel") == _tree(reference)
    assert len(info.index) == STUDIES * 5


_BUILD = """
import sys
import mlflow

from losslab.config import DataConfig, load_config
from losslab.data.cache import build_cache
build_cache(DataConfig(source="rsna_lumbar", root=sys.argv[1], generate=None, cache_dir=sys.argv[2],
                       num_folds=2, salt="preprocess-test-salt", preprocess_workers=1))
"""


def _journal_tasks(path: Path) -> int:
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)  # complete lines after the header
    except FileNotFoundError:
        return 0


def test_killed_build_resumes_to_the_same_cache(lumbar, reference, tmp_path, mlflow_store, capsys):
    cache_dir = tmp_path / "killed"
    journal = cache_dir / JOURNAL
    env = dict(os.environ, PYTHONPATH=str(Path(losslab.__file__).parents[1]))
    process = subprocess.Popen([sys.executable, "-c", _BUILD, str(lumbar), str(cache_dir)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while _journal_tasks(journal) < STUDIES // 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    done = _journal_tasks(journal)
    assert 0 < done < STUDIES and not (cache_dir / "index.parquet").exists()
    written = {p.name: p.stat().st_mtime_ns for p in (cache_dir / "arrays").glob("*.npy")}
    assert len(written) >= 5 * done

    cfg = load_config(None, ["data.source=rsna_lumbar", f"data.root={lumbar}", "data.generate=null",
                             f"data.cache_dir={cache_dir}", "data.num_folds=2", "data.salt=preprocess-test-salt",
                             "data.preprocess_workers=1", "tracking.experiment=preprocess-resume"])
    info = run_preprocess(cfg)  # the entry point's own path, logged to the session's MLflow store
    assert info.resumed_tasks == done and info.total_tasks == STUDIES and not info.reused
    assert f"resumed an interrupted build: {done} of {STUDIES} tasks were done" in capsys.readouterr().out
    run = mlflow.search_runs(experiment_names=["preprocess-resume"], output_format="list")[0]
    assert run.data.metrics["resumed_tasks"] == done and run.data.params["data.cache_dtype"] == "auto"
    # the journalled tasks were not run again: their arrays were not rewritten
    journalled = set(info.index["array_path"].str.slice(len("arrays/")))
    kept = {name for name, mtime in written.items()
            if name in journalled and (cache_dir / "arrays" / name).stat().st_mtime_ns == mtime}
    assert len(kept) >= 5 * done
    assert not journal.exists()
    assert _tree(cache_dir) == _tree(reference)  # byte for byte, arrays, index and report


def test_float16_round_trip_is_numpys_rounding_bit_for_bit():
    """The cache's fast float16 conversion (torch) stores the bits numpy's astype would."""
    from losslab.data.cache.images import _float16_round_trip

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.random(100_000), rng.normal(0, 300, 100_000), [0.0, -0.0, 1.0, 2.0**-25, 2.0**-24,
                             6.1e-5, 65504.0, 1 + 2.0**-11, 1 + 3 * 2.0**-11]]).astype(np.float32)
    stored, back = _float16_round_trip(values)
    assert stored.dtype == np.float16 and back.dtype == np.float32
    np.testing.assert_array_equal(stored.view(np.uint16), values.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(back, values.astype(np.float16).astype(np.float32))
