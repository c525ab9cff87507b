"""SIGTERM (what schedulers, ``kill`` and ``docker stop`` send) as an exception.

Without a handler Python dies on SIGTERM at once: no ``finally``, no checkpoint upload, and the
MLflow run stays RUNNING with no reason. :func:`sigterm_raises` turns the signal into
:class:`Terminated`, a ``BaseException`` like ``KeyboardInterrupt``: the training loop uploads its
checkpoints (``on_exception``) and :func:`losslab.tracking.managed_run` ends the run KILLED with the
reason. (Under torchrun, :func:`losslab.engine.distributed.distributed_context` replaces it with its
own handler, since there SIGTERM means another rank failed.)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(BaseException):
    """The process got SIGTERM; a run it ends is KILLED (stopped from outside), not FAILED."""


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise Terminated("got SIGTERM (stopped from outside: a scheduler, `kill` or `docker stop`)")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` in the main thread; the previous handler
    is restored afterwards. A no-op outside the main thread (signals are delivered there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
