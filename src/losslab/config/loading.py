"""Experiment configuration loading: YAML composition, dotted overrides, validation.

An experiment is one YAML file. It may start with a ``defaults:`` list naming other YAML files
relative to the ``configs/`` root (``data/embedded_brats``) or to the file itself (``./base.yaml``).
An entry whose first path component is a section name (``data``, ``model``, ``loss``, ``optim``,
``train``, ``tracking``, ``sweep``, ``cv``) is placed under that section; any other entry is merged at
the top level. The file's own keys are deep-merged last, then command-line overrides
(``loss.gamma=2.0``) are applied, then the result is validated against :mod:`losslab.schema`
and the task (:func:`losslab.tasks.check_task`). Every error names the key, the bad value and the file
it came from.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from losslab.schema import CONFIG_ROOT_ENV, SECTIONS, ConfigError, ExperimentConfig, _nearest_origin

def config_root() -> Path:
    """The ``configs/`` folder: $LOSSLAB_CONFIG_ROOT, else ./configs, else the repository's."""
    import os

    env = os.environ.get(CONFIG_ROOT_ENV)
    if env:
        return Path(env)
    cwd = Path.cwd() / "configs"
    if cwd.is_dir():
        return cwd
    return Path(__file__).resolve().parents[3] / "configs"


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively by ``update`` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_default(entry: str, current: Path, root: Path) -> Path:
    name = entry if entry.endswith((".yaml", ".yml")) else entry + ".yaml"
    candidates = [current.parent / name] if name.startswith(".") else [root / name, current.parent / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{current}: defaults entry {entry!r} not found (looked in {', '.join(map(str, candidates))})")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:  # an empty file would silently train the built-in defaults
        raise ConfigError(f"{path}: the config file is empty (no keys); refusing to run the built-in defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _compose(path: Path, root: Path, origins: dict[str, str], prefix: str, stack: tuple[Path, ...]) -> dict[str, Any]:
    """Load ``path`` with its defaults; record in ``origins`` which file set each dotted key."""
    if path in stack:
        raise ConfigError(f"{path}: circular defaults: {' -> '.join(map(str, stack + (path,)))}")
    data = _read_yaml(path)
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: 'defaults' must be a list of file names, got {defaults!r}")
    merged: dict[str, Any] = {}
    for entry in defaults:
        if not isinstance(entry, str):
            raise ConfigError(f"{path}: defaults entry must be a string, got {entry!r}")
        child = _resolve_default(entry, path, root)
        group = Path(entry).parts[0] if not entry.startswith(".") else None
        if group in SECTIONS and not prefix:
            sub = _compose(child, root, origins, group, stack + (path,))
            merged = deep_merge(merged, {group: sub})
        else:
            merged = deep_merge(merged, _compose(child, root, origins, prefix, stack + (path,)))
    _record_origins(data, str(path), origins, prefix)
    return deep_merge(merged, data)


def _record_origins(data: Any, source: str, origins: dict[str, str], prefix: str) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            origins[dotted] = source
            _record_origins(value, source, origins, dotted)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``loss.gamma=2.0`` -> (["loss", "gamma"], 2.0); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. loss.gamma=2.0")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key.split("."), value


def split_overrides(overrides: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Accept a list, or one string of space-separated overrides (the MLproject parameter)."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        import shlex

        return shlex.split(overrides)
    return [item for item in overrides if item.strip()]


def apply_overrides(data: dict[str, Any], overrides: list[str], origins: dict[str, str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) == 1 and keys[0] in SECTIONS and isinstance(value, str):
            # `loss=focal` selects the file configs/loss/focal.yaml for the whole section
            section_file = config_root() / keys[0] / f"{value}.yaml"
            _forget_origins(keys[0], origins)
            if section_file.is_file():
                sub = _compose(section_file.resolve(), config_root().resolve(), origins, keys[0], ())
                out[keys[0]] = sub
                continue
            if keys[0] != "loss":
                raise ConfigError(f"override {text!r}: no file {section_file}")
        node = out
        for part in keys[:-1]:
            if isinstance(node, list):  # a list item by position: loss.terms.0.weight=0.4
                node = _list_item(node, part, text)
                continue
            if not isinstance(node.get(part, {}), (dict, list)):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = node.setdefault(part, {})
        if isinstance(node, list):
            _list_item(node, keys[-1], text)
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value
        _forget_origins(".".join(keys), origins)
        origins[".".join(keys)] = f"command-line override {text!r}"
    return out


def _list_item(items: list, part: str, text: str) -> Any:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"override {text!r}: {part!r} is not a position in a list of {len(items)} item(s)")
    return items[int(part)]


def _forget_origins(key: str, origins: dict[str, str]) -> None:
    """``key`` was replaced as a whole: the files that set its sub-keys no longer explain them."""
    for stale in [k for k in origins if k.startswith(key + ".")]:
        del origins[stale]


def _format_validation_error(exc: ValidationError, origins: dict[str, str], path: str | None, data: dict) -> str:
    lines: list[str] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        source = origins.get(loc) or _nearest_origin(loc, origins) or path or "<defaults>"
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {loc!r} (value {value!r}) in {source}")
        else:
            lines.append(f"{loc} = {value!r} in {source}: {err['msg']}")
    if len(lines) == 1:
        return f"invalid configuration: {lines[0]}"
    return "invalid configuration:\n  " + "\n  ".join(lines)


def validate_config(data: dict[str, Any], origins: dict[str, str] | None = None, path: str | None = None) -> ExperimentConfig:
    """Validate the sections, then the pairing of task, model kind and loss (:func:`losslab.tasks.check_task`)."""
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origins or {}, path, data)) from None
    cfg._origins, cfg._path = dict(origins or {}), path
    _check_folds(cfg)
    _check_distill_data(cfg)
    task = _check_task(cfg, origins or {}, path)
    _fill_task_defaults(cfg, task)
    _check_channels_last(cfg, task)
    return cfg


def _fill_task_defaults(cfg: ExperimentConfig, task: Any) -> None:
    """The settings whose default is the task's (:meth:`losslab.tasks.Task.config_defaults`: the monitored
    metric and its mode and tie-breaks, the registered model's name), where the config sets none."""
    for (section, key), value in task.config_defaults().items():
        part = getattr(cfg, section)
        if key not in part.model_fields_set:
            setattr(part, key, value)


def _check_distill_data(cfg: ExperimentConfig) -> None:
    """A ``data.*`` key the image+text data path of ``distill`` cannot honour is refused here."""
    from losslab.data.text import check_distill_data

    check_distill_data(cfg)


def _check_channels_last(cfg: ExperimentConfig, task: Any) -> None:
    """``train.channels_last`` is a 2D memory format: refused where the task's model convolves volumes."""
    if cfg.train.channels_last and task.convolves_volumes(cfg):
        raise cfg.key_error("train.channels_last", True, f"applies to 2D backbones only; model.kind={cfg.model.kind} "
                            f"(spatial_dims={cfg.model.spatial_dims}) convolves volumes: set train.channels_last=false")


def _check_folds(cfg: ExperimentConfig) -> None:
    """Fold indices must exist: ``data.fold`` and every ``cv.folds`` entry in ``0..data.num_folds-1``."""
    n = cfg.data.num_folds
    if cfg.data.fold >= n:
        raise cfg.key_error("data.fold", cfg.data.fold, f"out of range: folds are 0..{n - 1} (data.num_folds={n})")
    folds = cfg.cv.folds
    if isinstance(folds, int) and not 1 <= folds <= n:
        raise cfg.key_error("cv.folds", folds, f"must be between 1 and data.num_folds={n}")
    if isinstance(folds, list):
        bad = [f for f in folds if not 0 <= f < n]
        if bad or not folds:
            raise cfg.key_error("cv.folds", folds, f"fold indices must be in 0..{n - 1} (data.num_folds={n})")


def _check_task(cfg: ExperimentConfig, origins: dict[str, str], path: str | None) -> Any:
    """The config's task, once it accepts the pairing of task, model kind, loss and settings. The task
    registry lives above the config layer (it knows the losses); it is imported here, lazily, so that an
    impossible pairing is refused at load time, before any MLflow run opens."""
    from losslab.losses.registry import UnknownLossError
    from losslab.tasks import TaskError, check_task

    def where(key: str) -> str:
        source = origins.get(key) or _nearest_origin(key, origins) or path
        return f" (in {source})" if source else " (the default)"

    try:
        return check_task(cfg, where)
    except UnknownLossError as exc:
        raise cfg.key_error("loss.name", cfg.loss.name, str(exc)) from None
    except TaskError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def load_config(path: str | Path | None = None, overrides: str | list[str] | None = None) -> ExperimentConfig:
    """Load an experiment YAML (or the defaults when ``path`` is None), apply overrides, validate."""
    origins: dict[str, str] = {}
    if path is None or str(path) == "":
        data: dict[str, Any] = {}
        shown = None
    else:
        p = Path(path)
        if not p.is_file():
            alt = config_root() / p
            alt = alt if alt.suffix else alt.with_suffix(".yaml")
            if alt.is_file():
                p = alt
            else:
                raise ConfigError(f"config file {path} not found (also looked for {alt})")
        p = p.resolve()
        data = _compose(p, config_root().resolve(), origins, "", ())
        shown = str(p)
    data = apply_overrides(data, split_overrides(overrides), origins)
    return validate_config(data, origins, shown)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def dump_yaml(cfg: ExperimentConfig, redact: bool = False) -> str:
    """The config as YAML. ``redact=True`` for anything logged or printed: URL passwords become ``***``
    and ``data.salt`` a fingerprint (:func:`losslab.redaction.redact_config`); without it, a config
    file to run (secrets included: keep such a file private)."""
    from losslab.redaction import redact_config

    data = cfg.to_dict()
    return yaml.safe_dump(redact_config(data) if redact else data, sort_keys=False)
