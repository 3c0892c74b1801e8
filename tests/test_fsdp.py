"""FSDP (torch fully_shard) with two CPU processes (gloo) through torchrun: PT and IFT, a stop and a
resume from the sharded checkpoint; both ranks agree, the result equals an uninterrupted DDP run
of the same recipe, and final/ holds exactly the gathered weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from olavlm.config import ConfigError
from olavlm.train import checkpoint as ckpt
from olavlm.devkit.smoke import smoke_overrides
from test_train_dist import _assert_agree, _assert_saved, _ranks, _torchrun

PT = Path("configs/llama3_8b_clip336/pt.yaml")  # teachers online, gradient checkpointing, text-only samples
IFT = Path("configs/llama3_8b_clip336/ift.yaml")


def _overrides(tiny_dir, recipe: Path, tmp: Path, steps: int) -> list[str]:
    extra = ["--train.init_from=null"] if recipe == IFT else []
    return smoke_overrides(tiny_dir, recipe, tmp) + extra + [
        "--train.global_batch_size=4", "--train.micro_batch_size=1", f"--train.max_steps={steps}"]  # accumulation 2


def _fsdp_with_resume_equals_ddp(tiny_dir, tmp: Path, recipe: Path, steps: int) -> dict:
    overrides = _overrides(tiny_dir, recipe, tmp, steps)
    ddp = tmp / "ddp"
    _torchrun(recipe, ddp, overrides)
    out = tmp / "fsdp"
    fsdp = overrides + ["--train.fsdp=true"]
    _torchrun(recipe, out, fsdp, OLAVLM_TEST_STOP_AFTER=str(steps - 1))
    first = ckpt.list_checkpoints(out)[-1]
    assert first.name == f"step-{steps - 1:08d}" and not (out / "final").exists()
    assert (first / "engine" / ".metadata").is_file()  # a torch.distributed.checkpoint folder ...
    assert sorted(p.name for p in (first / "engine").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    assert not (first / "trainable.safetensors").exists()
    _torchrun(recipe, out, fsdp)
    a, b = _ranks(out)
    _assert_agree(a, b)
    s = a["summary"]
    assert (s["world_size"], s["accumulation"], s["steps"], s["finished"]) == (2, 2, steps, True)
    ref = torch.load(ddp / "rank0.pt", weights_only=False)["trainable"]
    assert a["trainable"].keys() == ref.keys()
    for name, value in a["trainable"].items():
        torch.testing.assert_close(value, ref[name], rtol=1e-4, atol=1e-5, msg=name)
    _assert_saved(out, a["trainable"])
    return a


@pytest.mark.slow
def test_fsdp_pt_two_processes_with_resume_equals_ddp(tiny_dir, tmp_path):
    a = _fsdp_with_resume_equals_ddp(tiny_dir, tmp_path, PT, 3)
    assert any(k.startswith("predictors.") for k in a["trainable"]) and a["summary"]["samples"] == 12


@pytest.mark.slow
def test_fsdp_ift_two_processes_with_resume_equals_ddp(tiny_dir, tmp_path):
    a = _fsdp_with_resume_equals_ddp(tiny_dir, tmp_path, IFT, 2)
    assert a["summary"]["trainable"]["llm"] > 0 and a["summary"]["samples"] == 8


def test_fsdp_refuses_tied_embeddings(tiny_dir):
    """Input and output embeddings are separate units: a tied LLM is refused before anything is sharded."""
    from olavlm.devkit.tiny import tiny_model_config
    from olavlm.model.vlm import OlaVLM
    from olavlm.train.engine import is_sharded, shard

    model = OlaVLM.from_config(tiny_model_config(tiny_dir))
    model.llm.lm_head.weight = model.llm.get_input_embeddings().weight
    with pytest.raises(ConfigError, match="train.fsdp: LlamaForCausalLM ties its input and output embeddings"):
        shard(model)
    assert not is_sharded(model)
