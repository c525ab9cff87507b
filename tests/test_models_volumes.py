"""3D whole-volume classifiers on tiny volumes (MONAI ResNet, DenseNet, SwinUNETR encoder)."""

from __future__ import annotations

import logging

import pytest
import torch

from losslab.config import ModelConfig
from losslab.models import VolumeClassifier, build_model, create_volume_encoder, list_volume_encoders


def test_registry_names():
    assert {"monai_resnet10", "monai_resnet18", "monai_resnet34", "monai_resnet50", "monai_densenet121", "swinunetr"} <= set(list_volume_encoders())
    assert list_volume_encoders("monai_resnet*") == ["monai_resnet10", "monai_resnet18", "monai_resnet34", "monai_resnet50"]


def test_resnet10_classifier_values_and_priors():
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="volume3d", backbone="monai_resnet10", in_chans=4), 3, [0.5, 0.25, 0.25]).eval()
    x = torch.randn(1, 4, 16, 32, 32)
    logits, attention = model(x)
    assert logits.shape == (1, 3) and attention is None
    features = model.backbone(x)
    assert features.shape == (1, 512) and model.backbone.num_features == 512
    torch.testing.assert_close(logits, model.classifier(features))
    torch.testing.assert_close(model.classifier.bias, torch.tensor([0.5, 0.25, 0.25]).log())


def test_resnet_trains_one_step():
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="volume3d", backbone="monai_resnet10", in_chans=1), 2).train()
    x, target = torch.randn(2, 1, 16, 32, 32), torch.tensor([0, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x)[0], target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_densenet121_features():
    torch.manual_seed(0)
    encoder = create_volume_encoder("monai_densenet121", in_chans=4).eval()
    features = encoder(torch.randn(1, 4, 32, 32, 32))  # DenseNet downsamples by 32
    assert features.shape == (1, encoder.num_features) == (1, 1024)
    model = VolumeClassifier(encoder, 2).eval()
    assert model(torch.randn(1, 4, 32, 32, 32))[0].shape == (1, 2)


def test_swinunetr_encoder_pools_deepest_stage():
    pytest.importorskip("einops")
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(kind="volume3d", backbone="swinunetr", in_chans=1, drop_path_rate=0.1, backbone_kwargs={"feature_size": 12}), 2
    ).eval()
    assert model.backbone.num_features == 192
    x = torch.randn(1, 1, 32, 32, 32)
    logits, _ = model(x)
    deepest = model.backbone.swinViT(x, True)[-1]
    assert deepest.shape == (1, 192, 1, 1, 1)
    torch.testing.assert_close(logits, model.classifier(deepest.flatten(1)))
    # Stochastic depth reached the Swin blocks.
    assert max(getattr(m, "drop_prob", 0.0) for m in model.backbone.modules()) > 0


def test_weights_path_loads_into_encoder(tmp_path, caplog):
    torch.manual_seed(0)
    source = create_volume_encoder("monai_resnet10", in_chans=1)
    state = source.state_dict()
    state["fc.weight"] = torch.zeros(3, 512)  # a MedicalNet-style classifier key, not in the encoder
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "r10.pth")
    torch.manual_seed(1)
    with caplog.at_level(logging.WARNING, logger="losslab.models.volumes"):
        encoder = create_volume_encoder("monai_resnet10", in_chans=1, weights_path=str(tmp_path / "r10.pth"))
    torch.testing.assert_close(encoder.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"], rtol=0, atol=0)
    assert "fc.weight" in caplog.text


def test_pretrained_without_weights_path_raises():
    with pytest.raises(RuntimeError, match="offline.*weights_path"):
        create_volume_encoder("monai_resnet10", in_chans=1, pretrained=True)
