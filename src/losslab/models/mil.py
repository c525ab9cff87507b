"""Multiple-instance learning: a shared 2D backbone over the instances of a bag, and pooling heads.

Shapes
------
A bag batch is ``x: (B, N, C, H, W)`` with ``mask: (B, N)`` (bool, ``True`` = real instance,
``False`` = padding). :class:`MILClassifier` runs the backbone once on all ``B*N`` instances
(flattened to ``(B*N, C, H, W)``; padded ones too, so shapes stay static) and hands the per-instance
features ``(B, N, D)`` and the mask to a head. Every head returns::

    logits: (B, K)          bag logits
    attention: (B, N)       instance weights, exactly 0 on padded instances, summing to 1 per bag

and ``dual_stream`` alone returns a third element (see below). Padded instances never influence
the logits in eval mode. (In train mode a BatchNorm backbone's batch statistics include the padded
instances; pad with zeros or use a norm without batch statistics if that matters.)

Heads (registry: :func:`build_mil_head`, :func:`list_mil_heads`)
-----------------------------------------------------------------
- ``mean``: ``z = mean_i h_i`` over valid instances; ``attention`` is uniform, ``1/n``.
- ``max``: ``z_d = max_i h_id`` (element-wise over feature dims); ``attention_i`` is the fraction
  of the ``D`` feature dimensions whose maximum comes from instance ``i`` (one-hot when a single
  instance wins every dimension).
- ``attention`` (Ilse et al. 2018): ``a = softmax_i(w^T tanh(V h_i))``, ``z = sum_i a_i h_i``.
- ``gated_attention`` (Ilse et al. 2018): ``a = softmax_i(w^T (tanh(V h_i) * sigm(U h_i)))``.
- ``topk``: per-instance logits ``s_i = W h_i + b``; ``logits_k`` is the mean of the top ``k``
  instance logits of class ``k`` (``k`` capped at the number of valid instances; ``k = N`` equals
  mean pooling of instance logits). ``attention`` is uniform over the top-``k`` instances of the
  predicted class.
- ``dual_stream`` (DSMIL, Li et al. 2021): an instance classifier gives ``s_i = W_s h_i`` ``(B,N,K)``;
  per class ``c`` the critical instance is ``m_c = argmax_i s_ic`` and the max stream is
  ``s_{m_c, c}``. Queries ``q_i = Q(h_i)`` are L2-normalised (``normalize_queries=True``) and the
  attention of class ``c`` is ``A_ic = softmax_i(<q_i, q_{m_c}> / temperature)``; with
  ``normalize_queries=False`` the paper's ``<q_i, q_{m_c}> / sqrt(d_q)`` (further divided by
  ``temperature``) is used, which does not guarantee the critical instance the largest weight.
  The bag stream classifies the class-wise bag embeddings ``b_c = sum_i A_ic h_i`` with a
  ``Conv1d(K, K, kernel_size=D)`` as in the paper. ``forward`` returns the 3-tuple::

      (logits, attention, {"stream_logits": [max_stream_logits, bag_stream_logits],
                           "instance_logits": (B, N, K),
                           "class_attention": (B, K, N), "critical_index": (B, K)})

  where ``logits = (max_stream_logits + bag_stream_logits) / 2`` and ``attention`` is the
  ``class_attention`` row of the predicted class. The training loss is the mean of the loss on
  each of the two streams (paper, eq. 6); the engine computes it from ``stream_logits``.

Every head takes ``class_priors``: when given, the classifier bias starts at ``log(pi)`` (the
prior log-odds), so an untrained model predicts the class frequencies rather than uniform ones.

References:
    Ilse, Tomczak, Welling. "Attention-based Deep Multiple Instance Learning." ICML 2018,
    arXiv:1802.04712.
    Li, Li, Eliceiri. "Dual-stream Multiple Instance Learning Network for Whole Slide Image
    Classification with Self-supervised Contrastive Learning." CVPR 2021, arXiv:2011.08939.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionHead",
    "DualStreamHead",
    "GatedAttentionHead",
    "MILClassifier",
    "MILHead",
    "MaxHead",
    "MeanHead",
    "TopKHead",
    "UnknownMILHeadError",
    "build_mil_head",
    "check_mil_head_kwargs",
    "init_bias_from_priors",
    "list_mil_heads",
    "masked_softmax",
    "register_mil_head",
]

_MIL_HEADS: dict[str, type[MILHead]] = {}

H = TypeVar("H", bound=type)


class UnknownMILHeadError(KeyError):
    """An unknown MIL head name; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def register_mil_head(arg: H | str | None = None, *, key: str | None = None) -> H | Callable[[H], H]:
    """Register a head class: ``@register_mil_head``, ``@register_mil_head("name")`` or ``(key=)``.

    The name defaults to the class attribute ``name``. The class is returned unchanged.

    Raises:
        ValueError: the name is already registered.
    """

    def _register(cls: H, name: str | None) -> H:
        name = name or getattr(cls, "name", None) or cls.__name__
        if name in _MIL_HEADS:
            raise ValueError(f"MIL head {name!r} is already registered ({_MIL_HEADS[name].__qualname__})")
        _MIL_HEADS[name] = cls  # type: ignore[assignment]
        return cls

    if isinstance(arg, type):
        return _register(arg, key)
    return lambda cls: _register(cls, arg or key)


