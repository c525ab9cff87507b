from pathlib import Path

import pytest

from losslab.config import ConfigError, ExperimentConfig, flatten, load_config


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def config_tree(tmp_path, monkeypatch):
    root = tmp_path / "configs"
    write(root / "data" / "d.yaml", "source: brats\nbag_size: 8\nbatch_size: 2\n")
    write(root / "loss" / "focal.yaml", "name: focal\ngamma: 2.0\n")
    write(root / "loss" / "ce.yaml", "name: ce\nlabel_smoothing: 0.1\n")
    write(root / "experiment" / "base.yaml", "train:\n  epochs: 7\noptim:\n  lr: 0.01\n")
    write(root / "experiment" / "exp.yaml",
          "defaults:\n  - data/d\n  - loss/focal\n  - ./base.yaml\ndata:\n  bag_size: 12\n")
    monkeypatch.setenv("LOSSLAB_CONFIG_ROOT", str(root))
    return root


def test_defaults_compose_sections_and_own_keys_win(config_tree):
    cfg = load_config(config_tree / "experiment" / "exp.yaml")
    assert cfg.data.bag_size == 12  # own key beats data/d.yaml's 8
    assert cfg.data.batch_size == 2  # from data/d.yaml
    assert cfg.loss.name == "focal" and cfg.loss.params == {"gamma": 2.0}
    assert cfg.train.epochs == 7 and cfg.optim.lr == 0.01  # from ./base.yaml at top level


def test_dotted_overrides_parse_yaml_values(config_tree):
    cfg = load_config(config_tree / "experiment" / "exp.yaml", ["loss.gamma=0.5", "data.fold=3", "cv.folds=[0, 2]"])
    assert cfg.loss.params["gamma"] == 0.5
    assert cfg.data.fold == 3
    assert cfg.cv.folds == [0, 2]


def test_section_override_selects_a_file(config_tree):
    cfg = load_config(config_tree / "experiment" / "exp.yaml", ["loss=ce"])
    assert cfg.loss.name == "ce" and cfg.loss.params == {"label_smoothing": 0.1}


def test_overrides_as_one_string(config_tree):
    cfg = load_config(config_tree / "experiment" / "exp.yaml", "loss.gamma=3 train.epochs=2")
    assert cfg.loss.params["gamma"] == 3 and cfg.train.epochs == 2


def test_typo_names_key_value_and_file(config_tree):
    bad = write(config_tree / "experiment" / "typo.yaml", "defaults:\n  - data/d\ntrain:\n  epoch: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "train.epoch" in msg and "5" in msg and str(bad) in msg


def test_wrong_type_names_key_value_and_file_of_origin(config_tree):
    write(config_tree / "data" / "bad.yaml", "bag_size: lots\n")
    exp = write(config_tree / "experiment" / "e2.yaml", "defaults:\n  - data/bad\n")
    with pytest.raises(ConfigError) as err:
        load_config(exp)
    msg = str(err.value)
    assert "data.bag_size" in msg and "'lots'" in msg and "bad.yaml" in msg


def test_override_errors_name_the_override(config_tree):
    with pytest.raises(ConfigError, match="data.bag_size.*'x'.*command-line override"):
        load_config(config_tree / "experiment" / "exp.yaml", ["data.bag_size=x"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["loss.gamma"])


def test_missing_default_file_is_clear(config_tree):
    exp = write(config_tree / "experiment" / "e3.yaml", "defaults:\n  - data/nope\n")
    with pytest.raises(ConfigError, match="data/nope.*not found"):
        load_config(exp)


def test_flatten_and_roundtrip():
    cfg = ExperimentConfig()
    flat = flatten(cfg.to_dict())
    assert flat["data.bag_size"] == cfg.data.bag_size
    assert flat["loss.name"] == "ce"
    again = ExperimentConfig.model_validate(cfg.to_dict())
    assert again == cfg


def test_repository_configs_load():
    repo = Path(__file__).resolve().parents[1] / "configs" / "experiment"
    for path in sorted(repo.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.loss.name, path


@pytest.mark.parametrize("section, body, key, value", [
    ("sweep", "sweep:\n  n_trial: 5\n", "sweep.n_trial", "5"),
    ("sweep", "sweep:\n  space:\n    optim.lr: {type: float, high: 1}\n", "sweep.space.optim.lr", "needs 'low' and 'high'"),
    ("evaluate", "evaluate:\n  split: train\n", "evaluate.split", "'train'"),
    ("evaluate", "evaluate:\n  tta: {passes: 0}\n", "evaluate.tta.passes", "0"),
    ("distill", "distill:\n  ce_weigth: 1.0\n", "distill.ce_weigth", "1.0"),
    ("distill", "distill:\n  teacher: {epochs: 0}\n", "distill.teacher.epochs", "0"),
])
def test_sweep_evaluate_distill_sections_are_typed_with_the_same_errors(config_tree, section, body, key, value):
    bad = write(config_tree / "experiment" / f"bad_{section}.yaml", body)
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert key in msg and value in msg and str(bad) in msg


def test_typed_sections_keep_what_was_set(config_tree):
    from losslab.config import DistillConfig, EvaluateConfig, SweepConfig, section_dict

    exp = write(config_tree / "experiment" / "sections.yaml",
                "sweep:\n  n_trials: 3\n  space:\n    optim.lr: {type: float, low: 0.001, high: 0.1, log: true}\n"
                "evaluate:\n  split: val\ndistill:\n  losses: [vanilla, crd]\n  teacher: {epochs: 2}\n")
    cfg = load_config(exp)
    assert isinstance(cfg.sweep, SweepConfig) and isinstance(cfg.evaluate, EvaluateConfig)
    assert isinstance(cfg.distill, DistillConfig) and cfg.distill.teacher.epochs == 2
    assert section_dict(cfg.sweep).keys() == {"n_trials", "space"} and section_dict(cfg.evaluate) == {"split": "val"}
    assert section_dict(cfg.distill) == {"losses": ["vanilla", "crd"], "teacher": {"epochs": 2}}
    assert load_config(None).sweep is None and load_config(None).distill is None
    assert ExperimentConfig.model_validate(cfg.to_dict()).to_dict() == cfg.to_dict()  # round trip
