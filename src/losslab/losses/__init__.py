"""losslab.losses: the loss registry and every registered loss.

``build_loss(name, **params)`` builds a loss by name (see :mod:`losslab.losses.registry`);
``list_losses("*focal*")`` lists names. Every loss is a :class:`LossBase`. Importing this package
imports each loss module explicitly, which registers its losses.
"""

from .base import LossBase, LossReduction, class_weights_from_counts
from .registry import (UnknownLossError, UnknownLossParamError, build_loss, check_loss_params, get_loss_class, list_losses,
                       register_loss)

from . import classification  # noqa: E402,F401  (registers ce, focal, ldam, ...)
from . import ordinal  # noqa: E402,F401  (coral, corn)
from . import segmentation  # noqa: E402,F401  (dice, dice_ce, tversky, focal_tversky, focal_seg, boundary, ...)
from . import compound  # noqa: E402,F401  (compound)
from . import distillation  # noqa: E402,F401  (kd, combined, rkd, crd, mmd)
from .classification import NormedLinear
from .segmentation import signed_distance_map

__all__ = [
    "LossBase",
    "LossReduction",
    "NormedLinear",
    "UnknownLossError",
    "UnknownLossParamError",
    "build_loss",
    "check_loss_params",
    "class_weights_from_counts",
    "get_loss_class",
    "list_losses",
    "register_loss",
    "signed_distance_map",
]
