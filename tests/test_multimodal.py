"""Image + text pieces: the embedded_medpix generator, the WordPiece tokenizer and small text
transformer, the multimodal classifier (4 fusions), the image-text dataset and its errors."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from losslab.config import DataConfig, ModelConfig
from losslab.data.cache import build_cache
from losslab.data.sources import run_generator
from losslab.data.text import (ImageTextDataset, MissingTextError, check_image_text_manifest, collate_image_text,
                               task_classes_from_index)
from losslab.models import build_model
from losslab.models.multimodal import FUSIONS, MultiModalClassifier, build_multimodal_model, masked_mean
from losslab.models.text import SmallTextTransformer, WordPieceTokenizer, create_text_encoder

TASKS = ["modality", "location"]
IMAGE = {"backbone": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}}


def caption_tokens(model, texts):
    """Captions as the data path hands them to ``model`` (:class:`ImageTextDataset`:
    ``model.tokenizer(texts, model.max_length)``; zero-width ids and mask for an image-only model)."""
    if model.tokenizer is None:
        empty = torch.zeros(len(texts), 0, dtype=torch.long)
        return empty, empty.clone()
    return model.tokenizer(list(texts), model.max_length)


@pytest.fixture(scope="module")
def medpix(tmp_path_factory):
    root = tmp_path_factory.mktemp("medpix") / "raw"
    run_generator("embedded_medpix", str(root), seed=1, num_samples=40, image_size=32)
    return root


@pytest.fixture(scope="module")
def medpix_cache(medpix, tmp_path_factory):
    cfg = DataConfig(source="manifest", root=str(medpix), cache_dir=str(tmp_path_factory.mktemp("mcache")),
                     num_folds=2, salt="s", generate=None)
    return build_cache(cfg)


def test_generator_writes_manifest_with_partial_text_information(medpix):
    df = pd.read_csv(medpix / "manifest.csv")
    assert list(df.columns) == ["path", "label", "text", "modality", "location", "patient_id"]
    assert len(df) == 40 and (df["label"] == df["modality"]).all()
    assert set(df["modality"]) <= {"CT", "MRI", "XRAY"} and set(df["location"]) <= {"head", "chest", "abdomen"}
    assert df["patient_id"].nunique() < 40  # some patients have two images
    from PIL import Image

    assert np.asarray(Image.open(medpix / df["path"][0])).shape == (32, 32)
    # same seed, same files
    other = medpix.parent / "again"
    run_generator("embedded_medpix", str(other), seed=1, num_samples=40, image_size=32)
    assert (other / "manifest.csv").read_text() == (medpix / "manifest.csv").read_text()


def test_generator_text_rates_are_as_documented(tmp_path):
    from losslab.data.sources.embedded_medpix import LOCATION_WORDS, MODALITY_WORDS, write_caption

    rng = np.random.default_rng(0)
    named_mod = named_loc = correct_loc = 0
    n = 2000
    for _ in range(n):
        text = write_caption("MRI", "chest", rng).lower()
        named_mod += any(w.lower() in text for w in MODALITY_WORDS["MRI"])
        loc = [l for l, words in LOCATION_WORDS.items() if any(w in text for w in words)]
        named_loc += bool(loc)
        correct_loc += loc == ["chest"]
    assert 0.30 < named_mod / n < 0.40  # modality_text_rate 0.35
    assert 0.81 < named_loc / n < 0.89  # location_text_rate 0.85
    assert 0.86 < correct_loc / named_loc < 0.94  # 1 - location_text_noise
    with pytest.raises(ValueError, match="image_format"):
        run_generator("embedded_medpix", str(tmp_path / "x"), image_format="jpg")


def test_wordpiece_tokenizer_pads_truncates_and_pickles():
    tok = WordPieceTokenizer.train(["CT of the chest shows a mass.", "MRI of the brain."] * 5, vocab_size=80)
    ids, mask = tok(["CT of the brain.", "a " * 40], max_length=10)
    assert ids.shape == mask.shape == (2, 10)
    assert mask[0].tolist() == [1] * 7 + [0] * 3 and ids[0, 7:].tolist() == [0, 0, 0]  # [CLS] ct of the brain . [SEP]
    assert mask[1].sum() == 10  # truncated
    again = pickle.loads(pickle.dumps(tok))
    assert torch.equal(again(["CT of the brain."], 10)[0], ids[:1])
    with pytest.raises(ValueError, match="no non-empty caption"):
        WordPieceTokenizer.train(["", "  "])


def test_text_encoder_ignores_padding_and_errors():
    torch.manual_seed(0)
    enc = SmallTextTransformer(vocab_size=50, dim=16, depth=1, num_heads=2, max_length=12, dropout=0.0).eval()
    ids = torch.tensor([[2, 7, 9, 3, 0, 0]])
    mask = (ids != 0).long()
    out = enc(ids, mask)
    assert out.shape == (1, 6, 16)
    changed = ids.clone()
    changed[0, 4:] = 11  # different tokens under the padding mask
    assert torch.allclose(enc(changed, mask)[:, :4], out[:, :4], atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        SmallTextTransformer(50, dim=10, num_heads=4)
    with pytest.raises(ValueError, match="texts"):
        create_text_encoder({"name": "small_transformer"})
    with pytest.raises(ValueError, match="unknown keys"):
        create_text_encoder({"name": "small_transformer", "width": 3}, texts=["a b"])


def test_hf_text_encoder_needs_transformers_or_a_local_copy():
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"losslab\[text\]"):
            create_text_encoder({"name": "distilbert-base-uncased"})
    else:  # pragma: no cover - only with the optional extra
        with pytest.raises(RuntimeError, match="no local copy"):
            create_text_encoder({"name": "/nonexistent/encoder"})


@pytest.mark.parametrize("fusion", FUSIONS)
def test_multimodal_forward_shapes_and_backward(fusion):
    torch.manual_seed(0)
    tasks = {"modality": ["CT", "MRI", "XRAY"], "location": ["head", "chest"]}
    model = build_multimodal_model({"image": IMAGE, "text": {"dim": 16, "depth": 1, "num_heads": 2, "max_length": 12},
                                    "fusion": fusion, "fusion_dim": 16, "num_heads": 2}, tasks,
                                   texts=["CT of the chest", "MRI of the head"])
    ids, mask = caption_tokens(model, ["CT of the chest", "MRI"])
    logits, features = model(torch.randn(2, 1, 32, 32), ids, mask)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"modality": (2, 3), "location": (2, 2)}
    assert features.shape == (2, model.feature_dim)
    assert model.feature_dim == (32 if fusion in ("cross_attention", "concat") else 16)
    sum(v.sum() for v in logits.values()).backward()
    if fusion == "image_only":
        assert model.text_encoder is None and model.tokenizer is None
    if fusion == "text_only":
        assert model.image_encoder is None
    again = pickle.loads(pickle.dumps(model))
    model.eval(), again.eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(again(x, ids, mask)[1], model(x, ids, mask)[1])


def test_cross_attention_text_changes_image_prediction_and_padding_does_not():
    torch.manual_seed(0)
    model = build_multimodal_model({"image": IMAGE, "text": {"dim": 16, "depth": 1, "num_heads": 2, "max_length": 12,
                                                             "dropout": 0.0},
                                    "fusion": "cross_attention", "fusion_dim": 16, "num_heads": 2, "dropout": 0.0},
                                   {"t": ["a", "b"]}, texts=["ct chest", "mri head"]).eval()
    x = torch.randn(1, 1, 32, 32)
    a = model(x, *caption_tokens(model, ["ct chest"]))[1]
    b = model(x, *caption_tokens(model, ["mri head"]))[1]
    assert not torch.allclose(a[:, :16], b[:, :16])  # the image stream attends to the text
    ids, mask = caption_tokens(model, ["ct chest"])
    ids2 = ids.clone()
    ids2[mask == 0] = 5
    assert torch.allclose(model(x, ids2, mask)[1], a, atol=1e-5)
    assert torch.allclose(masked_mean(torch.tensor([[[1.0], [3.0], [100.0]]]), torch.tensor([[1, 1, 0]])),
                          torch.tensor([[2.0]]))


def test_multimodal_errors():
    with pytest.raises(ValueError, match="unknown fusion 'late'"):
        build_multimodal_model({"fusion": "late"}, {"t": ["a", "b"]})
    with pytest.raises(ValueError, match="unknown key"):
        build_multimodal_model({"fusoin": "concat"}, {"t": ["a", "b"]})
    with pytest.raises(ValueError, match="at least 2"):
        MultiModalClassifier(None, torch.nn.Identity(), {"t": ["a"]}, fusion="text_only")


def test_build_model_dispatches_multimodal():
    cfg = ModelConfig(kind="multimodal", backbone="test_vit", in_chans=1, head="concat",
                      backbone_kwargs={"img_size": 32, "patch_size": 8},
                      head_kwargs={"fusion_dim": 16, "num_heads": 2, "texts": ["ct chest", "mri head"],
                                   "text": {"dim": 16, "num_heads": 2, "depth": 1, "max_length": 8}})
    model = build_model(cfg, 3)
    assert isinstance(model, MultiModalClassifier) and model.task_classes == {"label": ["0", "1", "2"]}
    logits, _ = model(torch.randn(2, 1, 32, 32), *caption_tokens(model, ["ct", "mri"]))
    assert logits["label"].shape == (2, 3)
    with pytest.raises(ValueError, match="model.head is the fusion"):
        build_model(ModelConfig(kind="multimodal"), 2)


def test_dataset_items_and_collate(medpix_cache):
    info = medpix_cache
    classes = task_classes_from_index(info.index, TASKS)
    assert classes == {"modality": ["CT", "MRI", "XRAY"], "location": ["abdomen", "chest", "head"]}
    tok = WordPieceTokenizer.train(["ct chest", "mri head"], vocab_size=40)
    ds = ImageTextDataset(info.index, info.cache_dir, classes, tok, 16, image_mean=[0.5], image_std=[0.25])
    item = ds[3]
    raw = np.load(info.cache_dir / info.index["array_path"][3])[0]
    assert torch.allclose(item["image"], torch.from_numpy((raw - 0.5) / 0.25))
    meta = __import__("json").loads(info.index["meta"][3])
    assert item["labels"]["location"] == classes["location"].index(meta["task_location"])
    batch = collate_image_text([ds[0], ds[1], ds[2]])
    assert batch["image"].shape == (3, 1, 32, 32) and batch["input_ids"].shape == (3, 16)
    assert batch["labels"]["modality"].shape == (3,) and batch["index"].tolist() == [0, 1, 2]


def _write_manifest(root: Path, rows: list[dict], columns: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


def test_manifest_check_names_file_row_and_column(tmp_path):
    cols = ["path", "label", "text", "modality", "location", "patient_id"]
    good = {"path": "a.png", "label": "CT", "text": "CT of the head", "modality": "CT", "location": "head",
            "patient_id": "p1"}
    path = _write_manifest(tmp_path / "ok", [good, good], cols)
    assert check_image_text_manifest(path, TASKS) == 2
    path = _write_manifest(tmp_path / "notext", [good, dict(good, text=""), good], cols)
    with pytest.raises(MissingTextError, match=r"manifest.csv: row 3 \(path 'a.png'\): empty caption in column 'text'"):
        check_image_text_manifest(path, TASKS)
    path = _write_manifest(tmp_path / "nocol", [{k: v for k, v in good.items() if k != "location"}],
                           [c for c in cols if c != "location"])
    with pytest.raises(MissingTextError, match=r"manifest.csv: missing column 'location' \(the labels of task 'location'"):
        check_image_text_manifest(path, TASKS)
    path = _write_manifest(tmp_path / "notextcol", [{k: v for k, v in good.items() if k != "text"}],
                           [c for c in cols if c != "text"])
    with pytest.raises(MissingTextError, match="missing column 'text' \\(the captions"):
        check_image_text_manifest(path, TASKS)


def test_dataset_errors_name_case_and_key(medpix_cache):
    info = medpix_cache
    index = info.index.copy()
    index.loc[2, "meta"] = '{"task_location": "head", "task_modality": "CT"}'
    with pytest.raises(MissingTextError, match=rf"case {index['case_id'][2]}: no caption \(meta key 'text' is missing\)"):
        ImageTextDataset(index, info.cache_dir, {"modality": ["CT", "MRI", "XRAY"]})
    with pytest.raises(MissingTextError, match="no value for task 'severity'.*tasks \\['location', 'modality'\\]"):
        task_classes_from_index(info.index, ["severity"])
    with pytest.raises(ValueError, match="task 'modality' value 'CT' is not one of"):
        ImageTextDataset(info.index, info.cache_dir, {"modality": ["MRI", "XRAY"]})
