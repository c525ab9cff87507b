"""The LeNet instance encoder of Ilse et al. and plain image classification (issue 12, items 6, 7)."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from losslab.config import ModelConfig, load_config
from losslab.models import ImageClassifier, MILClassifier, build_model, create_backbone


def _reference_lenet() -> tuple[nn.Sequential, nn.Sequential]:
    """The feature extractor of the authors' model.py (AttentionDeepMIL), written out again."""
    part1 = nn.Sequential(nn.Conv2d(1, 20, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2, stride=2),
                          nn.Conv2d(20, 50, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2, stride=2))
    part2 = nn.Sequential(nn.Linear(50 * 4 * 4, 500), nn.ReLU())
    return part1, part2


def test_lenet_mil_equals_the_authors_feature_extractor():
    encoder = create_backbone("lenet_mil", in_chans=1)
    part1, part2 = _reference_lenet()
    assert encoder.num_features == 500
    assert sum(p.numel() for p in encoder.parameters()) == sum(p.numel() for p in [*part1.parameters(), *part2.parameters()]) == 426070
    with torch.no_grad():
        for ours, theirs in zip([encoder.features[0], encoder.features[3], encoder.fc[1]], [part1[0], part1[3], part2[0]]):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
        x = torch.randn(7, 1, 28, 28)
        expected = part2(part1(x).view(-1, 50 * 4 * 4))
        torch.testing.assert_close(encoder(x), expected)
    with pytest.raises(RuntimeError, match="lenet_mil has no pretrained weights"):
        create_backbone("lenet_mil", in_chans=1, pretrained=True)


def test_lenet_with_mil_heads_and_image_kind():
    mil = build_model(ModelConfig(kind="mil", backbone="lenet_mil", in_chans=1, head="gated_attention"), num_outputs=2)
    assert isinstance(mil, MILClassifier) and mil.head.in_dim == 500
    logits, attention = mil(torch.randn(2, 5, 1, 28, 28), torch.tensor([[1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool))
    assert logits.shape == (2, 2) and attention[0, 3:].abs().sum() == 0
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(2))
    image = build_model(ModelConfig(kind="image", backbone="lenet_mil", in_chans=1), num_outputs=10,
                        class_priors=[0.5] + [0.5 / 9] * 9)
    assert isinstance(image, ImageClassifier)
    x = torch.randn(4, 1, 28, 28)
    image.eval()
    logits, none = image(x)
    assert none is None
    torch.testing.assert_close(logits, image.classifier(image.backbone(x)))
    torch.testing.assert_close(image.classifier.bias, torch.log(torch.tensor([0.5] + [0.5 / 9] * 9)))
    with pytest.raises(TypeError, match="image model got an unexpected argument 'hidden_dim'"):
        build_model(ModelConfig(kind="image", backbone="lenet_mil", in_chans=1, head_kwargs={"hidden_dim": 4}), 2)


def test_image_kind_trains_and_evaluates_on_the_long_tailed_digits(tmp_path):
    """model.kind=image on mnist_digits with data.imbalance and data.train_cases: the class counts
    logged follow the formula, and evaluate scores the source's balanced test split."""
    from losslab.data.splits import long_tailed_counts
    from losslab.pipelines.evaluate import run_evaluate
    from losslab.pipelines.train import run_train

    cfg = load_config("experiment/long_tailed_digits.yaml", [
        f"data.cache_dir={tmp_path / 'cache'}", "data.imbalance.ratio=10", "train.epochs=1",
        f"train.checkpoint_dir={tmp_path / 'ckpt'}", "tracking.experiment=tests-image", "data.salt=s"])
    result = run_train(cfg)
    run = mlflow.get_run(result.folds[0].run_id)
    counts = json.loads(run.data.params["data.class_counts_train"])
    assert counts == long_tailed_counts([360] * 10, 10).tolist()  # 400 a digit minus the validation fold (10 folds)
    assert run.data.params["data.normalize_resolved"] == "fixed" and run.data.params["data.normalize_mean"] == "0.1307"
    evaluated = run_evaluate(cfg, source=result.folds[0].run_id, split="test", calibration={"enabled": False},
                             tta={"enabled": False}, latency={"enabled": False})
    predictions = evaluated.predictions
    assert len(predictions) == 1000 and np.bincount(predictions["label"]).tolist() == [100] * 10
    recall = [(predictions.loc[predictions["label"] == c, "prediction"] == c).mean() for c in range(10)]
    assert evaluated.metrics["test/balanced_accuracy"] == pytest.approx(np.mean(recall))
    # train's own test score (same best weights, same training normaliser) equals evaluate's
    trained = mlflow.get_run(result.folds[0].run_id).data.metrics
    assert trained["test/balanced_accuracy"] == pytest.approx(evaluated.metrics["test/balanced_accuracy"])
    assert trained["test/auc"] == pytest.approx(evaluated.metrics["test/auc"], abs=1e-9)
    small = run_train(cfg.model_copy(update={"data": cfg.data.model_copy(update={"train_cases": 100})}))
    assert sum(json.loads(mlflow.get_run(small.folds[0].run_id).data.params["data.class_counts_train"])) == 100
