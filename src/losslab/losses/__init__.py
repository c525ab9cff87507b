"""losslab.losses: the loss registry and every registered loss.

``build_loss(name, **params)`` builds a loss by name (see :mod:`losslab.losses.registry`);
``list_losses("*focal*")`` lists names. Every loss is a :class:`LossBase`. Importing this package
imports each loss module explicitly, which registers its losses.
"""

from .base import LossBase, LossReduction, class_weights_from_counts
from .registry import UnknownLossError, build_loss, get_loss_class, list_losses, register_loss

from . import classification  # noqa: E402,F401  (registers ce, focal, ldam, ...)
from .classification import NormedLinear

__all__ = [
    "LossBase",
    "LossReduction",
    "NormedLinear",
    "UnknownLossError",
    "build_loss",
    "class_weights_from_counts",
    "get_loss_class",
    "list_losses",
    "register_loss",
]
