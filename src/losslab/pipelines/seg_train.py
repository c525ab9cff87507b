"""train (segmentation): one fold, or ``cv.folds`` as child runs, of a MONAI segmentation model.

``model.kind: segmentation`` routes :func:`losslab.pipelines.train.run_train` / ``train_fold`` here.
Run naming and tags as for classification (``<loss>-f<fold>``, ``losslab.loss``, ``losslab.fold``,
...). Every epoch: ``train/loss``, ``train/loss_<term>``, ``loss_weight/<term>`` (compound and
scheduled losses), ``val/loss``, ``val/dice_<region>``, ``val/mean_dice``, ``val/hd95_<region>``;
an overlay plot every ``train.plot_every`` epochs. Trained by the engine's one loop (EMA, SWA, early
stopping, the alarms, checkpoints, ``--resume``). At the end the best checkpoint is validated again
(``best_val/*``, what ``compare`` and ``evaluate`` read), scored once on the held-out test patients
(``test/*``, when ``data.test_fraction`` > 0) and logged and registered as a model.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import mlflow

from losslab.config import ExperimentConfig
from losslab.data.seg_cache import SegCacheInfo, build_seg_cache
from losslab.engine.loop import evaluation_weights, fit, load_checkpoint, resolve_device, seed_everything
from losslab.engine.callbacks import ReseedEachEpoch
from losslab.engine.segmentation import SegmentationTask
from losslab.pipelines.common import base_tags
from losslab.tracking import log_and_register_model, log_config, log_metrics_batch, managed_run

log = logging.getLogger(__name__)


def seg_loss_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """The loss parameters with ``sigmoid: true`` added (also to every compound term) for regions."""
    params = copy.deepcopy(cfg.loss.params)
    if cfg.seg.labels == "regions":
        params["sigmoid"] = True
        if cfg.loss.name == "compound":
            params["terms"] = [dict(t, sigmoid=True) if isinstance(t, dict) else t for t in params.get("terms") or []]
    if cfg.loss.name == "compound":
        params.pop("sigmoid", None)
    return params


def build_seg_task(cfg: ExperimentConfig, channel_names: list[str], fractions: list[float] | None = None):
    """``(task, model)`` for ``cfg``: the loss (refused unless it is a segmentation loss) and the network,
    whose output bias starts at the channels' voxel ``fractions`` in the training volumes when given
    (:meth:`SegCacheInfo.voxel_fractions`; a model about to load weights needs none).

    Raises:
        ValueError: ``loss.name`` is not a segmentation loss (names it and the segmentation losses).
    """
    from losslab.losses import build_loss, list_losses
    from losslab.losses.registry import get_loss_class
    from losslab.models import build_model

    if cfg.train.mixup_alpha:
        raise ValueError(f"train.mixup_alpha={cfg.train.mixup_alpha}: mixup of whole volumes and their masks is not "
                         f"supported for model.kind=segmentation; set it to 0")
    if getattr(get_loss_class(cfg.loss.name), "task", None) != "segmentation" and cfg.loss.name != "compound":
        seg = [n for n in list_losses() if getattr(get_loss_class(n), "task", None) == "segmentation"]
        raise ValueError(f"loss.name={cfg.loss.name!r} is not a segmentation loss; with model.kind=segmentation use "
                         f"one of {', '.join(seg + ['compound'])}")
    loss_fn = build_loss(cfg.loss.name, **seg_loss_params(cfg), num_classes=len(channel_names))
    if getattr(loss_fn, "task", None) != "segmentation":
        raise ValueError(f"loss.name={cfg.loss.name!r}: its terms are {loss_fn.task} losses, not segmentation losses")
    model = build_model(cfg.model, num_outputs=len(channel_names))
    if fractions is not None:
        model.init_output_bias(fractions, sigmoid=cfg.seg.labels == "regions")
    task = SegmentationTask(loss_fn, channel_names, cfg.seg.labels == "regions", cfg.seg.patch_size,
                            cfg.seg.sw_batch_size, cfg.seg.overlap, cfg.seg.hd95)
    return task, model


def train_seg_fold(cfg: ExperimentConfig, info: SegCacheInfo, fold: int, nested: bool = False,
                   extra_callbacks: list | None = None, extra_tags: dict[str, str] | None = None,
                   resume_run_id: str | None = None):
    """Train one fold (``cfg`` is already the fold's config, see ``train.fold_config``) in its own MLflow
    run (FAILED with the reason on any error) through the engine's :func:`losslab.engine.loop.fit`;
    with ``resume_run_id`` that run continues from its last checkpoint. Returns a FoldResult."""
    from losslab.data.seg_datasets import make_seg_loaders
    from losslab.pipelines.registry import segmentation_spec
    from losslab.pipelines.train import FoldResult
    from losslab.tracking_seg import SegmentationMLflowCallback

    seed_everything(cfg.train.seed + fold, cfg.train.deterministic)
    tags = base_tags(cfg, "train", fold) | {"losslab.task": "segmentation", "losslab.seed": str(cfg.train.seed)}
    tags |= extra_tags or {}
    with managed_run(run_name=cfg.tracking.run_name or f"{cfg.loss.name}-f{fold}", tags=tags, nested=nested,
                     run_id=resume_run_id) as run:
        run_id = run.info.run_id
        fractions = info.voxel_fractions(fold)
        task, model = build_seg_task(cfg, info.channel_names, fractions)
        train_loader, val_loader = make_seg_loaders(info, fold, cfg.seg, cfg.model.spatial_dims, cfg.data.batch_size,
                                                    cfg.data.num_workers, seed=cfg.train.seed + fold)
        resume_from = _resume_or_log(cfg, info, task, run_id, resume_run_id, (train_loader, val_loader), fractions)
        train_cfg = cfg.train.model_copy(update={"checkpoint_dir": str(Path(cfg.train.checkpoint_dir) / run_id)})
        callbacks = [ReseedEachEpoch(train_loader, cfg.train.seed + fold),
                     SegmentationMLflowCallback(run_id, task.metric_names, plot_every=cfg.train.plot_every,
                                                synchronous=False, checkpoint_every=cfg.train.upload_checkpoint_every)]
        state = fit(model, task.loss_fn, train_loader, val_loader, train_cfg, cfg.optim, task.metric_names,
                    callbacks=callbacks + list(extra_callbacks or []), resume_from=resume_from, step=task)
        model.load_state_dict(evaluation_weights(load_checkpoint(Path(train_cfg.checkpoint_dir) / "best.pt")))
        device = resolve_device(cfg.train.device)
        best_metrics, _ = task.validate(model.to(device), val_loader, device, cfg.train.amp)
        summary = {f"best_{k}": v for k, v in best_metrics.items()}
        summary["best_epoch"] = float(state.best_epoch if state.best_epoch is not None else -1)
        test_metrics = score_seg_test_split(cfg, info, task, model, device)
        log_metrics_batch(run_id, summary | test_metrics, step=int(state.epoch))
        best_metrics = best_metrics | test_metrics
        version = None
        if cfg.tracking.log_model:
            volume = val_loader.dataset[0]["image"][None].numpy()  # (1, C, X, Y, Z) -> one training-sized patch
            patch = tuple(slice(0, s) for s in cfg.seg.patch_size)
            example = volume[(slice(None), slice(None)) + patch + ((0,) if cfg.model.spatial_dims == 2 else ())]
            mv = log_and_register_model(model, example, cfg.tracking.registered_model_name,
                                        cfg.tracking.alias if not nested else None,
                                        version_tags={"fold": fold, "loss": cfg.loss.name, "run_id": run_id},
                                        spec=segmentation_spec(cfg, info.channel_names))
            version = f"{mv.version}" if mv is not None else None
        return FoldResult(fold, run_id, "FINISHED", best_metrics, version, seed=cfg.train.seed)


def _resume_or_log(cfg: ExperimentConfig, info: SegCacheInfo, task: SegmentationTask, run_id: str,
                   resume_run_id: str | None, loaders: tuple, fractions: list[float]) -> Path | None:
    """A new run: log the config, the data sizes and the output bias prior; ``None``. A resumed one: its
    ``last.pt``."""
    from losslab.pipelines.train import resume_checkpoint

    if resume_run_id is not None:
        return resume_checkpoint(cfg, run_id)
    train_loader, val_loader = loaders
    log_config(cfg)
    mlflow.log_params({"data.n_train": len(train_loader.dataset), "data.n_val": len(val_loader.dataset),
                       "loss.formula": str(task.loss_fn)[:6000], "seg.channels": ",".join(info.channel_names),
                       "seg.output_bias_prior": ",".join(f"{n}={f:.5g}" for n, f in zip(info.channel_names, fractions))})
    mlflow.set_tag("losslab.class_names", ",".join(task.metric_names))
    return None


def score_seg_test_split(cfg: ExperimentConfig, info: SegCacheInfo, task: SegmentationTask, model, device
                         ) -> dict[str, float]:
    """``test/*`` (Dice per region, mean Dice, HD95, loss) of the best model on the held-out test
    patients (fold -1, ``data.test_fraction``), scored once; ``{}`` and one log line without them."""
    from losslab.data.seg_datasets import make_seg_test_loader

    loader = make_seg_test_loader(info)
    if loader is None:
        log.warning("no held-out test split in the segmentation cache %s (data.test_fraction=%s): no test/* metrics",
                    info.cache_dir, cfg.data.test_fraction)
        return {}
    out = split_metrics(task, model, loader, device, cfg.train.amp, "test")
    out["test/n_cases"] = float(len(loader.dataset))
    return out


def split_metrics(task: SegmentationTask, model, loader, device, amp: bool, split: str) -> dict[str, float]:
    """:meth:`SegmentationTask.validate` over ``loader``, its ``val/*`` metrics named ``<split>/*``."""
    metrics, _ = task.validate(model, loader, device, amp)
    return {f"{split}/{k[len('val/'):]}": v for k, v in metrics.items()}


def run_seg_train(cfg: ExperimentConfig, info: SegCacheInfo | None = None, extra_callbacks: list | None = None,
                  resume_run_id: str | None = None):
    """Train ``data.fold``, or every (seed, fold) of ``cv`` as children of one parent run; a TrainResult.
    ``resume_run_id``: continue that (single-fold) run from its last checkpoint."""
    from losslab.pipelines.train import TrainResult, run_cv, train_fold

    info = info or build_seg_cache(cfg.data, cfg.seg)
    build_seg_task(cfg, info.channel_names)  # a bad loss/model is refused before any run opens
    if resume_run_id is not None and cfg.cv.is_multi_run:
        raise ValueError("--resume continues one run: resume each fold run by its own id (without cv.folds)")
    if not cfg.cv.is_multi_run:  # train_fold gives the run its fold config and comes back here
        result = train_fold(cfg, info, cfg.data.fold, nested=mlflow.active_run() is not None,
                            extra_callbacks=extra_callbacks, resume_run_id=resume_run_id)
        return TrainResult([result], None, info.class_names)
    return run_cv(cfg, info, extra_callbacks)
