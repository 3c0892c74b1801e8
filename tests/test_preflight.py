"""The weight-free pre-flight (`olavlm check`, first step of `olavlm train`): every failure class is
one line naming the field, and it comes out before any weight file is opened. The tiny checkpoints
are copied with their weight files replaced by garbage: a pre-flight that read weights would fail
differently (and the guard below fails the test outright)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from olavlm.cli import build_parser
from olavlm.config import ConfigError, RunConfig, TrainConfig, load_config
from olavlm.config_checks import predictor_output_shape
from olavlm.errors import UserError
from olavlm.preflight import PreflightError, check_command, preflight
from olavlm.devkit.smoke import smoke_overrides, write_smoke_dataset

PT = Path("configs/llama3_8b_clip336/pt.yaml")
IFT = Path("configs/llama3_8b_clip336/ift.yaml")


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    """(garbage-weight copy of the tiny folder, PT overrides pointing at it, work dir)."""
    root = tmp_path_factory.mktemp("preflight")
    bad = root / "tiny-garbage"
    shutil.copytree(tiny_dir, bad)
    for weights in bad.rglob("*.safetensors"):
        weights.write_bytes(b"this is not a safetensors file")
    data = write_smoke_dataset(root / "data", num_images=4, text_only=1)
    overrides = [o.replace(str(tiny_dir), str(bad)) for o in smoke_overrides(tiny_dir, PT, root)]
    overrides += [f"--data.train_file={data}", f"--data.image_folder={data.parent / 'images'}",
                  f"--train.output_dir={root / 'run'}"]
    return bad, overrides, root


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Opening any weights during a test of this file is a failure."""
    import safetensors
    import safetensors.torch
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError(f"weights opened during the pre-flight: {args[:1]}")

    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(forbidden))


def _problems(overrides: list[str], config: Path = PT) -> list[str]:
    with pytest.raises(PreflightError) as e:
        check_command(str(config), overrides)
    assert isinstance(e.value, UserError) and isinstance(e.value, ConfigError)
    assert str(e.value).splitlines() == e.value.problems
    return e.value.problems


def _one(overrides: list[str], field: str, text: str, config: Path = PT) -> str:
    problems = _problems(overrides, config)
    assert len(problems) == 1, problems
    assert problems[0].startswith(field + ":") and text in problems[0], problems[0]
    return problems[0]


def test_valid_tiny_config_passes_without_reading_weights(setup):
    bad, overrides, root = setup
    notes = check_command(str(PT), overrides)
    assert any(n.startswith("model: LLM 4 layers x 64") for n in notes), notes
    assert any("model.tasks.seg: teacher oneformer -> targets (32, 8, 8)" in n for n in notes), notes
    assert any(n.startswith("data.train_file: 5 records") for n in notes), notes
    assert not (root / "run").exists()  # the pre-flight writes nothing


def test_garbage_weights_really_are_unloadable(setup, monkeypatch):
    monkeypatch.undo()  # the real loaders: the copies above cannot be loaded, so passing says nothing was read
    from olavlm.model.vlm import OlaVLM

    with pytest.raises(Exception) as e:
        OlaVLM.from_config(load_config(PT, setup[1]).model)
    assert not isinstance(e.value, ConfigError)


