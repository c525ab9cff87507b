"""MIL heads and MILClassifier: values checked against hand computations, not only shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losslab.models import (
    MILClassifier,
    UnknownMILHeadError,
    build_mil_head,
    init_bias_from_priors,
    list_mil_heads,
    masked_softmax,
    register_mil_head,
)
from losslab.models.mil import MeanHead

ALL_HEADS = ["attention", "dual_stream", "gated_attention", "max", "mean", "topk"]
D, K = 6, 3


def _features(batch: int = 2, num_instances: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, num_instances, D, generator=gen)
    mask = torch.ones(batch, num_instances, dtype=torch.bool)
    mask[0, 3:] = False  # first bag: 3 valid, 2 padded
    return features, mask


def _head(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build_mil_head(name, D, K, **kwargs).eval()


class TinyBackbone(nn.Module):
    """(M, 1, H, W) -> (M, 8): conv, tanh, global average and max pooling."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


def test_registry_lists_all_heads_sorted():
    assert list_mil_heads() == ALL_HEADS
    assert list_mil_heads("*attention") == ["attention", "gated_attention"]


def test_unknown_head_lists_known_names_sorted():
    with pytest.raises(KeyError) as info:
        build_mil_head("gated", D, K)
    assert isinstance(info.value, UnknownMILHeadError)
    assert "'gated'" in str(info.value) and ", ".join(ALL_HEADS) in str(info.value)


def test_unknown_kwarg_names_head_and_argument():
    with pytest.raises(TypeError, match=r"'attention'.*'hiden_dim'"):
        build_mil_head("attention", D, K, hiden_dim=64)
    # None kwargs are dropped: the default is kept.
    assert build_mil_head("attention", D, K, hidden_dim=None).attention_v.out_features == 128


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_mil_head("mean")(MeanHead)


@pytest.mark.parametrize("name", ALL_HEADS)
def test_masked_instances_get_zero_attention_and_do_not_change_logits(name):
    head = _head(name)
    features, mask = _features()
    out = head(features, mask)
    logits, attention = out[0], out[1]
    assert logits.shape == (2, K) and attention.shape == (2, 5)
    assert torch.all(attention[0, 3:] == 0)
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(2))
    assert torch.all(attention >= 0)
    changed = features.clone()
    changed[0, 3:] = 100.0 * torch.randn(2, D)
    out2 = head(changed, mask)
    torch.testing.assert_close(out2[0], logits)
    torch.testing.assert_close(out2[1], attention)


@pytest.mark.parametrize("name", ALL_HEADS)
def test_mask_none_means_all_valid(name):
    head = _head(name)
    features, _ = _features()
    full = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(head(features)[0], head(features, full)[0])


def test_mean_head_equals_manual_mean():
    head = _head("mean")
    features, mask = _features()
    logits, attention = head(features, mask)
    expected = torch.stack([head.classifier(features[0, :3].mean(0)), head.classifier(features[1].mean(0))])
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(attention[0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0, 0]))


def test_max_head_equals_manual_max_and_attention_counts_winning_dims():
    head = _head("max")
    features, mask = _features()
    logits, attention = head(features, mask)
    expected = torch.stack([head.classifier(features[0, :3].amax(0)), head.classifier(features[1].amax(0))])
    torch.testing.assert_close(logits, expected)
    winners = features[1].argmax(dim=0)  # (D,)
    torch.testing.assert_close(attention[1], torch.bincount(winners, minlength=5).float() / D)
    # One instance dominating every dimension gets attention exactly 1.
    dominated = features.clone()
    dominated[1, 2] = 50.0
    assert head(dominated, mask)[1][1].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("name", ["attention", "gated_attention"])
def test_attention_heads_equal_hand_computation(name):
    head = _head(name, hidden_dim=7)
    features, mask = _features()
    logits, attention = head(features, mask)
    hidden = torch.tanh(features @ head.attention_v.weight.T + head.attention_v.bias)
    if name == "gated_attention":
        hidden = hidden * torch.sigmoid(features @ head.attention_u.weight.T + head.attention_u.bias)
    scores = (hidden @ head.attention_w.weight.T + head.attention_w.bias).squeeze(-1)  # (B, N)
    for b, n_valid in enumerate([3, 5]):
        a = torch.softmax(scores[b, :n_valid], dim=0)
        torch.testing.assert_close(attention[b, :n_valid], a)
        z = (a.unsqueeze(1) * features[b, :n_valid]).sum(0)
        torch.testing.assert_close(logits[b], z @ head.classifier.weight.T + head.classifier.bias)


def test_topk_with_k_equal_n_is_mean_of_instance_logits():
    head = _head("topk", k=5)
    features, mask = _features()
    logits, attention = head(features, mask)
    instance_logits = head.classifier(features)
    torch.testing.assert_close(logits[1], instance_logits[1].mean(0))
    torch.testing.assert_close(logits[0], instance_logits[0, :3].mean(0))  # k capped at 3 valid
    torch.testing.assert_close(attention[1], torch.full((5,), 0.2))