def list_mil_heads(filter: str = "*") -> list[str]:  # noqa: A002 - timm's argument name
    """Registered head names matching an fnmatch pattern, sorted."""
    return sorted(n for n in _MIL_HEADS if fnmatch.fnmatch(n, filter))


def _head_class(name: str) -> type[MILHead]:
    try:
        return _MIL_HEADS[name]
    except KeyError:
        raise UnknownMILHeadError(f"unknown MIL head {name!r}; known heads: {', '.join(sorted(_MIL_HEADS))}") from None


def check_mil_head_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Validate a head name and its keyword arguments without building it.

    Raises:
        UnknownMILHeadError: (a ``KeyError``) unknown ``name``; lists the known heads, sorted.
        TypeError: an argument the head does not take; names the head, the argument and the
            accepted ones.
    """
    cls = _head_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "in_dim", "num_outputs")]
    for arg in kwargs:
        if arg not in accepted:
            raise TypeError(f"MIL head {name!r} got an unexpected argument {arg!r}; it accepts: {', '.join(accepted)}")


def build_mil_head(name: str, in_dim: int, num_outputs: int, **kwargs: Any) -> MILHead:
    """Build a registered head over features ``(B, N, in_dim)`` giving logits ``(B, num_outputs)``.

    ``None`` kwargs are dropped (the head's default is kept).

    Raises:
        UnknownMILHeadError: (a ``KeyError``) unknown ``name``; lists the known heads, sorted.
        TypeError: an argument the head does not take (names head and argument).
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    check_mil_head_kwargs(name, kwargs)
    return _head_class(name)(in_dim, num_outputs, **kwargs)


# ----------------------------------------------------------------------------------------- helpers
def init_bias_from_priors(bias: Tensor, class_priors: Sequence[float] | None) -> None:
    """Set a classifier bias ``(K,)`` to ``log(pi)`` (priors normalised to sum 1), in place.

    With ``K == 1`` (a single sigmoid output) and two priors ``(pi_0, pi_1)`` the bias is the prior
    log-odds ``log(pi_1 / pi_0)``. ``None`` leaves the bias unchanged.

    Raises:
        ValueError: a non-positive prior, or a count that matches neither ``K`` nor ``(K=1, 2)``.
    """
    if class_priors is None:
        return
    priors = torch.as_tensor(list(class_priors), dtype=torch.float64)
    if priors.ndim != 1 or (priors <= 0).any() or not torch.isfinite(priors).all():
        raise ValueError(f"class_priors must be positive finite numbers, got {list(class_priors)}")
    priors = priors / priors.sum()
    num_outputs = bias.shape[0]
    if priors.numel() == num_outputs:
        value = priors.log()
    elif num_outputs == 1 and priors.numel() == 2:
        value = (priors[1] / priors[0]).log().reshape(1)
    else:
        raise ValueError(f"class_priors has {priors.numel()} entries but the classifier has {num_outputs} outputs")
    with torch.no_grad():
        bias.copy_(value.to(bias.dtype))


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax of ``scores`` over ``dim`` restricted to ``mask``: exactly 0 where ``mask`` is False.

    ``scores`` and ``mask`` broadcast together (e.g. ``(B, N)`` or ``(B, K, N)`` with ``(B, 1, N)``).
    A slice with no valid entry gives all zeros (not NaN).
    """
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=dim) * mask
    return weights / weights.sum(dim=dim, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def _valid_mask(features: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    return mask.to(device=features.device, dtype=torch.bool)


# ------------------------------------------------------------------------------------------ heads
class MILHead(nn.Module):
    """Base class: pools instance features ``(B, N, D)`` with mask ``(B, N)`` into logits ``(B, K)``.

    Args:
        in_dim: instance feature width ``D``.
        num_outputs: number of logits ``K``.
        dropout: dropout on the pooled feature before the classifier (default 0.0, in [0, 1)).
        class_priors: class frequencies ``(K,)``; the classifier bias starts at ``log(pi)``.
    """

    name = ""

    def __init__(self, in_dim: int, num_outputs: int, dropout: float = 0.0, class_priors: Sequence[float] | None = None) -> None:
        super().__init__()
        if in_dim < 1 or num_outputs < 1:
            raise ValueError(f"in_dim and num_outputs must be >= 1, got in_dim={in_dim}, num_outputs={num_outputs}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_dim = in_dim
        self.num_outputs = num_outputs
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim, num_outputs)
        init_bias_from_priors(self.classifier.bias, class_priors)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``features (B, N, D)``, ``mask (B, N)`` bool -> ``(logits (B, K), attention (B, N))``."""
        raise NotImplementedError


@register_mil_head
class MeanHead(MILHead):
    """Mean pooling over valid instances: ``logits = W mean_i(h_i) + b``; attention uniform ``1/n``.

    Shapes: ``features (B, N, D)``, ``mask (B, N)`` -> ``logits (B, K)``, ``attention (B, N)``.
    """

    name = "mean"

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mask = _valid_mask(features, mask)
        attention = mask.to(features.dtype)
        attention = attention / attention.sum(dim=1, keepdim=True).clamp_min(1.0)
        pooled = torch.einsum("bn,bnd->bd", attention, features)
        return self.classifier(self.dropout(pooled)), attention


@register_mil_head
class MaxHead(MILHead):
    """Element-wise max pooling over valid instances: ``logits = W max_i(h_i) + b``.

    ``attention_i`` = fraction of the ``D`` feature dimensions whose max comes from instance ``i``
    (sums to 1; one-hot when one instance wins every dimension; ties go to the first instance).

    Shapes: ``features (B, N, D)``, ``mask (B, N)`` -> ``logits (B, K)``, ``attention (B, N)``.
    """

    name = "max"

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mask = _valid_mask(features, mask)
        masked = features.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        pooled, winner = masked.max(dim=1)  # (B, D), (B, D)
        pooled = torch.where(mask.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))
        attention = F.one_hot(winner, features.shape[1]).to(features.dtype).mean(dim=1)  # (B, N)
        attention = attention * mask
        return self.classifier(self.dropout(pooled)), attention


