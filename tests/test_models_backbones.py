"""2D backbones: timm feature extractors, local weights with stem adaptation, offline pretrained."""

from __future__ import annotations

import logging
import os

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import DropPath

from losslab.models import UnknownBackboneError, create_backbone

NAME = "test_resnet"  # timm's tiny test model (stem conv1.0, classifier fc)


def test_pooled_features_and_num_features():
    backbone = create_backbone(NAME, in_chans=4).eval()
    features = backbone(torch.randn(3, 4, 32, 32))
    assert features.shape == (3, backbone.num_features)
    assert backbone.num_features == 96
    assert backbone.conv1[0].in_channels == 4


def test_any_timm_model_by_name_and_kwargs():
    backbone = create_backbone("test_vit", in_chans=2, img_size=32, global_pool=None).eval()
    assert backbone(torch.randn(1, 2, 32, 32)).shape == (1, backbone.num_features)


def test_pooled_dim_follows_head_hidden_size():
    backbone = create_backbone("mobilenetv3_small_050", in_chans=1).eval()
    assert backbone(torch.randn(1, 1, 32, 32)).shape == (1, backbone.num_features)


def test_drop_path_rate_reaches_timm_blocks():
    rates = [m.drop_prob for m in create_backbone(NAME, 3, drop_path_rate=0.3).modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.3)
    assert not any(isinstance(m, DropPath) for m in create_backbone(NAME, 3).modules())


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(KeyError, match="resnet18") as info:
        create_backbone("resnet_18", 3)
    assert isinstance(info.value, UnknownBackboneError)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_path_loads_and_adapts_stem(tmp_path, caplog, suffix):
    torch.manual_seed(1)
    source = timm.create_model(NAME, pretrained=False, num_classes=10, in_chans=3)  # with classifier
    state = source.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)  # nested checkpoint, as saved by many trainers
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    torch.manual_seed(2)
    with caplog.at_level(logging.INFO, logger="losslab.models.backbones"):
        backbone = create_backbone(NAME, in_chans=4, weights_path=str(path))
    loaded = backbone.state_dict()
    # An ordinary tensor is copied exactly.
    torch.testing.assert_close(loaded["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(loaded["bn1.running_mean"], state["bn1.running_mean"], rtol=0, atol=0)
    # The stem goes from 3 to 4 channels: channels repeated cyclically, scaled by 3/4.
    stem = state["conv1.0.weight"]
    expected = torch.cat([stem, stem[:, :1]], dim=1) * (3 / 4)
    torch.testing.assert_close(loaded["conv1.0.weight"], expected)
    assert "fc.weight" not in loaded
    assert "classifier" in caplog.text and "conv1.0.weight" in caplog.text


def test_weights_path_logs_missing_keys(tmp_path, caplog):
    state = timm.create_model(NAME, num_classes=0).state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    with caplog.at_level(logging.WARNING, logger="losslab.models.backbones"):
        create_backbone(NAME, 3, weights_path=str(tmp_path / "partial.pth"))
    assert "missing keys" in caplog.text and "layer1.0.conv1.weight" in caplog.text
    assert "unexpected keys" in caplog.text and "extra.weight" in caplog.text


def test_missing_weights_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_backbone(NAME, 3, weights_path=str(tmp_path / "nope.pth"))


def test_pretrained_without_local_cache_raises_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    offline_before = constants.HF_HUB_OFFLINE
    with pytest.raises(RuntimeError, match="no pretrained weights.*offline.*weights_path"):
        create_backbone(NAME, 3, pretrained=True)
    assert "HF_HUB_OFFLINE" not in os.environ  # environment and hub constant restored
    assert constants.HF_HUB_OFFLINE == offline_before
