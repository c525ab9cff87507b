"""``model.kind: image``: one image -> a 2D backbone -> logits (plain image classification, no bags).

:class:`ImageClassifier` is also the base of the 3D :class:`~losslab.models.volumes.VolumeClassifier`
(the same backbone -> dropout -> linear classifier over a volume encoder).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from losslab.models.mil import init_bias_from_priors


class ImageClassifier(nn.Module):
    """Image classifier: ``(B, C, H, W) -> (logits (B, K), None)``.

    Args:
        backbone: images ``(B, C, H, W)`` -> features ``(B, F)``, with attribute ``num_features = F``
            (any timm model built with ``num_classes=0``, or ``lenet_mil``).
        num_outputs: number of logits ``K``.
        dropout: dropout before the classifier (default 0.0, in [0, 1)).
        class_priors: class frequencies ``(K,)``; the classifier bias starts at ``log(pi)``.

    Raises:
        ValueError: ``dropout`` outside [0, 1).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_outputs: int,
        dropout: float = 0.0,
        class_priors: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.num_features, num_outputs)
        init_bias_from_priors(self.classifier.bias, class_priors)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, ...) -> (B, F)``."""
        return self.backbone(x)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, None]:
        """``x (B, C, H, W)``; ``mask`` is accepted for a uniform call signature and ignored."""
        return self.classifier(self.dropout(self.forward_features(x))), None
