"""msd source: Medical Segmentation Decathlon layout (dataset.json + NIfTI)."""

from __future__ import annotations

import numpy as np

from losslab.data.sources import SkipReport, build_source, run_generator


def test_msd_presence_labels(tmp_path):
    run_generator("msd", str(tmp_path), seed=0, cases=10)
    report = SkipReport()
    source = build_source("msd", str(tmp_path), salt="s", report=report)
    cases = list(source.iter_cases())
    assert report.read == 10 and report.skipped == []
    assert source.class_names == ["absent", "present"]
    assert sum(c.label for c in cases) == 3
    case = cases[0]
    assert case.image.shape == (8, 2, 16, 16) and case.image.dtype == np.float32
    assert case.meta["spacing"] == [2.5, 1.0, 1.0] and case.meta["modalities"] == ["mod0", "mod1"]
    assert all((c.meta["voxels_1"] > 0) == bool(c.label) for c in cases)
    assert abs(float(case.image.mean())) < 1e-3  # zscore default


def test_msd_csv_labels_and_resize(tmp_path):
    run_generator("msd", str(tmp_path), seed=1, cases=4, channels=1)
    (tmp_path / "labels.csv").write_text("case,label\nsynth_000,high\nsynth_001,low\nsynth_002,low\n")
    report = SkipReport()
    source = build_source("msd", str(tmp_path), salt="s", report=report, label_mode="csv",
                          labels_csv="labels.csv", image_size=8)
    cases = list(source.iter_cases())
    assert source.class_names == ["high", "low"]
    assert [c.label for c in cases] == [0, 1, 1] and cases[0].image.shape == (8, 1, 8, 8)
    assert report.skipped[0]["item"] == "imagesTr/synth_003.nii.gz"
    assert "no label" in report.skipped[0]["reason"]


def test_segmentation_reads_through_registered_sources(tmp_path):
    """The segmentation cache finds its readers in the source registry (no list of names of its own)."""
    import json

    import pytest

    from losslab.config import DataConfig, SegConfig
    from losslab.data.cache import SegmentationEncoder, build_cache
    from losslab.data.sources import segmentation_sources

    assert segmentation_sources() == ["brats", "msd"]
    with pytest.raises(ValueError, match=r"data.source='manifest' has no segmentation reader; use one of brats, msd$"):
        build_cache(DataConfig(source="manifest", root=str(tmp_path), cache_dir=str(tmp_path / "c")),
                    encoder=SegmentationEncoder.from_config(SegConfig()))
    run_generator("msd", str(tmp_path / "task"), seed=0, cases=4)
    source = build_source("msd", str(tmp_path / "task"), salt="s")
    items = list(source.segmentation_items())
    assert [item for item, _, _ in items] == [f"imagesTr/synth_{n:03d}.nii.gz" for n in range(4)]
    assert all(files[0].name == mask.name and mask.parent.name == "labelsTr" for _, files, mask in items)
    assert source.default_segmentation_mapping("regions") == {"lesion": [1]}
    assert source.default_segmentation_mapping("classes") == {"background": [0], "lesion": [1]}
    # the task's name decides nothing: a "Brain Tumour" task with one lesion label keeps that label; what
    # Task01 holds (four brain MRI contrasts, labels edema / non-enhancing / enhancing) gets the BraTS
    # regions whatever its name (the release says "BRATS")
    dataset = json.loads((tmp_path / "task" / "dataset.json").read_text())
    (tmp_path / "task" / "dataset.json").write_text(json.dumps(dataset | {"name": "Brain Tumour"}))
    named_only = build_source("msd", str(tmp_path / "task"), salt="s")
    assert named_only.default_segmentation_mapping("regions") == {"lesion": [1]}
    task01_content = {"name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                      "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}
    (tmp_path / "task" / "dataset.json").write_text(json.dumps(dataset | task01_content))
    brain = build_source("msd", str(tmp_path / "task"), salt="s")
    assert brain.default_segmentation_mapping("regions") == {"wt": [1, 2, 3], "tc": [2, 3], "et": [3]}
    assert brain.default_segmentation_mapping("classes") == {
        "background": [0], "edema": [1], "non_enhancing_tumor": [2], "enhancing_tumour": [3]}
    # the same labels with other contrasts (not brain MRI) are one region per label, under metric-safe names
    (tmp_path / "task" / "dataset.json").write_text(json.dumps(dataset | task01_content | {"modality": {"0": "CT"}}))
    other = build_source("msd", str(tmp_path / "task"), salt="s")
    assert other.default_segmentation_mapping("regions") == {
        "edema": [1], "non_enhancing_tumor": [2], "enhancing_tumour": [3]}


def test_label_names_become_metric_safe_and_a_clash_is_refused(tmp_path):
    """dataset.json label names name metrics: spaces and dashes become ``_``; two names that become one
    are refused, naming both labels."""
    import json

    import pytest

    run_generator("msd", str(tmp_path), seed=0, cases=2)
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    labels = {"0": "background", "1": "Left Atrium", "2": "right-ventricle (RV)"}
    (tmp_path / "dataset.json").write_text(json.dumps(dataset | {"labels": labels}))
    source = build_source("msd", str(tmp_path), salt="s")
    assert source.default_segmentation_mapping("regions") == {"left_atrium": [1], "right_ventricle_rv": [2]}
    (tmp_path / "dataset.json").write_text(json.dumps(dataset | {"labels": labels | {"2": "left-atrium"}}))
    with pytest.raises(ValueError, match=r"dataset.json: labels 1 \('Left Atrium'\) and 2 \('left-atrium'\) both "
                                         r"name metrics 'left_atrium'"):
        build_source("msd", str(tmp_path), salt="s").default_segmentation_mapping("regions")
