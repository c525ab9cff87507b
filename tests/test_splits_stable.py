"""Folds that are the same on every machine, caches that two workers can build at once, a segmentation
model scored after its raw data is gone, and shipped configs that never train on generated data by typo.

Folds: two fresh caches of the same data with no salt set (so two random salts) put every patient in the
same fold and have equal split fingerprints; a different ``data.seed`` changes both. Patients are
matched across the two caches through their salted hashes, recomputed here from each cache's ``.salt``.
"""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """16 embedded BraTS-layout cases (8 HGG, 8 LGG) of 24 x 24 x 8 voxels, grades in folders, masks beside."""
    from _data_factories import generate_embedded_brats

    return generate_embedded_brats(tmp_path_factory, "stable", seed=11, num_cases=16, hgg_ratio=1.0, shape=(24, 24, 8))


@pytest.fixture(autouse=True)
def _no_salt_in_env(monkeypatch):
    monkeypatch.delenv("LOSSLAB_SALT", raising=False)


def _data_cfg(root: Path, cache_dir: Path, **extra):
    from losslab.config import DataConfig

    return DataConfig(root=str(root), cache_dir=str(cache_dir), num_folds=3, test_fraction=0.25, **extra)


def _seg_encoder():
    from losslab.data.cache import SegmentationEncoder
    from losslab.schema import SegConfig

    return SegmentationEncoder.from_config(SegConfig())


def _names_by_case_id(cache_dir: Path, names: list[str], case_id_of) -> dict[str, str]:
    """Each case id of this cache -> its raw name, through the salted hash this cache's own salt gives it."""
    from losslab.data.deid import salted_hash

    salt = (cache_dir / ".salt").read_text().strip()
    return {salted_hash(case_id_of(name), salt): name for name in names}


def _classification_folds(cache_dir: Path, names: list[str]) -> dict[str, int]:
    by_id = _names_by_case_id(cache_dir, names, lambda name: name)
    index = pd.read_parquet(cache_dir / "index.parquet")
    return {by_id[c]: int(f) for c, f in zip(index["case_id"], index["fold"])}


def _case_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*/*") if p.is_dir())


def test_two_fresh_caches_of_the_same_data_put_every_patient_in_the_same_fold(cohort, tmp_path):
    from losslab.data.cache import build_cache

    names = _case_names(cohort)
    first = build_cache(_data_cfg(cohort, tmp_path / "a"))
    second = build_cache(_data_cfg(cohort, tmp_path / "b"))
    salts = {(tmp_path / d / ".salt").read_text() for d in ("a", "b")}
    assert len(salts) == 2  # two random salts: the case ids differ...
    assert set(first.index["case_id"]).isdisjoint(second.index["case_id"])
    folds_a, folds_b = _classification_folds(tmp_path / "a", names), _classification_folds(tmp_path / "b", names)
    assert len(folds_a) == len(names) == 16
    assert folds_a == folds_b  # ...and every patient is in the same fold
    assert (np.array(list(folds_a.values())) == -1).sum() == 4  # 25 % held out
    assert first.split_fingerprint == second.split_fingerprint and len(first.split_fingerprint) == 12
    # the fingerprint is the one of the (split key, fold) pairs, recomputed here from the raw names
    import hashlib

    pairs = sorted((hashlib.sha256(f"losslab-split:{n}".encode()).hexdigest()[:16], f) for n, f in folds_a.items())
    assert first.split_fingerprint == hashlib.sha256(repr(pairs).encode()).hexdigest()[:12]
    assert "split_key" not in first.index.columns  # the unsalted key never reaches the index
    # another data.seed draws other folds, and says so
    third = build_cache(_data_cfg(cohort, tmp_path / "c", seed=1))
    assert third.split_fingerprint != first.split_fingerprint
    assert _classification_folds(tmp_path / "c", names) != folds_a


def test_two_fresh_segmentation_caches_put_every_patient_in_the_same_fold(cohort, tmp_path):
    from losslab.data.cache import build_cache

    items = {f"{p.parent.name}/{p.name}" for p in cohort.glob("*/*") if p.is_dir()}
    folds = []
    for name in ("a", "b"):
        info = build_cache(_data_cfg(cohort, tmp_path / name), encoder=_seg_encoder())
        by_id = _names_by_case_id(tmp_path / name, sorted(items), lambda item: f"seg:brats:{item}")
        folds.append({by_id[r["case_id"]]: r["fold"] for r in info.index})
        assert "split_key" not in info.index[0]
    assert (tmp_path / "a" / ".salt").read_text() != (tmp_path / "b" / ".salt").read_text()
    assert folds[0] == folds[1] and len(folds[0]) == 16
    one = build_cache(_data_cfg(cohort, tmp_path / "a"), encoder=_seg_encoder())
    two = build_cache(_data_cfg(cohort, tmp_path / "b"), encoder=_seg_encoder())
    assert one.reused and two.reused and one.split_fingerprint == two.split_fingerprint
    other = build_cache(_data_cfg(cohort, tmp_path / "c", seed=4), encoder=_seg_encoder())
    assert other.split_fingerprint != one.split_fingerprint


