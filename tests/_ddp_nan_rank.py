"""``torchrun ... tests/_ddp_nan_rank.py train -c cfg.yaml``: the losslab CLI with one more loss,
``nan_on_rank_one`` (cross-entropy whose second training forward on rank 1 only returns NaN), for
tests/test_ddp.py: a NaN on one rank must stop every rank with the same one line."""

from __future__ import annotations

import os
import sys

import torch

from losslab.losses.classification import CrossEntropyLoss
from losslab.losses.registry import register_loss


@register_loss("nan_on_rank_one")
class NanOnRankOne(CrossEntropyLoss):
    """Cross-entropy; on rank 1 the second forward with gradients is NaN (the other ranks stay finite)."""

    training_calls = 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = super().forward(logits, target)
        if torch.is_grad_enabled() and os.environ.get("RANK") == "1":
            type(self).training_calls += 1
            if type(self).training_calls == 2:
                return loss * float("nan")
        return loss


if __name__ == "__main__":
    from losslab.cli import run

    sys.exit(run(sys.argv[1:]))
