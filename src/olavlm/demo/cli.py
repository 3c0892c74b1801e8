"""`olavlm demo`: the whole pipeline on the embedded ShapeWorld default."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("demo", help="generate ShapeWorld -> bootstrap -> PT -> IFT -> eval cvbench -> probe -> report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="runs/demo", help="everything goes here (world, bootstrap, runs, report)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the bootstrap and the first run")
    p.add_argument("--quick", action="store_true", help="smoke-test size (about a minute)")
    p.add_argument("--variants", default="ola,baseline",
                   help="comma list of ola (NTP + embedding losses in PT), baseline (NTP only), viral (baseline PT, "
                        "then NTP + alignment loss in IFT); all listed run side by side")
    p.add_argument("--seeds", type=int, default=1, help="repeat PT/IFT/eval for seeds seed..seed+N-1 (mean ± std)")
    p.add_argument("--config-dir", default=None, help="folder with pt.yaml / ift.yaml; None = the recipes shipped in the package (configs/shapeworld)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; None = OMP_NUM_THREADS if set, else 1 (the demo's models are tiny: "
                        "1 thread is the fastest, and far faster when other processes share the cores)")
    p.add_argument("--jobs", type=int, default=None,
                   help="training processes for the independent variant/seed runs; None = one per run, at most one "
                        "per core (each single-threaded; results do not depend on it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars for eval/probe (logs only)")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import sys

    from olavlm.demo.bootstrap import BootstrapSpec
    from olavlm.demo.run import VARIANTS
    from olavlm.threads import configure_threads

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    problem = (f"--seeds must be >= 1 (got {args.seeds})" if args.seeds < 1 else
               f"--threads must be >= 1 (got {args.threads})" if args.threads is not None and args.threads < 1 else
               f"--jobs must be >= 1 (got {args.jobs})" if args.jobs is not None and args.jobs < 1 else
               f"--variants: expected a comma list of {', '.join(VARIANTS)} (got {args.variants!r})"
               if not variants or set(variants) - set(VARIANTS) else None)
    if problem:
        print(f"olavlm demo: error: {problem}", file=sys.stderr)
        return 2
    configure_threads(args.threads, model_params=BootstrapSpec().approx_params())
    from olavlm.demo.run import run_demo

    run_demo(args.output_dir, seed=args.seed, quick=args.quick, seeds=args.seeds, variants=variants,
             config_dir=args.config_dir, progress=not args.no_progress, jobs=args.jobs)
    print((__import__("pathlib").Path(args.output_dir) / "report.md").read_text())
    return 0
