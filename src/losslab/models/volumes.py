"""3D whole-volume classifiers: MONAI encoders + a linear head.

A volume batch is ``x: (B, C, D, H, W)``. :class:`VolumeClassifier` pools the encoder's features to
``(B, F)`` and returns ``(logits (B, K), None)`` (no instance attention; the ``None`` keeps the
``(logits, attention)`` convention of the other model kinds).

Encoders (registry: :func:`create_volume_encoder`, :func:`list_volume_encoders`), each returning
pooled features ``(B, F)`` and exposing ``num_features = F``:

- ``monai_resnet10/18/34/50``: ``monai.networks.nets.resnet*`` (``spatial_dims=3``,
  ``feed_forward=False``); ``F`` = 512 (2048 for resnet50).
- ``monai_densenet121/169/201``: ``monai.networks.nets.DenseNet*`` with the final linear removed.
- ``swinunetr``: the Swin transformer encoder of ``monai.networks.nets.SwinUNETR`` (``swinViT``;
  the decoder is discarded), deepest stage globally average-pooled; ``F = 16 * feature_size``.
  Spatial sizes must be divisible by 32. Needs ``einops`` (MONAI's optional dependency).

Weights come only from local files (``weights_path``), loaded non-strictly with missing/unexpected
keys logged; ``SwinUNETR`` checkpoints (keys ``swinViT.*``) load directly.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from losslab.models.backbones import UnknownBackboneError, load_non_strict, read_state_dict
from losslab.models.image import ImageClassifier

__all__ = [
    "SwinViTEncoder",
    "VolumeClassifier",
    "create_volume_encoder",
    "list_volume_encoders",
    "load_encoder_weights",
]

_logger = logging.getLogger(__name__)

_VOLUME_ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def _register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _VOLUME_ENCODERS:
            raise ValueError(f"volume encoder {name!r} is already registered")
        _VOLUME_ENCODERS[name] = fn
        return fn

    return wrap


def list_volume_encoders(filter: str = "*") -> list[str]:  # noqa: A002 - timm's argument name
    """Registered 3D encoder names matching an fnmatch pattern, sorted."""
    return sorted(n for n in _VOLUME_ENCODERS if fnmatch.fnmatch(n, filter))


def _ignore_drop_path(name: str, drop_path_rate: float) -> None:
    if drop_path_rate:
        _logger.warning("volume encoder %r has no stochastic depth; drop_path_rate=%s is ignored", name, drop_path_rate)


def _make_resnet(depth: int) -> Callable[..., nn.Module]:
    def factory(in_chans: int, drop_path_rate: float = 0.0, **kwargs: Any) -> nn.Module:
        from monai.networks.nets import resnet

        _ignore_drop_path(f"monai_resnet{depth}", drop_path_rate)
        net = getattr(resnet, f"resnet{depth}")(spatial_dims=3, n_input_channels=in_chans, feed_forward=False, **kwargs)
        net.num_features = net.in_planes  # channels after the last stage (512 * block expansion)
        return net

    return factory


def _make_densenet(depth: int) -> Callable[..., nn.Module]:
    def factory(in_chans: int, drop_path_rate: float = 0.0, **kwargs: Any) -> nn.Module:
        from monai.networks import nets

        _ignore_drop_path(f"monai_densenet{depth}", drop_path_rate)
        net = getattr(nets, f"DenseNet{depth}")(spatial_dims=3, in_channels=in_chans, out_channels=1, **kwargs)
        net.num_features = net.class_layers.out.in_features
        net.class_layers.out = nn.Identity()  # class_layers: relu -> global pool -> flatten -> (linear)
        return net

    return factory


for _depth in (10, 18, 34, 50):
    _register(f"monai_resnet{_depth}")(_make_resnet(_depth))
for _depth in (121, 169, 201):
    _register(f"monai_densenet{_depth}")(_make_densenet(_depth))


class SwinViTEncoder(nn.Module):
    """The SwinUNETR Swin encoder as a classifier backbone: ``(B, C, D, H, W) -> (B, 16 * feature_size)``.

    Runs ``swinViT(x, normalize)`` and globally average-pools the deepest stage. The attribute is
    named ``swinViT`` so SwinUNETR state dicts (``swinViT.*``) load into it unchanged.
    """

    def __init__(self, swin_vit: nn.Module, num_features: int, normalize: bool = True) -> None:
        super().__init__()
        self.swinViT = swin_vit
        self.num_features = num_features
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        deepest = self.swinViT(x, self.normalize)[-1]  # (B, 16 * feature_size, D/32, H/32, W/32)
        return deepest.mean(dim=(2, 3, 4))


@_register("swinunetr")
def _make_swinunetr(in_chans: int, drop_path_rate: float = 0.0, normalize: bool = True, **kwargs: Any) -> nn.Module:
    try:
        import einops  # noqa: F401
    except ImportError as exc:
        raise ImportError("the 'swinunetr' encoder needs einops (MONAI's optional dependency): pip install einops") from exc
    from monai.networks.nets import SwinUNETR

    kwargs.setdefault("feature_size", 24)
    net = SwinUNETR(in_channels=in_chans, out_channels=1, spatial_dims=3, dropout_path_rate=drop_path_rate, **kwargs)
    return SwinViTEncoder(net.swinViT, num_features=16 * kwargs["feature_size"], normalize=normalize)


def _densenet_final_size(n: int) -> int:
    """Spatial size after MONAI DenseNet's stem (conv k7 s2 p3, max-pool k3 s2 p1) and its three
    transitions (average pool k2 s2); 0 when a transition gets less than 2."""
    n = (n + 2 * 3 - 7) // 2 + 1
    n = (n + 2 * 1 - 3) // 2 + 1
    for _ in range(3):
        if n < 2:
            return 0
        n //= 2
    return n


def input_shape_problem(name: str, shape: tuple[int, ...]) -> str | None:
    """Why encoder ``name`` cannot take volumes of spatial ``shape`` (D, H, W), or None.

    MONAI's DenseNet pools each axis by 32 in all; an axis that becomes smaller than its average
    pool's kernel fails in the forward pass (e.g. 24 slices). The ResNets (padded convolutions) and
    the Swin encoder (pads to its windows) take any size."""
    if name.startswith("monai_densenet"):
        short = [n for n in shape if _densenet_final_size(int(n)) < 1]
        if short:
            least = next(n for n in range(1, 1024) if _densenet_final_size(n) >= 1)
            return f"its 5 reductions by 2 need at least {least} voxels on every axis (too short: {short})"
    return None


def create_volume_encoder(
    name: str,
    in_chans: int,
    pretrained: bool = False,
    weights_path: str | os.PathLike | None = None,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered 3D encoder: volumes ``(B, C, D, H, W)`` -> features ``(B, F)``.

    Args:
        name: a registered encoder (:func:`list_volume_encoders`), e.g. ``"monai_resnet10"``.
        in_chans: input channels ``C``.
        pretrained: needs ``weights_path`` (nothing is downloaded); True without it raises.
        weights_path: local state dict loaded non-strictly (shape mismatches skipped and logged).
        drop_path_rate: stochastic depth (SwinUNETR only; ignored with a warning otherwise).
        **kwargs: passed to the MONAI constructor; ``None`` values dropped.

    Raises:
        UnknownBackboneError: (a ``KeyError``) unknown ``name``; lists the known encoders, sorted.
        RuntimeError: ``pretrained=True`` without ``weights_path``.
    """
    if name not in _VOLUME_ENCODERS:
        close = difflib.get_close_matches(name, list(_VOLUME_ENCODERS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownBackboneError(f"unknown 3D backbone {name!r}{hint}; known: {', '.join(list_volume_encoders())}")
    if pretrained and weights_path is None:
        raise RuntimeError(
            f"no pretrained weights for 3D backbone {name!r} are available offline (nothing is downloaded "
            f"at run time); pass model.weights_path=<local .pth or .safetensors state dict> or set model.pretrained=false"
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    encoder = _VOLUME_ENCODERS[name](in_chans, drop_path_rate=drop_path_rate, **kwargs)
    if weights_path is not None:
        load_encoder_weights(encoder, weights_path)
    return encoder


def load_encoder_weights(encoder: nn.Module, weights_path: str | os.PathLike) -> nn.modules.module._IncompatibleKeys:
    """Load a local state dict into ``encoder`` non-strictly; skip and log shape mismatches and key misses."""
    state = read_state_dict(weights_path)
    own = encoder.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for key in skipped:
        del state[key]
    if skipped:
        _logger.warning("%s: skipped %d tensors with mismatched shapes: %s", weights_path, len(skipped), ", ".join(skipped))
    return load_non_strict(encoder, state, weights_path)


class VolumeClassifier(ImageClassifier):
    """Whole-volume classifier: ``(B, C, D, H, W) -> (logits (B, K), None)``.

    Args:
        backbone: volumes ``(B, C, D, H, W)`` -> features ``(B, F)``, with attribute ``num_features = F``.
        num_outputs: number of logits ``K``.
        dropout: dropout before the classifier (default 0.0, in [0, 1)).
        class_priors: class frequencies ``(K,)``; the classifier bias starts at ``log(pi)``.

    The same backbone -> dropout -> linear classifier as :class:`~losslab.models.image.ImageClassifier`;
    ``mask`` is accepted for a uniform call signature and ignored.
    """
