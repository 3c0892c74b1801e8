"""Shared benchmark plumbing: thread policy, machine description, interleaved timing (wall and CPU
time, min and median), JSON results.

Every benchmark measures its comparison side by side in ONE process run (machines are noisy): it
fixes the torch thread count first (:func:`bench_threads`, recorded in the JSON), warms up, repeats
with the variants interleaved, and writes ``benchmarks/results/<name>.json`` with the machine,
versions, threads, config, raw wall and CPU seconds, min, median, spread and ratios.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"  # committed results; OLAVLM_BENCH_RESULTS overrides
_THREADS: dict[str, Any] = {}  # what bench_threads chose, written into every result


def bench_threads(requested: int | None = None) -> int:
    """Fix torch's intra-op thread count for this benchmark process (``olavlm.threads``: an explicit
    ``--threads``, else OMP_NUM_THREADS, else 1) and remember it for the JSON record."""
    from olavlm.threads import choose_threads, configure_threads

    n, why = choose_threads(requested)
    configure_threads(n, quiet=True)
    _THREADS.update(count=n, reason=why if requested is None else "--threads")
    return n


def threads_record() -> dict[str, Any]:
    import torch

    return {**_THREADS, "torch_num_threads": torch.get_num_threads()} if _THREADS else {
        "count": torch.get_num_threads(), "reason": "not fixed by the benchmark (torch default)",
        "torch_num_threads": torch.get_num_threads()}


def results_dir() -> Path:
    """Where results are written: ``$OLAVLM_BENCH_RESULTS`` (tests point it at a temporary folder) or
    ``benchmarks/results``."""
    return Path(os.environ.get("OLAVLM_BENCH_RESULTS") or RESULTS)


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


def timed(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if sync:
        sync()
    return time.perf_counter() - w0, time.process_time() - c0


def timeit(fn: Callable[[], Any], *, warmup: int = 2, repeat: int = 5,
           sync: Callable[[], None] | None = None, cpu: list[float] | None = None) -> list[float]:
    """Wall seconds of ``repeat`` calls after ``warmup`` calls (their CPU seconds appended to ``cpu``)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeat):
        wall, used = timed(fn, sync)
        times.append(wall)
        if cpu is not None:
            cpu.append(used)
    return times


def summarize(times: list[float], cpu: list[float] | None = None) -> dict[str, Any]:
    """Median, min (the least disturbed repeat), max and spread of wall timings; with ``cpu`` the same
    of the CPU seconds and their ratio to wall time (about the thread count when the process has
    the cores to itself, much less when it waits for them)."""
    med = statistics.median(times)
    out: dict[str, Any] = {"median": med, "min": min(times), "max": max(times),
                           "spread": (max(times) - min(times)) / med if med else 0.0, "n": len(times)}
    if cpu:
        cmed = statistics.median(cpu)
        out.update(cpu_raw=list(cpu), cpu_median=cmed, cpu_min=min(cpu), cpu_over_wall=cmed / med if med else None)
    return out


def write_result(name: str, payload: dict[str, Any]) -> Path:
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.stability import NEIGHBOUR_ENV, code_identity

    payload = {"name": name, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine(), "threads": threads_record(), "code": code_identity(),
               "neighbour": os.environ.get(NEIGHBOUR_ENV), **payload}
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------
# Shared by the step benchmarks (pt_vs_ntp, ift_vs_llava, online_vs_cached, scaling, data_vs_model)
# ------------------------------------------------------------------------------------------------


def bench_env() -> None:
    """Environment every benchmark process sets before importing transformers (no network, no bars)."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TRANSFORMERS_VERBOSITY", "error"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("DS_ACCELERATOR", "cpu")):
        os.environ.setdefault(key, value)


def step_parser(description: str):
    """Arguments shared by the step benchmarks."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="smaller batch/sequence, fewer repeats (CI smoke)")
    ap.add_argument("--config", default="small",
                    help="'small' (built in code, CPU-friendly), 'demo' (the ShapeWorld demo's model sizes) or a "
                         "RunConfig YAML with real models (GPU)")
    ap.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="dotted override applied to --config YAML (repeatable)")
    ap.add_argument("--text-len", type=int, default=None, help="text tokens per sample (default: small 96, YAML 128)")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default: small 8, YAML micro batch)")
    ap.add_argument("--repeat", type=int, default=None, help="timed steps per variant (default 9, quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default 2, quick 1)")
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                    help="bf16 autocast: auto = YAML train.bf16; small config: on only on CUDA")
    ap.add_argument("--no-flops", action="store_true",
                    help="skip counting FLOPs (torch's FlopCounterMode costs ~ms per op, once per variant)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense bf16 TFLOP/s of the device for MFU (default: known GPUs, else none)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: OMP_NUM_THREADS, else 1; recorded in the result)")
    return ap


