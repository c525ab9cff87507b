"""Shared by the study tests: the overrides that put a study on the session's small cohort."""

from __future__ import annotations


def small_overrides(embedded_root, small_cache, tmp_path, experiment: str, epochs: int = 1) -> list[str]:
    """The session's small cohort and cache (conftest), a tiny model, no registered model, one experiment."""
    return [f"data.root={embedded_root}", f"data.cache_dir={small_cache.cache_dir}", "data.num_folds=3",
            "data.salt=test-salt", "data.bag_size=4", "data.batch_size=4", "model.backbone=test_resnet",
            "model.head_kwargs={hidden_dim: 16}", f"train.epochs={epochs}", f"train.checkpoint_dir={tmp_path / 'ckpt'}",
            f"tracking.experiment={experiment}", "tracking.log_model=false", "optim.lr=0.003"]
