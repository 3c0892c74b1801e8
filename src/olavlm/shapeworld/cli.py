"""`olavlm demo`: the whole pipeline on the embedded ShapeWorld default."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("demo", help="generate ShapeWorld -> bootstrap -> PT -> IFT -> eval cvbench -> probe -> report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="runs/demo", help="everything goes here (world, bootstrap, runs, report)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the bootstrap and the first run")
    p.add_argument("--quick", action="store_true", help="smoke-test size (about a minute)")
    p.add_argument("--compare", action="store_true",
                   help="also train the baseline (embedding losses off) and report both side by side")
    p.add_argument("--seeds", type=int, default=1, help="repeat PT/IFT/eval for seeds seed..seed+N-1 (mean ± std)")
    p.add_argument("--config-dir", default=None, help="folder with pt.yaml / ift.yaml; None = the repository's configs/shapeworld")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; None = torch's choice (1 is faster on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars for eval/probe (logs only)")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from olavlm.shapeworld.demo import run_demo

    run_demo(args.output_dir, seed=args.seed, quick=args.quick, compare=args.compare, seeds=args.seeds,
             config_dir=args.config_dir, progress=not args.no_progress)
    print((__import__("pathlib").Path(args.output_dir) / "report.md").read_text())
    return 0
