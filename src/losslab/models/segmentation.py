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

    def __init__(self, net: nn.Module, spatial_dims: int, num_outputs: int) -> None:
        super().__init__()
        self.net = net
        self.spatial_dims = int(spatial_dims)
        self.num_outputs = int(num_outputs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)

    def output_bias(self) -> nn.Parameter:
        """The bias of the network's last layer: the last convolution (in registration order, which for
        UNet, SegResNet and SwinUNETR is the output layer) with a bias and as many output channels as
        the logits have."""
        convs = [m for m in self.net.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.bias is not None
                 and m.out_channels == self.num_outputs]
        if not convs:
            raise ValueError(f"{type(self.net).__name__} has no output convolution with a bias to start at the prior")
        return convs[-1].bias

    def init_output_bias(self, fractions: list[float], sigmoid: bool) -> None:
        """Start the logits at the prior of each channel, as the classification heads do (the segmentation
        analogue of ``init_bias_from_priors``; RetinaNet's prior init, Lin et al. 2017): the log-odds of
        each region's voxel fraction (sigmoid), or the log of each class's fraction (softmax). At zero
        bias every voxel starts at p = 0.5, and a Dice-type loss spends its first epochs (on the embedded
        cohort, most of 30) removing false positives from the 98 % of voxels that are background."""
        from losslab.models.mil import init_bias_from_priors

        bias = self.output_bias()
        if len(fractions) != bias.numel() or not all(0 < f < 1 for f in fractions):
            raise ValueError(f"output bias prior: {len(fractions)} fraction(s) in (0, 1) needed for "
                             f"{bias.numel()} output channel(s), got {fractions}")
        if not sigmoid:
            init_bias_from_priors(bias, fractions)
            return
        with torch.no_grad():
            for r, f in enumerate(fractions):  # each region is its own two-class prior (1 − f, f)
                init_bias_from_priors(bias[r:r + 1], (1 - f, f))


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
    return SegmentationNet(net, spatial_dims, num_outputs)
