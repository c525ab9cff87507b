"""study: variants × folds × seeds as cells, run by workers that claim them from an Optuna RDB storage,
sequential until decided, tables from the MLflow store.

``losslab study -c configs/study/<name>.yaml [--workers N] [--storage URL] [--write-results FILE]``
(the study file: :mod:`losslab.config.study`). The command

1. checks every variant's config, opens the MLflow experiment and the study's Optuna study (creating it
   on first use; the same command on another machine, against the same storage and MLflow server,
   joins it), and refuses in one line a worker whose cache's folds (split fingerprint) or variant
   configs differ from the study's;
2. makes sure the study has one parent run (``study-<name>``, or the run ``mlflow run`` opened, or
   ``main``'s run) and queues the cells the plan needs (:mod:`losslab.pipelines.study_plan`); a re-run
   queues the cells that failed again;
3. runs the cells: in this process (``--workers 1``), or in it and N - 1 worker processes (CPU threads
   divided among them, spread over the visible GPUs; :mod:`losslab.pipelines.study_worker`), showing progress
   (:mod:`losslab.pipelines.study_progress`) until the study is complete: every planned pair decided or
   its seed budget spent;
4. logs the tables, plots and ``study.md`` to the parent run (:mod:`losslab.pipelines.study_report`),
   prints one line per planned pair and writes ``--write-results`` from the store.

Killing every worker and running the command again continues the study: finished cells are reused,
the interrupted ones resume from their last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from losslab.config.study import LoadedStudy
from losslab.pipelines.study_plan import Cell, PairOutcome, outcomes
from losslab.pipelines.study_progress import progress
from losslab.pipelines.study_report import log_report, paired_table, study_markdown, write_section
from losslab.pipelines.study_store import PARENT_ATTR, ROLE_TAG, cells_frame, search
from losslab.pipelines.study_worker import (Worker, cell_state, enqueue, open_storage, open_worker, set_if_absent,
                                            trials_by_cell, worker_id)
from losslab.redaction import redact_text
from losslab.tracking import STUDY_TAG

log = logging.getLogger(__name__)


@dataclass
class StudyResult:
    name: str
    parent_run_id: str
    complete: bool
    outcomes: list[PairOutcome]
    frame: pd.DataFrame
    paired: pd.DataFrame
    markdown: str
    failed: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # failed cell -> the reason its last trial recorded
    trained_here: int = 0  # cells completed while this command ran, by any worker, not reused
    seconds: float = 0.0


def _run_exists(run_id: str | None) -> bool:
    try:
        return bool(run_id) and MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except Exception:
        return False


def _describe_parent(run_id: str, loaded: LoadedStudy, url: str) -> None:
    """The parent's tags, params (the study's keys; the storage without its password) and ``study.yaml``."""
    spec, client = loaded.spec, MlflowClient()
    for key, value in {STUDY_TAG: spec.name, ROLE_TAG: "parent", "losslab.study_storage": redact_text(url)}.items():
        client.set_tag(run_id, key, value)
    params = {"study.name": spec.name, "study.config": str(spec.config), "study.variants": json.dumps(spec.variants),
              "study.reference": spec.reference, "study.planned": json.dumps(spec.planned_pairs),
              "study.folds": json.dumps(spec.fold_list), "study.seeds": json.dumps(spec.seed_list),
              "study.budget_seeds": str(spec.budget), "study.metrics": json.dumps([m.model_dump() for m in spec.metrics]),
              "study.split": spec.split, "study.alpha": str(spec.alpha),
              "study.overrides": redact_text(json.dumps([*spec.overrides, *loaded.overrides]))}
    try:
        for key, value in params.items():
            client.log_param(run_id, key, value[:6000])
    except Exception as exc:  # a parent adopted from `mlflow run` may hold other values: keep them
        log.info("study parameters not logged again on run %s: %s", run_id, exc)
    shown = redact_text(yaml.safe_dump(spec.model_dump(mode="json") | {"command_line_overrides": loaded.overrides},
                                       sort_keys=False))
    client.log_text(run_id, shown, "study.yaml")


def _wait_for_parent(study: Any, seconds: float = 30.0) -> str | None:
    """A worker that did not create the study gives its creator time to record the parent run."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if study.user_attrs.get(PARENT_ATTR):
            return study.user_attrs[PARENT_ATTR]
        time.sleep(0.5)
    return None