@register_mil_head
class AttentionHead(MILHead):
    """Attention-based MIL pooling (Ilse et al., ICML 2018, arXiv:1802.04712).

    ``a_i = softmax_i(w^T tanh(V h_i))`` over valid instances, ``z = sum_i a_i h_i``,
    ``logits = W z + b``.

    Args:
        in_dim, num_outputs, dropout, class_priors: see :class:`MILHead`; ``dropout`` also applies
            to the attention network's hidden layer.
        hidden_dim: attention hidden width (default 128).

    Shapes: ``features (B, N, D)``, ``mask (B, N)`` -> ``logits (B, K)``, ``attention (B, N)``.
    """

    name = "attention"

    def __init__(
        self,
        in_dim: int,
        num_outputs: int,
        hidden_dim: int = 128,
        dropout: float = 0.0,
        class_priors: Sequence[float] | None = None,
    ) -> None:
        super().__init__(in_dim, num_outputs, dropout=dropout, class_priors=class_priors)
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}")
        self.attention_v = nn.Linear(in_dim, hidden_dim)
        self.attention_w = nn.Linear(hidden_dim, 1)

    def attention_hidden(self, features: Tensor) -> Tensor:
        """``(B, N, D) -> (B, N, hidden_dim)``: ``tanh(V h)``."""
        return torch.tanh(self.attention_v(features))

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mask = _valid_mask(features, mask)
        scores = self.attention_w(self.dropout(self.attention_hidden(features))).squeeze(-1)  # (B, N)
        attention = masked_softmax(scores, mask)
        pooled = torch.einsum("bn,bnd->bd", attention, features)
        return self.classifier(self.dropout(pooled)), attention


