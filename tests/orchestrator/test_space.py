"""Search-space validation: every kind of bad input is reported, all at once, before Ray starts."""

import copy
from pathlib import Path

import optuna
import pytest

from fcsae.errors import FcsaeInputError
from orchestrator import space

REPO = Path(__file__).resolve().parents[2]

GOOD = {
    "name": "t",
    "runner": "tests.orchestrator.fake_runner",
    "fixed": {"sae": {"activation": "topk", "k": 4, "dict_size": 32}, "trainer": {"total_tokens": 4096, "batch_size": 256}},
    "search": {
        "split.criterion": {"type": "categorical", "values": ["none", "fc"], "grid": True},
        "tracker.ema_alpha": {"type": "float", "low": 0.9, "high": 0.999, "log": True},
        "sae.dict_size": {"type": "int", "low": 16, "high": 64},
        "tracker.tau_act": {"type": "float", "low": 0.0, "high": 0.5},
    },
    "seeds": [0, 1],
    "objectives": [{"metric": "absorption.mean_absorption_fraction", "mode": "min"}],
    "num_samples": 4,
    "max_concurrent": 2,
    "resources": {"cpu": 1, "gpu": 0},
}


def _problems(mutate) -> list[str]:
    raw = copy.deepcopy(GOOD)
    mutate(raw)
    with pytest.raises(space.SpaceError) as e:
        space.parse_space(raw, "s.yaml")
    assert isinstance(e.value, FcsaeInputError)
    return e.value.problems


def test_good_space_parses():
    spec = space.parse_space(copy.deepcopy(GOOD))
    assert [p.name for p in spec.params] == ["tracker.ema_alpha", "sae.dict_size", "tracker.tau_act"]
    assert spec.grid == (("split.criterion", ("none", "fc")), ("trainer.seed", (0, 1)))
    assert len(spec.grid_cells) == 4
    assert spec.objectives[0].mode == "min"


def test_shipped_spaces_validate():
    spec = space.load_space(REPO / "search_spaces" / "quickstart.yaml")
    criteria = dict(spec.grid).get("split.criterion") or next(p.values for p in spec.params if p.name == "split.criterion")
    assert "fc" in criteria and ({"none", "dead"} & set(criteria))


def test_gpu_recipe_is_the_study_at_the_literatures_scale():
    """absorption.yaml: the study's arms, 16k-65k latents, 1e8 tokens, the full vocabulary, a GPU share per trial."""
    spec = space.load_space(REPO / "search_spaces" / "absorption.yaml", check_machine=False)
    study = space.load_space(REPO / "search_spaces" / "study.yaml", check_machine=False)
    assert dict(spec.arms) == dict(study.arms)
    widths = dict(spec.grid)["sae.dict_size"]
    assert min(widths) >= 16384 and max(widths) <= 65536 and len(dict(spec.grid)["trainer.seed"]) >= 3
    assert spec.fixed["trainer"]["total_tokens"] >= 10**8 and spec.fixed["harvest"]["tokens"] >= 10**8
    assert spec.fixed["eval"]["absorption_words"] == 0 and "k" in spec.fixed["sae"]  # all words; one L0 for all
    assert 0 < spec.resources.gpu <= 1 and spec.fixed["trainer"]["device"] == spec.fixed["lm"]["device"] == "cuda"
    assert spec.num_samples == len(spec.grid_cells)
    if space._machine_gpus() == 0:  # on a CPU-only machine the machine check refuses it, naming the GPU
        with pytest.raises(space.SpaceError, match="resources.gpu"):
            space.load_space(REPO / "search_spaces" / "absorption.yaml")


def test_unknown_keys_everywhere_listed_together():
    def m(raw):
        raw["bogus"] = 1
        raw["fixed"]["sae"]["colour"] = "red"
        raw["fixed"]["nosection"] = {}
        raw["search"]["tracker.nope"] = {"type": "float", "low": 0, "high": 1}
        raw["search"]["tracker.ema_alpha"]["extra"] = 1
        raw["resources"]["tpu"] = 1
    probs = _problems(m)
    assert len(probs) == 6, probs
    joined = "\n".join(probs)
    for needle in ("bogus", "fixed.sae.colour", "fixed.nosection", "search.tracker.nope", "extra", "resources.tpu"):
        assert needle in joined


