"""Shared fixtures: tiny real checkpoints written once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One intra-op thread for the tiny models of the suite (and every subprocess it starts): faster
# than torch's default on small CPUs, and far faster when other processes share the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from olavlm.threads import configure_threads  # noqa: E402

configure_threads(quiet=True)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, whatever an entry point under test set (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folder written by `olavlm make-tiny` (tokenizer, llm-llama/phi3/qwen2, vision-clip/siglip, teachers)."""
    from olavlm.devkit.tiny import make_tiny

    out = tmp_path_factory.mktemp("tiny")
    make_tiny(out, seed=0)
    return out
