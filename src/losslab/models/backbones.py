"""2D backbones: any timm model as a pooled feature extractor, with local pretrained weights.

``create_backbone(name, in_chans)`` returns the timm model built with ``num_classes=0``, so that
``backbone(x)`` maps images ``(B, C, H, W)`` to pooled features ``(B, D)`` with
``D = backbone.num_features``. Nothing is downloaded at run time:

- ``weights_path`` (a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` state dict, e.g. saved from a
  3-channel ImageNet model with its classifier) is loaded non-strictly: classifier keys are dropped,
  the input convolution is adapted to ``in_chans`` with :func:`timm.models.adapt_input_conv`
  (channels repeated and scaled by ``3 / in_chans``; summed when ``in_chans == 1``) and missing or
  unexpected keys are logged;
- ``pretrained=True`` without a path reads the local Hugging Face / timm cache only
  (``HF_HUB_OFFLINE=1`` around the call) and raises a :class:`RuntimeError` if it is not there.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from losslab.models import lenet as _lenet  # noqa: F401  registers lenet_mil with timm

__all__ = [
    "UnknownBackboneError",
    "create_backbone",
    "load_backbone_weights",
    "read_state_dict",
]

_logger = logging.getLogger(__name__)

# Keys under which checkpoints commonly nest the state dict.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


class UnknownBackboneError(KeyError):
    """A backbone name that neither timm nor the 3D encoder registry knows."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


