"""Batched teacher encode vs a per-image loop (the reference's strategy).

For each teacher (Depth-Anything, OneFormer, unCLIP image encoder) the SAME transformers classes
as the real teachers are built with small random configs, scaled up from the test-suite's tiny
ones (``make_tiny_teachers(scale=...)``: wider/deeper backbones) so the per-call overhead does not
dominate, and the image side is the teachers' own input size. One process measures, side by side:

* ``batched``: ``teacher.encode(images)`` - one call for the N images of a micro-batch;
* ``loop``:    ``[teacher.encode(images[i:i+1]) for i in range(N)]`` - one call per image.

Both include the preprocessing (resize + normalise) and run under no_grad in ``--dtype``.
Result: benchmarks/results/teacher_batching.json (machine, versions, config, raw timings,
medians, ratio = loop / batched, > 1 means batching is faster).

    python benchmarks/teacher_batching.py            # N=16, scale 3, 25 rounds
    python benchmarks/teacher_batching.py --quick    # N=8, scale 2, 3 repeats (CI smoke)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import bench_threads, ratio, summarize, timeit_interleaved, write_result  # noqa: E402

GOAL = 4.0  # goal: batching the teacher encode is at least 4x faster than a per-image loop
TEACHERS = {"depth": ("depth_anything", "teacher-depth"), "seg": ("oneformer", "teacher-seg"),
            "gen": ("unclip", "teacher-gen")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    ap.add_argument("--batch", type=int, default=None, help="images per micro-batch (default 16, quick 8)")
    ap.add_argument("--scale", type=int, default=None, help="teacher size multiplier (default 3, quick 2)")
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds (default 25, quick 3)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: OMP_NUM_THREADS, else 1; recorded in the result)")
    args = ap.parse_args(argv)
    bench_threads(args.threads)
    n = args.batch or (8 if args.quick else 16)
    scale = args.scale or (2 if args.quick else 3)
    repeat = args.repeat or (3 if args.quick else 25)  # 10-300 ms a round: the minimum of many is cheap
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    from olavlm.teachers import build_teacher
    from olavlm.devkit.teachers import make_tiny_teachers

    grid = 8
    results, table = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiny_teachers(tmp, seed=0, scale=scale)
        for task, (name, folder) in TEACHERS.items():
            teacher = build_teacher(name, str(paths[folder]), grid=grid).to(device=device, dtype=dtype)
            gen = torch.Generator().manual_seed(0)
            images = torch.randint(0, 256, (n, 3, 96, 96), dtype=torch.uint8, generator=gen)
            cpu: dict[str, list[float]] = {}
            times, _ = timeit_interleaved({"batched": lambda: teacher.encode(images),
                                           "loop": lambda: [teacher.encode(images[i:i + 1]) for i in range(n)]},
                                          warmup=3, repeat=repeat, sync=sync, cpu=cpu)
            batched, loop = times["batched"], times["loop"]
            b, lo = summarize(batched, cpu["batched"]), summarize(loop, cpu["loop"])
            params = sum(p.numel() for p in teacher.parameters())
            results[task] = {"teacher": name, "params": params, "input_size": teacher.input_size,
                             "target_shape": list(teacher.target_shape), "raw": {"batched": batched, "loop": loop},
                             "batched": b, "loop": lo, "ratio_loop_over_batched": lo["median"] / b["median"],
                             "ratio": ratio(lo, b, goal=GOAL, better="higher",
                                            what="per-image loop / batched encode (time)")}
            r = results[task]["ratio"]
            table.append(f"{task:6s} {name:15s} {params / 1e6:6.2f}M params  in {teacher.input_size:3d}px  "
                         f"batched {b['median'] * 1e3:8.1f} ms  loop {lo['median'] * 1e3:8.1f} ms  "
                         f"ratio {r['value']:5.2f}x wall median, {r[r['headline']]:5.2f}x {r['headline']}")
    config = {"images_per_batch": n, "source_image_side": 96, "scale": scale, "repeat": repeat, "warmup": 3,
              "dtype": args.dtype, "device": str(device), "grid": grid, "quick": args.quick,
              "torch_threads": torch.get_num_threads(), "load_average_after": os.getloadavg(),
              "note": "tiny-but-real-architecture teachers (random weights, scaled up from the test ones); "
                      "ratios, not absolute times, are the result"}
    path = write_result("teacher_batching", {"config": config, "results": results})
    print("\n".join(table))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
