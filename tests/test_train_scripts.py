"""scripts/train/*.sh: recipe selection by LLM/ENCODER, GPU detection errors, the TINY smoke path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPTS = Path("scripts/train")


def _run(script: str, *args: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=full, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("script", ["pretrain.sh", "vpt.sh", "finetune.sh", "vpt_ift.sh"])
def test_unknown_recipe_is_refused(script):
    proc = _run(script, LLM="gpt9")
    assert proc.returncode == 2 and "no recipe configs/gpt9_clip336/" in proc.stderr


def test_no_gpu_is_refused_without_tiny():
    proc = _run("finetune.sh", NGPU="0")
    assert proc.returncode == 2 and "no GPU found" in proc.stderr


def test_tiny_smoke_path_resolves_the_recipe(tiny_dir, tmp_path):
    proc = _run("vpt_ift.sh", "--print-config", TINY=str(tiny_dir), LLM="phi3_mini", SMOKE_OUT=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["llm"] == str(tiny_dir / "llm-phi3") and cfg["data"]["template"] == "llava_phi_3"
    assert cfg["train"]["stage"] == "ift" and cfg["train"]["max_steps"] == 2
    assert cfg["train"]["init_from"] == str(tmp_path / "phi3_mini_clip336" / "vpt")
    assert cfg["train"]["output_dir"] == str(tmp_path / "phi3_mini_clip336" / "vpt_ift")
    assert (tmp_path / "data" / "train.json").is_file()
