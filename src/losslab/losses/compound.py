"""``compound``: a weighted sum of registered losses, with fixed, learnable-softmax or uncertainty weights."""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .base import LossBase, check_choice, check_number
from .registry import UnknownLossError, UnknownLossParamError, build_loss, register_loss

__all__ = ["CompoundLoss", "WEIGHTINGS"]

WEIGHTINGS = ("fixed", "learnable_softmax", "uncertainty")


def _forward_kwargs(module: nn.Module) -> set[str] | None:
    """Names of the keyword arguments ``module.forward`` takes beyond the first two; None = any (``**kw``)."""
    params = list(inspect.signature(module.forward).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _unique_term_names(names: list[str]) -> list[str]:
    """Each term's key: its loss name, a repeated name suffixed ``_2``, ``_3``, …"""
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return keys


@register_loss("compound")
class CompoundLoss(LossBase):
    """A weighted sum of any registered losses ("terms").

    ``L = Σ_i w_i L_i`` where each ``L_i`` is built with :func:`build_loss` from a dict
    ``{"name": ..., "weight": w_i, <that loss's parameters>}``; ``class_counts``, ``num_classes`` and
    ``reduction`` are passed through to every term that accepts them. Weighting:

    * ``fixed``: ``w_i`` as given.
    * ``learnable_softmax``: ``w = softmax(θ)`` with learnable logits θ initialised to ``log(w / Σ w)``
      (so the initial weights are the given ones, normalised to sum to 1; they must be > 0). Note that
      minimising ``Σ softmax(θ)_i L_i`` on the training loss itself moves weight towards the smallest
      term; use it with a small learning rate or as an ablation.
    * ``uncertainty``: Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
      Scene Geometry and Semantics", CVPR 2018, arXiv:1705.07115: ``L = Σ_i e^{−s_i} L_i + s_i / 2``
      with learnable ``s_i = log σ_i²``, initialised to ``−log w_i`` (weights > 0); ``weights()`` reports
      ``e^{−s_i}``.

    Learnable weights are ``nn.Parameter``s (the pipeline adds ``loss.parameters()`` to the optimizer).
    ``forward(*args, **kwargs)`` passes the positional args to every term and each keyword argument
    (e.g. ``dist_maps``) only to the terms whose ``forward`` accepts it. ``terms()`` returns each term's
    last value (reduced, unweighted), ``weights()`` the current weights, both keyed by term name (a
    repeated name gets ``_2``, ``_3``, …). ``str(loss)`` renders the formula. ``family``, ``output_dim``,
    ``probabilities`` and ``predict`` come from the terms (which must agree on family and head size);
    ``on_epoch_start`` is forwarded to every term.

    Args:
        terms: non-empty list of dicts, each with ``name`` (a registered loss), optional ``weight``
            (default 1.0, ≥ 0; > 0 for learnable weightings) and that loss's parameters.
        weighting: ``fixed`` (default) | ``learnable_softmax`` | ``uncertainty``.
        class_counts / num_classes: passed to the terms that accept them.
        reduction: ``mean`` | ``sum`` | ``none`` (passed to every term; a term may override it).

    Raises:
        ValueError: empty ``terms``, a term without ``name``, bad weights, unknown weighting, terms of
            different families or head sizes; a term's own errors are re-raised prefixed with its position.
        TypeError: ``terms`` not a list of dicts; a term's unknown parameter.
        UnknownLossError: a term's unknown name.

    >>> import torch
    >>> z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    >>> one = CompoundLoss(terms=[{"name": "ce", "weight": 1.0}])
    >>> torch.allclose(one(z, y), torch.nn.functional.cross_entropy(z, y))
    True
    >>> print(CompoundLoss(terms=[{"name": "ce", "weight": 0.7}, {"name": "focal", "weight": 0.3}]))
    0.7·ce + 0.3·focal

    YAML (``configs/loss/compound_seg.yaml``)::

        name: compound
        weighting: learnable_softmax
        terms:
          - {name: dice, weight: 0.5}
          - {name: focal_seg, weight: 0.3, alpha: 0.25, gamma: 2}
          - {name: boundary, weight: 0.2}
    """

    def __init__(
        self,
        terms: Sequence[Mapping[str, Any]] | None = None,
        weighting: str = "fixed",
        class_counts: Sequence[float] | None = None,
        num_classes: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        self.weighting = check_choice(self.name, "weighting", weighting, WEIGHTINGS)
        if terms is None or isinstance(terms, (str, Mapping)) or not isinstance(terms, Sequence):
            raise TypeError(f"loss {self.name!r}: terms must be a list of dicts like "
                            f"[{{'name': 'ce', 'weight': 0.5}}, ...], got {type(terms).__name__} {terms!r}")
        if len(terms) == 0:
            raise ValueError(f"loss {self.name!r}: terms must not be empty")
        built = [self._build_term(i, spec, class_counts, num_classes, reduction) for i, spec in enumerate(terms)]
        modules = [term for _, term, _ in built]
        self._check_terms_agree(modules, num_classes)
        self.family = modules[0].family  # type: ignore[misc]
        self.head = modules[0].head  # type: ignore[misc]
        self.term_names = _unique_term_names([name for name, _, _ in built])
        self.losses = nn.ModuleList(modules)
        self._forward_kwargs = [_forward_kwargs(m) for m in modules]
        w = torch.tensor([weight for _, _, weight in built], dtype=torch.float32)
        if self.weighting == "fixed":
            self.register_buffer("fixed_weights", w)
        elif self.weighting == "learnable_softmax":
            self.weight_logits = nn.Parameter((w / w.sum()).log())
        else:
            self.log_vars = nn.Parameter(-w.log())

    def _build_term(self, i: int, spec: Any, class_counts: Sequence[float] | None, num_classes: int | None,
                    reduction: str) -> tuple[str, LossBase, float]:
        """``terms[i]`` -> ``(its loss name, the built loss, its weight)``; a term's own errors are
        re-raised prefixed with its position."""
        if not isinstance(spec, Mapping):
            raise TypeError(f"loss {self.name!r}: terms[{i}] must be a dict with a 'name', got {spec!r}")
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"loss {self.name!r}: terms[{i}] needs a 'name' (a registered loss), got {spec!r}")
        weight = check_number(self.name, f"terms[{i}].weight", params.pop("weight", 1.0), minimum=0.0,
                              min_inclusive=self.weighting == "fixed")
        params.setdefault("reduction", reduction)
        try:
            term = build_loss(name, class_counts=class_counts, num_classes=num_classes, **params)
        except UnknownLossError as exc:
            raise UnknownLossError(f"loss {self.name!r}: terms[{i}]: {exc}") from None
        except UnknownLossParamError as exc:  # keep the unknown names for the caller
            raise UnknownLossParamError(f"loss {self.name!r}: terms[{i}] ({name!r}): {exc}", exc.params) from None
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"loss {self.name!r}: terms[{i}] ({name!r}): {exc}") from None
        return name, term, weight

    def _check_terms_agree(self, modules: list[LossBase], num_classes: int | None) -> None:
        """Every term of one family and one head size."""
        families = {m.family for m in modules}
        if len(families) > 1:
            raise ValueError(f"loss {self.name!r}: terms mix loss families {sorted(families)}; all terms must "
                             f"share one family")
        k = num_classes if num_classes is not None else 3
        dims = {m.output_dim(k) for m in modules}
        if len(dims) > 1:
            raise ValueError(f"loss {self.name!r}: terms need different head sizes {sorted(dims)} for {k} classes "
                             f"(e.g. coral with ce); all terms must share one head")

    # ---------------------------------------------------------------- weights
    def current_weights(self) -> torch.Tensor:
        """The weights ``(num_terms,)`` applied now (with autograd for learnable weightings)."""
        if self.weighting == "fixed":
            return self.fixed_weights
        if self.weighting == "learnable_softmax":
            return torch.softmax(self.weight_logits, dim=0)
        return torch.exp(-self.log_vars)

    def weights(self) -> dict[str, float]:
        values = self.current_weights().detach().cpu().tolist()
        return dict(zip(self.term_names, map(float, values)))

    # ---------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        weights = self.current_weights()
        total = None
        values = {}
        for i, (key, term, accepted) in enumerate(zip(self.term_names, self.losses, self._forward_kwargs)):
            kw = kwargs if accepted is None else {k: v for k, v in kwargs.items() if k in accepted}
            value = term(*args, **kw)
            values[key] = value
            part = weights[i].to(value.dtype) * value
            if self.weighting == "uncertainty":
                part = part + 0.5 * self.log_vars[i].to(value.dtype)
            total = part if total is None else total + part
        self.record_terms(**values)
        return total

    # ---------------------------------------------------------------- delegation
    def on_epoch_start(self, epoch: int) -> None:
        for term in self.losses:
            term.on_epoch_start(epoch)

    def output_dim(self, num_classes: int) -> int:
        return self.losses[0].output_dim(num_classes)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return self.losses[0].probabilities(logits)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return self.losses[0].predict(logits)

    def __str__(self) -> str:
        w = self.weights()
        if self.weighting == "uncertainty":
            parts = " + ".join(f"exp(-s_{k})·{k}" for k in self.term_names)
            regs = " + ".join(f"s_{k}" for k in self.term_names)
            now = ", ".join(f"exp(-s_{k})={v:.4g}" for k, v in w.items())
            return f"{parts} + ({regs})/2  [{now}]"
        return " + ".join(f"{_fmt(v)}·{k}" for k, v in w.items())

    def extra_repr(self) -> str:
        return f"weighting={self.weighting!r}, reduction={self.reduction!r}"


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)
