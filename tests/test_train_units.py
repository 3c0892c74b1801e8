"""Unit tests of the training pieces that need no real model: stage policy, accumulation,
checkpoint atomicity / rotation / resume selection, metric reduction and sinks, CLI arguments."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from olavlm.config import ConfigError, TrainConfig
from olavlm.train import checkpoint as ckpt
from olavlm.train import rundir
from olavlm.train.engine import accumulation_steps
from olavlm.train.metrics import MetricsLogger, StepAccumulator, check_report_to, plot_losses
from olavlm.train.stages import configure_trainable, trainable_groups, trainable_parameters


class FakeVLM(nn.Module):
    """Same param_groups() contract as OlaVLM, six tiny groups."""

    def __init__(self, predictors: bool = True) -> None:
        super().__init__()
        self.llm = nn.Linear(3, 3)
        self.vision = nn.Linear(3, 3)
        self.projector = nn.Linear(3, 3)
        self.task_tokens = nn.Parameter(torch.randn(4, 3))
        self.predictors = nn.Linear(3, 2) if predictors else None
        self.logit_scales = nn.Parameter(torch.zeros(2)) if predictors else None

    def param_groups(self):
        groups = {"llm": list(self.llm.parameters()), "vision": list(self.vision.parameters()),
                  "projector": list(self.projector.parameters()), "task_tokens": [self.task_tokens]}
        if self.predictors is not None:
            groups["predictors"] = list(self.predictors.parameters())
            groups["logit_scales"] = [self.logit_scales]
        return groups


def _trainable_names(model):
    return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


def test_stage_policy_pt_and_ift():
    model = FakeVLM()
    counts = configure_trainable(model, "pt", TrainConfig(stage="pt"))
    assert _trainable_names(model) == {"projector", "task_tokens", "predictors", "logit_scales"}
    assert counts == {"llm": 0, "vision": 0, "projector": 12, "task_tokens": 12, "predictors": 8,
                      "logit_scales": 2}
    for stage in ("vpt", "ift"):
        model = FakeVLM(predictors=False)
        counts = configure_trainable(model, stage, TrainConfig(stage=stage))
        assert _trainable_names(model) == {"llm", "projector"}
        assert counts["llm"] == 12 and counts["task_tokens"] == 0 and counts["vision"] == 0


def test_stage_overrides():
    t = TrainConfig(stage="ift", freeze_task_tokens=False, unfreeze_vision_tower=True)
    assert trainable_groups("ift", t) == {"llm", "projector", "task_tokens", "vision"}
    assert "task_tokens" not in trainable_groups("pt", TrainConfig(freeze_task_tokens=True))
    model = FakeVLM(predictors=False)
    configure_trainable(model, "ift", t)
    assert _trainable_names(model) == {"llm", "projector", "task_tokens", "vision"}
    assert len(trainable_parameters(model)) == 7


def test_stage_refuses_predictors_after_pt_and_bad_stage():
    with pytest.raises(ValueError, match="with_predictors=False"):
        configure_trainable(FakeVLM(predictors=True), "ift", TrainConfig(stage="ift"))
    with pytest.raises(ConfigError, match="train.stage"):
        trainable_groups("sft", TrainConfig())


def test_accumulation_is_derived_and_checked():
    assert accumulation_steps(256, 32, 8) == 1
    assert accumulation_steps(128, 4, 2) == 16
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        accumulation_steps(256, 32, 3)


# -- checkpoints --------------------------------------------------------------------------------


@pytest.fixture
def setup(tmp_path):
    from accelerate import Accelerator
    from transformers import get_scheduler

    from olavlm.train.engine import build_accelerator

    accelerator = build_accelerator(TrainConfig(bf16=False), 1)
    assert isinstance(accelerator, Accelerator)
    torch.manual_seed(0)
    model = FakeVLM()
    configure_trainable(model, "pt", TrainConfig())
    opt = torch.optim.AdamW(trainable_parameters(model), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)
    return accelerator, model, opt, sched, tmp_path


def _step(model, opt, sched):
    loss = sum((p ** 2).sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def _save(setup, step, **kw):
    accelerator, model, opt, sched, out = setup
    state = ckpt.TrainState(step=step, step_in_epoch=step, samples=4 * step, skipped={"too_long": step})
    return ckpt.save_checkpoint(accelerator, model, opt, sched, state, out, keep_last=kw.get("keep_last", 2),
                                engine_state=False)


def test_checkpoint_roundtrip_restores_everything(setup):
    accelerator, model, opt, sched, out = setup
    _step(model, opt, sched)
    path = _save(setup, 1)
    assert ckpt.is_complete(path) and (path / "trainable.safetensors").is_file()
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    import random

    import numpy as np

    expected_draws = (torch.rand(3), np.random.rand(), random.random())  # what the saved RNG state gives
    _step(model, opt, sched)
    _step(model, opt, sched)
    state = ckpt.load_checkpoint(path, accelerator, model, opt, sched, engine_state=False)
    assert state.step == 1 and state.skipped == {"too_long": 1}
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[n]), n
    assert sched.last_epoch == 1
    # continuing from the restored state equals continuing from the original one
    _step(model, opt, sched)
    after_resume = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not torch.equal(after_resume["projector.weight"], saved["projector.weight"])
    state2 = ckpt.load_checkpoint(path, accelerator, model, opt, sched, engine_state=False)
    _step(model, opt, sched)
    for n, p in model.named_parameters():
        assert torch.equal(p, after_resume[n]), n
    assert state2.step == 1
    # RNG: after restore_rng the draws repeat what the saved state gave
    torch.manual_seed(999)
    ckpt.restore_rng(path, 0)
    draws = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]


def _chosen(out, resume, accelerator):
    return rundir.choose_checkpoint(rundir.plan_resume(out, resume), accelerator)


def test_checkpoint_rotation_and_resume_selection(setup):
    accelerator, out = setup[0], setup[-1]
    for step in (2, 4, 6):
        _save(setup, step)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000004", "step-00000006"]
    assert _chosen(out, "auto", accelerator).name == "step-00000006"
    assert _chosen(out, "none", accelerator) is None and _chosen(out, None, accelerator) is None
    assert _chosen(out / "nothing-here", "auto", accelerator) is None
    assert _chosen(out, str(out / "checkpoints" / "step-00000004"), accelerator).name == "step-00000004"
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint folder"):
        rundir.plan_resume(out, str(out / "checkpoints" / "step-00000002"))  # rotated away


def test_kill_during_checkpoint_write_keeps_previous(setup, monkeypatch):
    accelerator, model, opt, sched, out = setup
    _step(model, opt, sched)
    good = _save(setup, 1)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, opt, sched)

    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # the process "dies" after the weights, while writing the optimizer
        real_save(obj, f, *a, **k)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _save(setup, 2)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in (out / "checkpoints").glob(".tmp-*")] == [f".tmp-step-00000002-{os.getpid()}"]
    assert not (out / "checkpoints" / "step-00000002").exists()
    found = _chosen(out, "auto", accelerator)
    assert found == good
    ckpt.load_checkpoint(found, accelerator, model, opt, sched, engine_state=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    _save(setup, 3)  # the next successful save clears the leftovers
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_load_refuses_other_trainable_set(setup):
    accelerator, model, opt, sched, out = setup
    path = _save(setup, 1)
    accelerator.unwrap_model(model).projector.weight.requires_grad_(False)
    with pytest.raises(ckpt.CheckpointError, match="trainable parameters differ"):
        ckpt.load_checkpoint(path, accelerator, model, opt, sched, engine_state=False)
    with pytest.raises(ckpt.CheckpointError, match="DeepSpeed/FSDP"):
        ckpt.load_checkpoint(path, accelerator, model, opt, sched, engine_state=True)


# -- metrics ------------------------------------------------------------------------------------


def test_accumulator_means_metrics_and_sums_counters():
    acc = StepAccumulator()
    acc.add_metrics({"loss": torch.tensor(1.0), "loss/gen": torch.tensor(4.0)})
    acc.add_metrics({"loss": torch.tensor(3.0)})
    acc.add_counts(samples=2, tokens=10)
    acc.add_counts(samples=2, tokens=5)
    acc.add_skipped({"too_long": 1})
    acc.add_skipped({"too_long": 2, "missing_image": 1})
    out = acc.reduce()
    assert out == {"loss": 2.0, "loss/gen": 4.0, "samples": 4, "tokens": 15, "skipped/missing_image": 1,
                   "skipped/too_long": 3}
    assert acc.reduce() == {}


def test_logger_sinks_and_summary(tmp_path):
    logger = MetricsLogger(tmp_path, report_to=["tensorboard"], total_steps=3)
    for step in (1, 2, 3):
        logger.log(step, {"loss": 3.0 - step, "loss/ntp": 2.0, "loss/gen/layer2/sl1": 0.5, "lr": 0.1})
        logger.advance()
    logger.epoch_end(0, {"too_long": 2})
    logger.close({"steps": 3})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and lines[0]["loss"] == 2.0
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 3}
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # a resumed logger drops the records written after its checkpoint
    MetricsLogger(tmp_path, report_to=[], total_steps=3, start_step=1).close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert plot_losses(tmp_path / "missing.jsonl", tmp_path / "x.png") is None


def test_report_to_validation(monkeypatch):
    with pytest.raises(ConfigError, match="train.report_to"):
        check_report_to(["mlflow"])
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match="wandb package is not installed"):
        check_report_to(["wandb"])


def test_cli_splits_flags_and_overrides():
    from olavlm.train.cli import split_args

    flags, overrides = split_args(["--train.max_steps=2", "--output-dir", "x", "--resume", "none",
                                   "--print-config", "model.llm=a"])
    assert overrides == ["--train.max_steps=2", "model.llm=a"]
    assert flags.output_dir == "x" and flags.resume == "none" and flags.print_config
    with pytest.raises(ConfigError, match="--bogus"):
        split_args(["--bogus"])
