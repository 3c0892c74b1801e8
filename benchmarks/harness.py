"""The measuring loop the step benchmarks share: FLOPs of one step per variant, interleaved timed
steps, medians/spread, peak memory (CUDA), achieved TFLOP/s and MFU, and the JSON record."""

from __future__ import annotations

from typing import Any, Callable

from benchmarks.common import load_average, memory_probes, repeats, summarize, timeit_interleaved, write_result
from benchmarks.flops import count, throughput


def measure(steps: dict[str, Callable[[], Any]], *, args, dev, count_flops: bool | None = None) -> dict[str, dict]:
    """Warm up, count one step's FLOPs, then time all variants interleaved. Returns
    ``{variant: {"raw": [s], median, min, max, spread, n, cpu_raw, cpu_median, cpu_min, cpu_over_wall,
    "peak_memory_bytes", "throughput"}}``;
    ``count_flops`` None = unless ``--no-flops``."""
    from benchmarks.models import sync_fn

    warmup, repeat = repeats(args)
    sync = sync_fn(dev)
    peak, reset = memory_probes(dev)
    cpu: dict[str, list[float]] = {}
    times, peaks = timeit_interleaved(steps, warmup=warmup, repeat=repeat, sync=sync, peak_memory=peak,
                                      reset_peak=reset, cpu=cpu)
    if count_flops is None:
        count_flops = not args.no_flops
    out: dict[str, dict] = {}
    for name, fn in steps.items():
        s = summarize(times[name], cpu.get(name))
        rec: dict[str, Any] = {"raw": times[name], **s, "peak_memory_bytes": peaks[name], "throughput": None}
        if count_flops:
            flops, _ = count(fn)
            rec["throughput"] = throughput(flops, s["median"], args.peak_tflops)
        out[name] = rec
    return out


def record(name: str, *, args, bc, variants: dict, ratios: dict, extra: dict | None = None) -> str:
    """Write ``benchmarks/results/<name>.json`` (machine and versions are added by write_result)."""
    warmup, repeat = repeats(args)
    payload = {"config": {**bc.describe(), "quick": args.quick, "warmup": warmup, "repeat": repeat,
                          "interleaved": True, "load_average_after": load_average()},
               "bf16_autocast": bc.run.train.bf16, "variants": variants, "ratios": ratios, **(extra or {})}
    return str(write_result(name, payload))


def print_summary(variants: dict, ratios: dict) -> None:
    for name, v in variants.items():
        tp = v.get("throughput") or {}
        extra = f"  {tp['achieved_tflops'] * 1e3:8.2f} GFLOP/s" if tp else ""
        cpu = f", CPU {v['cpu_median'] * 1e3:8.1f}" if v.get("cpu_median") is not None else ""
        print(f"  {name:24s} median {v['median'] * 1e3:9.1f} ms  (min {v['min'] * 1e3:8.1f}, max "
              f"{v['max'] * 1e3:8.1f}{cpu}, n={v['n']}){extra}")
    for name, r in ratios.items():
        verdict = "" if r["goal"] is None else (" PASS" if r["pass"] else " FAIL") + \
            f" (goal {'<=' if r['better'] == 'lower' else '>='} {r['goal']})"
        print(f"  {name:40s} {r[r['headline']]:6.3f} ({r['headline']}; wall median {r['value']:6.3f}){verdict}")