def create_backbone(
    name: str,
    in_chans: int,
    pretrained: bool = False,
    weights_path: str | os.PathLike | None = None,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """Build a timm model as a feature extractor: images ``(B, C, H, W)`` -> features ``(B, D)``.

    Args:
        name: any timm model name (``timm.list_models()``), e.g. ``"resnet18"``, ``"convnext_tiny"``,
            or ``"lenet_mil"`` (:mod:`losslab.models.lenet`, registered with timm).
        in_chans: input channels ``C`` (e.g. 4 MRI sequences).
        pretrained: load weights from the local HF/timm cache when ``weights_path`` is not given.
        weights_path: a local state dict (``.pth``/``.pt``/``.bin``/``.safetensors``); takes
            precedence over ``pretrained``.
        drop_path_rate: stochastic depth rate passed to timm (only when > 0, so models without the
            argument still build with the default).
        **kwargs: extra timm model arguments; ``None`` values are dropped (model default kept).

    Returns:
        The timm model with ``num_classes=0``; ``backbone.num_features`` is ``D``, the width of the
        pooled output.

    Raises:
        UnknownBackboneError: (a ``KeyError``) ``name`` is not a timm model; close matches listed.
        FileNotFoundError: ``weights_path`` does not exist.
        RuntimeError: ``pretrained=True``, no ``weights_path``, and no weights in the local cache.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UnknownBackboneError(f"unknown backbone {name!r} (not a timm model){hint}")
    model_kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model_kwargs.update(num_classes=0, in_chans=in_chans)
    if drop_path_rate:
        model_kwargs["drop_path_rate"] = drop_path_rate

    if weights_path is None and pretrained:
        model = _create_from_local_cache(name, model_kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **model_kwargs)
        if weights_path is not None:
            load_backbone_weights(model, weights_path, in_chans=in_chans)

    # The pooled output (what forward() returns with num_classes=0) is `head_hidden_size` wide for
    # the few timm models with a pre-logits conv/MLP (e.g. MobileNetV3); expose it as num_features.
    pooled_dim = getattr(model, "head_hidden_size", None) or model.num_features
    if pooled_dim != model.num_features:
        model.num_features = pooled_dim
    return model


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` (environment and the already-imported hub constant) for a block."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = None
    old_const = None
    with contextlib.suppress(ImportError):
        from huggingface_hub import constants  # type: ignore[no-redef]

        old_const = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
        if constants is not None:
            constants.HF_HUB_OFFLINE = old_const


def _create_from_local_cache(name: str, model_kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(pretrained=True)`` with the hub forced offline; clear error on failure."""
    with _hf_offline():
        try:
            return timm.create_model(name, pretrained=True, **model_kwargs)
        except Exception as exc:  # hub / torch.hub errors vary by version and by source
            raise RuntimeError(
                f"no pretrained weights for backbone {name!r} are available offline (the local "
                f"Hugging Face / timm cache has none and nothing is downloaded at run time); pass "
                f"model.weights_path=<local .pth or .safetensors state dict> or set "
                f"model.pretrained=false. Cause: {type(exc).__name__}: {exc}"
            ) from exc


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only``), unwrapped.

    Nested checkpoints (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped and a
    DataParallel ``module.`` prefix is stripped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no mapping of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights_path {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, Mapping):
        nested = next((state[k] for k in _NESTED_STATE_KEYS if isinstance(state.get(k), Mapping)), None)
        if nested is None or any(isinstance(v, torch.Tensor) for v in state.values()):
            break
        state = nested
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights_path {str(path)!r} holds no state dict of tensors")
    out = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def _as_tuple(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def load_backbone_weights(
    model: nn.Module, weights_path: str | os.PathLike, in_chans: int | None = None
) -> nn.modules.module._IncompatibleKeys:
    """Load a local state dict into a timm backbone, non-strictly, and log what did not match.

    Steps: drop the classifier keys (``pretrained_cfg["classifier"]``); adapt the input convolution
    (``pretrained_cfg["first_conv"]``, or any 4D weight whose shapes differ only in input channels)
    from the file's channel count to the model's with :func:`timm.models.adapt_input_conv`; drop
    other tensors whose shape differs from the model's; ``load_state_dict(strict=False)``.

    Args:
        model: a timm model (built with ``num_classes=0``).
        weights_path: a ``.pth``/``.pt``/``.bin``/``.safetensors`` state dict.
        in_chans: the model's input channels (default: read from the stem weight).

    Returns:
        torch's ``(missing_keys, unexpected_keys)`` result of the load.
    """
    state = read_state_dict(weights_path)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    own = model.state_dict()

    classifiers = _as_tuple(cfg.get("classifier"))
    dropped = [k for k in state if any(k == c or k.startswith(c + ".") for c in classifiers)]
    for k in dropped:
        del state[k]
    if dropped:
        _logger.info("%s: dropped %d classifier keys (%s)", weights_path, len(dropped), ", ".join(dropped))

    stems = {c + ".weight" for c in _as_tuple(cfg.get("first_conv"))}
    mismatched = []
    for key, value in list(state.items()):
        target = own.get(key)
        if target is None or target.shape == value.shape:
            continue
        only_in_channels = value.ndim == 4 and target.ndim == 4 and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]
        if only_in_channels and (key in stems or not stems):
            chans = in_chans if in_chans is not None else target.shape[1]
            state[key] = adapt_input_conv(chans, value, base_chans=value.shape[1])
            _logger.info("%s: adapted %s from %d to %d input channels", weights_path, key, value.shape[1], chans)
        else:
            mismatched.append(f"{key} {tuple(value.shape)} vs model {tuple(target.shape)}")
            del state[key]
    if mismatched:
        _logger.warning("%s: skipped %d tensors with mismatched shapes: %s", weights_path, len(mismatched), "; ".join(mismatched))

    return load_non_strict(model, state, weights_path)


def load_non_strict(model: nn.Module, state: dict[str, torch.Tensor], weights_path: str | os.PathLike
                    ) -> nn.modules.module._IncompatibleKeys:
    """``load_state_dict(strict=False)`` and log the missing and unexpected keys (shared by 2D and 3D)."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        _logger.warning("%s: %d missing keys (left at init): %s", weights_path, len(result.missing_keys), ", ".join(result.missing_keys))
    if result.unexpected_keys:
        _logger.warning("%s: %d unexpected keys (ignored): %s", weights_path, len(result.unexpected_keys), ", ".join(result.unexpected_keys))
    return result