def test_topk_k2_is_mean_of_two_largest_and_attention_on_them():
    head = _head("topk", k=2)
    features, mask = _features()
    logits, attention = head(features, mask)
    instance_logits = head.classifier(features)[1]  # (N, K)
    top2 = instance_logits.topk(2, dim=0).values.mean(0)
    torch.testing.assert_close(logits[1], top2)
    predicted = logits[1].argmax()
    chosen = instance_logits[:, predicted].topk(2).indices
    expected = torch.zeros(5)
    expected[chosen] = 0.5
    torch.testing.assert_close(attention[1], expected)
    with pytest.raises(ValueError, match="k must be"):
        build_mil_head("topk", D, K, k=0)


def test_dual_stream_critical_instance_and_streams():
    head = _head("dual_stream", query_dim=8)
    features, mask = _features(seed=3)
    logits, attention, extras = head(features, mask)
    instance_logits = extras["instance_logits"]
    torch.testing.assert_close(instance_logits, head.instance_classifier(features))
    masked = instance_logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    assert torch.equal(extras["critical_index"], masked.argmax(dim=1))
    max_stream, bag_stream = extras["stream_logits"]
    torch.testing.assert_close(max_stream, masked.amax(dim=1))
    torch.testing.assert_close(logits, (max_stream + bag_stream) / 2)
    class_attention = extras["class_attention"]  # (B, K, N)
    assert class_attention.shape == (2, K, 5)
    torch.testing.assert_close(class_attention.sum(-1), torch.ones(2, K))
    # Attention of each class is highest at that class's critical instance.
    assert torch.equal(class_attention.argmax(dim=-1), extras["critical_index"])
    # The returned attention is the predicted class's row.
    predicted = logits.argmax(dim=1)
    torch.testing.assert_close(attention, class_attention[torch.arange(2), predicted])
    # Hand computation of the bag stream for bag 1.
    q = F.normalize(head.query(features[1]), dim=-1)
    a = torch.softmax(q @ q[extras["critical_index"][1]].T / head.temperature, dim=0).T  # (K, N)
    torch.testing.assert_close(class_attention[1], a)
    bag_embeddings = a @ features[1]  # (K, D)
    expected = (head.bag_classifier.weight * bag_embeddings).sum(dim=(1, 2)) + head.bag_classifier.bias
    torch.testing.assert_close(bag_stream[1], expected)


def test_dual_stream_paper_scaling_and_temperature():
    head = _head("dual_stream", query_dim=8, normalize_queries=False, temperature=0.5)
    features, mask = _features()
    _, _, extras = head(features, mask)
    q = head.query(features[1])
    crit = extras["critical_index"][1]
    a = torch.softmax(q @ q[crit].T / (math.sqrt(8) * 0.5), dim=0).T
    torch.testing.assert_close(extras["class_attention"][1], a)


def test_class_priors_initialise_bias_to_log_priors():
    priors = [0.7, 0.2, 0.1]
    for name in ("mean", "attention", "topk"):
        torch.testing.assert_close(build_mil_head(name, D, K, class_priors=priors).classifier.bias, torch.tensor(priors).log())
    dsmil = build_mil_head("dual_stream", D, K, class_priors=[7, 2, 1])  # unnormalised counts
    torch.testing.assert_close(dsmil.instance_classifier.bias, torch.tensor(priors).log())
    torch.testing.assert_close(dsmil.bag_classifier.bias, torch.tensor(priors).log())
    binary = nn.Linear(2, 1)
    init_bias_from_priors(binary.bias, [0.8, 0.2])
    torch.testing.assert_close(binary.bias, torch.tensor([math.log(0.25)]))
    with pytest.raises(ValueError, match="3 outputs"):
        build_mil_head("mean", D, K, class_priors=[0.5, 0.5])
    with pytest.raises(ValueError, match="positive"):
        build_mil_head("mean", D, K, class_priors=[0.5, 0.0, 0.5])


def test_masked_softmax_all_masked_row_is_zero_not_nan():
    weights = masked_softmax(torch.randn(2, 3), torch.tensor([[True, False, True], [False, False, False]]))
    assert weights[0, 1] == 0 and torch.allclose(weights[0].sum(), torch.tensor(1.0))
    assert torch.equal(weights[1], torch.zeros(3))


def _classifier(head: str, instance_dropout: float = 0.0) -> MILClassifier:
    torch.manual_seed(0)
    return MILClassifier(TinyBackbone(), build_mil_head(head, TinyBackbone.num_features, 2), instance_dropout=instance_dropout)


