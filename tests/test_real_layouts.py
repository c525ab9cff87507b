"""The public brain-tumour releases as they ship (issue #28): BraTS 2018, 2019, 2020, 2021 and MSD Task01,
laid out by ``tests/_release_layouts.py`` (tiny volumes, the releases' file names, CSV headers,
``dataset.json`` and quirks). Each reader is checked against what was written (nibabel, numpy); the
README's "Your own data" commands run preprocess -> train (classification and segmentation) -> evaluate
on the BraTS 2020 and the MSD Task01 layouts."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from _release_layouts import (TASK01_CHANNELS, write_brats2018, write_brats2019, write_brats2020, write_brats2021,
                              write_msd_task01)
from losslab.config import DataConfig, SegConfig
from losslab.data.cache import SegmentationEncoder, build_cache
from losslab.data.deid import salted_hash
from losslab.data.sources import SkipReport, build_source

REPO = Path(__file__).resolve().parents[1]
SALT = "test-salt"
BRAIN_ORDER = ["t1", "t1ce", "t2", "flair"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: tiny 3D convolutions on a shared 2-core machine spin otherwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _zscore_nonzero(volume: np.ndarray) -> np.ndarray:
    """Per channel over its non-zero voxels, computed here with numpy (the cache uses MONAI)."""
    out = np.zeros(volume.shape, dtype=np.float64)
    for c, channel in enumerate(volume.astype(np.float64)):
        inside = channel != 0
        out[c][inside] = (channel[inside] - channel[inside].mean()) / channel[inside].std()
    return out


def _brats_regions(seg: np.ndarray) -> np.ndarray:
    """Whole tumour, tumour core, enhancing tumour of a BraTS label map (1 necrotic, 2 oedema, 4 enhancing)."""
    return np.stack([np.isin(seg, [1, 2, 4]), np.isin(seg, [1, 4]), seg == 4]).astype(np.uint8)


def _seg_cache(root: Path, cache: Path, source: str = "brats", **seg):
    data = DataConfig(source=source, root=str(root), cache_dir=str(cache), num_folds=2, test_fraction=0, salt=SALT)
    return build_cache(data, encoder=SegmentationEncoder.from_config(SegConfig(**seg)))


def _cached_case(info, item: str, source: str) -> dict[str, np.ndarray]:
    case_id = salted_hash(f"seg:{source}:{item}", SALT)
    row = next(r for r in info.index if r["case_id"] == case_id)
    return {k: np.asarray(v) for k, v in info.arrays(row).items()}


# ------------------------------------------------------------------------------------------- BraTS
def test_brats2018_grade_folders_nii_gz(tmp_path):
    written = write_brats2018(tmp_path / "MICCAI_BraTS_2018_Data_Training")
    report = SkipReport()
    cases = list(build_source("brats", str(tmp_path / "MICCAI_BraTS_2018_Data_Training"), SALT, report).iter_cases())
    assert report.read == 4 and report.skipped == []
    by_id = {c.case_id: c for c in cases}
    for name, (grade, volumes) in written.items():
        case = by_id[salted_hash(name, SALT)]
        assert case.label == ("LGG", "HGG").index(grade)
        k = case.meta["slice_index"][0]
        expected = np.stack([volumes[m][:, :, k] for m in BRAIN_ORDER]).astype(np.float32)
        np.testing.assert_array_equal(case.image[0], expected)  # channels t1, t1ce, t2, flair
    cache = build_cache(DataConfig(root=str(tmp_path / "MICCAI_BraTS_2018_Data_Training"), cache_dir=str(tmp_path / "c"),
                                   num_folds=2, salt=SALT))
    assert cache.report["modalities"] == BRAIN_ORDER and cache.report["class_counts"] == {"LGG": 2, "HGG": 2}


def test_brats2019_grade_from_folders_and_name_mapping_and_a_disagreement_is_named(tmp_path):
    root = tmp_path / "MICCAI_BraTS_2019_Data_Training"
    written = write_brats2019(root)
    cases = list(build_source("brats", str(root), SALT, SkipReport()).iter_cases())
    assert {c.case_id: c.label for c in cases} == {salted_hash(n, SALT): ("LGG", "HGG").index(g)
                                                   for n, (g, _) in written.items()}
    # the table says LGG for a case the HGG folder holds: said in one line, naming both
    hgg_case = next(n for n, (g, _) in written.items() if g == "HGG")
    table = (root / "name_mapping.csv").read_text().replace(f"HGG,", "LGG,", 1)
    assert hgg_case in table.splitlines()[1]
    (root / "name_mapping.csv").write_text(table)
    with pytest.raises(ValueError, match=rf"^HGG/{hgg_case}: the folder says HGG but name_mapping.csv says 'LGG'"):
        list(build_source("brats", str(root), SALT, SkipReport()).iter_cases())


def test_brats2020_grade_from_its_name_mapping_csv_with_no_option(tmp_path):
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    written = write_brats2020(root)
    assert all(p.suffix == ".nii" for p in root.rglob("*.nii*"))  # 2020 ships uncompressed NIfTI
    report = SkipReport()
    cases = list(build_source("brats", str(root), SALT, report).iter_cases())
    assert report.skipped == []
    assert {c.case_id: c.label for c in cases} == {salted_hash(n, SALT): ("LGG", "HGG").index(g)
                                                   for n, (g, _) in written.items()}


def test_brats2020_subject_355_mask_is_read_as_the_release_ships_it(tmp_path):
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    written = write_brats2020(root)
    assert (root / "BraTS20_Training_355" / "W39_1998.09.19_Segm.nii").is_file()
    info = _seg_cache(root, tmp_path / "cache")
    assert len(info.index) == 4 and info.report["skipped"] == []
    assert info.report["notes"] == ["BraTS20_Training_355: mask read from W39_1998.09.19_Segm.nii "
                                    "(as BraTS 2020 ships it: a known quirk)"]
    arrays = _cached_case(info, "BraTS20_Training_355", "brats")
    np.testing.assert_array_equal(arrays["label"], _brats_regions(written["BraTS20_Training_355"][1]["seg"]))
    assert sorted(p.name for p in (root / "BraTS20_Training_355").iterdir())[-1] == "W39_1998.09.19_Segm.nii"  # not renamed


def test_brats2021_has_no_grade_classification_needs_a_labels_csv_inside_the_root(tmp_path, monkeypatch):
    root = tmp_path / "RSNA_ASNR_MICCAI_BraTS2021_TrainingData"
    written = write_brats2021(root)
    with pytest.raises(ValueError, match="BraTS 2021 and later ship none.*needs data.source_kwargs.labels_csv"):
        list(build_source("brats", str(root), SALT, SkipReport()).iter_cases())
    # segmentation needs no grade
    info = _seg_cache(root, tmp_path / "cache")
    assert len(info.index) == 4 and info.channel_names == ["wt", "tc", "et"]
    # a relative labels_csv is read from data.root, whatever the working directory
    (root / "grades.csv").write_text("case,label\n" + "".join(f"{n},{g}\n" for n, (g, _) in written.items()))
    monkeypatch.chdir(tmp_path)
    cases = list(build_source("brats", str(root), SALT, SkipReport(), labels_csv="grades.csv").iter_cases())
    assert {c.case_id: c.label for c in cases} == {salted_hash(n, SALT): ("LGG", "HGG").index(g)
                                                   for n, (g, _) in written.items()}


def test_every_brats_release_caches_the_same_channels_and_regions(tmp_path):
    """2018 (folders, .nii.gz), 2020 (flat, .nii) and 2021 (flat, .nii.gz): each segmentation cache holds
    t1, t1ce, t2, flair (numpy z-score of the written volumes) and wt/tc/et of the written masks."""
    for writer, folder in ((write_brats2018, "MICCAI_BraTS_2018_Data_Training"),
                           (write_brats2020, "MICCAI_BraTS2020_TrainingData"),
                           (write_brats2021, "RSNA_ASNR_MICCAI_BraTS2021_TrainingData")):
        written = writer(tmp_path / folder)
        info = _seg_cache(tmp_path / folder, tmp_path / f"cache-{folder}")
        assert info.report["modalities"] == BRAIN_ORDER and info.report["mapping"] == {
            "wt": [1, 2, 4], "tc": [1, 4], "et": [4]}
        name, (grade, volumes) = next(iter(written.items()))
        item = f"{grade}/{name}" if writer is write_brats2018 else name
        arrays = _cached_case(info, item, "brats")
        np.testing.assert_allclose(arrays["image"], _zscore_nonzero(np.stack([volumes[m] for m in BRAIN_ORDER])),
                                   atol=1e-4)
        np.testing.assert_array_equal(arrays["label"], _brats_regions(volumes["seg"]))


# ------------------------------------------------------------------------------------------- MSD Task01
def test_msd_task01_as_shipped_gets_the_brats_regions_and_the_brain_mri_channel_order(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    written = write_msd_task01(root)
    info = _seg_cache(root, tmp_path / "cache", source="msd")
    assert info.channel_names == ["wt", "tc", "et"] and info.report["mapping"] == {
        "wt": [1, 2, 3], "tc": [2, 3], "et": [3]}
    assert info.report["modalities"] == BRAIN_ORDER and len(info.index) == 4 and info.report["skipped"] == []
    for name, (_, volumes) in written.items():
        arrays = _cached_case(info, f"imagesTr/{name}.nii.gz", "msd")
        # channel k holds BRAIN_ORDER[k]: the 4D image's FLAIR (shipped first) is the last channel
        np.testing.assert_allclose(arrays["image"], _zscore_nonzero(np.stack([volumes[m] for m in BRAIN_ORDER])),
                                   atol=1e-4)
        # Task01's wt/tc/et are the structures BraTS's are (its labels renumbered 2->1, 1->2, 4->3)
        np.testing.assert_array_equal(arrays["label"], _brats_regions(volumes["seg"]))
    classes = _seg_cache(root, tmp_path / "cache-classes", source="msd", labels="classes")
    assert classes.channel_names == ["background", "edema", "non_enhancing_tumor", "enhancing_tumour"]


def test_msd_task01_classification_cache_in_the_brain_mri_channel_order(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    write_msd_task01(root)
    report = SkipReport()
    source = build_source("msd", str(root), SALT, report, label_class=3, normalise="none")
    cases = list(source.iter_cases())
    assert report.read == 4 and report.skipped == []  # the ._* files of the archive are not listed, not read
    image = np.asarray(nib.load(str(root / "imagesTr" / "BRATS_001.nii.gz")).dataobj)  # (X, Y, Z, 4) as shipped
    first = next(c for c in cases if c.case_id == salted_hash("msd:BRATS:BRATS_001", SALT))
    for k, name in enumerate(BRAIN_ORDER):
        np.testing.assert_array_equal(first.image[:, k], image[..., TASK01_CHANNELS.index(name)].transpose(2, 1, 0))
    assert first.meta["modalities"] == BRAIN_ORDER
    cache = build_cache(DataConfig(source="msd", root=str(root), cache_dir=str(tmp_path / "c"), num_folds=2,
                                   salt=SALT, source_kwargs={"label_class": 3}))
    assert cache.report["modalities"] == BRAIN_ORDER


def test_files_named_in_the_config_stay_inside_the_data_root(tmp_path):
    """MSD's labels_csv and MedMNIST's files are paths inside data.root: one leading out is refused before
    it is opened (relative to the root, not to the working directory)."""
    from losslab.data.sources import run_generator

    root = tmp_path / "Task01_BrainTumour"
    write_msd_task01(root)
    (tmp_path / "labels.csv").write_text("case,label\nBRATS_001,high\n")
    for outside in ("../labels.csv", str(tmp_path / "labels.csv")):
        with pytest.raises(ValueError, match=r"data.source_kwargs.labels_csv=.* is outside the data root"):
            build_source("msd", str(root), SALT, SkipReport(), label_mode="csv", labels_csv=outside)
    (root / "labels.csv").write_text("case,label\nBRATS_001,high\nBRATS_002,low\n")
    inside = build_source("msd", str(root), SALT, SkipReport(), label_mode="csv", labels_csv="labels.csv")
    assert inside.csv_labels == {"BRATS_001": "high", "BRATS_002": "low"}
    run_generator("medmnist", str(tmp_path / "outside_npz"))
    npz = next((tmp_path / "outside_npz").rglob("*.npz"))
    (tmp_path / "medmnist").mkdir()
    with pytest.raises(ValueError, match=r"data.source_kwargs.files=.* is outside the data root"):
        build_source("medmnist", str(tmp_path / "medmnist"), SALT, SkipReport(), files=[f"../outside_npz/{npz.name}"])


# ------------------------------------------------------------------------------------------- the README
def _readme_commands(layout: str) -> list[str]:
    """The ``losslab`` lines of the README's "Your own data" block for ``layout`` (its ``# layout`` comment)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)
    block = next(b for b in blocks if b.startswith(f"# {layout}"))
    return [line.strip() for line in block.splitlines() if line.strip().startswith("losslab ")]


