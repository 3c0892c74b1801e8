"""Shared benchmark plumbing: machine description, repeated timing with medians, JSON results.

Every benchmark measures its comparison side by side in ONE process run (machines are noisy), warms
up, repeats, and writes ``benchmarks/results/<name>.json`` with the machine, versions, config, raw
timings, medians, spread and ratios.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def timeit(fn: Callable[[], Any], *, warmup: int = 2, repeat: int = 5, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall seconds of ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median and spread (min, max, relative IQR-ish half-range) of a list of timings."""
    med = statistics.median(times)
    return {"median": med, "min": min(times), "max": max(times),
            "spread": (max(times) - min(times)) / med if med else 0.0, "n": len(times)}


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
    return path
