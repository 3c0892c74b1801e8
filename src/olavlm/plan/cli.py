"""`olavlm plan CONFIG.yaml [--gpus N] [--nodes M] [--gpu NAME] [--mfu X] [--seq-len L] [--json]
[--section.key=value ...]`: parameters, memory, FLOPs, time and disk of a run, from configs only."""

from __future__ import annotations

import argparse
import json
import sys


def _add_flags(p: argparse.ArgumentParser) -> None:
    from olavlm.plan.hardware import GPUS

    p.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu", default="h100", help=f"accelerator: {', '.join(GPUS)} (default h100)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak per GPU (overrides the table)")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (overrides the table)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the time (default 0.4)")
    p.add_argument("--seq-len", type=int, default=None, help="positions per sample after image expansion "
                   "(default data.max_length, an upper bound)")
    p.add_argument("--samples", type=int, default=None, help="training samples (default: counted from data.train_file)")
    p.add_argument("--hub-configs", default=None, metavar="DIR",
                   help="local copies of hub config files, DIR/<org>/<name>/config.json (e.g. tests/data/real_configs)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def register(sub) -> None:
    p = sub.add_parser(
        "plan", help="what a run needs (parameters, memory per GPU, FLOPs, time, disk), from configs alone",
        description="Build the run's model and teachers on the meta device (config.json files only, no weights) "
                    "and print exact parameter counts, memory per GPU for DDP / ZeRO-2 / ZeRO-3 / FSDP, FLOPs per "
                    "optimizer step, the step count and time at a stated MFU, target-cache and checkpoint sizes. "
                    "Any recipe field can be overridden with --section.key=value.")
    p.add_argument("config", help="recipe YAML (configs/...)")
    _add_flags(p)
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key=value ...")
    p.set_defaults(func=run)


def _split(args) -> list[str]:
    """Flags given after CONFIG land in the remainder: apply them to ``args``; return the overrides."""
    from olavlm.config import ConfigError

    flags = argparse.ArgumentParser(add_help=False)
    _add_flags(flags)
    defaults = vars(flags.parse_args([]))
    late, overrides = flags.parse_known_args(args.overrides or [])
    for name, value in vars(late).items():
        if value != defaults[name]:
            setattr(args, name, value)
    bad = [o for o in overrides if "=" not in o or "." not in o.lstrip("-").split("=", 1)[0]]
    if bad:
        raise ConfigError(f"{bad[0]}: unknown argument; overrides look like --section.key=value")
    return overrides


def run(args) -> int:
    from olavlm.config import ConfigError, load_config
    from olavlm.plan.build import make_plan
    from olavlm.plan.report import render

    try:
        overrides = _split(args)
        for name, value in (("--gpus", args.gpus), ("--nodes", args.nodes)):
            if value < 1:
                raise ConfigError(f"{name}: must be >= 1, got {value}")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu: must be in (0, 1], got {args.mfu}")
        cfg = load_config(args.config, overrides)
        plan = make_plan(cfg, gpus=args.gpus, nodes=args.nodes, gpu=args.gpu, mfu=args.mfu,
                         peak_tflops=args.peak_tflops, gpu_memory=args.gpu_memory, seq_len=args.seq_len,
                         samples=args.samples, hub_configs=args.hub_configs, config_path=args.config)
    except (ConfigError, FileNotFoundError) as e:
        print(f"olavlm plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0