def test_wrong_types():
    def m(raw):
        raw["num_samples"] = "four"
        raw["max_concurrent"] = 1.5
        raw["search"]["sae.dict_size"]["low"] = 16.5
        raw["search"]["tracker.ema_alpha"]["log"] = "yes"
        raw["fixed"]["trainer"]["batch_size"] = "big"
    probs = _problems(m)
    assert any(p.startswith("num_samples") for p in probs)
    assert any(p.startswith("max_concurrent") for p in probs)
    assert any("sae.dict_size.low: must be an integer" in p for p in probs)
    assert any("log: must be true or false" in p for p in probs)
    assert any("batch_size" in p for p in probs)


def test_empty_inverted_and_refused_ranges():
    def m(raw):
        raw["search"]["tracker.ema_alpha"] = {"type": "float", "low": 0.99, "high": 0.9}
        raw["search"]["sae.dict_size"] = {"type": "int", "low": 8, "high": 8}
        raw["search"]["tracker.tau_act"] = {"type": "float", "low": -1.0, "high": 0.5}
        raw["search"]["trainer.lr"] = {"type": "float", "low": 0.0, "high": 1e-3, "log": True}
    probs = _problems(m)
    assert any("ema_alpha: empty or inverted" in p for p in probs)
    assert any("dict_size: empty or inverted" in p for p in probs)
    assert any("tau_act: value -1.0 refused" in p for p in probs)
    assert any("trainer.lr: log scale needs low > 0" in p for p in probs)


def test_range_end_refused_by_config_and_k_vs_dict_size():
    def m(raw):
        raw["search"]["tracker.ema_alpha"] = {"type": "float", "low": 0.9, "high": 1.0}
        raw["search"]["sae.dict_size"] = {"type": "int", "low": 2, "high": 64}  # k=4 > 2
    probs = _problems(m)
    assert any("ema_alpha: value 1.0 refused" in p and "(0, 1)" in p for p in probs)
    assert any("dict_size: value 2 refused" in p for p in probs)


def test_unknown_choices_objectives_and_scheduler():
    def m(raw):
        raw["search"]["split.criterion"]["values"] = ["none", "magic"]
        raw["objectives"] = [{"metric": "absorption.nope", "mode": "down"}]
        raw["scheduler"] = {"type": "hyperband", "metric": "mse"}
    probs = _problems(m)
    assert any("value 'magic' refused" in p and "fc" in p for p in probs)
    assert any("objectives[0].metric" in p for p in probs)
    assert any("objectives[0].mode" in p for p in probs)
    assert any("scheduler.type" in p for p in probs)
    assert any("scheduler.metric" in p for p in probs)


def test_objective_of_disabled_eval_refused():
    probs = _problems(lambda raw: raw.update(evals={"absorption": False}))
    assert any("not a metric of the enabled evals" in p for p in probs)


def test_fixed_sections_that_cannot_be_searched():
    def m(raw):
        raw["search"]["lm.layer"] = {"type": "int", "low": 1, "high": 3}
        raw["search"]["sae.d_in"] = {"type": "int", "low": 1, "high": 3}
    probs = _problems(m)
    assert sum("cannot be searched" in p for p in probs) == 2


def test_resources_beyond_machine():
    def m(raw):
        raw["resources"] = {"cpu": 10_000, "gpu": 3}
    probs = _problems(m)
    assert any("resources.cpu: 10000 per trial" in p for p in probs)
    assert any("resources.gpu: 3 per trial" in p for p in probs)
    spec = space.parse_space({**copy.deepcopy(GOOD), "resources": {"cpu": 10_000}}, check_machine=False)
    assert spec.resources.cpu == 10_000


def test_grid_budget_and_seeds():
    assert any("not a multiple of the 4 grid cells" in p for p in _problems(lambda r: r.update(num_samples=6)))
    assert any(p.startswith("seeds:") for p in _problems(lambda r: r.update(seeds=[0, 0])))
    def conflict(raw):
        raw["search"]["trainer.seed"] = {"type": "int", "low": 0, "high": 3}
    assert any("conflicts" in p for p in _problems(conflict))


