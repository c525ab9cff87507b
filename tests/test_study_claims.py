"""The study's records that workers race to write (the parent run, each data setting's split fingerprint,
the variants' configs) are set once: of several workers writing at the same moment, every one reads back
the first one's value, on a real SQLite Optuna storage (before: check-then-set, so a later writer
overwrote the value an earlier worker had already trained against, or the storage raised)."""

from __future__ import annotations

import multiprocessing

import pytest

KEYS = 12


def _race(url: str, barrier, me: int, out) -> None:
    import optuna

    from losslab.pipelines.study_worker import set_if_absent

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    study = optuna.load_study(study_name="race", storage=storage)
    got = []
    for k in range(KEYS):
        barrier.wait()
        got.append(set_if_absent(storage, study, f"fingerprint:{k}", f"worker-{me}"))
    out.put((me, got))


def test_racing_workers_all_read_the_first_value(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    optuna.create_study(study_name="race", storage=url)
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(4), context.Queue()
    procs = [context.Process(target=_race, args=(url, barrier, me, out)) for me in range(4)]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert all(proc.exitcode == 0 for proc in procs)
    stored = optuna.load_study(study_name="race", storage=url).user_attrs
    for k in range(KEYS):
        seen = {results[me][k] for me in range(4)}
        assert seen == {stored[f"fingerprint:{k}"]}, (k, seen, stored[f"fingerprint:{k}"])


def test_in_memory_storage_keeps_the_first_value():
    import optuna

    from losslab.pipelines.study_worker import set_if_absent

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    assert set_if_absent(storage, study, "k", 1) == 1
    assert set_if_absent(storage, study, "k", 2) == 1
    assert study.user_attrs["k"] == 1


@pytest.mark.parametrize("older", [{"abc": "70d1d45c06c1"}])
def test_a_study_with_the_earlier_dict_of_fingerprints_is_still_read(older):
    from types import SimpleNamespace

    import optuna

    from losslab.config import ConfigError, load_config
    from losslab.pipelines.study_worker import FINGERPRINT_ATTR, Worker, data_key

    cfg = load_config(None)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    study.set_user_attr(FINGERPRINT_ATTR, {data_key(cfg): "70d1d45c06c1"})
    worker = SimpleNamespace(study=study, storage=storage, spec=SimpleNamespace(name="s"))
    assert Worker.check_split(worker, cfg, SimpleNamespace(split_fingerprint="70d1d45c06c1")) == "70d1d45c06c1"
    with pytest.raises(ConfigError, match="this worker's folds differ from the study's"):
        Worker.check_split(worker, cfg, SimpleNamespace(split_fingerprint="000000000000"))
