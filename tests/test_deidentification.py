"""No protected health information reaches the cache, the index, logs or MLflow (issue 4).

Real DICOM files with known fake identifiers are preprocessed and trained on with a dedicated real
MLflow store; then every file of the cache and of the store (SQLite database and artifacts) is
scanned for those identifiers.
"""

import logging
from pathlib import Path

import pandas as pd
import pydicom

from losslab.config import load_config
from losslab.data.sources import run_generator
from losslab.pipelines.preprocess import run_preprocess
from losslab.pipelines.train import run_train


def _identifiers(root: Path) -> set[str]:
    values = set()
    for path in list(root.rglob("*.dcm"))[:200]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                        "ReferringPhysicianName", "StudyID"):
            value = str(getattr(ds, keyword, "") or "")
            if value:
                values.add(value)
                values.update(part for part in value.split("^") if len(part) >= 4 and not part.isdigit())
    return values


def test_fake_identifiers_never_reach_cache_logs_or_mlflow(tmp_path, caplog, capsys):
    raw = tmp_path / "lumbar"
    run_generator("embedded_lumbar", str(raw), seed=1, studies=12)
    identifiers = _identifiers(raw)
    assert any(v.startswith("FAKE^PATIENT") for v in identifiers) and len(identifiers) > 20

    store = tmp_path / "store"
    store.mkdir()
    cfg = load_config(None, [
        "data.source=rsna_lumbar", f"data.root={raw}", "data.generate=null", f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_folds=2", "data.batch_size=8", "data.salt=deid-test-salt",
        "model.kind=slices25d", "model.backbone=test_resnet", "model.in_chans=3",
        "model.head_kwargs={num_slices: 7, level_embed_dim: 8}",
        "loss=ce", "train.epochs=1", f"train.checkpoint_dir={tmp_path / 'ckpt'}",
        f"tracking.tracking_uri=sqlite:///{store / 'mlflow.db'}",
        f"tracking.artifact_location={(store / 'artifacts').as_uri()}",
        "tracking.experiment=deid", "tracking.registered_model_name=deid-model",
    ])
    with caplog.at_level(logging.DEBUG):
        info = run_preprocess(cfg)
        run_train(cfg, info=info)
    captured = capsys.readouterr()

    hits = []
    text_sources = {"log records": caplog.text, "stdout": captured.out, "stderr": captured.err,
                    "index": pd.read_parquet(info.cache_dir / "index.parquet").to_csv()}
    # local checkpoint copies are removed once uploaded: the checkpoints are scanned in the store
    ckpt_files = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()] if (tmp_path / "ckpt").exists() else []
    for folder in (tmp_path / "cache", store):
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert files, folder
        for path in files + ckpt_files:
            text_sources[str(path)] = path.read_bytes().decode("latin-1")
    for where, text in text_sources.items():
        for ident in identifiers:
            if ident in text:
                hits.append((ident, where))
    assert hits == []
    # and the store really holds the run's params, tags, metrics and artifacts that were scanned
    assert any(p.name == "config.yaml" for p in (store / "artifacts").rglob("*"))
    assert {"best.pt", "last.pt"} <= {p.name for p in (store / "artifacts").rglob("*.pt")}
    assert len(info.index) > 0