def _build_in_worker(kind: str, root: str, cache_dir: str, barrier, queue) -> None:
    from losslab.data.cache import build_cache

    cfg = _data_cfg(Path(root), Path(cache_dir))
    barrier.wait()
    try:
        info = build_cache(cfg) if kind == "cases" else build_cache(cfg, encoder=_seg_encoder())
        ids = sorted(info.index["case_id"]) if kind == "cases" else sorted(r["case_id"] for r in info.index)
        queue.put((info.split_fingerprint, ids, bool(info.reused)))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put(("error", repr(exc), False))


@pytest.mark.parametrize("kind", ["cases", "segmentation"])
def test_two_workers_building_one_fresh_cache_at_once_share_one_salt_and_one_build(kind, cohort, tmp_path):
    """Two processes start building the same fresh cache folder at the same instant (no salt set):
    one builds, the other waits and reuses it; both see the same case ids, and every array is intact."""
    from losslab.data.cache import load_cache

    context = multiprocessing.get_context("fork")
    barrier, queue = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_build_in_worker, args=(kind, str(cohort), str(tmp_path / "cache"), barrier, queue))
               for _ in range(2)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    assert all(r[0] != "error" for r in results), results
    assert results[0][:2] == results[1][:2]
    assert sorted(r[2] for r in results) == [False, True]  # one built, the other reused that build
    reopened = load_cache(tmp_path / "cache", check_hashes=True) if kind == "cases" else \
        load_cache(tmp_path / "cache", check_hashes=True, encoder=_seg_encoder())
    ids = sorted(reopened.index["case_id"]) if kind == "cases" else sorted(r["case_id"] for r in reopened.index)
    assert ids == results[0][1]
    assert [p.name for p in (tmp_path / "cache").glob(".salt*")] == [".salt"]


def test_a_segmentation_model_is_scored_after_its_raw_data_is_gone(cohort, tmp_path, monkeypatch):
    """Train a segmentation model, delete the raw volumes, evaluate the run: the intact cache is read as
    it is (no rebuild, no missing-raw-data error) and the test Dice equals the one train logged."""
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from losslab.cli import app

    root = tmp_path / "raw"
    shutil.copytree(cohort, root)
    monkeypatch.chdir(tmp_path)
    args = ["train", "-c", str(REPO / "configs" / "experiment" / "seg_dice.yaml")]
    for o in (f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_folds=2", "data.test_fraction=0.25",
              "data.salt=raw-gone", "data.batch_size=2", "seg.patch_size=[16, 16, 8]", "seg.samples_per_case=1",
              "train.epochs=1", f"train.checkpoint_dir={tmp_path / 'ckpt'}", "tracking.experiment=seg-raw-gone",
              "tracking.registered_model_name=test-seg-raw-gone"):
        args += ["-o", o]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    run_id = next(l for l in result.output.splitlines() if l.startswith("fold 0: FINISHED")).split(" run ")[1].split()[0]
    trained = MlflowClient().get_run(run_id).data.metrics
    shutil.rmtree(root)
    monkeypatch.setenv("LOSSLAB_SALT", "raw-gone")
    result = CliRunner().invoke(app, ["evaluate", "-m", run_id])
    assert result.exit_code == 0, (result.output, result.exception)
    scored = MlflowClient().get_run(result.output.split("evaluate run ")[1].split(":")[0]).data.metrics
    assert scored["test/mean_dice"] == pytest.approx(trained["test/mean_dice"], abs=1e-6)
    assert not root.exists()


def _shipped_configs() -> list[Path]:
    return sorted((REPO / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("config", _shipped_configs(), ids=lambda p: p.stem)
def test_a_mistyped_data_root_never_trains_on_generated_data(config, tmp_path, monkeypatch):
    """Every shipped experiment config with ``data.root`` pointing at a path that does not exist: the cache
    build refuses in one line naming the path, and writes nothing there."""
    from losslab.config import load_config
    from losslab.data.sources import source_reads_root
    from losslab.tasks import task_of

    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "my_data" / "BraTS2020_TrainingDta"
    cfg = load_config(config, [f"data.root={typo}", f"data.cache_dir={tmp_path / 'cache'}"])
    if not source_reads_root(cfg.data.source):
        pytest.skip(f"{cfg.data.source} reads no data root (its data ship in a package)")
    with pytest.raises(FileNotFoundError, match="BraTS2020_TrainingDta does not exist"):
        task_of(cfg).build_cache(cfg)
    assert not typo.exists()
