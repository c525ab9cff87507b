"""Progress of a study, read from its Optuna storage (so it sees every worker, on every machine): cells
done / planned so far, failed, an ETA (the mean time of the cells trained so far × the cells left ÷ the
workers running), and per worker its current cell and epoch. On a terminal a ``rich`` live table on
stderr; otherwise one line on stderr whenever something changes (a cell starts or ends, an epoch ends).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Iterator


def snapshot(study: Any) -> dict:
    """``{done, failed, planned, running: [(worker, cell, epoch, epochs)], eta_s}`` of a study's cells."""
    trials = [t for t in study.get_trials(deepcopy=False) if "cell" in t.user_attrs
              and not t.user_attrs.get("duplicate_of")]
    keys = {t.user_attrs["cell"] for t in trials}
    done = {t.user_attrs["cell"] for t in trials if t.state.name == "COMPLETE"}
    failed = {t.user_attrs["cell"] for t in trials if t.state.name == "FAIL"} - done - \
        {t.user_attrs["cell"] for t in trials if t.state.name in ("WAITING", "RUNNING")}
    running = sorted((t.user_attrs.get("worker", "?"), t.user_attrs["cell"], int(t.user_attrs.get("epoch", 0)),
                      int(t.user_attrs.get("epochs", 0))) for t in trials if t.state.name == "RUNNING")
    trained = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
               if t.state.name == "COMPLETE" and not t.user_attrs.get("reused") and t.datetime_start]
    left = len(keys) - len(done) - len(failed)
    eta = (sum(trained) / len(trained)) * left / max(1, len(running)) if trained and left else None
    return {"done": len(done), "failed": len(failed), "planned": len(keys), "running": running, "eta_s": eta}


def describe(name: str, snap: dict) -> str:
    eta = "" if snap["eta_s"] is None else f", ETA {snap['eta_s']:.0f} s"
    failed = f" ({snap['failed']} failed)" if snap["failed"] else ""
    head = f"study {name}: {snap['done']}/{snap['planned']} cells done{failed}{eta}"
    workers = [f"{w} {cell} " + (f"epoch {e}/{n}" if n else "starting") for w, cell, e, n in snap["running"]]
    return head + ("  |  " + "; ".join(workers) if workers else "")


def _render(name: str, snap: dict):
    from rich.table import Table

    table = Table(title=describe(name, {**snap, "running": []}), title_justify="left")
    for column in ("worker", "cell", "epoch"):
        table.add_column(column)
    for worker, cell, epoch, epochs in snap["running"]:
        table.add_row(worker, cell, f"{epoch}/{epochs}" if epochs else "starting")
    return table


def _watch(storage_factory, name: str, stop: threading.Event, interval: float) -> None:
    import optuna

    study = None
    last = None
    live = None
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.live import Live

        live = Live(console=Console(stderr=True), refresh_per_second=2, transient=True)
        live.start()
    try:
        while not stop.wait(interval):
            with contextlib.suppress(Exception):  # a busy database: try again at the next tick
                study = study or optuna.load_study(study_name=name, storage=storage_factory())
                snap = snapshot(study)
                if live is not None:
                    live.update(_render(name, snap))
                elif describe(name, {**snap, "eta_s": None}) != last:
                    last = describe(name, {**snap, "eta_s": None})
                    print(describe(name, snap), file=sys.stderr, flush=True)
    finally:
        if live is not None:
            live.stop()


@contextlib.contextmanager
def progress(storage_factory, name: str, enabled: bool = True, interval: float = 2.0) -> Iterator[None]:
    """Show the study's progress while the block runs (a daemon thread polling the storage)."""
    if not enabled:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_watch, args=(storage_factory, name, stop, interval), daemon=True,
                              name="study-progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


__all__ = ["describe", "progress", "snapshot"]
