"""User errors end `olavlm` with ONE stderr line `olavlm: error: ...` and exit 2; --debug / OLAVLM_DEBUG=1
show the traceback; bugs are never hidden."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from olavlm.cli import main, user_error_message
from olavlm.config import ConfigError, load_config
from olavlm.errors import UserError

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "llama3_8b_clip336" / "pt.yaml"

# (override, text the one line must contain): every one fails in load_config, before any weights load
BAD_OVERRIDES = [
    ("--train.max_steps=abc", "expected an integer, got 'abc' (train.max_steps)"),
    ("--train.max_steps=1.5", "expected an integer, got 1.5 (train.max_steps)"),
    ("--train.max_grad_norm=big", "expected a number, got 'big' (train.max_grad_norm)"),
    ("--train.freeze_task_tokens=maybe", "expected true/false, got 'maybe' (train.freeze_task_tokens)"),
    ("--train.run_name=[1]", "expected a string, got [1] (train.run_name)"),
    ("--train.bf16=3", "expected true/false, got 3 (train.bf16)"),
    ("--train.report_to=3", "expected a list, got int 3 (train.report_to)"),
    ("--train.adam_betas=[0.9,x]", "expected a number, got 'x' (train.adam_betas[1])"),
    ("--data.max_length=null", "must not be null (data.max_length)"),
    ("--data.on_bad_sample=maybe", "'maybe' is not one of ['skip', 'error'] (data.on_bad_sample)"),
    ("--data.image_geometry=crop", "(data.image_geometry)"),
    ("--data.max_image_aspect=wide", "expected a number, got 'wide' (data.max_image_aspect)"),
    ("--train.nope=1", "unknown key (known: adam_betas"),
    ("--nosection=1", "--nosection=1: unknown argument; overrides look like --section.key=value"),
    ("--train.max_steps", "unknown argument; overrides look like --section.key=value (train.max_steps)"),
    ("--train.keep_last=0", "must be >= 1, got 0 (train.keep_last)"),
    ("--train.warmup_ratio=1.5", "must be in [0, 1), got 1.5 (train.warmup_ratio)"),
    ("--train.stage=xx", "(train.stage)"),
    ("--model.layer_spec=x1", "unknown task letter 'x' in 'x1' (model.layer_spec)"),
    ("--model.num_task_tokens=-1", "must be >= 0, got -1 (model.num_task_tokens)"),
    ("--train.micro_batch_size=0", "must be >= 1, got 0 (train.micro_batch_size)"),
    ("--model.tasks.depth.predictor.query_source=x", "'x' is not one of ['task_tokens', 'hidden'] (model.tasks.depth.predictor.query_source)"),
    ("--model.tasks.depth.predictor=3", "expected a mapping, got int (model.tasks.depth.predictor)"),
    ("--model.projector=mlp", "(model.projector)"),
    ("--train.fsdp=true", "cannot be combined with train.deepspeed (train.fsdp)"),
]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("olavlm: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("override,expect", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_override_is_one_line(override, expect, capsys):
    extra = ["--train.deepspeed=configs/deepspeed/zero2.json"] if "fsdp" in override else []
    rc = main(["train", str(RECIPE), override, *extra, "--print-config"])
    line = _one_error_line(capsys)
    assert rc == 2 and expect in line, line


def test_coerce_names_the_field_of_an_optional_value():
    """`int | None` given a string used to raise a str (TypeError) and lose the field name."""
    with pytest.raises(ConfigError, match=r"^train\.max_steps: expected an integer, got 'abc'$"):
        load_config(None, ["train.max_steps=abc"])
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("content,expect", [
    (None, "No such file or directory ("),
    ("train: [unclosed", "invalid YAML"),
    ("- a list", "top level must be a mapping"),
    ("train:\n  max_steps: abc\n", "expected an integer, got 'abc' (train.max_steps)"),
    ("data:\n  nope: 1\n", "unknown key"),
    ("model:\n  tasks: 3\n", "(model.tasks)"),
])
def test_bad_config_file_is_one_line(tmp_path, capsys, content, expect):
    path = tmp_path / "run.yaml"
    if content is not None:
        path.write_text(content)
    rc = main(["train", str(path), "--print-config"])
    line = _one_error_line(capsys)
    assert rc == 2 and expect in line, line
    if content is None:
        assert str(path) in line


def test_other_commands_report_user_errors_in_one_line(tmp_path, capsys):
    assert main(["targets", "verify", str(tmp_path)]) == 2  # not a cache folder: CacheError
    assert "not a target cache" in _one_error_line(capsys)
    (tmp_path / "index.json").write_text("{not json")
    assert main(["targets", "verify", str(tmp_path)]) == 2
    assert "invalid JSON" in _one_error_line(capsys)
    assert main(["targets", "precompute", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in _one_error_line(capsys)


def test_debug_flag_and_env_show_the_traceback(monkeypatch, capsys):
    with pytest.raises(ConfigError, match="train.max_steps"):
        main(["train", str(RECIPE), "--train.max_steps=abc", "--print-config", "--debug"])
    monkeypatch.setenv("OLAVLM_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["--log-level", "ERROR", "train", str(RECIPE), "--train.max_steps=abc", "--print-config"])
    monkeypatch.setenv("OLAVLM_DEBUG", "0")
    assert main(["train", str(RECIPE), "--train.max_steps=abc", "--print-config"]) == 2


def test_bugs_are_not_hidden():
    assert user_error_message(KeyError("x")) is None
    assert user_error_message(RuntimeError("boom")) is None
    assert user_error_message(TypeError("exceptions must derive from BaseException")) is None
    assert user_error_message(UserError("a\n  b\n  c")) == "a; b; c"
    assert user_error_message(UserError("target cache x does not match:\n  depth: y")) == \
        "target cache x does not match: depth: y"
    assert user_error_message(FileNotFoundError(2, "No such file or directory", "/d/x.json")) == \
        "No such file or directory (/d/x.json)"
    missing = ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
    assert "optional package 'torchvision' is not installed" in user_error_message(missing)


def test_errors_raised_in_dataloader_workers(tmp_path, tiny_dir):
    """A worker re-raises a BadSample as RuntimeError and a CacheError as itself, with the worker's
    traceback in the message: still one line, the original message."""
    import torch
    from transformers import AutoTokenizer

    from olavlm.config import DataConfig
    from olavlm.data.dataset import LlavaDataset
    from olavlm.data.images import ImageSpec
    from olavlm.teachers.cache import CacheError

    (tmp_path / "images").mkdir()
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A shape."}]
    (tmp_path / "data.json").write_text(json.dumps([{"id": "r0", "image": "gone.png", "conversations": conv}]))
    cfg = DataConfig(train_file=str(tmp_path / "data.json"), image_folder=str(tmp_path / "images"),
                     on_bad_sample="error")
    ds = LlavaDataset(cfg, AutoTokenizer.from_pretrained(tiny_dir / "tokenizer"), tokens_per_image=4,
                      image_spec=ImageSpec(size=16, mean=(0.5,) * 3, std=(0.5,) * 3))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    with pytest.raises(Exception) as e:
        next(iter(loader))
    assert "Original Traceback" in str(e.value)
    line = user_error_message(e.value)
    assert line is not None and line.startswith("missing_image: record 0 (id r0): ") and "\n" not in line

    class Raises(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise CacheError("target cache /c does not match this run:\n  depth: grid 8 != 4")

    with pytest.raises(CacheError) as e:
        next(iter(torch.utils.data.DataLoader(Raises(), batch_size=None, num_workers=1)))
    assert user_error_message(e.value) == "target cache /c does not match this run: depth: grid 8 != 4"


def test_real_process_prints_exactly_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.pop("OLAVLM_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "olavlm.cli", "train", str(RECIPE), "--train.max_steps=abc"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "olavlm: error: expected an integer, got 'abc' (train.max_steps)\n"