@pytest.mark.parametrize("extra, field, text", [
    (["--model.tasks.depth.layers=[2,40]"], "model.tasks.depth.layers", "layer 40 is outside the LLM's 1..4"),
    (["--model.num_task_tokens=3"], "model.tasks.depth.token_rows", "64 rows are not divisible"),
    (["--model.tasks.seg.predictor.num_queries=8", "--model.tasks.seg.token_rows=8", "--model.num_task_tokens=2"],
     "model.tasks.seg.predictor.num_queries", "grid layout needs a square count, got 8"),
    (["--model.vision_feature_layer=-9"], "model.vision_feature_layer", "is outside"),
    (["--model.llm=/nowhere/llm"], "model.llm", "cannot read the config.json"),
    (["--model.vision_tower=/nowhere/tower"], "model.vision_tower", "cannot read the config.json"),
    (["--model.tasks.depth.predictor.out_dim=31"], "model.tasks.depth.predictor",
     "outputs (64, 31) per image but teacher 'depth_anything'"),
    (["--model.tasks.seg.predictor.output_layout=tokens"], "model.tasks.seg.predictor", "gives targets (32, 8, 8)"),
    (["--model.tasks.seg.teacher_path=/nowhere/seg"], "model.tasks.seg.teacher_path", "/nowhere/seg"),
    (["--model.tasks.seg.teacher=segment_anything"], "model.tasks.seg.teacher", "not a registered teacher"),
    (["--model.attn_implementation=flash_attention_2"], "model.attn_implementation", "flash-attn"),
    (["--train.deepspeed=/nowhere/zero2.json"], "train.deepspeed", "does not exist"),
    (["--train.init_from=/nowhere"], "train.init_from", "PT starts from model.llm"),
    (["--data.template=alpaca"], "data.template", "is not one of"),
    (["--data.target_cache=/nowhere/cache"], "data.target_cache", "not a target cache"),
])
def test_each_model_and_engine_failure_is_one_named_line(setup, extra, field, text):
    _one(setup[1] + extra, field, text)


def test_teacher_dtype_is_a_choice_of_the_dtype_table(setup):
    """train.teacher_dtype is checked when the config loads (a Literal of olavlm.dtypes' spellings)."""
    with pytest.raises(ConfigError, match=r"train\.teacher_dtype: 'int8' is not one of \['bfloat16'"):
        load_config(PT, setup[1] + ["--train.teacher_dtype=int8"])
    assert load_config(PT, setup[1] + ["--train.teacher_dtype=bf16"]).train.teacher_dtype == "bf16"


