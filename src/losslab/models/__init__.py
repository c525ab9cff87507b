"""losslab.models: build a model from a :class:`~losslab.config.ModelConfig`.

``build_model(cfg, num_outputs, class_priors)`` dispatches on ``cfg.kind``:

- ``"mil"``: :class:`MILClassifier` — a timm backbone (``cfg.backbone``) shared over the instances of
  a bag and a MIL head (``cfg.head``, one of :func:`list_mil_heads`). ``forward(x (B, N, C, H, W),
  mask (B, N)) -> (logits (B, K), attention (B, N))`` (``dual_stream``: a third element of extras).
  ``head_kwargs`` go to the head, except ``instance_dropout`` which goes to the classifier.
- ``"slices25d"``: :class:`SliceStackClassifier` — ``forward(x (B, S, C, H, W), mask (B, S),
  level (B,)) -> (logits (B, K), slice_weights (B, S))``; ``head_kwargs``: ``num_slices``,
  ``num_levels``, ``level_embed_dim``, ``dropout`` (``cfg.head`` is not used).
- ``"volume3d"``: :class:`VolumeClassifier` — a MONAI encoder (``cfg.backbone`` in
  :func:`list_volume_encoders`); ``forward(x (B, C, D, H, W)) -> (logits (B, K), None)``;
  ``head_kwargs``: ``dropout`` (``cfg.head`` is not used).
- ``"image"``: :class:`ImageClassifier` — one image, no bag: ``forward(x (B, C, H, W)) -> (logits
  (B, K), None)`` over a 2D backbone (timm, or ``lenet_mil``); ``head_kwargs``: ``dropout``
  (``cfg.head`` is not used).
- ``"multimodal"``: :class:`MultiModalClassifier` (:mod:`losslab.models.multimodal`) —
  ``forward(image (B, C, H, W), input_ids (B, L), attention_mask (B, L)) -> ({task: (B, K_t)},
  features (B, D))``. ``cfg.head`` is the fusion (``cross_attention``, ``concat``, ``image_only``,
  ``text_only``); the backbone fields describe the image encoder; ``head_kwargs``: ``text`` (text
  encoder spec), ``fusion_dim``, ``fusion_layers``, ``num_heads``, ``dropout``, ``tasks``
  (``{task: [class names]}``, default one task ``label`` with ``num_outputs`` classes) and ``texts``
  (captions the offline tokenizer learns its vocabulary from).

- ``"segmentation"``: :class:`SegmentationNet` (:mod:`losslab.models.segmentation`) — a MONAI
  ``unet``, ``segresnet`` or ``swinunetr`` (``cfg.backbone``) in ``cfg.spatial_dims`` 2 or 3;
  ``forward(x (B, C, *spatial)) -> logits (B, K, *spatial)`` (``cfg.head`` is not used).

``backbone_kwargs`` go to the backbone constructor (timm or MONAI). ``class_priors`` (class
frequencies, length ``K``) initialise every classifier bias to ``log(pi)``. Models never import
``losslab.data`` or ``mlflow``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from losslab.schema import ModelConfig
from losslab.models.backbones import UnknownBackboneError, create_backbone, load_backbone_weights, read_state_dict
from losslab.models.image import ImageClassifier
from losslab.models.mil import (
    AttentionHead,
    DualStreamHead,
    GatedAttentionHead,
    MaxHead,
    MeanHead,
    MILClassifier,
    MILHead,
    TopKHead,
    UnknownMILHeadError,
    build_mil_head,
    check_mil_head_kwargs,
    init_bias_from_priors,
    list_mil_heads,
    masked_softmax,
    register_mil_head,
)
from losslab.models.slices import SliceStackClassifier, centre_slice_logits
from losslab.models.volumes import VolumeClassifier, create_volume_encoder, list_volume_encoders, load_encoder_weights

__all__ = [
    "AttentionHead",
    "DualStreamHead",
    "GatedAttentionHead",
    "ImageClassifier",
    "MILClassifier",
    "MILHead",
    "MaxHead",
    "MeanHead",
    "SliceStackClassifier",
    "TopKHead",
    "UnknownBackboneError",
    "UnknownMILHeadError",
    "VolumeClassifier",
    "build_mil_head",
    "build_model",
    "centre_slice_logits",
    "check_mil_head_kwargs",
    "create_backbone",
    "create_volume_encoder",
    "init_bias_from_priors",
    "list_mil_heads",
    "list_volume_encoders",
    "load_backbone_weights",
    "load_encoder_weights",
    "masked_softmax",
    "read_state_dict",
    "register_mil_head",
]


def _check_kwargs(owner: str, kwargs: dict[str, Any], accepted: Sequence[str]) -> None:
    for arg in kwargs:
        if arg not in accepted:
            raise TypeError(f"{owner} got an unexpected argument {arg!r} in model.head_kwargs; it accepts: {', '.join(accepted)}")


def _accepted(cls: type, exclude: Sequence[str]) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", *exclude)]


def build_model(cfg: ModelConfig, num_outputs: int, class_priors: Sequence[float] | None = None) -> nn.Module:
    """Build the model that ``cfg`` describes, with ``num_outputs`` logits ``K``.

    Head arguments are validated before the backbone is built, so a typo fails fast.

    Args:
        cfg: the model section of an experiment config.
        num_outputs: number of logits ``K``.
        class_priors: class frequencies ``(K,)`` (need not sum to 1); classifier biases start at
            ``log(pi)``. ``None``: default initialisation.

    Returns:
        ``MILClassifier`` (kind ``mil``), ``SliceStackClassifier`` (``slices25d``),
        ``VolumeClassifier`` (``volume3d``) or ``ImageClassifier`` (``image``); see the module
        docstring for their shapes.

    Raises:
        UnknownMILHeadError: (``KeyError``) unknown ``cfg.head``; lists known heads, sorted.
        UnknownBackboneError: (``KeyError``) unknown ``cfg.backbone``.
        TypeError: an unknown key in ``cfg.head_kwargs``; names the head (or kind) and the key.
        ValueError: ``multimodal`` with a head that is not a fusion, or a bad multimodal spec.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    if cfg.kind not in _BUILDERS:
        raise ValueError(f"unknown model.kind {cfg.kind!r}; expected one of {', '.join(_BUILDERS)}")
    head_kwargs = {k: v for k, v in cfg.head_kwargs.items() if v is not None}
    backbone_args = dict(in_chans=cfg.in_chans, pretrained=cfg.pretrained, weights_path=cfg.weights_path,
                         drop_path_rate=cfg.drop_path_rate, **cfg.backbone_kwargs)
    return _BUILDERS[cfg.kind](cfg, num_outputs, class_priors, head_kwargs, backbone_args)