def _run_cli(args: list[str], ok: bool = True):
    from typer.testing import CliRunner

    from losslab.cli import app

    result = CliRunner().invoke(app, args)
    if ok:
        assert result.exit_code == 0, (args, result.output, result.exception)
    return result


#: what makes the README's commands tiny: the same for preprocess and train (one cache), one epoch
TINY_CLASSIFICATION = ["model.backbone=test_resnet", "model.head_kwargs={hidden_dim: 16}", "data.bag_size=4",
                       "train.epochs=1", "data.num_folds=2", "data.test_fraction=0.25", f"data.salt={SALT}"]
TINY_SEGMENTATION = ["seg.patch_size=[16, 16, 16]", "seg.samples_per_case=1", "train.epochs=1", "data.num_folds=2",
                     "data.test_fraction=0.25", f"data.salt={SALT}", "train.plot_every=1"]
LAYOUTS = {
    "BraTS 2020": (write_brats2020, "/data/MICCAI_BraTS2020_TrainingData", "wt=1+2+4;tc=1+4;et=4"),
    "MSD Task01": (write_msd_task01, "/data/Task01_BrainTumour", "wt=1+2+3;tc=2+3;et=3"),
}


def _as_test_command(line: str, root: Path, tmp_path: Path, *extra: str) -> list[str]:
    """A README command with this test's data root, caches and configs, and the tiny settings."""
    args = []
    for arg in shlex.split(line.replace("configs/", f"{REPO}/configs/"))[1:]:
        if arg.startswith("data.root="):
            arg = f"data.root={root}"
        elif arg.startswith("data.cache_dir="):
            arg = f"data.cache_dir={tmp_path / arg.split('=', 1)[1]}"
        args.append(arg)
    if args[0] in ("preprocess", "train"):
        tiny = TINY_SEGMENTATION if "seg_dice" in line else TINY_CLASSIFICATION
        args += [x for o in [*tiny, f"train.checkpoint_dir={tmp_path / 'ckpt'}", *extra] for x in ("-o", o)]
    return args