def test_data_and_output_failures(setup, tmp_path):
    overrides = setup[1]
    _one(overrides + [f"--data.train_file={tmp_path / 'absent.json'}"], "data.train_file", "does not exist")
    (tmp_path / "broken.json").write_text('[{"id": 1, "conversations": []}, {"id": ')
    _one(overrides + [f"--data.train_file={tmp_path / 'broken.json'}"], "data.train_file", "broken.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    _one(overrides + [f"--data.train_file={tmp_path / 'empty.jsonl'}"], "data.train_file", "contains no records")
    _one(overrides + [f"--data.image_folder={tmp_path / 'no-images'}"], "data.image_folder", "is not a folder")
    _one(overrides + [f"--data.image_folder={tmp_path}"], "data.image_folder", "none of the first 4 images")
    (tmp_path / "file.txt").write_text("x")
    _one(overrides + [f"--train.output_dir={tmp_path / 'file.txt'}"], "train.output_dir", "is not a folder")
    _one(overrides + [f"--train.output_dir={tmp_path / 'file.txt' / 'run'}"], "train.output_dir", "which is a file")
    (tmp_path / "ds.json").write_text("{zero_optimization: 2")
    _one(overrides + [f"--train.deepspeed={tmp_path / 'ds.json'}"], "train.deepspeed", "not readable JSON")


def test_world_size_divisibility(setup, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    _one(setup[1], "train.global_batch_size", "world size")


def test_all_problems_come_together_one_line_each(setup, tmp_path):
    problems = _problems(setup[1] + ["--model.tasks.depth.layers=[9]", f"--data.train_file={tmp_path / 'x.json'}",
                                     "--train.deepspeed=/nowhere.json"])
    assert [p.split(":")[0] for p in problems] == ["train.deepspeed", "model.tasks.depth.layers", "data.train_file"]


def test_config_types_and_ranges_fail_first(setup):
    for extra, field in [(["--train.epochs=0"], "train.epochs"), (["--train.stage=sft"], "train.stage"),
                         (["--train.report_to=[mlflow]"], "train.report_to[0]"),
                         (["--model.tasks.gen.predictor.output_layout=cube"], "model.tasks.gen.predictor.output_layout"),
                         (["--train.adam_betas=[0.9]"], "train.adam_betas"), (["--data.num_workers=-1"], "data.num_workers")]:
        with pytest.raises(ConfigError) as e:
            check_command(str(PT), setup[1] + extra)
        assert str(e.value).startswith(field + ":"), str(e.value)
    # a config built in code gets the same choice checks as a loaded one
    with pytest.raises(ConfigError, match=r"^train\.lr_scheduler: 'step' is not one of"):
        preflight(RunConfig(train=TrainConfig(lr_scheduler="step")))


def test_init_from_failures(setup, tmp_path):
    overrides = setup[1] + [f"--train.output_dir={tmp_path / 'ift'}"]
    ift = overrides + ["--model.tasks.depth.layers=[]", "--model.tasks.seg.layers=[]", "--model.tasks.gen.layers=[]"]
    _one(ift + [f"--train.init_from={tmp_path / 'missing-run'}"], "train.init_from", "holds no finished model", IFT)
    half = tmp_path / "half" / "final"
    half.mkdir(parents=True)
    (half / "config.json").write_text(json.dumps({"olavlm_format": 1, "llm": "llm", "vision_tower": "vision"}))
    _one(ift + [f"--train.init_from={half.parent}"], "train.init_from", "is not a finished model", IFT)
    (half / "config.json").write_text("{")
    _one(ift + [f"--train.init_from={half.parent}"], "train.init_from", "no readable olavlm model", IFT)


def test_train_runs_the_preflight_before_any_weights(setup):
    """`olavlm train` stops with the pre-flight's line, not with an error of the garbage weights."""
    from olavlm.train.loop import train

    with pytest.raises(PreflightError, match=r"^model\.tasks\.seg\.layers: layer 7 is outside"):
        train(load_config(PT, setup[1] + ["--model.tasks.seg.layers=[7]"]), resume="none")
    assert not (setup[2] / "run").exists()


def test_check_command_line(setup, capsys):
    args = build_parser().parse_args(["check", str(PT), *setup[1]])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "passes the pre-flight" in out and "model: LLM 4 layers" in out
    args = build_parser().parse_args(["check", str(PT), *setup[1], "--model.tasks.gen.layers=[5]"])
    with pytest.raises(PreflightError, match=r"model\.tasks\.gen\.layers: layer 5"):
        args.func(args)


def test_predictor_shapes_match_the_built_model(tiny_dir, monkeypatch):
    """The weight-free predictor output shapes equal those of a built model (independent computation)."""
    monkeypatch.undo()
    from olavlm.devkit.tiny import tiny_model_config
    from olavlm.model.vlm import OlaVLM

    for overrides in ({}, {"vision": "siglip"}):
        cfg = tiny_model_config(tiny_dir, **overrides)
        model = OlaVLM.from_config(cfg)
        assert model.target_shapes == {t: predictor_output_shape(cfg, t, model.num_image_tokens)
                                       for t in model.target_shapes}


def test_teacher_specs_match_loaded_teachers(tiny_dir, tmp_path, monkeypatch):
    """Each weight-free spec equals the loaded teacher's target shape and input size."""
    monkeypatch.undo()
    from olavlm.world.generate import WorldSpec, generate_world
    from olavlm.teachers import build_teacher
    from olavlm.teachers.registry import target_spec

    teachers = tiny_dir / "teachers"
    world = generate_world(tmp_path / "w", WorldSpec(seed=1, n_pretrain=2, n_instruct=1, n_text_only=1,
                                                     n_cvbench=1, n_probe=1)).root
    cases = [("depth_anything", teachers / "teacher-depth", {}), ("depth_anything", teachers / "teacher-depth",
                                                                  {"blocks": [0, 3]}),
             ("oneformer", teachers / "teacher-seg", {}), ("oneformer", teachers / "teacher-seg", {"image_size": 96}),
             ("unclip", teachers / "teacher-gen", {}), ("shapeworld_depth", world, {"dim": 12}),
             ("shapeworld_seg", world, {}), ("shapeworld_gen", world, {"dim": 7})]
    for grid in (8, 4):
        for name, path, kwargs in cases:
            teacher = build_teacher(name, str(path), grid=grid, **kwargs)
            spec = target_spec(name, str(path), grid=grid, **kwargs)
            assert (spec.shape, spec.input_size, spec.layout) == (tuple(teacher.target_shape), teacher.input_size,
                                                                  teacher.layout), (name, kwargs, grid)
