"""What goes into the MLflow Model Registry: a classifier that returns logits only.

MIL models return ``(logits, attention[, aux])``; MLflow's pyfunc serving expects one tensor. The
registered model wraps the trained model so that ``forward(x (B, N, C, H, W)) -> logits (B, K)``
(all instances valid), while ``.model`` keeps the full model (attention included) for analysis.
"""

from __future__ import annotations

import torch
from torch import nn


class LogitsOnly(nn.Module):
    """``forward(x, mask=None, **kw) -> logits (B, K)`` around a model returning a tuple."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        out = self.model(x, mask, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out
