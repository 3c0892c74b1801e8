"""`make bench` / `make bench-quick`: run every benchmark, one subprocess each, then regenerate the
README performance table from ``benchmarks/results/*.json``.

    python -m benchmarks.run                       # all, small config (CPU-friendly), ~6 min on 2 cores
    python -m benchmarks.run --quick               # all, smoke sizes (CI)
    python -m benchmarks.run --config RUN.yaml     # the step benchmarks on a recipe's real models (GPU)
    python -m benchmarks.run --only pt_vs_ntp ift_vs_llava
    python -m benchmarks.run --config RUN.yaml --extra "--batch 16 --peak-tflops 989"
    python -m benchmarks.run --stability           # twice: as the machine is, then beside a busy process

With ``--stability`` (``make bench-stability``) the benchmarks run a second time beside a one-core
pure-Python spin loop started (and always stopped) here, writing to ``<results>/busy/``; the table then
shows both runs' headline ratios and gives a verdict only where they agree within 10 %. A plain run
compares with whatever ``busy/`` holds when it was made by the same code and settings
(``benchmarks/stability.py``), else its rows say "stability not checked". ``run.json`` in each folder
records the load average before and after every benchmark and the comparison.

Each benchmark runs in its own process (clean memory, thread pools and CUDA state; a crash in one
does not stop the others) and writes ``benchmarks/results/<name>.json`` (``$OLAVLM_BENCH_RESULTS``
overrides the folder; the README is only rewritten for the default folder). The exit status is 1
when any benchmark failed to produce its result -- a goal that is missed is a number, not a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, bench_env, results_dir  # noqa: E402
from benchmarks.stability import (NEIGHBOUR_ENV, TOLERANCE, busy_neighbour, busy_seconds, code_identity,  # noqa: E402
                                  describe_neighbour, load_average)

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    name: str  # results/<name>.json and the script benchmarks/<name>.py
    goal: str  # what it measures (number of the goal in benchmarks/README.md)
    takes_config: bool  # accepts --config (the step benchmarks); the others have their own sizes


BENCHMARKS = [
    Bench("pt_vs_ntp", "1. PT step (3 embedding losses, cached targets) / NTP step, <= 1.10", True),
    Bench("ift_vs_llava", "2. IFT step / LlavaForConditionalGeneration step, <= 1.00", True),
    Bench("teacher_batching", "3. per-image teacher loop / batched encode, >= 4", False),
    Bench("pt_memory", "4. PT peak memory, hooks + supervised NTP / hidden states + fp32 logits, <= 0.5", False),
    Bench("data_loading", "5a. data loading samples/s (2 workers)", False),
    Bench("data_vs_model", "5. loader samples/s / model consumption on the demo config (alternating), >= 3", True),
    Bench("online_vs_cached", "6. PT step with online teachers / with cached targets", True),
    Bench("scaling", "7. step time vs sequence length and batch", True),
    Bench("packing", "P. IFT tokens/s packed / padded on LLaVA-665K-like lengths (padding removed)", False),
]
NAMES = [b.name for b in BENCHMARKS]


def command(bench: Bench, args) -> list[str]:
    cmd = [sys.executable, str(HERE / f"{bench.name}.py")]
    if args.quick:
        cmd.append("--quick")
    if bench.takes_config:
        if args.config:
            cmd += ["--config", args.config]
        for item in args.override:
            cmd += ["--override", item]
        cmd += shlex.split(args.extra)
    return cmd


def run_one(bench: Bench, args, folder: Path, env: dict[str, str]) -> dict:
    out = folder / f"{bench.name}.json"
    before = out.stat().st_mtime if out.exists() else None
    cmd = command(bench, args)
    print(f"\n=== {bench.name}: {bench.goal}\n$ {' '.join(cmd[1:])}", flush=True)
    load_before = load_average()
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=HERE.parent, timeout=args.timeout, env=env).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - t0
    wrote = out.exists() and out.stat().st_mtime != before
    ok = rc == 0 and wrote
    print(f"=== {bench.name}: {'ok' if ok else 'FAILED (exit ' + str(rc) + ')'} in {wall:.0f} s", flush=True)
    return {"name": bench.name, "exit": rc, "ok": ok, "wall_s": round(wall, 1), "command": cmd[1:],
            "load_average_before": load_before, "load_average_after": load_average()}


def run_all(chosen: list[Bench], args, folder: Path, *, role: str, neighbour: str | None = None) -> dict:
    """Every chosen benchmark, results to ``folder``; the run's record (written as ``folder/run.json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OLAVLM_BENCH_RESULTS": str(folder)}
    env.pop(NEIGHBOUR_ENV, None)
    if neighbour:
        env[NEIGHBOUR_ENV] = neighbour
    print(f"\n##### {role} run -> {folder}" + (f" (beside {neighbour})" if neighbour else ""), flush=True)
    load_before, t0 = load_average(), time.perf_counter()
    runs = [run_one(b, args, folder, env) for b in chosen]
    summary = {"written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "role": role, "neighbour": neighbour,
               "quick": args.quick, "config": args.config or "small", "code": code_identity(),
               "wall_s": round(time.perf_counter() - t0, 1), "load_average_before": load_before,
               "load_average_after": load_average(), "runs": runs}
    write_summary(folder, summary)
    print(f"\n{len([r for r in runs if r['ok']])}/{len(runs)} benchmarks wrote results in {summary['wall_s']:.0f} s")
    for r in runs:
        print(f"  {r['name']:18s} {'ok' if r['ok'] else 'FAILED'} {r['wall_s']:7.1f} s")
    return summary