@register_mil_head
class GatedAttentionHead(AttentionHead):
    """Gated attention MIL pooling (Ilse et al., ICML 2018, arXiv:1802.04712).

    ``a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))``, ``z = sum_i a_i h_i``, ``logits = W z + b``.
    Arguments as :class:`AttentionHead` (``hidden_dim`` default 128, ``dropout``).

    Shapes: ``features (B, N, D)``, ``mask (B, N)`` -> ``logits (B, K)``, ``attention (B, N)``.
    """

    name = "gated_attention"

    def __init__(
        self,
        in_dim: int,
        num_outputs: int,
        hidden_dim: int = 128,
        dropout: float = 0.0,
        class_priors: Sequence[float] | None = None,
    ) -> None:
        super().__init__(in_dim, num_outputs, hidden_dim=hidden_dim, dropout=dropout, class_priors=class_priors)
        self.attention_u = nn.Linear(in_dim, hidden_dim)

    def attention_hidden(self, features: Tensor) -> Tensor:
        """``(B, N, D) -> (B, N, hidden_dim)``: ``tanh(V h) * sigmoid(U h)``."""
        return torch.tanh(self.attention_v(features)) * torch.sigmoid(self.attention_u(features))


@register_mil_head
class TopKHead(MILHead):
    """Top-k pooling of instance logits: ``logits_c = mean of the k largest s_ic``, ``s_i = W h_i + b``.

    ``k`` is capped at each bag's number of valid instances, so ``k >= N`` is mean pooling of
    instance logits and ``k = 1`` is max pooling (mi-Net style). ``attention`` is uniform
    (``1/k``) over the top-``k`` instances of the predicted class.

    Args:
        in_dim, num_outputs, dropout, class_priors: see :class:`MILHead` (dropout on instance features).
        k: number of instances averaged (default 1, >= 1).

    Shapes: ``features (B, N, D)``, ``mask (B, N)`` -> ``logits (B, K)``, ``attention (B, N)``.
    """

    name = "topk"

    def __init__(
        self,
        in_dim: int,
        num_outputs: int,
        k: int = 1,
        dropout: float = 0.0,
        class_priors: Sequence[float] | None = None,
    ) -> None:
        super().__init__(in_dim, num_outputs, dropout=dropout, class_priors=class_priors)
        if int(k) != k or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.k = int(k)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mask = _valid_mask(features, mask)
        batch, num_instances = mask.shape
        instance_logits = self.classifier(self.dropout(features))  # (B, N, K)
        k = min(self.k, num_instances)
        masked = instance_logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        top_values, top_index = masked.topk(k, dim=1)  # (B, k, K)
        # Bags with fewer than k valid instances: only the valid ones among the top k count.
        top_valid = torch.arange(k, device=mask.device).view(1, k, 1) < mask.sum(dim=1).view(batch, 1, 1)
        counts = top_valid.sum(dim=1).clamp_min(1)  # (B, 1)
        logits = torch.where(top_valid, top_values, torch.zeros_like(top_values)).sum(dim=1) / counts
        predicted = logits.argmax(dim=1)  # (B,)
        chosen_index = top_index[torch.arange(batch, device=mask.device), :, predicted]  # (B, k)
        chosen_valid = top_valid[:, :, 0].to(features.dtype)
        attention = torch.zeros(batch, num_instances, dtype=features.dtype, device=features.device)
        attention.scatter_add_(1, chosen_index, chosen_valid)
        attention = attention / attention.sum(dim=1, keepdim=True).clamp_min(1.0)
        return logits, attention


