"""2.5D slice-stack classifier: centre-favouring weights, level embedding, prior bias, masking."""

from __future__ import annotations

import pytest
import torch

from losslab.models import SliceStackClassifier, centre_slice_logits, create_backbone


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone("test_resnet", in_chans=1)


def _model(backbone, **kwargs) -> SliceStackClassifier:
    torch.manual_seed(0)
    return SliceStackClassifier(backbone, 3, **kwargs).eval()


def test_centre_slice_has_largest_initial_weight(backbone):
    for num_slices in (5, 4, 1):
        model = _model(backbone, num_slices=num_slices)
        _, weights = model(torch.randn(2, num_slices, 1, 32, 32))
        torch.testing.assert_close(weights[0], torch.softmax(centre_slice_logits(num_slices), 0))
        torch.testing.assert_close(weights.sum(1), torch.ones(2))
    weights = _model(backbone, num_slices=5)(torch.randn(1, 5, 1, 32, 32))[1][0]
    assert weights.argmax() == 2 and torch.all(weights[2] > weights[[0, 1, 3, 4]])
    assert weights[1] == weights[3] and weights[0] == weights[4]  # symmetric
    assert centre_slice_logits(4).tolist() == [-1.5, -0.5, -0.5, -1.5]


def test_logits_equal_hand_computation(backbone):
    model = _model(backbone, num_slices=3, level_embed_dim=4)
    x = torch.randn(2, 3, 1, 32, 32)
    level = torch.tensor([1, 3])
    logits, weights = model(x, level=level)
    features = backbone.eval()(x.flatten(0, 1)).view(2, 3, -1)
    pooled = (weights.unsqueeze(-1) * features).sum(1)
    combined = torch.cat([pooled, model.level_embedding.weight[level]], dim=1)
    torch.testing.assert_close(logits, combined @ model.classifier.weight.T + model.classifier.bias)


def test_bias_equals_log_priors(backbone):
    priors = [0.5, 0.3, 0.2]
    model = _model(backbone, class_priors=priors)
    torch.testing.assert_close(model.classifier.bias, torch.tensor(priors).log())


def test_level_embedding_changes_output(backbone):
    model = _model(backbone, num_slices=3)
    x = torch.randn(1, 3, 1, 32, 32).expand(2, -1, -1, -1, -1)
    logits, _ = model(x, level=torch.tensor([0, 4]))
    assert not torch.allclose(logits[0], logits[1])
    no_level, _ = model(x)
    assert not torch.allclose(no_level[0], logits[0])
    assert model.level_embedding.num_embeddings == 5 and model.level_embedding.embedding_dim == 256
    without = _model(backbone, num_slices=3, num_levels=0)
    assert without.level_embedding is None and without.classifier.in_features == backbone.num_features


def test_masked_slices_get_zero_weight_and_do_not_change_logits(backbone):
    model = _model(backbone, num_slices=5)
    x = torch.randn(1, 5, 1, 32, 32)
    mask = torch.tensor([[False, True, True, True, True]])
    logits, weights = model(x, mask=mask)
    assert weights[0, 0] == 0
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    x[0, 0] = 25.0
    torch.testing.assert_close(model(x, mask=mask)[0], logits)


def test_slice_weights_are_learnable(backbone):
    model = _model(backbone, num_slices=3).train()
    logits, _ = model(torch.randn(2, 3, 1, 32, 32), level=torch.tensor([0, 1]))
    logits.sum().backward()
    assert model.slice_logits.grad is not None and model.slice_logits.grad.abs().sum() > 0


def test_wrong_slice_count_raises(backbone):
    with pytest.raises(ValueError, match="num_slices=5"):
        _model(backbone, num_slices=5)(torch.randn(1, 3, 1, 32, 32))