def _run_id(output: str, prefix: str) -> str:
    return re.search(rf"{prefix}\s*(?:run\s+)?([0-9a-f]{{32}})", output).group(1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_readme_commands_preprocess_train_evaluate_on_the_release_layout(layout, tmp_path, monkeypatch, mlflow_store):
    """The README's commands for ``layout``: both tasks train one epoch and are evaluated; every train run
    logs t1,t1ce,t2,flair; segmentation reports dice_wt/tc/et (evaluate gives train's test numbers) with
    the release's region definition; a patch larger than the volumes and a cache in another channel order
    are refused in one line."""
    from mlflow.tracking import MlflowClient

    writer, readme_root, regions = LAYOUTS[layout]
    root = tmp_path / Path(readme_root).name
    writer(root, cases=8)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOSSLAB_SALT", SALT)  # a logged config holds only the salt's fingerprint
    commands = _readme_commands(layout)
    assert [shlex.split(c)[1] for c in commands] == ["preprocess", "train", "evaluate"] * 2
    assert all(readme_root in c for c in commands if " evaluate " not in c)
    client = MlflowClient()
    train_runs, evaluated = [], []
    for line in commands:
        if " evaluate " in line:
            output = _run_cli(_as_test_command(line, root, tmp_path)).output
            evaluated.append(client.get_run(_run_id(output, "evaluate run")))
        else:
            output = _run_cli(_as_test_command(line, root, tmp_path)).output
            if " train " in line:
                train_runs.append(client.get_run(_run_id(output, "fold 0: FINISHED")))
    for run in train_runs:
        assert run.data.params["data.modalities"] == "t1,t1ce,t2,flair", run.data.params
    classifier, segmenter = train_runs
    seg_eval = evaluated[1]
    assert segmenter.data.params["seg.mapping"] == regions
    for key in ("dice_wt", "dice_tc", "dice_et"):
        assert f"val/{key}" in segmenter.data.metrics and f"test/{key}" in segmenter.data.metrics
        assert abs(seg_eval.data.metrics[f"test/{key}"] - segmenter.data.metrics[f"test/{key}"]) <= 1e-5, key
    assert not [k for r in train_runs + evaluated for k in r.data.metrics if " " in k]
    assert evaluated[0].data.tags["losslab.source_modalities"] == "t1,t1ce,t2,flair"
    assert abs(evaluated[0].data.metrics["test/balanced_accuracy"]
               - classifier.data.metrics["test/balanced_accuracy"]) <= 1e-6

    seg_train = next(c for c in commands if " train " in c and "seg_dice" in c)
    seg_experiment = segmenter.info.experiment_id
    before = len(client.search_runs([seg_experiment]))
    patch = [a for a in _as_test_command(seg_train, root, tmp_path, "seg.patch_size=[16, 16, 32]")]
    refused = _run_cli(patch, ok=False)
    assert refused.exit_code != 0 and len(client.search_runs([seg_experiment])) == before  # before any run
    assert re.search(r"seg.patch_size=\[16, 16, 32\] is larger than the smallest volume in the segmentation cache "
                     r".*\(32 x 32 x 16 voxels per axis, over 8 cases\); set seg.patch_size to at most \[16, 16, 16\]",
                     refused.output + str(refused.exception)), refused.output

    # the same cache recorded in another channel order (as a cache built before the order was recorded
    # could hold it): evaluate refuses to score the model on it
    seg_cache = Path(segmenter.data.params["data.cache_dir"])
    report = json.loads((seg_cache / "report.json").read_text())
    (seg_cache / "report.json").write_text(json.dumps(report | {"modalities": ["flair", "t1", "t1ce", "t2"]}))
    seg_evaluate = next(c for c in commands if " evaluate " in c and "seg_dice" in c)
    refused = _run_cli(_as_test_command(seg_evaluate, root, tmp_path), ok=False)
    assert refused.exit_code != 0
    assert "the model was trained on channels t1,t1ce,t2,flair (its run's data.modalities) but the cache " \
           f"{seg_cache} holds flair,t1,t1ce,t2: refused" in refused.output + str(refused.exception), refused.output
