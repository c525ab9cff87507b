"""Registered models in and out: the spec a model is logged with, and the one safe way to load it.

A registered losslab model is a state dict (safetensors) plus a JSON spec (see
:mod:`losslab.models.export`); :func:`load_registered_model` downloads the folder, rebuilds the model
with the library's builders and loads the weights. A model logged by ``mlflow.pytorch`` in pickle
format (what losslab registered before) can run arbitrary code when unpickled: it is refused with
one line unless the caller opts in (``evaluate --allow-pickle`` / ``evaluate.allow_pickle: true``,
``distill.teacher.allow_pickle: true``), which only makes sense for a registry you control.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

from torch import nn

from losslab.config import ExperimentConfig
from losslab.tracking import UnsafeModelError, download_model


@dataclass
class RegisteredModel:
    """A model loaded from the registry: the full model (tuple outputs) in eval mode, its spec
    (``None`` for an opted-in pickle model) and, for a classifier, the loss rebuilt from the spec."""

    model: nn.Module
    spec: dict[str, Any] | None
    loss_fn: nn.Module | None = None


def classifier_spec(cfg: ExperimentConfig, class_names: list[str], class_counts: list[int]) -> dict[str, Any]:
    """The spec of a train run's model: what :func:`losslab.pipelines.train.build_components` needs
    (the ``model`` and ``loss`` sections and the training class counts) plus the class names."""
    return {"kind": "classifier", "model": cfg.model.model_dump(mode="json"),
            "loss": cfg.loss.model_dump(mode="json"), "class_names": list(class_names),
            "class_counts": [int(c) for c in class_counts]}


def segmentation_spec(cfg: ExperimentConfig, channel_names: list[str]) -> dict[str, Any]:
    """The spec of a segmentation run's model: the ``model``, ``loss`` and ``seg`` sections and the
    output channel names (regions, or classes with background first)."""
    return {"kind": "segmentation", "model": cfg.model.model_dump(mode="json"), "loss": cfg.loss.model_dump(mode="json"),
            "seg": cfg.seg.model_dump(mode="json"), "channel_names": list(channel_names)}


def build_from_spec(spec: dict[str, Any]) -> tuple[nn.Module, nn.Module | None]:
    """``(model, loss or None)`` with random weights, shaped as ``spec`` says; no pretrained weights
    are read (the registered state dict replaces them)."""
    from losslab.models.export import ModelFormatError, build_multimodal_from_spec

    if spec.get("kind") == "multimodal":
        return build_multimodal_from_spec(spec), None
    if spec.get("kind") == "classifier":
        from losslab.pipelines.train import build_components

        model_section = {**spec["model"], "pretrained": False, "weights_path": None}
        cfg = ExperimentConfig.model_validate({"model": model_section, "loss": spec["loss"]})
        loss_fn, model = build_components(cfg, list(spec["class_counts"]))
        return model, loss_fn
    if spec.get("kind") == "segmentation":
        from losslab.pipelines.seg_train import build_seg_task

        cfg = ExperimentConfig.model_validate({"model": spec["model"], "loss": spec["loss"], "seg": spec["seg"]})
        task, model = build_seg_task(cfg, list(spec["channel_names"]))
        return model, task.loss_fn
    raise ModelFormatError(f"unknown model kind {spec.get('kind')!r} in the model's spec")


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
    model, loss_fn = build_from_spec(spec)
    model.load_state_dict(state, strict=True)
    return RegisteredModel(model.eval(), spec, loss_fn)


def _load_pickle(local: str) -> RegisteredModel:
    """The explicit opt-in: MLflow's pickle loader (runs whatever the pickle names)."""
    import mlflow.pytorch

    from losslab.models.export import LogitsOnly

    loaded = mlflow.pytorch.load_model(local, map_location="cpu")
    model = loaded.model if isinstance(loaded, LogitsOnly) else loaded
    return RegisteredModel(model.eval(), None)
