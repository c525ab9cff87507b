"""Nothing outside the data root is read: a manifest path out of the root is refused before it is
opened (and never echoed), and symlinked series / case folders or files leading outside the root, or
dangling, are refused and named in the preprocess report."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from _data_factories import ramp_volume, write_series
from losslab.config import load_config
from losslab.data import dicom
from losslab.data.sources import SkipReport, build_source
from losslab.pipelines.preprocess import run_preprocess

SECRET_LINE = "root:x:0:0:secret-line-7d1e:/root:/bin/bash"


@pytest.fixture
def outside_file(tmp_path) -> Path:
    """A file outside the data root standing in for /etc/passwd."""
    path = tmp_path / "elsewhere" / "passwd"
    path.parent.mkdir()
    path.write_text(SECRET_LINE + "\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n")
    return path


@pytest.mark.parametrize("manifest", ["ABSOLUTE", "../elsewhere/passwd"])
def test_a_manifest_outside_the_data_root_is_refused_unread(tmp_path, outside_file, manifest):
    root = tmp_path / "root"
    root.mkdir()
    manifest = str(outside_file) if manifest == "ABSOLUTE" else manifest
    with pytest.raises(ValueError, match=r"data.source_kwargs.manifest=.* is outside the data root") as err:
        build_source("manifest", str(root), "salt", SkipReport(), manifest=manifest)
    assert "secret-line" not in str(err.value)


def test_the_error_tag_of_a_refused_manifest_echoes_nothing_of_the_file(tmp_path, outside_file, mlflow_store):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.npy").write_bytes(b"")  # a non-empty root: nothing is generated
    experiment = f"confinement-{uuid.uuid4().hex[:6]}"
    cfg = load_config(None, [f"data.root={root}", "data.source=manifest", f"data.cache_dir={tmp_path / 'cache'}",
                             f"data.source_kwargs={{manifest: {outside_file}}}", "data.salt=s",
                             f"tracking.experiment={experiment}"])
    with pytest.raises(ValueError, match="outside the data root"):
        run_preprocess(cfg)
    exp = mlflow.get_experiment_by_name(experiment)
    runs = MlflowClient().search_runs([exp.experiment_id]) if exp else []
    for run in runs:
        assert "secret-line" not in repr(run.data.tags)


def test_a_csv_error_inside_the_root_does_not_echo_a_file_that_is_no_csv(tmp_path, outside_file):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(outside_file, root / "not-a-manifest.csv")
    with pytest.raises(ValueError, match=r"missing column 'path' \(found columns: 1 column\(s\), names not shown\)") as err:
        build_source("manifest", str(root), "salt", SkipReport(), manifest="not-a-manifest.csv")
    assert "secret-line" not in str(err.value)
    (root / "ok.csv").write_text("image,label\n")
    with pytest.raises(ValueError, match=r"found columns: image, label\)"):  # a real header is still listed
        build_source("manifest", str(root), "salt", SkipReport(), manifest="ok.csv")


def test_brats_case_folders_linked_out_of_the_root_or_dangling_are_refused_and_named(embedded_root, tmp_path):
    root = tmp_path / "brats"
    shutil.copytree(embedded_root, root)
    outside = tmp_path / "outside"
    outside.mkdir()
    hgg = sorted((root / "HGG").iterdir())
    moved = outside / hgg[0].name
    shutil.move(str(hgg[0]), moved)
    os.symlink(moved, hgg[0])                        # a case folder that leads outside the root
    os.symlink(tmp_path / "gone", root / "LGG" / "dangling-case")  # a case folder that points nowhere
    report = SkipReport()
    cases = list(build_source("brats", str(root), "s", report).iter_cases())
    total = len(list((embedded_root / "HGG").iterdir())) + len(list((embedded_root / "LGG").iterdir()))
    assert len(cases) == total - 1  # the outside case refused, every other case read
    reasons = {s["item"]: s["reason"] for s in report.skipped}
    assert reasons == {f"HGG/{hgg[0].name}": "symlink leads outside the data root (refused)",
                       "LGG/dangling-case": "dangling symlink (refused)"}


def test_dicom_files_linked_out_of_the_root_or_dangling_are_refused_and_named(tmp_path):
    root = tmp_path / "root"
    folder = root / "study" / "series"
    write_series(folder, ramp_volume(depth=4, size=8))
    outside = tmp_path / "outside"
    write_series(outside, ramp_volume(depth=2, size=8), name_prefix="x", series_uid="1.2.3.4")
    os.symlink(sorted(outside.iterdir())[0], folder / "linked.dcm")
    os.symlink(tmp_path / "gone.dcm", folder / "dangling.dcm")
    report = SkipReport()
    groups = dicom.group_series(folder, report, root=root)
    assert [len(m) for m in groups.values()] == [4]  # only the four slices inside the root
    reasons = {s["item"]: s["reason"] for s in report.skipped}
    assert reasons == {"study/series/linked.dcm": "symlink leads outside the data root (refused)",
                       "study/series/dangling.dcm": "dangling symlink (refused)"}
    # the whole series folder linked from outside the root
    os.symlink(outside, root / "study" / "linked-series")
    report = SkipReport()
    assert not dicom.group_series(root / "study" / "linked-series", report, root=root)
    assert {s["reason"] for s in report.skipped} == {"symlink leads outside the data root (refused)"}
    assert len(report.skipped) == len(list(outside.iterdir()))
    assert np.isfinite(ramp_volume()).all()


def test_rsna_series_folders_linked_out_of_the_root_or_dangling_are_refused_and_named(tmp_path):
    from losslab.data.sources import run_generator

    root = tmp_path / "lumbar"
    run_generator("embedded_lumbar", str(root), seed=0)
    series = sorted(p for p in (root / "train_images").glob("*/*") if p.is_dir())
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(str(series[0]), outside / series[0].name)
    os.symlink(outside / series[0].name, series[0])  # a series folder that leads outside the root
    shutil.rmtree(series[1])
    os.symlink(tmp_path / "gone", series[1])          # a series folder that points nowhere
    report = SkipReport()
    list(build_source("rsna_lumbar", str(root), salt="s", report=report).iter_cases())
    by_item: dict[str, set[str]] = {}
    for s in report.skipped:
        by_item.setdefault(s["item"], set()).add(s["reason"].split(": ", 1)[-1])
    rel = [str(p.relative_to(root)) for p in series[:2]]
    assert by_item[rel[0]] == {"symlink leads outside the data root (refused)"}
    assert by_item[rel[1]] == {"dangling symlink (refused)"}


def test_link_guard_agrees_with_refused_link_on_every_kind_of_path(tmp_path):
    """The per-folder cache of LinkGuard gives the same verdict as the full per-path check."""
    import os

    from losslab.data.sources.base import LinkGuard, refused_link

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.dcm").write_bytes(b"x")
    (outside / "inner.dcm").write_bytes(b"x")
    (root / "a" / "plain.dcm").write_bytes(b"x")
    os.symlink(root / "a" / "plain.dcm", root / "a" / "link_in.dcm")
    os.symlink(outside / "secret.dcm", root / "a" / "link_out.dcm")
    os.symlink(root / "a" / "missing.dcm", root / "a" / "dangling.dcm")
    os.symlink(outside, root / "linked_folder")  # a folder that leads out: its files are out too
    os.symlink(root / "a", root / "folder_in")
    paths = [root / "a" / name for name in ("plain.dcm", "link_in.dcm", "link_out.dcm", "dangling.dcm")]
    paths += [root / "linked_folder" / "inner.dcm", root / "folder_in" / "plain.dcm", root / "folder_in" / "link_out.dcm"]
    guard = LinkGuard(str(root))
    verdicts = {p.name + str(p.parent.name): guard.refused(str(p)) for p in paths}
    assert verdicts == {p.name + str(p.parent.name): refused_link(str(root), str(p)) for p in paths}
    assert [v is None for v in verdicts.values()] == [True, True, False, False, False, True, False]