def test_classifier_forward_features_and_padded_pixels_do_not_matter():
    model = _classifier("gated_attention").eval()
    x = torch.randn(2, 4, 1, 8, 8)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    features = model.forward_features(x)
    assert features.shape == (2, 4, 8)
    torch.testing.assert_close(features[1, 2], model.backbone(x[1, 2:3])[0])
    logits, attention = model(x, mask)
    x2 = x.clone()
    x2[0, 2:] = torch.rand(2, 1, 8, 8) * 50
    logits2, attention2 = model(x2, mask)
    torch.testing.assert_close(logits2, logits)
    assert torch.all(attention2[0, 2:] == 0)


def test_backbone_runs_once_on_all_instances():
    model = _classifier("mean").eval()
    calls = []
    model.backbone.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    model(torch.randn(3, 5, 1, 8, 8), torch.ones(3, 5, dtype=torch.bool))
    assert calls == [torch.Size([15, 1, 8, 8])]


def test_instance_dropout_masks_instances_but_never_a_whole_bag():
    model = _classifier("attention", instance_dropout=0.9)
    torch.manual_seed(1)
    mask = torch.ones(64, 6, dtype=torch.bool)
    mask[:, 4:] = False
    dropped = model.drop_instances(mask)
    assert torch.all(dropped.sum(dim=1) >= 1)  # never empty
    assert not torch.any(dropped & ~mask)  # never revives padding
    assert dropped.sum() < mask.sum() * 0.5  # p=0.9 removes most instances
    model.train()
    _, attention = model(torch.randn(4, 6, 1, 8, 8), mask[:4])
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(4))
    model.eval()  # no dropout in eval
    _, attention = model(torch.randn(4, 6, 1, 8, 8), mask[:4])
    assert torch.all(attention[:, :4] > 0)
    with pytest.raises(ValueError, match="instance_dropout"):
        MILClassifier(TinyBackbone(), build_mil_head("mean", 8, 2), instance_dropout=1.0)


def _toy_bags(num_bags: int = 16, bag_size: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of dark 8x8 images; a bag is positive iff one instance is bright."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.rand(num_bags, bag_size, 1, 8, 8, generator=gen)
    labels = torch.arange(num_bags) % 2
    for b in range(num_bags):
        if labels[b]:
            x[b, torch.randint(bag_size, (1,), generator=gen)] += 1.0
    return x, labels


@pytest.mark.parametrize("name", ["attention", "gated_attention", "dual_stream"])
def test_attention_heads_learn_separable_toy(name):
    model = _classifier(name).train()
    x, labels = _toy_bags()
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)

    def loss_fn() -> torch.Tensor:
        out = model(x, mask)
        if len(out) == 3:  # DSMIL: mean of the two stream losses
            return sum(F.cross_entropy(s, labels) for s in out[2]["stream_logits"]) / 2
        return F.cross_entropy(out[0], labels)

    with torch.no_grad():
        initial = loss_fn().item()
    for _ in range(25):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(x, mask)
        final = loss_fn().item()
    assert final < 0.7 * initial
    assert (out[0].argmax(1) == labels).float().mean() == 1.0
    if name == "dual_stream":
        return  # its max stream learns slowly (gradient through one instance); bag stream solves it
    # Attention of positive bags concentrates on the bright instance.
    bright = x.mean(dim=(2, 3, 4)).argmax(dim=1)
    positives = labels == 1
    assert torch.all(out[1][positives].argmax(dim=1) == bright[positives])


def test_dual_stream_head_takes_cosine_classifiers_for_ldam(make_config):
    """LDAM (normed_linear) on the dual-stream head: both streams give cosine logits, equal to the
    cosine of the (flattened) inputs and the classifier weights computed by hand."""
    import torch.nn.functional as F

    from losslab.pipelines.train import build_components

    cfg = make_config("loss=ldam", "model.head=dual_stream", "model.head_kwargs={query_dim: 8}")
    _, model = build_components(cfg, [10, 30])
    head = model.head
    features = torch.randn(2, 5, head.instance_classifier.in_features)
    logits, _, extras = head(features)
    w_inst = head.instance_classifier.weight  # (D, K)
    inst = torch.einsum("bnd,dk->bnk", features / features.norm(dim=-1, keepdim=True), w_inst / w_inst.norm(dim=0))
    torch.testing.assert_close(extras["instance_logits"], inst)
    max_stream, bag_stream = extras["stream_logits"]
    attention = extras["class_attention"]  # (B, K, N)
    bags = torch.einsum("bkn,bnd->bkd", attention, features).flatten(1)  # (B, K * D)
    w_bag = head.bag_classifier.linear.weight  # (K * D, K)
    torch.testing.assert_close(bag_stream, F.normalize(bags, dim=1) @ F.normalize(w_bag, dim=0))
    assert max_stream.abs().max() <= 1 + 1e-6 and bag_stream.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(logits, (max_stream + bag_stream) / 2)
