"""Command groups that several packages add sub-commands to (e.g. ``olavlm convert reference`` and
``olavlm convert open-clip``): whichever package registers first creates the group."""

from __future__ import annotations

import argparse

CONVERT_HELP = "convert checkpoints from other layouts into olavlm / Hugging Face folders"


def command_group(sub, name: str, help_text: str):
    """The sub-subcommand action of ``olavlm NAME``, created on first use."""
    parser = sub.choices.get(name)
    if parser is None:
        parser = sub.add_parser(name, help=help_text)
        return parser.add_subparsers(dest=f"{name}_kind", metavar="KIND", required=True)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
