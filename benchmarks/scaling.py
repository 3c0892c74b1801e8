"""Goal 7: PT step time (cached targets) as the sequence and the batch grow -- a small table.

One model, one process; every (text length, batch) point is its own variant and all points are
timed interleaved. For each point the table gives the median step time, time per sample and per
sequence token, and the step's counted FLOPs; relative columns compare with the base point
(the config's text length and batch): cost should grow about linearly with tokens (batch: exactly;
length: linearly plus the quadratic attention term, visible only for long sequences), i.e.
``time_ratio / flops_ratio`` stays near 1. Result: benchmarks/results/scaling.json.

    python -m benchmarks.scaling [--quick] [--config small|RUN.yaml] [--batch B] [--text-len T]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import bench_env, step_parser  # noqa: E402

bench_env()


def grid(text_len: int, batch: int, quick: bool) -> list[tuple[int, int]]:
    """(text_len, batch) points: the length sweep at the base batch, the batch sweep at the base length."""
    lengths = [text_len // 2, text_len] if quick else [text_len // 2, text_len, 2 * text_len, 4 * text_len]
    batches = [max(1, batch // 2), batch] if quick else [max(1, batch // 2), batch, 2 * batch]
    points = [(t, batch) for t in lengths] + [(text_len, b) for b in batches if b != batch]
    return sorted(set(points), key=lambda p: (p[1], p[0]))


def main(argv: list[str] | None = None) -> int:
    ap = step_parser(__doc__.splitlines()[0])
    args = ap.parse_args(argv)
    from benchmarks.harness import measure, record
    from benchmarks.steps import StepBench

    sb = StepBench.from_args(args)
    bc, dev, bf16 = sb.bc, sb.dev, sb.bf16
    pt = sb.olavlm("pt")
    model, counts = pt.model, pt.counts
    points = grid(bc.text_len, bc.micro_batch, args.quick)
    steps, shapes = {}, {}
    for t, b in points:
        name = f"T{t}_B{b}"
        steps[name] = sb.step(pt, {**sb.batch(model, b, t), "targets": sb.targets(model, b)})
        shapes[name] = (t, b, t - 1 + model.tokens_per_image)
    variants = measure(steps, args=args, dev=dev, count_flops=True)  # the table compares time with FLOPs
    base = f"T{bc.text_len}_B{bc.micro_batch}"
    def seconds(v: dict) -> float:  # the least disturbed step: CPU time (1 thread), else wall
        return v.get("cpu_min") or v["min"]

    b_time, b_flops = seconds(variants[base]), variants[base]["throughput"]["step_flops"]
    table = []
    for name, (t, b, length) in shapes.items():
        v = variants[name]
        flops, s = v["throughput"]["step_flops"], seconds(v)
        tokens = b * length
        table.append({"point": name, "text_len": t, "batch": b, "sequence_len": length, "tokens": tokens,
                      "ms": s * 1e3, "statistic": "CPU min" if v.get("cpu_min") else "wall min",
                      "median_ms": v["median"] * 1e3, "spread": v["spread"], "ms_per_sample": s * 1e3 / b,
                      "us_per_token": s * 1e6 / tokens, "step_gflops": flops / 1e9,
                      "time_ratio": s / b_time, "flops_ratio": flops / b_flops,
                      "tokens_ratio": tokens / (bc.micro_batch * (bc.text_len - 1 + model.tokens_per_image)),
                      "time_over_flops_ratio": (s / b_time) / (flops / b_flops)})
    path = record("scaling", args=args, bc=bc, variants=variants, ratios={}, extra={"base": base, "table": table,
                                                                                     "trainable": counts})
    print(f"scaling ({'bf16 autocast' if bf16 else 'fp32'}, device {dev.type}; base {base})")
    print(f"  {'T':>5} {'B':>3} {'seq':>5} {'ms/step':>9} {'ms/sample':>10} {'us/token':>9} {'GFLOP':>7} "
          f"{'time x':>7} {'flops x':>7}")
    for r in table:
        print(f"  {r['text_len']:5d} {r['batch']:3d} {r['sequence_len']:5d} {r['ms']:9.1f} "
              f"{r['ms_per_sample']:10.1f} {r['us_per_token']:9.1f} {r['step_gflops']:7.2f} {r['time_ratio']:7.2f} "
              f"{r['flops_ratio']:7.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
