"""`olavlm` command line: subcommands map to plain functions in their own packages.

Each package that offers commands has a ``cli.py`` with ``register(subparsers)``; this file only
collects them. Imports are per package so ``olavlm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# package modules that register subcommands, in help order
COMMAND_MODULES = [
    "olavlm.train.cli",      # train
    "olavlm.data.cli",       # data check / show / prepare
    "olavlm.teachers.cli",   # targets precompute
    "olavlm.infer.cli",      # chat
    "olavlm.evaluation.cli", # eval cvbench, probe
    "olavlm.shapeworld.cli", # demo
    "olavlm.model.cli",      # make-tiny
    "olavlm.plan.cli",       # plan
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olavlm", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("OLAVLM_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # package not built (yet); its commands are absent
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
