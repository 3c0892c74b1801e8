"""CPU thread policy shared by every CPU entry point (demo, train on CPU, benchmarks, tests).

torch's default (one intra-op thread per core) is a poor choice for the small models olavlm runs on
CPUs: on a 2-core machine with one other busy process, a training step of the ShapeWorld demo model
took 5.3 s with 2 threads and 0.33 s with 1 (same machine, same minute), and the test suite runs
faster with 1 thread even when the machine is idle. So the count is chosen explicitly:

1. an explicit request (``--threads N``) wins;
2. else ``OMP_NUM_THREADS`` when the user set it;
3. else 1 thread for models under ``SMALL_MODEL_PARAMS`` parameters (or when the size is unknown),
   and all physical cores for larger ones, where the matrix products are big enough to share.

The choice is logged once with its reason.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

SMALL_MODEL_PARAMS = 50_000_000  # below this a matmul is too small for intra-op threads to pay off


def choose_threads(requested: int | None = None, *, model_params: int | None = None) -> tuple[int, str]:
    """The thread count for this process and the reason for it (see the module docstring)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1 (got {requested})")
        return requested, "requested"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer (got {env!r})") from None
        if n >= 1:
            return n, "OMP_NUM_THREADS"
    if model_params is None or model_params < SMALL_MODEL_PARAMS:
        return 1, "small model" if model_params is not None else "default for CPU runs"
    return max(1, (os.cpu_count() or 1)), f"model of {model_params / 1e6:.0f}M parameters"


def configure_threads(requested: int | None = None, *, model_params: int | None = None, quiet: bool = False) -> int:
    """Apply :func:`choose_threads` to torch (intra-op threads) and return the count."""
    import torch

    n, why = choose_threads(requested, model_params=model_params)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if not quiet:
        log.info("torch CPU threads: %d (%s)", n, why)
    return n


def estimate_llm_params(llm: str | None) -> int | None:
    """Rough parameter count of a causal LM from its ``config.json`` (local folder or cached hub id),
    without loading weights; None when the config cannot be read offline."""
    if not llm:
        return None
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(llm, local_files_only=True)
        cfg = getattr(cfg, "text_config", None) or cfg
        h, layers, vocab = int(cfg.hidden_size), int(cfg.num_hidden_layers), int(cfg.vocab_size)
        inter = int(getattr(cfg, "intermediate_size", None) or 4 * h)
        heads = int(getattr(cfg, "num_attention_heads", 1))
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads) * (h // heads)
    except Exception:  # noqa: BLE001 - unknown or unreadable config: the policy's size-unknown default
        return None
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    # per layer: q and o (h x h), k and v (h x kv), gated MLP (3 x h x inter); norms and biases left out
    return layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + vocab * h * (1 if tied else 2)


def configure_cpu_threads(llm: str | None, requested: int | None = None) -> int | None:
    """For a process that trains or evaluates ``llm``: apply the policy when it runs on the CPU
    (no CUDA device); on a GPU machine torch's default is left alone and None is returned."""
    import torch

    if torch.cuda.is_available():
        return None
    return configure_threads(requested, model_params=estimate_llm_params(llm))