def ensure_parent(worker: Worker, url: str, adopt: str | None, created: bool = True) -> str:
    """The study's one parent run: the one it records, else one tagged as its parent, else ``adopt``
    (``main``'s run, the run ``mlflow run`` opened), else a new ``study-<name>``. A run adopted by a
    later command that is not the parent points to it (tag ``losslab.study_run``)."""
    study, spec, client = worker.study, worker.spec, MlflowClient()
    parent = study.user_attrs.get(PARENT_ATTR) or (None if created else _wait_for_parent(study))
    if not _run_exists(parent):
        found = search(worker.experiment_id, spec.name, "parent", status=None)
        mine = found[0].info.run_id if found else adopt or client.create_run(
            worker.experiment_id, run_name=f"study-{spec.name}", tags={"losslab.entry_point": "study"}).info.run_id
        if parent is None:
            recorded = set_if_absent(worker.storage, study, PARENT_ATTR, mine)
        else:  # the recorded parent was deleted
            study.set_user_attr(PARENT_ATTR, mine)
            recorded = mine
        if recorded != mine and not found and not adopt:
            client.delete_run(mine)  # another worker's parent won the race
        parent = recorded
        _describe_parent(parent, worker.loaded, url)
    if adopt and adopt != parent:
        client.set_tag(adopt, "losslab.study_run", parent)
        client.set_tag(adopt, "mlflow.note.content", f"Continued study `{spec.name}`: its tables are on run {parent}.")
    return parent


def _gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return [v.strip() for v in visible.split(",") if v.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]


def run_processes(loaded: LoadedStudy, url: str, worker: Worker, n: int, threads: int | None) -> list[str]:
    """N workers on this study: this process and N - 1 spawned ones (start-up is an import of torch,
    MLflow and the models per process: this one has paid it); CPU threads divided among them, GPUs shared
    round robin (this process the first). Waits for all; returns their worker ids. A worker that dies
    leaves its cell to the others."""
    import multiprocessing

    from losslab.pipelines.study_spawn import worker_process

    per_worker = threads or max(1, len(os.sched_getaffinity(0)) // n)
    devices = _gpus()
    payload = {"path": loaded.path, "spec": loaded.spec.model_dump(mode="json"), "overrides": loaded.overrides,
               "storage": url, "tracking_uri": mlflow.get_tracking_uri(), "parent_id": worker.parent_id,
               "threads": per_worker}
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=worker_process, name=f"study-worker-{i}",
                             args=(payload | {"cuda_device": devices[i % len(devices)] if devices else None},))
             for i in range(1, n)]
    for proc in procs:
        proc.start()
    try:
        _run_here(worker, per_worker)
        for proc in procs:
            proc.join()
    except BaseException:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(timeout=60)
        raise
    for proc in procs:
        if proc.exitcode:
            log.warning("study worker %s (pid %s) exited with %s", proc.name, proc.pid, proc.exitcode)
    return [worker_id()] + [f"{socket.gethostname()}:{proc.pid}" for proc in procs]


def _retry_failed(worker: Worker) -> None:
    failed = [Cell(ts[0].user_attrs["variant"], int(ts[0].user_attrs["fold"]), int(ts[0].user_attrs["seed"]))
              for ts in trials_by_cell(worker.study).values() if cell_state(ts) == "failed"]
    if enqueue(worker.study, failed, retry_failed=True):
        log.info("study %s: %d failed cell(s) queued again", worker.spec.name, len(failed))


