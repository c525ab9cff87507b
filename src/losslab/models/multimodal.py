"""Image + text classifiers with one head per task, for teacher/student distillation.

:class:`MultiModalClassifier`::

    model(image (B, C, H, W), input_ids (B, L), attention_mask (B, L))
        -> (logits: {task: (B, K_task)}, features (B, D))

* image tokens: a timm backbone's ``forward_features`` — ``(B, N_i, D_i)`` for ViTs (prefix tokens
  included), ``(B, D_i, h, w)`` for CNNs (flattened to ``h·w`` tokens) — projected to ``fusion_dim``;
* text tokens: a text encoder (:mod:`losslab.models.text`) ``(B, L, D_t)`` projected to ``fusion_dim``;
* ``fusion``:

  ============== ==================================================================== ============
  cross_attention ``fusion_layers`` blocks; in each, image tokens attend to text tokens  D = 2·fusion_dim
                  and text tokens to image tokens (pre-norm, residual, then an MLP);
                  then the masked mean of each stream, concatenated
  concat          mean of image tokens ‖ masked mean of text tokens                       D = 2·fusion_dim
  image_only      mean of image tokens (no text encoder)                                  D = fusion_dim
  text_only       masked mean of text tokens (no image encoder)                           D = fusion_dim
  ============== ==================================================================== ============

* ``features (B, D)`` is the fused feature that feature-based distillation losses compare
  (``D = model.feature_dim``); each head is ``Dropout → Linear(D, K_task)``.

The model carries what it needs to be used on its own once registered: ``tokenizer`` (captions ->
ids), ``max_length``, ``task_classes`` ({task: class names}) and ``spec`` (the build spec).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from losslab.models.backbones import create_backbone
from losslab.models.text import create_text_encoder

__all__ = ["FUSIONS", "CrossAttentionBlock", "MultiModalClassifier", "build_multimodal_model"]

FUSIONS = ("cross_attention", "concat", "image_only", "text_only")


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens ``(B, N, D) -> (B, D)`` of the positions where ``mask (B, N)`` is non-zero."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class CrossAttentionBlock(nn.Module):
    """Bidirectional cross-attention: ``img += MHA(img → txt)``, ``txt += MHA(txt → img)``, then MLPs.

    ``forward(image_tokens (B, N_i, D), text_tokens (B, L, D), text_mask (B, L)) -> (image, text)``
    with the same shapes; padded text positions are never attended to.
    """

    def __init__(self, dim: int, num_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_image = nn.LayerNorm(dim)
        self.norm_text = nn.LayerNorm(dim)
        self.image_to_text = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.text_to_image = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.mlp_image = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.mlp_text = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None):
        image_n, text_n = self.norm_image(image), self.norm_text(text)
        padding = None if text_mask is None else text_mask == 0
        image = image + self.image_to_text(image_n, text_n, text_n, key_padding_mask=padding, need_weights=False)[0]
        text = text + self.text_to_image(text_n, image_n, image_n, need_weights=False)[0]
        return image + self.mlp_image(image), text + self.mlp_text(text)


class MultiModalClassifier(nn.Module):
    """Image encoder + text encoder + fusion + one linear head per task (see the module docstring).

    Args:
        image_encoder: a timm model with ``forward_features`` (``None`` for ``text_only``).
        text_encoder: ``forward(ids, mask) -> (B, L, D_t)`` with ``num_features`` (``None`` for ``image_only``).
        task_classes: ``{task: [class names]}``, in head order; each task needs ≥ 2 classes.
        fusion: one of ``cross_attention``, ``concat``, ``image_only``, ``text_only``.
        fusion_dim: width of the projected tokens, default 64. fusion_layers: cross-attention
            blocks, default 1. num_heads: default 4 (must divide ``fusion_dim``). dropout: default 0.1.
        tokenizer, max_length, spec: carried for inference and the registry (see module docstring).

    Raises:
        ValueError: unknown fusion, a missing encoder for it, a task with fewer than 2 classes.
    """

    def __init__(self, image_encoder: nn.Module | None, text_encoder: nn.Module | None,
                 task_classes: dict[str, Sequence[str]], fusion: str = "cross_attention", fusion_dim: int = 64,
                 fusion_layers: int = 1, num_heads: int = 4, dropout: float = 0.1, tokenizer: Any = None,
                 max_length: int = 64, spec: dict[str, Any] | None = None) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {', '.join(FUSIONS)}")
        if fusion != "text_only" and image_encoder is None:
            raise ValueError(f"fusion {fusion!r} needs an image encoder")
        if fusion != "image_only" and text_encoder is None:
            raise ValueError(f"fusion {fusion!r} needs a text encoder")
        if not task_classes:
            raise ValueError("task_classes is empty: give at least one task with its class names")
        for task, classes in task_classes.items():
            if len(classes) < 2:
                raise ValueError(f"task {task!r} has {len(classes)} class(es) {list(classes)}; need at least 2")
        if fusion_dim % num_heads:
            raise ValueError(f"fusion_dim ({fusion_dim}) must be divisible by num_heads ({num_heads})")
        self.fusion = fusion
        self.task_classes = {str(t): [str(c) for c in cs] for t, cs in task_classes.items()}
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.spec = copy.deepcopy(spec or {})
        self.image_encoder = image_encoder if fusion != "text_only" else None
        self.text_encoder = text_encoder if fusion != "image_only" else None
        if self.image_encoder is not None:
            self.image_proj = nn.Linear(self.image_encoder.num_features, fusion_dim)
        if self.text_encoder is not None:
            self.text_proj = nn.Linear(self.text_encoder.num_features, fusion_dim)
        self.blocks = nn.ModuleList(
            [CrossAttentionBlock(fusion_dim, num_heads, dropout) for _ in range(fusion_layers)]
            if fusion == "cross_attention" else [])
        self.feature_dim = 2 * fusion_dim if fusion in ("cross_attention", "concat") else fusion_dim
        self.heads = nn.ModuleDict({task: nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, len(cs)))
                                    for task, cs in self.task_classes.items()})

    @property
    def tasks(self) -> list[str]:
        return list(self.task_classes)

    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, N_i, fusion_dim)``."""
        tokens = self.image_encoder.forward_features(image)
        if tokens.ndim == 4:  # CNN feature map (B, D, h, w)
            tokens = tokens.flatten(2).transpose(1, 2)
        return self.image_proj(tokens)

    def forward(self, image: torch.Tensor | None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(B, C, H, W), (B, L), (B, L) -> ({task: (B, K_task)}, features (B, feature_dim))``."""
        image_tokens = self.image_tokens(image) if self.image_encoder is not None else None
        text_tokens = None
        if self.text_encoder is not None:
            if input_ids is None:
                raise ValueError(f"fusion {self.fusion!r} needs input_ids (the tokenized captions)")
            text_tokens = self.text_proj(self.text_encoder(input_ids, attention_mask))
        for block in self.blocks:
            image_tokens, text_tokens = block(image_tokens, text_tokens, attention_mask)
        pooled = []
        if image_tokens is not None:
            pooled.append(image_tokens.mean(dim=1))
        if text_tokens is not None:
            pooled.append(masked_mean(text_tokens, attention_mask))
        features = torch.cat(pooled, dim=1)
        return {task: head(features) for task, head in self.heads.items()}, features


def build_multimodal_model(spec: dict[str, Any], task_classes: dict[str, Sequence[str]],
                           texts: Sequence[str] | None = None, in_chans: int = 1,
                           tokenizer: Any = None) -> MultiModalClassifier:
    """Build a :class:`MultiModalClassifier` from a spec dict (the ``distill.teacher``/``student`` YAML).

    Spec keys (all optional)::

        image: {backbone: test_vit, pretrained: false, weights_path: null, in_chans: 1,
                kwargs: {img_size: 64, patch_size: 8}}          # any timm model; kwargs go to timm
        text: {name: small_transformer, dim: 64, depth: 2, ...}  # or {name: distilbert-base-uncased}
        fusion: cross_attention | concat | image_only | text_only   (default cross_attention)
        fusion_dim: 64
        fusion_layers: 1
        num_heads: 4
        dropout: 0.1

    Args:
        spec: the dict above. task_classes: ``{task: [class names]}``.
        texts: training captions (the offline tokenizer learns its vocabulary from them).
        tokenizer: an existing tokenizer to reuse instead (a registered model's vocabulary).
        in_chans: image channels when ``image.in_chans`` is not given.

    Raises:
        ValueError: an unknown key (named), bad fusion, or what the encoders raise.
    """
    spec = copy.deepcopy(dict(spec or {}))
    allowed = {"image", "text", "fusion", "fusion_dim", "fusion_layers", "num_heads", "dropout"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"multimodal model spec: unknown key(s) {unknown}; accepted: {', '.join(sorted(allowed))}")
    fusion = spec.get("fusion", "cross_attention")
    if fusion not in FUSIONS:
        raise ValueError(f"multimodal model spec: unknown fusion {fusion!r}; expected one of {', '.join(FUSIONS)}")
    image_encoder = text_encoder = None
    text_spec = dict(spec.get("text") or {})
    max_length = int(text_spec.get("max_length", 64))
    if fusion != "text_only":
        image = dict(spec.get("image") or {})
        image_allowed = {"backbone", "pretrained", "weights_path", "in_chans", "kwargs", "drop_path_rate"}
        bad = sorted(set(image) - image_allowed)
        if bad:
            raise ValueError(f"multimodal model spec: unknown image key(s) {bad}; accepted: {', '.join(sorted(image_allowed))}")
        image_encoder = create_backbone(image.get("backbone", "test_vit"), in_chans=int(image.get("in_chans", in_chans)),
                                        pretrained=bool(image.get("pretrained", False)),
                                        weights_path=image.get("weights_path"),
                                        drop_path_rate=float(image.get("drop_path_rate", 0.0)),
                                        **dict(image.get("kwargs") or {}))
    if fusion != "image_only":
        text_encoder, tokenizer = create_text_encoder(text_spec, texts=texts, tokenizer=tokenizer)
    else:
        tokenizer = None
    return MultiModalClassifier(image_encoder, text_encoder, task_classes, fusion=fusion,
                                fusion_dim=int(spec.get("fusion_dim", 64)),
                                fusion_layers=int(spec.get("fusion_layers", 1)),
                                num_heads=int(spec.get("num_heads", 4)), dropout=float(spec.get("dropout", 0.1)),
                                tokenizer=tokenizer, max_length=max_length, spec=spec)
