"""build_model: dispatch on ModelConfig.kind, argument errors, priors and the MIL contract."""

from __future__ import annotations

import pytest
import torch

from losslab.config import ModelConfig
from losslab.models import MILClassifier, SliceStackClassifier, UnknownMILHeadError, VolumeClassifier, build_model


def _mil_cfg(**kwargs) -> ModelConfig:
    return ModelConfig(**{"kind": "mil", "backbone": "test_resnet", "in_chans": 4, **kwargs})


def test_build_mil_model_contract():
    priors = [0.6, 0.3, 0.1]
    model = build_model(_mil_cfg(head="gated_attention", head_kwargs={"hidden_dim": 16, "instance_dropout": 0.25}), 3, priors)
    assert isinstance(model, MILClassifier)
    assert model.instance_dropout == 0.25
    assert model.head.attention_v.out_features == 16
    assert model.head.in_dim == model.backbone.num_features
    torch.testing.assert_close(model.head.classifier.bias, torch.tensor(priors).log())
    model.eval()
    x = torch.randn(2, 3, 4, 32, 32)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    logits, attention = model(x, mask)
    assert logits.shape == (2, 3) and attention.shape == (2, 3)
    assert model.forward_features(x).shape == (2, 3, model.backbone.num_features)
    x[0, 2] = 10.0  # a padded instance's pixels
    torch.testing.assert_close(model(x, mask)[0], logits)


def test_build_dual_stream_returns_three_tuple():
    model = build_model(_mil_cfg(head="dual_stream"), 2).eval()
    out = model(torch.randn(1, 4, 4, 32, 32))
    assert len(out) == 3
    logits, attention, extras = out
    max_stream, bag_stream = extras["stream_logits"]
    torch.testing.assert_close(logits, (max_stream + bag_stream) / 2)
    assert extras["instance_logits"].shape == (1, 4, 2)


def test_backbone_kwargs_and_drop_path_reach_timm():
    model = build_model(_mil_cfg(head="mean", drop_path_rate=0.2, backbone_kwargs={"global_pool": "max"}), 2)
    assert model.backbone.global_pool.pool_type == "max"
    assert max(getattr(m, "drop_prob", 0.0) for m in model.backbone.modules()) == pytest.approx(0.2)


def test_unknown_head_error_lists_heads():
    with pytest.raises(UnknownMILHeadError, match=r"'transformer'.*attention, dual_stream, gated_attention, max, mean, topk"):
        build_model(_mil_cfg(head="transformer"), 2)


def test_unknown_head_kwarg_names_head_and_argument():
    with pytest.raises(TypeError, match=r"'topk'.*'kk'"):
        build_model(_mil_cfg(head="topk", head_kwargs={"kk": 3}), 2)
    with pytest.raises(TypeError, match=r"slices25d.*'levels'"):
        build_model(ModelConfig(kind="slices25d", backbone="test_resnet", head_kwargs={"levels": 5}), 2)
    with pytest.raises(TypeError, match=r"volume3d.*'hidden_dim'"):
        build_model(ModelConfig(kind="volume3d", backbone="monai_resnet10", head_kwargs={"hidden_dim": 5}), 2)


def test_unknown_backbone_raises_key_error():
    with pytest.raises(KeyError, match="not_a_model"):
        build_model(_mil_cfg(backbone="not_a_model"), 2)
    with pytest.raises(KeyError, match="monai_resnet10"):
        build_model(ModelConfig(kind="volume3d", backbone="resnet10"), 2)


def test_build_slices_and_volume_kinds():
    priors = [0.9, 0.1]
    slices = build_model(ModelConfig(kind="slices25d", backbone="test_resnet", in_chans=1, head_kwargs={"num_slices": 3, "level_embed_dim": 8}), 2, priors)
    assert isinstance(slices, SliceStackClassifier)
    torch.testing.assert_close(slices.classifier.bias, torch.tensor(priors).log())
    assert slices.classifier.in_features == slices.backbone.num_features + 8
    volume = build_model(ModelConfig(kind="volume3d", backbone="monai_resnet10", in_chans=2, head_kwargs={"dropout": 0.1}), 2, priors)
    assert isinstance(volume, VolumeClassifier)
    torch.testing.assert_close(volume.classifier.bias, torch.tensor(priors).log())