def test_bad_runner_and_missing_objectives():
    def m(raw):
        raw["runner"] = "no.such.module"
        del raw["objectives"]
    probs = _problems(m)
    assert any(p.startswith("runner: cannot import") for p in probs)
    assert any(p.startswith("objectives: required") for p in probs)


def test_load_space_file_errors(tmp_path):
    with pytest.raises(FcsaeInputError, match="not found"):
        space.load_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(FcsaeInputError, match="not valid YAML"):
        space.load_space(bad)
    bad.write_text("- a list\n")
    with pytest.raises(space.SpaceError, match="top level"):
        space.load_space(bad)


def test_suggest_samples_in_range_and_cycles_grid():
    spec = space.parse_space(copy.deepcopy(GOOD))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    cells = []
    for _ in range(8):
        t = study.ask()
        const = space.suggest(t, spec)
        assert 0.9 <= t.params["tracker.ema_alpha"] <= 0.999
        assert 16 <= t.params["sae.dict_size"] <= 64
        cells.append((const["split.criterion"], const["trainer.seed"]))
    assert cells[:4] == cells[4:] and len(set(cells)) == 4


def test_architectures_space_crosses_activation_criterion_and_k():
    spec = space.load_space(REPO / "search_spaces" / "architectures.yaml", check_machine=False)
    grid = dict(spec.grid)
    assert grid["sae.activation"] == ("topk", "batchtopk", "matryoshka") and grid["split.criterion"] == ("none", "fc")
    assert len(spec.grid_cells) == spec.num_samples == 24
    for cell in spec.grid_cells:
        cfgs = space.section_configs(spec.fixed, cell, d_in=576)
        assert cfgs["sae"].activation == cell["sae.activation"] and cfgs["sae"].k == cell["sae.k"]


def test_fractional_k_refused_for_topk_and_accepted_for_batchtopk():
    ok = copy.deepcopy(GOOD)
    ok["fixed"]["sae"] = {**ok["fixed"].get("sae", {}), "activation": "batchtopk"}
    ok["search"]["sae.k"] = {"type": "float", "low": 2.5, "high": 12.5}
    space.parse_space(ok)
    bad = copy.deepcopy(ok)
    bad["fixed"]["sae"]["activation"] = "topk"
    with pytest.raises(space.SpaceError, match="topk keeps a whole number"):
        space.parse_space(bad)


# ------------------------------------------------------------------ issue 14 items 5 and 9


def test_cuda_without_a_gpu_refused_before_any_trial(monkeypatch):  # item 5
    monkeypatch.setattr(space, "_machine_gpus", lambda: 0)
    probs = _problems(lambda r: r["fixed"].update(lm={"device": "cuda"}))
    assert any(p.startswith("fixed.lm.device: 'cuda' but this machine has no CUDA GPU") for p in probs), probs
    monkeypatch.setattr(space, "_machine_gpus", lambda: 1)
    probs = _problems(lambda r: r["fixed"].update(trainer={"total_tokens": 4096, "batch_size": 256, "device": "cuda:0"}))
    assert any("fixed.trainer.device: 'cuda:0' needs resources.gpu > 0" in p for p in probs), probs


def test_scheduler_metric_must_be_one_the_trainer_logs():  # item 5
    bad = {"type": "asha", "metric": "train.nope", "mode": "min"}
    probs = _problems(lambda r: r.update(scheduler=bad))
    assert any(p.startswith("scheduler.metric:") and "train.fvu" in p and "'train.nope'" in p for p in probs), probs
    raw = copy.deepcopy(GOOD)
    raw["scheduler"] = {**bad, "metric": "train.fvu"}
    assert space.parse_space(raw).scheduler.metric == "train.fvu"


def test_duplicate_yaml_keys_refused(tmp_path):  # item 5
    f = tmp_path / "dup.yaml"
    f.write_text("name: a\nnum_samples: 2\nnum_samples: 4\n")
    with pytest.raises(FcsaeInputError, match=r"duplicate key 'num_samples' \(line 3\)"):
        space.load_space(f)


