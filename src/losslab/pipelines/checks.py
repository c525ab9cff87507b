"""Checks that run when a config is loaded, before any MLflow run opens and before the cache is built.

:func:`check_config` finds what the schema alone cannot: an unknown loss name, a loss parameter the
loss does not take or refuses (the loss is built, with uniform class counts when the number of
classes is known from ``data.class_names`` or the source), and ``data.source_kwargs`` keys or values
the source's constructor does not take (:func:`losslab.data.sources.check_source_kwargs`). Each
problem is one :class:`~losslab.config.ConfigError` line naming the key, the value and the file.
"""

from __future__ import annotations

from losslab.config import ConfigError, ExperimentConfig


def check_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Raise :class:`ConfigError` for the first problem found; return ``cfg`` unchanged otherwise."""
    check_loss(cfg)
    check_data_source(cfg)
    return cfg


def known_num_classes(cfg: ExperimentConfig) -> int | None:
    """The number of classes when the config or the source class fixes it (else None: read from data)."""
    from losslab.data.sources import get_source_class

    if cfg.data.class_names:
        return len(cfg.data.class_names)
    names = getattr(get_source_class(cfg.data.source), "class_names", None)
    return len(names) if names else None


def check_loss(cfg: ExperimentConfig) -> None:
    """The loss exists, takes every configured parameter and (when the classes are known) builds."""
    from losslab.losses import UnknownLossError, UnknownLossParamError, check_loss_params

    from losslab.tasks import task_of

    name, params = cfg.loss.name, cfg.loss.params
    try:
        check_loss_params(name, params)
        task_of(cfg).check_loss(cfg, known_num_classes(cfg))
    except UnknownLossError as exc:
        raise cfg.key_error("loss.name", name, str(exc)) from None
    except UnknownLossParamError as exc:
        key = exc.params[0]
        raise cfg.key_error(f"loss.{key}", params[key], str(exc)) from None
    except (TypeError, ValueError) as exc:
        named = [k for k in params if k in str(exc)]
        key = f"loss.{named[0]}" if named else "loss.name"
        raise cfg.key_error(key, params[named[0]] if named else name, f"{type(exc).__name__}: {exc}") from None


def check_data_source(cfg: ExperimentConfig) -> None:
    """``data.source`` is registered and ``data.source_kwargs`` fit its constructor."""
    from losslab.data.sources import SourceKwargsError, UnknownSourceError, check_source_kwargs

    try:
        check_source_kwargs(cfg.data.source, cfg.data.source_kwargs)
    except UnknownSourceError as exc:
        raise cfg.key_error("data.source", cfg.data.source, exc.args[0]) from None
    except SourceKwargsError as exc:
        raise cfg.key_error(f"data.source_kwargs.{exc.key}", exc.value, exc.problem) from None


def check_checkpoint_dir(cfg: ExperimentConfig) -> None:
    """``train.checkpoint_dir`` can be created and written (found before training, not after the
    first epoch)."""
    import os
    from pathlib import Path

    folder = Path(cfg.train.checkpoint_dir)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise cfg.key_error("train.checkpoint_dir", str(folder),
                            f"not writable ({exc.strerror or exc}: {exc.filename or folder})") from None


__all__ = ["ConfigError", "check_checkpoint_dir", "check_config", "check_data_source", "check_loss", "known_num_classes"]
