"""``lenet_mil``: the LeNet-style instance encoder of Ilse et al.'s MNIST-bags experiments, as a timm model.

Reimplementation of the feature extractor in the authors' code (github.com/AMLab-Amsterdam/
AttentionDeepMIL, ``model.py``) for:
    Attention-based Deep Multiple Instance Learning. M. Ilse, J. M. Tomczak, M. Welling.
    ICML 2018, arXiv:1802.04712.

``conv(20, 5) - ReLU - maxpool 2 - conv(50, 5) - ReLU - maxpool 2 - flatten - fc 500 - ReLU``;
images ``(B, C, H, W)`` (28x28 in the paper; ``img_size`` sets another square size) -> features
``(B, 500)``. Registered with ``timm.models.register_model`` so ``model.backbone: lenet_mil`` works
for every model kind that takes a 2D backbone (MIL heads, ``image``). It has no pretrained weights.
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model
from torch import Tensor, nn


class LeNetEncoder(nn.Module):
    """LeNet-5-style encoder with a timm-like interface (``num_features``, ``forward_features``,
    ``forward_head``, ``reset_classifier``); ``num_classes=0`` returns the 500-d features."""

    def __init__(self, in_chans: int = 1, num_classes: int = 0, img_size: int = 28, feature_dim: int = 500,
                 **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"lenet_mil got unexpected arguments {sorted(kwargs)}; it accepts in_chans, "
                            "num_classes, img_size, feature_dim")
        side = ((img_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"lenet_mil: img_size={img_size} is too small (needs >= 16)")
        self.num_features = int(feature_dim)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 20, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2, stride=2),
            nn.Conv2d(20, 50, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2, stride=2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(50 * side * side, self.num_features), nn.ReLU())
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, 500)``."""
        return self.fc(self.features(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def lenet_mil(pretrained: bool = False, **kwargs: Any) -> LeNetEncoder:
    """Ilse et al.'s MNIST-bags instance encoder (500-d features)."""
    if pretrained:
        raise ValueError("lenet_mil has no pretrained weights; set model.pretrained=false")
    for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory plumbing
        kwargs.pop(timm_only, None)
    return LeNetEncoder(**kwargs)