def test_an_int_no_row_can_hold_refused():  # item 5
    probs = _problems(lambda r: r["fixed"]["trainer"].update(total_tokens=10**30))
    assert any("trainer.total_tokens: must fit in a 64-bit integer" in p for p in probs), probs


def test_first_problem_on_the_first_line_and_a_bad_fixed_value_once():  # item 9
    raw = copy.deepcopy(GOOD)
    raw["fixed"]["tracker"] = {"ema_alpha": 1.5}
    raw["search"] = {"split.criterion": {"type": "categorical", "values": ["none", "fc", "dead"], "grid": True}}
    raw.pop("seeds")
    raw["num_samples"] = 3
    with pytest.raises(space.SpaceError) as e:
        space.parse_space(raw, "s.yaml")
    first = str(e.value).splitlines()[0]
    assert first.startswith("s.yaml: fixed.tracker.ema_alpha") and len(e.value.problems) == 1, str(e.value)
    assert "ema_alpha" in first and str(e.value).count("ema_alpha") == 1


ARMS = {"topk-fc": {"sae.activation": "topk", "split.criterion": "fc"},
        "batchtopk": {"sae.activation": "batchtopk", "split.criterion": "none"},
        "matryoshka": {"sae.activation": "matryoshka", "split.criterion": "none"}}


def _with_arms(raw, arms=ARMS, num_samples=6):
    raw["search"].pop("split.criterion")
    raw["arms"] = copy.deepcopy(arms)
    raw["num_samples"] = num_samples
    return raw


def test_arms_are_one_grid_axis_setting_several_fields():
    spec = space.parse_space(_with_arms(copy.deepcopy(GOOD)))
    assert [name for name, _ in spec.arms] == ["topk-fc", "batchtopk", "matryoshka"]
    assert spec.grid_names == ["sae.activation", "split.criterion", "trainer.seed"]
    assert spec.grid_cells == [{**arm, "trainer.seed": s} for s in (0, 1) for arm in ARMS.values()]
    assert {"sae.activation", "split.criterion"} <= set(spec.searched_names)


def test_arms_must_divide_num_samples():
    problems = _problems(lambda raw: _with_arms(raw, num_samples=4))
    assert any("not a multiple of the 6 grid cells (arms x trainer.seed)" in p for p in problems)


def test_bad_arms_listed_together():
    arms = {"a": {"sae.activation": "topk", "split.criterion": "fc"},
            "b": {"sae.activation": "bogus", "split.criterion": "none"},   # a value the config refuses
            "c": {"sae.activation": "topk"},                                # not the same fields
            "d": {"sae.activation": "topk", "lm.layer": 3},                  # a field sweeps cannot vary
            "e": {"sae.activation": "topk", "split.criterion": "fc"}}       # the same as a
    problems = _problems(lambda raw: _with_arms(raw, arms=arms, num_samples=10))
    text = "\n".join(problems)
    assert "arms.b" in text and "bogus" in text
    assert "arms.c: sets sae.activation; every arm must set the same fields" in text
    assert "arms.d" in text
    assert "arms: two arms set the same values" in text
    assert "arms.a" not in text


def test_arm_field_also_searched_is_refused():
    def m(raw):
        _with_arms(raw)
        raw["search"]["split.criterion"] = {"type": "categorical", "values": ["none", "fc"]}
    assert any("arms.topk-fc.split.criterion: also under search/seeds" in p for p in _problems(m))


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_space_validates(path):
    spec = space.load_space(path, check_machine=False)
    assert spec.num_samples % len(spec.grid_cells) == 0


def test_study_space_compares_the_arms_at_equal_budget():
    spec = space.load_space(REPO / "search_spaces" / "study.yaml")
    arms = {(a["sae.activation"], a["split.criterion"]) for _, a in spec.arms}
    assert {("topk", "none"), ("topk", "dead"), ("topk", "fc"), ("batchtopk", "none"), ("matryoshka", "none")} <= arms
    assert len(dict(spec.grid)["trainer.seed"]) >= 3
    assert "total_tokens" in spec.fixed["trainer"] and "k" in spec.fixed["sae"]   # one budget, one L0 for all
