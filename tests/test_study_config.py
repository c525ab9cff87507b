"""The study file (losslab.config.study) and the sequential plan (losslab.pipelines.study_plan), without
training: bad files are refused at load time naming the file and the key; the plan's looks, decisions,
MDE and next cells agree with losslab.stats computed by hand on the same differences."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from losslab import stats
from losslab.config import ConfigError
from losslab.config.study import load_study, read_study_file, validate_study
from losslab.pipelines.study_plan import Cell, looks, outcomes, required_cells, seed_cells

BASE = {"name": "s1", "config": None, "variants": {"ce": ["loss=ce"], "focal": ["loss=focal"]}, "reference": "ce",
        "folds": 2, "seeds": 2, "budget_seeds": 4, "metrics": ["balanced_accuracy"], "split": "val"}


def _write(tmp_path, data, name="study.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("change, expected", [
    ({"varaints": {"a": []}}, r"study\.yaml: unknown key 'varaints'"),
    ({"reference": "dice"}, r"study\.yaml: reference 'dice' is not a variant"),
    ({"budget_seeds": 1}, r"study\.yaml: budget_seeds 1 is below the 2 seed\(s\) to start with"),
    ({"split": "train"}, r"study\.yaml: split = 'train'"),
    ({"variants": {"ce": ["loss=ce"]}}, r"study\.yaml: variants = .*at least 2"),
    ({"planned": [["ce", "ce"]]}, r"planned pair \[ce, ce\]: needs two different variants"),
    ({"alpha": 1.5}, r"study\.yaml: alpha = 1\.5"),
    ({"metrics": [{"name": "auc", "direction": "up"}]}, r"study\.yaml: metrics\.0\.direction = 'up'"),
])
def test_bad_study_files_are_refused_naming_file_and_key(tmp_path, change, expected):
    path = _write(tmp_path, BASE | change)
    with pytest.raises(ConfigError, match=expected) as info:
        read_study_file(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_variant_is_validated_against_the_experiment_schema_at_load_time(tmp_path):
    path = _write(tmp_path, BASE | {"variants": {"ce": ["loss=ce"], "focal": ["loss=focal", "train.epochz=3"]}})
    with pytest.raises(ConfigError) as info:
        load_study(path)
    message = str(info.value)
    assert message.startswith(f"{path}: variants.focal = ") and "unknown key 'train.epochz'" in message
    assert "\n" not in message
    # a fold beyond the base config's data.num_folds (5 by default) is refused too, before anything runs
    with pytest.raises(ConfigError, match=r"variants\.ce .*data\.fold = 6 .*out of range"):
        load_study(_write(tmp_path, BASE | {"folds": [0, 6]}, "folds.yaml"))


def test_the_cli_refuses_a_bad_study_file_in_one_line(tmp_path, capsys):
    from losslab.cli import run

    path = _write(tmp_path, BASE | {"seeds": [0, 0]})
    assert run(["study", "-c", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and "seeds [0, 0]: need distinct seeds" in err


def _spec(**change):
    return validate_study(BASE | change, "<test>")


def _frame(spec, values: dict[tuple[str, int, int], float], ratio=0.5):
    rows = [{"variant": v, "fold": f, "seed": s, "cell": Cell(v, f, s).key, "test_train_ratio": ratio,
             "best_val/balanced_accuracy": x} for (v, f, s), x in values.items()]
    return pd.DataFrame(rows)


def test_seeds_and_looks_follow_the_budget():
    spec = _spec(seeds=[3, 5], budget_seeds=4)
    assert spec.all_seeds == [3, 5, 6, 7] and looks(spec) == [4, 6, 8]
    assert looks(_spec(folds=[0], seeds=1, budget_seeds=3)) == [2, 3]  # one fold: a t-test needs 2 pairs
    assert [c.key for c in seed_cells(spec, 6, ["ce", "focal"])] == ["ce|f0|s6", "focal|f0|s6", "ce|f1|s6", "focal|f1|s6"]


def test_a_planted_difference_is_decided_at_the_first_look_against_stats_by_hand():
    spec = _spec()
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 0.01, 8)
    values = {}
    for i, (seed, fold) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        values[("ce", fold, seed)] = 0.60 + noise[i]
        values[("focal", fold, seed)] = 0.80 + noise[4 + i]
    frame = _frame(spec, values)
    (out,) = outcomes(spec, frame)
    d = np.array([values[("focal", f, s)] - values[("ce", f, s)] for s, f in [(0, 0), (0, 1), (1, 0), (1, 1)]])
    p = stats.nadeau_bengio_ttest(d, 0.5)[1]
    threshold = stats.sequential_thresholds([4, 6, 8], 0.05)[0]
    assert p < threshold  # the hand computation decides too
    assert (out.decided, out.look, out.pairs, out.better) == (True, 1, 4, "focal")
    assert out.p_value == pytest.approx(p) and out.threshold == pytest.approx(threshold)
    assert out.mde == pytest.approx(stats.minimum_detectable_difference(d.std(ddof=1), 4, 0.5, 0.05))
    cells, complete = required_cells(spec, frame, set(frame["cell"]))
    assert complete and len(cells) == 8  # no third seed
    assert "decided at look 1 (2 seed(s), 4 pairs): focal better" in out.line()


def test_an_undecided_pair_adds_seeds_for_its_variants_only_and_stops_at_the_budget():
    spec = _spec(variants={"ce": ["loss=ce"], "focal": ["loss=focal"], "ldam": ["loss=ldam"]}, budget_seeds=3)
    rng = np.random.default_rng(2)
    values = {}
    for seed in (0, 1, 2):
        for fold in (0, 1):
            base = 0.6 + rng.normal(0, 0.02)
            values[("ce", fold, seed)] = base
            values[("ldam", fold, seed)] = base + rng.normal(0, 0.02)  # no difference
            if seed < 2:
                values[("focal", fold, seed)] = base + 0.3 + rng.normal(0, 0.005)
    frame = _frame(spec, values)
    first = frame[frame["seed"] < 2]
    cells, complete = required_cells(spec, first, set(first["cell"]))
    assert not complete
    added = [c for c in cells if c.seed == 2]
    assert sorted(c.key for c in added) == ["ce|f0|s2", "ce|f1|s2", "ldam|f0|s2", "ldam|f1|s2"]  # focal is decided
    cells, complete = required_cells(spec, frame, set(frame["cell"]))
    assert complete and len(cells) == 12 + 4
    ldam = next(o for o in outcomes(spec, frame) if o.a == "ldam")
    assert not ldam.decided and ldam.budget_spent and ldam.seeds == 3 and ldam.alpha == pytest.approx(0.025)
    d = np.array([values[("ldam", f, s)] - values[("ce", f, s)] for s in (0, 1, 2) for f in (0, 1)])
    assert ldam.mde == pytest.approx(stats.minimum_detectable_difference(d.std(ddof=1), 6, 0.5, 0.025))
    needed = stats.pairs_needed(d.mean(), d.std(ddof=1), 0.5, 0.025)
    assert ldam.n_needed == needed
    assert "budget of 3 seed(s) spent" in ldam.line() and "MDE" in ldam.line()


def test_identical_variants_are_never_decided_and_one_fold_is_a_plain_paired_t():
    spec = _spec(folds=[0], seeds=2, budget_seeds=3)
    values = {(v, 0, s): 0.5 + 0.1 * s for v in ("ce", "focal") for s in (0, 1, 2)}
    frame = _frame(spec, values, ratio=0.4)
    (out,) = outcomes(spec, frame)
    assert not out.decided and out.budget_spent and out.pairs == 3 and out.mde == 0.0 and math.isinf(out.n_needed)
    values[("focal", 0, 2)] = 0.8
    (out,) = outcomes(spec, _frame(spec, values, ratio=0.4))
    d = np.array([0.0, 0.0, 0.8 - 0.7])
    assert out.p_value == pytest.approx(stats.nadeau_bengio_ttest(d, 0.0)[1])  # ratio 0: one fold


def test_a_study_recorded_by_an_older_losslab_is_refused_in_one_line():
    """Before f04cd57 the study kept one split fingerprint (a str); checking it then raised
    ``TypeError: 'str' object is not a mapping``. It is now refused naming the study."""
    from types import SimpleNamespace

    import optuna

    from losslab.config import ConfigError, load_config
    from losslab.pipelines.study_worker import FINGERPRINT_ATTR, Worker

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    study.set_user_attr(FINGERPRINT_ATTR, "70d1d45c06c1")
    worker = SimpleNamespace(study=study, spec=SimpleNamespace(name="old-demo"))
    with pytest.raises(ConfigError, match="study old-demo was created by an older losslab.*70d1d45c06c1"):
        Worker.check_split(worker, load_config(None), SimpleNamespace(split_fingerprint="70d1d45c06c1"))
