"""Shared fixtures: tiny real checkpoints written once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folder written by `olavlm make-tiny` (tokenizer, llm-llama/phi3/qwen2, vision-clip/siglip, teachers)."""
    from olavlm.model.tiny import make_tiny

    out = tmp_path_factory.mktemp("tiny")
    make_tiny(out, seed=0)
    return out
