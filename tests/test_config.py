"""Config assembly and type checks (fcsae.config): the one place every entry point builds trial configs."""

import pytest
import yaml

from fcsae import config as fcfg
from fcsae.config import SECTIONS, SplitConfig, TrainerConfig, field_type_problem, from_dict, section_configs
from fcsae.errors import FcsaeInputError


@pytest.mark.parametrize("section, field, value, needle", [
    ("trainer", "seed", "0", "trainer.seed: must be an integer, got '0'"),
    ("trainer", "seed", True, "trainer.seed: must be an integer, got True"),
    ("trainer", "lr", "1e-4", "trainer.lr: must be a finite number, got '1e-4'"),
    ("trainer", "lr", float("nan"), "trainer.lr: must be a finite number"),
    ("tracker", "enabled", "yes", "tracker.enabled: must be true or false"),
    ("split", "criterion", 3, "split.criterion: must be a string, got 3"),
    ("sae", "dict_size", 64.0, "sae.dict_size: must be an integer, got 64.0"),
])
def test_from_dict_refuses_wrong_types_naming_field_and_type(section, field, value, needle):
    data = {field: value, **({"d_in": 8} if section == "sae" else {})}
    with pytest.raises(FcsaeInputError) as e:
        from_dict(SECTIONS[section], data, f"{section}.")
    assert needle in str(e.value)
    assert field_type_problem(section, field, value).startswith(f"{section}.{field}: must be")


def test_yaml_float_without_dot_is_explained():
    raw = yaml.safe_load("lr: 1e-4")  # PyYAML reads this as a string
    with pytest.raises(FcsaeInputError, match=r"trainer\.lr: .*write 1\.0e-4"):
        from_dict(TrainerConfig, raw, "trainer.")
    with pytest.raises(FcsaeInputError, match=r"trainer\.seed: must be an integer, got '0' \(a string: remove the quotes\)"):
        from_dict(TrainerConfig, yaml.safe_load("seed: '0'"), "trainer.")


def test_direct_construction_is_checked_too():
    with pytest.raises(FcsaeInputError, match="seed: must be an integer"):
        TrainerConfig(seed="0")


def test_int_is_a_valid_float_and_good_values_pass():
    cfg = from_dict(TrainerConfig, {"lr": 1, "seed": 3}, "trainer.")
    assert cfg.lr == 1 and cfg.seed == 3
    assert field_type_problem("trainer", "lr", 1) is None
    assert field_type_problem("trainer", "no_such_field", "x") is None


def test_section_configs_assembles_every_section():
    cfgs = section_configs({"lm": {"layer": 3}, "trainer": {"lr": 1e-3}}, {"split.criterion": "fc"}, d_in=16)
    assert set(cfgs) == set(SECTIONS)
    assert cfgs["harvest"].lm == cfgs["lm"] and cfgs["lm"].layer == 3
    assert cfgs["sae"].d_in == 16 and cfgs["trainer"].lr == 1e-3 and cfgs["split"] == SplitConfig(criterion="fc")
    for section, cls in SECTIONS.items():
        assert isinstance(cfgs[section], cls)


def test_section_configs_errors_name_the_field():
    with pytest.raises(FcsaeInputError, match=r"^trainer\.seed: must be an integer"):
        section_configs({"trainer": {"seed": "0"}})
    with pytest.raises(FcsaeInputError, match=r"^split\.criterion: must be one of"):
        section_configs({}, {"split.criterion": "bogus"})
    with pytest.raises(FcsaeInputError, match="not a dotted config field"):
        section_configs({}, {"nosection.x": 1})


def test_orchestrator_uses_the_same_assembly():
    from orchestrator import space

    assert space.section_configs is fcfg.section_configs
    assert space.field_type_problem is fcfg.field_type_problem


def test_checkpoint_cadence_has_one_definition():
    cfg = TrainerConfig(total_tokens=1000 * 8, batch_size=8, log_every=7)  # 1000 steps
    assert [s for s in range(1, 1001) if cfg.checkpoints_at(s)] == [1000]  # 0: only at the end
    every = cfg.resumable()
    assert every.checkpoint_every == 98 and every.checkpoint_every % cfg.log_every == 0  # ~10%, on a logging step
    assert [s for s in range(1, 1001) if every.checkpoints_at(s)] == [98 * i for i in range(1, 11)] + [1000]
    assert every.resumable() is every and TrainerConfig(checkpoint_every=5).resumable().checkpoint_every == 5
