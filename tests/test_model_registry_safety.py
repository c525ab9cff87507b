"""Registered models cannot run code on load: losslab logs safetensors weights plus a JSON spec and
rebuilds the model with its own builders; a pickle-format model is refused (one line) unless the
caller opts in. Real SQLite MLflow store, no mocks."""

from __future__ import annotations

import uuid

import pytest
import torch
from typer.testing import CliRunner

from _crafted import register_pickle_bomb
from losslab.config import dump_yaml
from losslab.models.export import ModelFormatError, build_multimodal_from_spec, multimodal_spec, read_model_dir, \
    save_model_dir
from losslab.models.multimodal import build_multimodal_model
from losslab.pipelines.registry import load_registered_model
from losslab.tracking import UnsafeModelError


def test_a_pickle_registered_model_is_refused_and_never_unpickled(make_config, tmp_path):
    marker = tmp_path / "pwned"
    uri = register_pickle_bomb(f"bomb-{uuid.uuid4().hex[:8]}", marker, dump_yaml(make_config()))
    with pytest.raises(UnsafeModelError, match="pickle-format mlflow.pytorch model: loading it can run arbitrary code"):
        load_registered_model(uri)
    assert not marker.exists()

    from losslab.cli import app

    result = CliRunner().invoke(app, ["evaluate", "--model", uri])
    assert result.exit_code == 2, result.output
    assert "is refused" in result.output and "--allow-pickle" in result.output
    assert "Traceback" not in result.output
    assert not marker.exists()

    # the crafted model is live: the explicit opt-in unpickles it (and the payload runs)
    with pytest.raises(AttributeError):  # the payload returns a file object, not a model
        load_registered_model(uri, allow_pickle=True)
    assert marker.exists()


def test_a_multimodal_model_round_trips_through_safetensors_and_its_spec(tmp_path):
    torch.manual_seed(0)
    captions = ["CT of the chest with contrast.", "MRI of the brain, axial.", "X-ray of the left hand."]
    spec = {"image": {"backbone": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}},
            "text": {"dim": 32, "depth": 1, "max_length": 16}, "fusion": "cross_attention", "fusion_dim": 32}
    tasks = {"modality": ["CT", "MR", "XR"], "plane": ["axial", "other"]}
    model = build_multimodal_model(spec, tasks, texts=captions, in_chans=3).eval()
    model.preprocessing = {"image_mean": [0.1, 0.2, 0.3], "image_std": [1.0, 1.1, 1.2]}
    save_model_dir(model, tmp_path, multimodal_spec(model, in_chans=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["losslab_model.json", "weights.safetensors"]

    saved_spec, state = read_model_dir(tmp_path)
    rebuilt = build_multimodal_from_spec(saved_spec)
    rebuilt.load_state_dict(state, strict=True)
    rebuilt.eval()
    assert rebuilt.task_classes == tasks and rebuilt.preprocessing == model.preprocessing
    ids, mask = model.tokenizer(captions, model.max_length)  # as ImageTextDataset tokenizes for the model
    ids2, mask2 = rebuilt.tokenizer(captions, rebuilt.max_length)
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)  # the same vocabulary, not a re-learnt one
    image = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        (logits, features), (logits2, features2) = model(image, ids, mask), rebuilt(image, ids2, mask2)
    assert torch.equal(features, features2)
    assert all(torch.equal(logits[t], logits2[t]) for t in tasks)


def test_a_model_folder_without_its_spec_is_a_clear_error(tmp_path):
    save_model_dir(torch.nn.Linear(2, 2), tmp_path, {"kind": "classifier"})
    (tmp_path / "losslab_model.json").unlink()
    with pytest.raises(ModelFormatError, match="losslab_model.json is missing"):
        read_model_dir(tmp_path)
