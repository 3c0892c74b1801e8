"""CPU thread policy: explicit request > OMP_NUM_THREADS > 1 thread for small models; size estimate."""

from __future__ import annotations

import logging

import pytest
import torch

from olavlm.threads import (SMALL_MODEL_PARAMS, choose_threads, configure_cpu_threads, configure_threads,
                            estimate_llm_params)


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_precedence_request_then_env_then_model_size(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(2, model_params=10**9) == (2, "requested")
    assert choose_threads(None, model_params=10**9) == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert choose_threads(None, model_params=SMALL_MODEL_PARAMS - 1) == (1, "small model")
    assert choose_threads(None) == (1, "default for CPU runs")
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    n, why = choose_threads(None, model_params=SMALL_MODEL_PARAMS)
    assert n == 6 and "50M" in why
    monkeypatch.setenv("OMP_NUM_THREADS", "  ")  # blank counts as unset
    assert choose_threads(None, model_params=10)[0] == 1


def test_bad_counts_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        choose_threads(0)
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS must be a positive integer"):
        choose_threads(None)


def test_configure_sets_torch_and_logs(monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    with caplog.at_level(logging.INFO, logger="olavlm.threads"):
        assert configure_threads(None, model_params=1000) == 1
    assert torch.get_num_threads() == 1
    assert "torch CPU threads: 1 (small model)" in caplog.text
    assert configure_threads(2, quiet=True) == 2 and torch.get_num_threads() == 2


def test_estimate_matches_the_built_model(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "llm")
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert estimate_llm_params(str(tmp_path / "llm")) == sum(p.numel() for p in model.parameters()) - norms
    assert estimate_llm_params(str(tmp_path / "missing")) is None and estimate_llm_params(None) is None
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if not torch.cuda.is_available():
        assert configure_cpu_threads(str(tmp_path / "llm")) == 1 and torch.get_num_threads() == 1
