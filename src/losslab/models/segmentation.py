"""Segmentation networks (MONAI): ``unet``, ``segresnet``, ``swinunetr``, in 2D or 3D.

``build_segmentation_model(backbone, spatial_dims, in_chans, num_outputs, **kwargs)`` returns a
:class:`SegmentationNet`: ``forward(x (B, C, *spatial), mask=None) -> logits (B, K, *spatial)``
where ``*spatial`` is ``(H, W)`` in 2D and ``(H, W, D)`` in 3D (MONAI's channel-first layout).
``kwargs`` (``model.backbone_kwargs``) go to the MONAI constructor and override the defaults below,
which are sized for small patches (32³); an argument the constructor does not take is refused with
its name. SwinUNETR needs every side of the input divisible by 32, and in training more than one
voxel at its bottleneck (e.g. 64 × 64 × 32 patches, not 32³).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["SegmentationNet", "build_segmentation_model", "list_segmentation_backbones"]


def _unet(spatial_dims: int, in_channels: int, out_channels: int, **kw: Any) -> nn.Module:
    from monai.networks.nets import UNet

    args = dict(channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1) | kw
    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **args)


def _segresnet(spatial_dims: int, in_channels: int, out_channels: int, **kw: Any) -> nn.Module:
    from monai.networks.nets import SegResNet

    args = dict(init_filters=8, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)) | kw
    return SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **args)


def _swinunetr(spatial_dims: int, in_channels: int, out_channels: int, **kw: Any) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    args = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)) | kw
    return SwinUNETR(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **args)


_BACKBONES: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "unet": (_unet, "monai.networks.nets.UNet"),
    "segresnet": (_segresnet, "monai.networks.nets.SegResNet"),
    "swinunetr": (_swinunetr, "monai.networks.nets.SwinUNETR"),
}


def list_segmentation_backbones() -> list[str]:
    return sorted(_BACKBONES)


class SegmentationNet(nn.Module):
    """A MONAI segmentation network with the losslab call ``forward(x, mask=None)``.

    ``x (B, C, *spatial) -> logits (B, K, *spatial)``; ``mask`` is ignored (bag models take one).
    """

    def __init__(self, net: nn.Module, spatial_dims: int) -> None:
        super().__init__()
        self.net = net
        self.spatial_dims = int(spatial_dims)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


def build_segmentation_model(backbone: str, spatial_dims: int, in_chans: int, num_outputs: int,
                             **kwargs: Any) -> SegmentationNet:
    """The MONAI network ``backbone`` with ``num_outputs`` output channels.

    Raises:
        KeyError: unknown ``backbone`` (the message lists the known ones).
        TypeError: a key in ``kwargs`` the MONAI constructor does not take (named, with the accepted ones).
    """
    if backbone not in _BACKBONES:
        raise KeyError(f"unknown segmentation model.backbone {backbone!r}; known: "
                       f"{', '.join(list_segmentation_backbones())}")
    factory, target = _BACKBONES[backbone]
    import importlib

    module, _, name = target.rpartition(".")
    accepted = set(inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(f"model.backbone_kwargs: {', '.join(unknown)} not accepted by {target}; it accepts: "
                        f"{', '.join(sorted(accepted - {'self'}))}")
    net = factory(int(spatial_dims), int(in_chans), int(num_outputs), **kwargs)
    return SegmentationNet(net, spatial_dims)
