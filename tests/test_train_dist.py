"""Two-process training on CPU through torchrun (gloo): DDP, and DeepSpeed ZeRO-2 with resume."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from olavlm.train import checkpoint as ckpt
from olavlm.train.smoke import smoke_overrides

WORKER = Path(__file__).parent / "dist" / "train_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(recipe: Path, out: Path, overrides: list[str], **env) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), str(recipe), str(out), *overrides]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "TOKENIZERS_PARALLELISM": "false", **env}
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _ranks(out: Path) -> tuple[dict, dict]:
    a, b = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert a["world"] == b["world"] == 2
    return a, b


def _assert_agree(a: dict, b: dict) -> None:
    assert a["trainable"].keys() == b["trainable"].keys() and a["trainable"]
    for name, value in a["trainable"].items():
        assert torch.equal(value, b["trainable"][name]), f"ranks disagree on {name}"


def test_ddp_two_processes_train_and_agree(tiny_dir, tmp_path):
    recipe = Path("configs/llama3_8b_clip336/pt.yaml")  # PT: teachers online, contrastive gathered over ranks
    out = tmp_path / "ddp"
    overrides = smoke_overrides(tiny_dir, recipe, tmp_path) + [
        "--train.global_batch_size=4", "--train.micro_batch_size=1", "--train.max_steps=3"]  # accumulation 2
    _torchrun(recipe, out, overrides)
    a, b = _ranks(out)
    _assert_agree(a, b)
    s = a["summary"]
    assert (s["world_size"], s["accumulation"], s["steps"], s["samples"]) == (2, 2, 3, 12)
    assert (out / "final" / "olavlm.safetensors").is_file() and (out / "summary.json").is_file()
    assert any(k.startswith("predictors.") for k in a["trainable"])  # PT trained the predictors on both ranks


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_with_resume(tiny_dir, tmp_path):
    """ZeRO-2 on CPU (gloo): stop after 2 steps (engine checkpoint), resume, finish; ranks agree."""
    recipe = Path("configs/llama3_8b_clip336/ift.yaml")
    out = tmp_path / "zero2"
    overrides = smoke_overrides(tiny_dir, recipe, tmp_path) + [
        "--train.init_from=null", "--train.global_batch_size=4", "--train.micro_batch_size=1",
        "--train.max_steps=3", "--train.deepspeed=configs/deepspeed/zero2.json"]
    _torchrun(recipe, out, overrides, OLAVLM_TEST_STOP_AFTER="2")
    first = ckpt.find_resume(out, "auto")
    assert first.name == "step-00000002" and (first / "engine").is_dir() and not (out / "final").exists()
    _torchrun(recipe, out, overrides)
    a, b = _ranks(out)
    _assert_agree(a, b)
    s = a["summary"]
    assert (s["world_size"], s["accumulation"], s["steps"], s["samples"], s["finished"]) == (2, 2, 3, 12, True)
    assert (out / "final" / "config.json").is_file()