def _build_mil(cfg, num_outputs, class_priors, head_kwargs, backbone_args) -> nn.Module:
    instance_dropout = float(head_kwargs.pop("instance_dropout", 0.0))
    if "class_priors" in head_kwargs:
        raise TypeError(f"MIL head {cfg.head!r}: class_priors come from the data, not model.head_kwargs")
    check_mil_head_kwargs(cfg.head, head_kwargs)
    backbone = create_backbone(cfg.backbone, **backbone_args)
    head = build_mil_head(cfg.head, backbone.num_features, num_outputs, class_priors=class_priors, **head_kwargs)
    return MILClassifier(backbone, head, instance_dropout=instance_dropout)


def _classifier_builder(kind: str, classifier: type, encoder: Callable[..., nn.Module]):
    """The builder of a backbone + linear-head classifier (``slices25d``, ``image``, ``volume3d``)."""

    def build(cfg, num_outputs, class_priors, head_kwargs, backbone_args) -> nn.Module:
        _check_kwargs(f"{kind} model", head_kwargs, _accepted(classifier, ("backbone", "num_outputs", "class_priors")))
        return classifier(encoder(cfg.backbone, **backbone_args), num_outputs, class_priors=class_priors, **head_kwargs)

    return build


def _build_multimodal(cfg, num_outputs, class_priors, head_kwargs, backbone_args) -> nn.Module:
    from losslab.models.multimodal import FUSIONS, build_multimodal_model

    if cfg.head not in FUSIONS:
        raise ValueError(f"model.kind='multimodal': model.head is the fusion, one of {', '.join(FUSIONS)}; "
                         f"got {cfg.head!r}")
    tasks = head_kwargs.pop("tasks", None) or {"label": [str(k) for k in range(num_outputs)]}
    texts = head_kwargs.pop("texts", None)
    image = {"backbone": cfg.backbone, "in_chans": cfg.in_chans, "pretrained": cfg.pretrained,
             "weights_path": cfg.weights_path, "drop_path_rate": cfg.drop_path_rate, "kwargs": dict(cfg.backbone_kwargs)}
    return build_multimodal_model({"image": image, "fusion": cfg.head, **head_kwargs}, tasks, texts=texts,
                                  in_chans=cfg.in_chans)


def _build_segmentation(cfg, num_outputs, class_priors, head_kwargs, backbone_args) -> nn.Module:
    from losslab.models.segmentation import build_segmentation_model

    return build_segmentation_model(cfg.backbone, cfg.spatial_dims, cfg.in_chans, num_outputs, **cfg.backbone_kwargs)


#: model.kind -> builder(cfg, num_outputs, class_priors, head_kwargs, backbone_args)
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mil": _build_mil,
    "slices25d": _classifier_builder("slices25d", SliceStackClassifier, create_backbone),
    "image": _classifier_builder("image", ImageClassifier, create_backbone),
    "volume3d": _classifier_builder("volume3d", VolumeClassifier, create_volume_encoder),
    "multimodal": _build_multimodal,
    "segmentation": _build_segmentation,
}