@register_mil_head
class DualStreamHead(MILHead):
    """DSMIL dual-stream aggregator (Li, Li, Eliceiri, CVPR 2021, arXiv:2011.08939).

    Max stream: instance logits ``s = W_s h`` ``(B, N, K)``; critical instance
    ``m_c = argmax_i s_ic``; ``max_stream_logits_c = s_{m_c, c}``.
    Bag stream: queries ``q_i = Q(h_i)`` ``(B, N, d_q)``; ``A_ic = softmax_i(<q_i, q_{m_c}> / tau)``
    with L2-normalised queries (default) or ``/ (sqrt(d_q) * tau)`` on raw queries as in the paper;
    ``b_c = sum_i A_ic h_i`` ``(B, K, D)``; ``bag_stream_logits = Conv1d(K, K, kernel_size=D)(b)``.
    ``logits = (max_stream_logits + bag_stream_logits) / 2``.

    Args:
        in_dim, num_outputs, dropout, class_priors: see :class:`MILHead`; the prior bias initialises
            both the instance and the bag classifier; dropout applies to the bag embeddings.
        query_dim: query width ``d_q`` (default 128).
        temperature: softmax temperature ``tau`` (default 1.0 raw, > 0).
        normalize_queries: cosine instead of scaled dot-product similarity (default True; it makes
            the critical instance's own weight the largest).

    Returns from ``forward``: ``(logits (B, K), attention (B, N), extras)`` with
    ``extras = {"stream_logits": [max_stream (B, K), bag_stream (B, K)], "instance_logits": (B, N, K),
    "class_attention": (B, K, N), "critical_index": (B, K)}``; ``attention`` is the
    ``class_attention`` row of the predicted class. Loss: mean of the loss on each stream.
    """

    name = "dual_stream"

    def __init__(
        self,
        in_dim: int,
        num_outputs: int,
        query_dim: int = 128,
        temperature: float = 1.0,
        normalize_queries: bool = True,
        dropout: float = 0.0,
        class_priors: Sequence[float] | None = None,
    ) -> None:
        super().__init__(in_dim, num_outputs, dropout=dropout, class_priors=class_priors)
        if query_dim < 1:
            raise ValueError(f"query_dim must be >= 1, got {query_dim}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        del self.classifier  # replaced by the two stream classifiers below
        self.instance_classifier = nn.Linear(in_dim, num_outputs)
        self.query = nn.Sequential(nn.Linear(in_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh())
        self.bag_classifier = nn.Conv1d(num_outputs, num_outputs, kernel_size=in_dim)
        self.temperature = float(temperature)
        self.normalize_queries = bool(normalize_queries)
        init_bias_from_priors(self.instance_classifier.bias, class_priors)
        init_bias_from_priors(self.bag_classifier.bias, class_priors)

    def use_cosine_classifiers(self) -> None:
        """Cosine logits in [-1, 1] on both streams, for margin losses such as LDAM: the instance
        classifier becomes a :class:`losslab.losses.NormedLinear` over ``D``, the bag classifier (a
        linear map of the flattened ``(K, D)`` bag embeddings) one over ``K·D``."""
        from losslab.losses import NormedLinear

        k = self.bag_classifier.out_channels
        flat = self.bag_classifier.in_channels * self.bag_classifier.kernel_size[0]  # K · D
        self.instance_classifier = NormedLinear(self.instance_classifier.in_features, self.instance_classifier.out_features)
        self.bag_classifier = _FlatNormedLinear(NormedLinear(flat, k))

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Any]]:
        mask = _valid_mask(features, mask)
        batch = features.shape[0]
        instance_logits = self.instance_classifier(features)  # (B, N, K)
        masked = instance_logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        max_stream, critical_index = masked.max(dim=1)  # (B, K), (B, K)

        queries = self.query(features)  # (B, N, d_q)
        if self.normalize_queries:
            queries = F.normalize(queries, dim=-1)
            scale = 1.0 / self.temperature
        else:
            scale = 1.0 / (math.sqrt(queries.shape[-1]) * self.temperature)
        critical_queries = torch.gather(queries, 1, critical_index.unsqueeze(-1).expand(-1, -1, queries.shape[-1]))  # (B, K, d_q)
        scores = torch.einsum("bkq,bnq->bkn", critical_queries, queries) * scale  # (B, K, N)
        class_attention = masked_softmax(scores, mask.unsqueeze(1))  # (B, K, N)
        bag_embeddings = torch.einsum("bkn,bnd->bkd", class_attention, features)  # (B, K, D)
        bag_stream = self.bag_classifier(self.dropout(bag_embeddings)).squeeze(-1)  # (B, K)

        logits = (max_stream + bag_stream) / 2
        predicted = logits.argmax(dim=1)
        attention = class_attention[torch.arange(batch, device=features.device), predicted]  # (B, N)
        extras = {
            "stream_logits": [max_stream, bag_stream],
            "instance_logits": instance_logits,
            "class_attention": class_attention,
            "critical_index": critical_index,
        }
        return logits, attention, extras


