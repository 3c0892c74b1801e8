from pathlib import Path

import pytest
import yaml

from olavlm.config import ConfigError, RunConfig, from_dict, load_config, parse_layer_spec, validate_against_model

LETTERS = {"d": "depth", "s": "seg", "g": "gen"}


def test_layer_spec_is_a_list_not_a_range():
    assert parse_layer_spec("d18-20_s10-18_g12-20", LETTERS) == {"depth": [18, 20], "seg": [10, 18], "gen": [12, 20]}
    assert parse_layer_spec("d8-14-20", LETTERS) == {"depth": [8, 14, 20]}  # three layers kept (the reference kept at most two)


@pytest.mark.parametrize("spec", ["d18-", "x18", "d0", "d18_d20", "d18-18", "d18 s10", ""])
def test_layer_spec_malformed_raises(spec):
    with pytest.raises(ConfigError, match="model.layer_spec"):
        parse_layer_spec(spec, LETTERS)


def test_weight_spec_accepts_integers_and_applies():
    cfg = load_config(None, ["model.weight_spec=d1_s0.25_g0.5", "model.layer_spec=d3-4_s2_g1"])
    assert cfg.model.tasks["depth"].weight == 1.0 and cfg.model.tasks["seg"].weight == 0.25
    assert cfg.model.tasks["seg"].layers == [2]


@pytest.mark.parametrize("override, field", [
    (["train.lr=1"], "train.lr"),
    (["train.micro_batch_size=3"], "train.global_batch_size"),
    (["model.tasks.seg.layers=5"], "model.tasks.seg.layers"),
    (["train.bf16=maybe"], "train.bf16"),
    (["data.image_geometry=stretch"], "data.image_geometry"),
    (["model.tasks.seg=null"], "model.task_order"),
])
def test_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert str(e.value).startswith(field)


def test_tasks_patch_defaults_and_roundtrip():
    cfg = load_config(None, ["model.tasks.depth.predictor.dim=64", "model.tasks.seg=null", "model.task_order=[gen,depth]"])
    assert cfg.model.tasks["depth"].predictor.dim == 64
    assert cfg.model.tasks["depth"].predictor.output_mlp is True  # inherited default
    assert "seg" not in cfg.model.tasks
    assert from_dict(RunConfig, cfg.to_dict()) == cfg


def test_validate_against_model():
    cfg = load_config(None, ["model.layer_spec=d8-20_s10-18_g12-20"]).model
    validate_against_model(cfg, num_layers=32, num_image_tokens=576)
    with pytest.raises(ConfigError, match=r"model.tasks.\w+.layers: layer 20 is outside"):
        validate_against_model(cfg, num_layers=16, num_image_tokens=576)
    cfg2 = load_config(None, ["model.num_task_tokens=7"]).model
    with pytest.raises(ConfigError, match="num_task_tokens"):
        validate_against_model(cfg2, num_layers=32, num_image_tokens=576)


RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipes_give_layers_as_typed_lists(recipe):
    """Shipped recipes write model.tasks.<t>.layers as YAML lists of ints; no compact strings."""
    raw = yaml.safe_load(recipe.read_text())["model"]
    assert "layer_spec" not in raw and "weight_spec" not in raw
    for name, task in raw.get("tasks", {}).items():
        assert isinstance(task.get("layers"), list) and all(type(x) is int for x in task["layers"]), name


def test_compact_strings_are_override_sugar_for_the_typed_lists():
    """`--model.layer_spec=` / `--model.weight_spec=` on top of a recipe set the same fields as the
    typed lists would: the two spellings give equal configs."""
    recipe = Path(__file__).resolve().parents[1] / "configs" / "phi3_mini_clip336" / "pt.yaml"
    base = load_config(recipe, [])
    assert {n: t.layers for n, t in base.model.tasks.items()} == {"depth": [8, 20], "seg": [10, 18], "gen": [12, 20]}
    sugar = load_config(recipe, ["--model.layer_spec=d3-4-7_s2_g1", "--model.weight_spec=d1_s0.25_g0.5"])
    typed = load_config(recipe, ["--model.tasks.depth.layers=[3, 4, 7]", "--model.tasks.seg.layers=[2]",
                                 "--model.tasks.gen.layers=[1]", "--model.tasks.depth.weight=1",
                                 "--model.tasks.seg.weight=0.25", "--model.tasks.gen.weight=0.5"])
    assert {n: (t.layers, t.weight) for n, t in sugar.model.tasks.items()} == \
        {"depth": ([3, 4, 7], 1.0), "seg": ([2], 0.25), "gen": ([1], 0.5)}
    sugar.model.layer_spec = sugar.model.weight_spec = None
    assert sugar.to_dict() == typed.to_dict()
    with pytest.raises(ConfigError, match="model.tasks.depth.layers"):
        load_config(recipe, ["--model.tasks.depth.layers=d18-20"])  # the list field takes no string
