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
