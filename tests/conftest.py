"""Shared fixtures: a real SQLite MLflow store per test session, a small embedded BraTS cohort,
and a factory for fast experiment configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("LOSSLAB_CONFIG_ROOT", str(REPO / "configs"))
os.environ["LOSSLAB_TRACKING_STRICT"] = "1"  # tracking errors raise in tests instead of warning
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # several test processes share the cores (pytest-xdist): one torch thread each (and in the processes
    # they start), instead of every process's pool fighting over every core
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's addopts): one test process per core, at most 4 (each holds its own small
    cohort, cache and MLflow store, and the slow tests start processes of their own)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def pytest_collection_modifyitems(config, items) -> None:
    """The files with slow tests first (stable: a file's tests stay together and in order), so that under
    ``--dist loadfile`` the longest files start at once instead of ending the run alone."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str:
    """A real MLflow tracking store (SQLite file) for the whole test session."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory) -> Path:
    """A small embedded BraTS cohort: 30 cases, 48×48×16 voxels (same generator as the demo)."""
    from _data_factories import generate_embedded_brats

    return generate_embedded_brats(tmp_path_factory, "data", seed=3, num_cases=30, shape=(48, 48, 16))


@pytest.fixture(scope="session")
def small_cache(embedded_root, tmp_path_factory):
    """The preprocessed cache of the small cohort (3 folds)."""
    from losslab.config import DataConfig
    from losslab.data.cache import build_cache

    cache_dir = tmp_path_factory.mktemp("cache")
    cfg = DataConfig(root=str(embedded_root), cache_dir=str(cache_dir), num_folds=3, salt="test-salt")
    return build_cache(cfg)


@pytest.fixture
def make_config(embedded_root, small_cache, tmp_path, mlflow_store):
    """Factory: a fast ExperimentConfig on the small cohort; keyword overrides as dotted strings."""
    from losslab.config import load_config

    def _make(*overrides: str, experiment: str = "tests"):
        base = [
            f"data.root={embedded_root}",
            f"data.cache_dir={small_cache.cache_dir}",
            "data.num_folds=3",
            "data.salt=test-salt",
            "data.bag_size=4",
            "data.batch_size=4",
            "model.backbone=test_resnet",
            "model.head_kwargs={hidden_dim: 16}",
            "train.epochs=2",
            "train.seed=0",
            f"train.checkpoint_dir={tmp_path / 'ckpt'}",
            f"tracking.experiment={experiment}",
            "tracking.registered_model_name=test-model",
            "optim.lr=0.003",
        ]
        return load_config(None, base + list(overrides))

    return _make


@pytest.fixture(autouse=True)
def _session_tracking_uri(mlflow_store):
    """Every test starts on the session store: a test that points MLflow at a store of its own
    (e.g. the de-identification scan) must not leak that global setting into the next test."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_store)
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_store
    yield
    if mlflow.active_run() is not None:  # a failed test must not leave a run open for the next one
        mlflow.end_run(status="FAILED")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that changes torch's thread count (the reproduction scripts run in-process set it to 1)
    must not change it for the tests after it: a float reduction over 1 thread and over 2 differs in
    the last bits, and the resume test compares an in-process run with a subprocess to 1e-6."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
