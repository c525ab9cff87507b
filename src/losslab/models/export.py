"""What goes into the MLflow Model Registry: weights that cannot run code, and how to rebuild the model.

A registered losslab model is a folder (the ``losslab`` flavor of an MLflow model)::

    MLmodel                  MLflow's description (flavor ``losslab``, signature, input example)
    weights.safetensors      the model's state dict (safetensors: tensors only, nothing to execute)
    losslab_model.json       the spec our code rebuilds the model from (no pickle, no code)

The spec is plain JSON: ``{"format": 1, "kind": ..., ...}``. ``kind="classifier"`` carries the
``model`` and ``loss`` config sections, ``class_names`` and ``class_counts`` (the loss decides the
output size, e.g. K-1 for CORAL, and the classifier type, e.g. a cosine classifier for LDAM), and
``loss_state`` / ``loss_epoch``: the loss as it was when the registered weights were validated (learned
term weights, buffers, its epoch's schedule; :func:`losslab.engine.checkpoint.loss_spec`);
``kind="multimodal"`` carries the build ``spec``, ``task_classes``, ``in_chans``, the tokenizer
(``tokenizer_json``, a serialised WordPiece vocabulary) and the image ``preprocessing``. Loading reads
the spec, builds a fresh model with the library's own builders and calls ``load_state_dict(strict=True)``:
unlike a pickled module, nothing in the folder decides which code runs.

:class:`LogitsOnly` wraps a model whose ``forward`` returns a tuple so that it returns logits only;
it is what the registered model's signature describes (``x (B, N, C, H, W) -> logits (B, K)``).
This module never imports MLflow (see :mod:`losslab.tracking` for logging and the registry).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT_VERSION = 1
FLAVOR_NAME = "losslab"
WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "losslab_model.json"


class LogitsOnly(nn.Module):
    """``forward(x, mask=None, **kw) -> logits (B, K)`` around a model returning a tuple."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        out = self.model(x, mask, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class ModelFormatError(ValueError):
    """A model folder that is not a losslab model folder (missing or malformed files)."""


def save_model_dir(model: nn.Module, directory: str | Path, spec: dict[str, Any]) -> None:
    """Write ``model``'s state dict (safetensors) and ``spec`` (JSON) into ``directory``.

    Tensors are copied to CPU and made contiguous; tied weights are stored once per name (safetensors
    refuses shared storage), which ``load_state_dict`` restores exactly.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": str(FORMAT_VERSION)})
    (directory / SPEC_FILE).write_text(json.dumps({"format": FORMAT_VERSION, **spec}, indent=2, sort_keys=True))


def read_model_dir(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(spec, state dict)`` from a folder written by :func:`save_model_dir`.

    Raises:
        ModelFormatError: a file is missing, the spec is not JSON or has another format version.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise ModelFormatError(f"{directory} is not a losslab model folder: {path.name} is missing")
    try:
        spec = json.loads(spec_path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ModelFormatError(f"{spec_path} is not valid JSON") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT_VERSION:
        raise ModelFormatError(f"{spec_path}: format {spec.get('format') if isinstance(spec, dict) else None!r} "
                               f"is not {FORMAT_VERSION}")
    return spec, load_file(str(weights_path))


def multimodal_spec(model: nn.Module, in_chans: int) -> dict[str, Any]:
    """The spec of a :class:`~losslab.models.multimodal.MultiModalClassifier` built with ``in_chans``
    image channels (see the module docstring)."""
    tokenizer = getattr(model, "tokenizer", None)
    spec: dict[str, Any] = {"kind": "multimodal", "spec": model.spec, "task_classes": model.task_classes,
                            "preprocessing": getattr(model, "preprocessing", None), "in_chans": int(in_chans)}
    if tokenizer is not None and hasattr(tokenizer, "to_str"):
        spec["tokenizer_json"] = tokenizer.to_str()
    return spec


def build_multimodal_from_spec(spec: dict[str, Any]) -> nn.Module:
    """A fresh :class:`~losslab.models.multimodal.MultiModalClassifier` shaped as ``spec`` says (random
    weights; no pretrained weights are read: the state dict replaces them)."""
    from losslab.models.multimodal import build_multimodal_model
    from losslab.models.text import WordPieceTokenizer

    build = json.loads(json.dumps(spec["spec"]))
    if build.get("image"):
        build["image"] = {**build["image"], "pretrained": False, "weights_path": None}
    tokenizer = WordPieceTokenizer(spec["tokenizer_json"]) if spec.get("tokenizer_json") else None
    model = build_multimodal_model(build, spec["task_classes"], tokenizer=tokenizer, in_chans=int(spec["in_chans"]))
    if spec.get("preprocessing") is not None:
        model.preprocessing = spec["preprocessing"]
    return model