def repeats(args) -> tuple[int, int]:
    """(warmup, repeat) from the parsed step arguments."""
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 9)  # the minimum needs a few
    return warmup, repeat


def timeit_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 2, repeat: int = 5,
                       sync: Callable[[], None] | None = None,
                       peak_memory: Callable[[], int | None] | None = None,
                       reset_peak: Callable[[], None] | None = None,
                       cpu: dict[str, list[float]] | None = None) -> tuple[dict[str, list[float]], dict]:
    """Time several variants side by side: after each variant's warm-up, the timed rounds alternate
    A B C, C B A, ... so slow drifts of a shared machine hit every variant alike. Returns
    ``({name: [wall seconds]}, {name: peak bytes during its warm-up or None})`` (peaks need
    warmup >= 1); the CPU seconds of every timed call go to ``cpu[name]`` when given."""
    peaks: dict[str, int | None] = {}
    for name, fn in fns.items():
        if reset_peak:
            reset_peak()
        for _ in range(warmup):
            fn()
        if sync:
            sync()
        peaks[name] = peak_memory() if peak_memory else None
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(repeat):
        for name in (order if r % 2 == 0 else order[::-1]):
            wall, used = timed(fns[name], sync)
            times[name].append(wall)
            if cpu is not None:
                cpu.setdefault(name, []).append(used)
    return times, peaks


def ratio(numerator: dict[str, float], denominator: dict[str, float], *, goal: float | None = None,
          better: str = "lower", what: str = "", headline: str | None = None) -> dict[str, Any]:
    """Ratio of two :func:`summarize` records with its goal: ``better="lower"`` passes when
    ratio <= goal, ``"higher"`` when ratio >= goal; no goal -> ``pass`` is None.

    Every statistic is written: ``value`` (medians of wall time), ``value_min`` (minima: each side's
    least disturbed repeat), ``value_cpu`` / ``value_cpu_min`` (median / minimum CPU seconds of the
    process, when both sides have them) and the ``range``, the ratio of the extremes (min/max,
    max/min) -- how far noise could move it. ``headline`` names the statistic the goal is judged on
    and the table shows (default: ``value_cpu_min`` when both sides have CPU times, else
    ``value_min``; see benchmarks/README.md, "Which number is the headline")."""
    value = numerator["median"] / denominator["median"]
    lo, hi = numerator["min"] / denominator["max"], numerator["max"] / denominator["min"]
    out = {"value": value, "value_min": numerator["min"] / denominator["min"], "range": [lo, hi], "goal": goal,
           "better": better, "what": what}
    if numerator.get("cpu_median") and denominator.get("cpu_median"):
        out["value_cpu"] = numerator["cpu_median"] / denominator["cpu_median"]
        out["value_cpu_min"] = numerator["cpu_min"] / denominator["cpu_min"]
    headline = headline or ("value_cpu_min" if "value_cpu_min" in out else "value_min")
    if headline not in out:
        raise ValueError(f"headline {headline!r}: not computed for this ratio (have {sorted(out)})")
    best = out[headline]
    out["headline"] = headline
    out["pass"] = None if goal is None else (best <= goal if better == "lower" else best >= goal)
    return out


def memory_probes(dev) -> tuple[Callable[[], int | None] | None, Callable[[], None] | None]:
    """(peak bytes, reset) on CUDA; (None, None) elsewhere (CPU peak memory: see pt_memory.py)."""
    import torch

    if getattr(dev, "type", str(dev)) != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated, torch.cuda.reset_peak_memory_stats


def load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return None
