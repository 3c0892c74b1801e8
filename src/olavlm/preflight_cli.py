"""`olavlm check CONFIG.yaml [--section.key=value ...]`: the weight-free pre-flight of a run."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "check", help="check a run config without loading any weights (what `olavlm train` checks first)",
        description="Check a recipe before training: config types and ranges, the LLM's / tower's / teachers' "
                    "config.json against the model settings, data file, image folder, DeepSpeed JSON, "
                    "train.init_from and the output folder. Reads no weights. Overrides as for `olavlm train`.")
    p.add_argument("config", help="recipe YAML (configs/...)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key=value ...")
    p.set_defaults(func=run)


def run(args) -> int:
    from olavlm.preflight import check_command
    from olavlm.train.cli import split_args

    late, overrides = split_args(args.overrides or [])
    if late.output_dir:
        overrides.append(f"train.output_dir={late.output_dir}")
    for note in check_command(args.config, overrides):
        print(f"  {note}")
    print(f"ok: {args.config} passes the pre-flight")
    return 0