def _run_here(worker: Worker, threads: int | None) -> None:
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        worker.run()
    finally:
        torch.set_num_threads(before)


def run_study(loaded: LoadedStudy, workers: int | None = None, storage: str | None = None,
              parent_run_id: str | None = None, threads: int | None = None, write_results: str | None = None,
              show_progress: bool = True) -> StudyResult:
    """Run (or continue, or join) the study of ``loaded``; see the module docstring."""
    t0 = time.perf_counter()
    worker, url = open_worker(loaded, storage)
    active = mlflow.active_run()
    worker.parent_id = ensure_parent(worker, url, parent_run_id or (active.info.run_id if active else None),
                                     worker.created)
    _retry_failed(worker)
    worker.advance()  # the first cells, or those a killed worker left to queue
    n = workers or loaded.spec.workers
    before = {t.number for t in worker.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"}
    with progress(lambda: open_storage(url, loaded, worker.experiment_id), loaded.spec.name, show_progress):
        if n == 1:
            _run_here(worker, threads)
        else:
            run_processes(loaded, url, worker, n, threads)
    result = finish(worker, write_results, before)
    result.seconds = time.perf_counter() - t0
    print_result(result)
    return result


def finish(worker: Worker, write_results: str | None = None, before: set[int] | None = None) -> StudyResult:
    """The study's tables from the store, logged to its parent (and ``write_results``); the parent ends
    FINISHED once the study is complete (unless it is the run of this process: its owner ends it)."""
    spec = worker.spec
    complete = worker.advance()
    frame = cells_frame(spec, worker.experiment_id)
    decided = outcomes(spec, frame)
    paired = paired_table(spec, frame)
    by_cell = trials_by_cell(worker.study)
    failed = sorted(k for k, ts in by_cell.items() if cell_state(ts) == "failed")
    errors = {k: by_cell[k][-1].user_attrs.get("error", "no reason recorded") for k in failed}
    markdown = study_markdown(spec, frame, decided, paired, failed)
    log_report(worker.parent_id, spec, frame, decided, paired, markdown)
    active = mlflow.active_run()
    if complete and (active is None or active.info.run_id != worker.parent_id):
        MlflowClient().set_terminated(worker.parent_id, "FAILED" if failed else "FINISHED")
    if write_results:
        write_section(write_results, spec.name, markdown)
    trained = sum(1 for ts in by_cell.values() for t in ts if t.state.name == "COMPLETE"
                  and t.number not in (before or set()) and not t.user_attrs.get("reused"))
    return StudyResult(spec.name, worker.parent_id, complete, decided, frame, paired, markdown, failed, errors, trained)


class CellsFailed(RuntimeError):
    """Cells of a study failed: the tables miss them (the next run of the command queues them again)."""


def failure_line(result: StudyResult) -> str:
    """One line: how many cells failed, and the first one's reason."""
    first = result.failed[0]
    return (f"study {result.name}: {len(result.failed)} cell(s) failed ({', '.join(result.failed)}); {first}: "
            f"{result.errors.get(first, 'no reason recorded')}; the tables miss them (run the command again "
            "to retry them)")


def print_result(result: StudyResult) -> None:
    state = "complete" if result.complete else "not complete (cells left: run the command again)"
    print(f"study {result.name}: {state}; {len(result.frame)} cell(s) in the tables, {result.trained_here} trained "
          f"while this command ran ({result.seconds:.1f} s); parent run {result.parent_run_id} (study.md)", flush=True)
    for outcome in result.outcomes:
        print("  " + outcome.line(), flush=True)
    if result.failed:
        for key in result.failed:
            print(f"  failed cell {key}: {result.errors.get(key, '')} (queued again by the next run of the command)",
                  flush=True)


__all__ = ["CellsFailed", "StudyResult", "ensure_parent", "failure_line", "finish", "print_result", "run_processes", "run_study"]
