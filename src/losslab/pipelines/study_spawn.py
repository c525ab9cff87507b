"""The entry point of a study worker process started by ``losslab study --workers N``.

Kept free of heavy imports: the process picks its GPU (``CUDA_VISIBLE_DEVICES``) before torch is
imported, and asks the kernel to send it SIGTERM when the process that started it dies (Linux), so a
killed ``losslab study`` leaves no worker behind (SIGTERM stops the cell's run KILLED, its checkpoint
uploaded, and the cell is queued again at once).
"""

from __future__ import annotations

import os
import signal
import sys


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def worker_process(payload: dict) -> None:
    """Run one worker of the study described by ``payload`` (see :func:`losslab.pipelines.study_worker.join_study`)."""
    if payload.get("cuda_device") is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(payload["cuda_device"])
    _die_with_parent()
    import logging

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {os.getpid()} %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from losslab.termination import Terminated, sigterm_raises

    try:
        with sigterm_raises():
            from losslab.pipelines.study_worker import join_study

            join_study(payload)
    except Terminated:
        sys.exit(143)
