"""Registered models in and out: the spec a model is logged with, and the one safe way to load it.

A registered losslab model is a state dict (safetensors) plus a JSON spec (see
:mod:`losslab.models.export`; the task writes it, :meth:`losslab.tasks.Task.spec`);
:func:`load_registered_model` downloads the folder, rebuilds the model through its task
(:func:`losslab.tasks.build_from_spec`) and loads the weights. A model logged by ``mlflow.pytorch`` in pickle
format (what losslab registered before) can run arbitrary code when unpickled: it is refused with
one line unless the caller opts in (``evaluate --allow-pickle`` / ``evaluate.allow_pickle: true``,
``distill.teacher.allow_pickle: true``), which only makes sense for a registry you control.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

from torch import nn

from losslab.tasks import build_from_spec
from losslab.tracking import UnsafeModelError, download_model


@dataclass
class RegisteredModel:
    """A model loaded from the registry: the full model (tuple outputs) in eval mode, its spec
    (``None`` for an opted-in pickle model) and the loss and task rebuilt from the spec."""

    model: nn.Module
    spec: dict[str, Any] | None
    loss_fn: nn.Module | None = None
    task: Any = None  # the task that built it (set up for this model), None for a pickle or multimodal model


def load_registered_model(model_uri: str, allow_pickle: bool = False) -> RegisteredModel:
    """Load ``models:/name/version`` (or ``models:/name@alias``, ``runs:/...``) safely.

    Raises:
        UnsafeModelError: a pickle-format model without ``allow_pickle``, or a format losslab
            cannot load (e.g. ``pt2``).
        losslab.models.export.ModelFormatError: a losslab folder with missing or malformed files.
        RuntimeError: weights that do not fit the rebuilt model (``load_state_dict(strict=True)``).
    """
    from losslab.models.export import read_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        local, fmt = download_model(model_uri, tmp)
        if fmt == "pickle":
            if not allow_pickle:
                raise UnsafeModelError(
                    f"{model_uri} is a pickle-format mlflow.pytorch model: loading it can run arbitrary code, so it "
                    f"is refused; re-register it with this losslab (safetensors + spec), or opt in with "
                    f"--allow-pickle (evaluate.allow_pickle=true, distill.teacher.allow_pickle=true) if you "
                    f"trust who wrote it")
            return _load_pickle(str(local))
        if fmt != "losslab":
            raise UnsafeModelError(f"{model_uri} is a {fmt} model; losslab loads only its own format (losslab flavor)")
        spec, state = read_model_dir(local)
    model, loss_fn, task = build_from_spec(spec)
    model.load_state_dict(state, strict=True)
    return RegisteredModel(model.eval(), spec, loss_fn, task)


def _load_pickle(local: str) -> RegisteredModel:
    """The explicit opt-in: MLflow's pickle loader (runs whatever the pickle names)."""
    import mlflow.pytorch

    from losslab.models.export import LogitsOnly

    loaded = mlflow.pytorch.load_model(local, map_location="cpu")
    model = loaded.model if isinstance(loaded, LogitsOnly) else loaded
    return RegisteredModel(model.eval(), None)