def write_summary(folder: Path, summary: dict) -> None:
    (folder / "run.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the benchmarks and regenerate the README performance table.")
    ap.add_argument("--quick", action="store_true", help="smoke sizes for every benchmark (CI)")
    ap.add_argument("--config", default=None,
                    help="'small' (default), 'demo', or a RunConfig YAML for the step benchmarks (real models, GPU)")
    ap.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="dotted override for --config YAML (repeatable)")
    ap.add_argument("--extra", default="", metavar='"ARGS"',
                    help='more arguments for the step benchmarks, e.g. "--batch 16 --peak-tflops 989"')
    ap.add_argument("--only", nargs="+", choices=NAMES, default=None, help="run only these")
    ap.add_argument("--skip", nargs="+", choices=NAMES, default=[], help="leave these out")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per benchmark before it is stopped")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the README tables")
    ap.add_argument("--stability", action="store_true",
                    help="run twice: as the machine is, then beside a one-core busy process (results in busy/); "
                         "the table gives a verdict only where both runs agree within 10%%")
    args = ap.parse_args(argv)
    bench_env()
    chosen = [b for b in BENCHMARKS if (args.only is None or b.name in args.only) and b.name not in args.skip]
    out, second = results_dir(), results_dir() / "busy"
    summaries = [run_all(chosen, args, out, role="first")]
    if args.stability:
        with busy_neighbour() as proc:
            summaries.append(run_all(chosen, args, second, role="busy", neighbour=describe_neighbour(proc)))
            summaries[-1]["neighbour_cpu_s"] = busy_seconds(proc.pid)
    from benchmarks import readme_table

    compared = readme_table.compare(out, second)
    for folder, summary in zip((out, second), summaries):
        summary["stability"] = {"this": str(folder), "other": str(second if folder == out else out),
                                "tolerance": TOLERANCE, "rows": compared}
        write_summary(folder, summary)
    print()
    print(readme_table.render(out, second))
    if not args.no_readme and out.resolve() == RESULTS.resolve() and not os.environ.get("OLAVLM_BENCH_RESULTS"):
        for path in readme_table.update_all(out):
            print(f"updated {path}")
    return 0 if all(r["ok"] for s in summaries for r in s["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
