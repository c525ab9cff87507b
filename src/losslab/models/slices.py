"""2.5D classification of slice stacks (the RSNA lumbar plan): shared 2D backbone + slice weights.

A stack batch is ``x: (B, S, C, H, W)`` (``S`` neighbouring slices around a labelled level, each with
``C`` channels), an optional ``mask: (B, S)`` (bool, ``True`` = real slice) and an optional
``level: (B,)`` (long, the spinal level index, ``0 <= level < num_levels``).

:class:`SliceStackClassifier`:

1. per-slice features ``f_s = backbone(x_s)`` ``(B, S, D)`` (one backbone pass on ``B*S`` images);
2. slice weights ``w = softmax_s(theta_s)`` over valid slices, with one learnable logit per slice
   position initialised to ``theta_s = -|s - (S - 1) / 2|`` so the centre slice starts heaviest;
3. ``z = sum_s w_s f_s`` ``(B, D)``, concatenated with a learned level embedding ``e(level)``
   ``(B, level_embed_dim)`` (zeros when ``level`` is None);
4. ``logits = W dropout([z, e]) + b`` ``(B, K)``, with ``b = log(pi)`` when class priors are given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from losslab.models.mil import init_bias_from_priors, masked_softmax

__all__ = ["SliceStackClassifier", "centre_slice_logits"]


def centre_slice_logits(num_slices: int) -> Tensor:
    """Initial slice-position logits ``(S,)``: ``-|s - (S - 1) / 2|`` (largest at the centre)."""
    positions = torch.arange(num_slices, dtype=torch.float32)
    return -(positions - (num_slices - 1) / 2).abs()


class SliceStackClassifier(nn.Module):
    """2.5D classifier: shared backbone per slice, learnable centre-favouring slice weights, level embedding.

    Args:
        backbone: images ``(M, C, H, W)`` -> features ``(M, D)``, with attribute ``num_features = D``.
        num_outputs: number of logits ``K``.
        num_slices: slices per stack ``S`` (default 5); must match the data.
        num_levels: number of spinal levels (default 5); 0 disables the level embedding.
        level_embed_dim: level embedding width (default 256); 0 disables it.
        dropout: dropout before the classifier (default 0.0, in [0, 1)).
        class_priors: class frequencies ``(K,)``; the classifier bias starts at ``log(pi)``.

    ``forward(x (B, S, C, H, W), mask (B, S) bool | None = None, level (B,) long | None = None)
    -> (logits (B, K), slice_weights (B, S))``; ``slice_weights`` are 0 on masked slices and sum to 1.

    Raises:
        ValueError: a size < 1 (``num_slices``), a negative size, or dropout outside [0, 1);
            in ``forward``, a stack whose ``S`` differs from ``num_slices``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_outputs: int,
        num_slices: int = 5,
        num_levels: int = 5,
        level_embed_dim: int = 256,
        dropout: float = 0.0,
        class_priors: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if num_slices < 1 or num_outputs < 1:
            raise ValueError(f"num_slices and num_outputs must be >= 1, got num_slices={num_slices}, num_outputs={num_outputs}")
        if num_levels < 0 or level_embed_dim < 0:
            raise ValueError(f"num_levels and level_embed_dim must be >= 0, got {num_levels}, {level_embed_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.backbone = backbone
        self.num_slices = num_slices
        self.slice_logits = nn.Parameter(centre_slice_logits(num_slices))
        self.use_levels = num_levels > 0 and level_embed_dim > 0
        self.level_embed_dim = level_embed_dim if self.use_levels else 0
        self.level_embedding = nn.Embedding(num_levels, level_embed_dim) if self.use_levels else None
        if self.level_embedding is not None:
            nn.init.normal_(self.level_embedding.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.num_features + self.level_embed_dim, num_outputs)
        init_bias_from_priors(self.classifier.bias, class_priors)

    def forward_features(self, x: Tensor) -> Tensor:
        """Per-slice features: ``(B, S, C, H, W) -> (B, S, D)``; one backbone pass on ``B*S`` images."""
        batch, num_slices = x.shape[:2]
        return self.backbone(x.reshape(batch * num_slices, *x.shape[2:])).reshape(batch, num_slices, -1)

    def forward(self, x: Tensor, mask: Tensor | None = None, level: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch, num_slices = x.shape[:2]
        if num_slices != self.num_slices:
            raise ValueError(f"got stacks of {num_slices} slices but the model was built with num_slices={self.num_slices} (model.head_kwargs.num_slices)")
        features = self.forward_features(x)  # (B, S, D)
        if mask is None:
            mask = torch.ones(batch, num_slices, dtype=torch.bool, device=x.device)
        scores = self.slice_logits.unsqueeze(0).expand(batch, -1).to(features.dtype)
        slice_weights = masked_softmax(scores, mask.to(device=x.device, dtype=torch.bool))  # (B, S)
        pooled = torch.einsum("bs,bsd->bd", slice_weights, features)
        if self.level_embedding is not None:
            if level is None:
                embedded = pooled.new_zeros(batch, self.level_embed_dim)
            else:
                embedded = self.level_embedding(level.to(device=x.device, dtype=torch.long).reshape(batch)).to(pooled.dtype)
            pooled = torch.cat([pooled, embedded], dim=1)
        return self.classifier(self.dropout(pooled)), slice_weights