class _FlatNormedLinear(nn.Module):
    """A cosine classifier in the bag classifier's place: ``(B, K, D) -> (B, K, 1)`` like the Conv1d."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, bag_embeddings: Tensor) -> Tensor:
        return self.linear(bag_embeddings.flatten(1)).unsqueeze(-1)


# ------------------------------------------------------------------------------------------ model
class MILClassifier(nn.Module):
    """A shared 2D backbone over the instances of a bag, then a MIL head.

    Args:
        backbone: images ``(M, C, H, W)`` -> features ``(M, D)``, with attribute ``num_features = D``.
        head: a :class:`MILHead` (or any module with the same call signature).
        instance_dropout: in training, drop each valid instance from the mask with probability ``p``
            before pooling, but never every instance of a bag (one random valid instance is kept).
            Default 0.0; in [0, 1).

    ``forward(x (B, N, C, H, W), mask (B, N) bool | None) -> (logits (B, K), attention (B, N))``, or
    the head's 3-tuple for ``dual_stream``. ``mask=None`` means every instance is valid.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, instance_dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= instance_dropout < 1.0:
            raise ValueError(f"instance_dropout must be in [0, 1), got {instance_dropout}")
        self.backbone = backbone
        self.head = head
        self.instance_dropout = float(instance_dropout)

    def forward_features(self, x: Tensor) -> Tensor:
        """Per-instance features: ``(B, N, C, H, W) -> (B, N, D)``; one backbone pass on ``B*N`` images."""
        batch, num_instances = x.shape[:2]
        features = self.backbone(x.reshape(batch * num_instances, *x.shape[2:]))
        return features.reshape(batch, num_instances, -1)

    def drop_instances(self, mask: Tensor) -> Tensor:
        """Randomly remove valid instances from ``mask (B, N)`` with probability ``instance_dropout``.

        A bag that would lose every instance keeps one valid instance chosen uniformly at random.
        """
        if self.instance_dropout <= 0.0:
            return mask
        kept = mask & (torch.rand(mask.shape, device=mask.device) >= self.instance_dropout)
        rescue_scores = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0)
        rescue = F.one_hot(rescue_scores.argmax(dim=1), mask.shape[1]).bool() & mask
        return torch.where(kept.any(dim=1, keepdim=True), kept, rescue)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, ...]:
        features = self.forward_features(x)
        mask = _valid_mask(features, mask)
        if self.training:
            mask = self.drop_instances(mask)
        return self.head(features, mask)
