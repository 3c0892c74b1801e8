"""`olavlm` command line: subcommands map to plain functions in their own packages.

Each package that offers commands has a ``cli.py`` with ``register(subparsers)``; this file only
collects them. Imports are per package so ``olavlm --help`` stays fast.

User errors (:class:`olavlm.errors.UserError` and its subclasses: config, data, cache, checkpoint
problems; a missing or unreadable file the user named) end the command with ONE line on stderr,
``olavlm: error: <what> (<field or file>)``, and exit status 2. ``--debug`` (anywhere on the
command line) or ``OLAVLM_DEBUG=1`` shows the traceback instead (README "Errors").
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import logging
import os
import re
import sys

from olavlm.errors import UserError

# package modules that register subcommands, in help order
COMMAND_MODULES = [
    "olavlm.train.cli",      # train
    "olavlm.preflight_cli",  # check
    "olavlm.data.cli",       # data check / show / prepare
    "olavlm.teachers.cli",   # targets precompute
    "olavlm.infer.cli",      # chat
    "olavlm.evaluation.cli", # eval cvbench, probe
    "olavlm.demo.cli",       # demo
    "olavlm.devkit.cli",     # make-tiny
    "olavlm.model.cli",      # convert open-clip
    "olavlm.interop.cli",    # convert reference, export llava
    "olavlm.plan.cli",       # plan
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olavlm", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("OLAVLM_LOG_LEVEL", "INFO"))
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of user errors (also OLAVLM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


# exceptions about a file the user named: printed as "<strerror> (<file>)"
FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
# optional extras that are not installed by default: a missing one is a one-line error too
OPTIONAL_PACKAGES = ("torchvision", "timm", "open_clip", "flash_attn", "diffusers", "bitsandbytes")
_FIELD_HEAD = re.compile(r"^(--)?([A-Za-z_]\w*(?:\.[\w\[\]-]+)+)(=\S*)?: (.+)$", re.S)
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$")  # "olavlm.data.errors.BadSample: missing_image: ..."


def _one_line(text: str) -> str:
    parts = [line.strip() for line in str(text).splitlines() if line.strip()]
    out = parts[0] if parts else ""
    for part in parts[1:]:
        out += (" " if out.endswith(":") else "; ") + part
    return out


def _from_worker(exc: BaseException) -> tuple[type, str] | None:
    """(original type, message) of an exception re-raised by a DataLoader worker wrapper."""
    text = str(exc)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return None
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):  # the last exception line; its message may go on below
        m = _EXC_LINE.match(lines[i])
        if m:
            break
    else:
        return None
    name, message = m.group(1), "\n".join([m.group(2), *lines[i + 1:]])
    module, _, cls = name.rpartition(".")
    if module.startswith("olavlm.") and module not in sys.modules:
        try:
            importlib.import_module(module)
        except ImportError:
            return None
    tp = getattr(sys.modules.get(module) if module else builtins, cls, None)
    return (tp, message) if isinstance(tp, type) else None


def user_error_message(exc: BaseException) -> str | None:
    """The one line printed for a user error, or None when ``exc`` is not one (a bug: traceback)."""
    wrapped = _from_worker(exc)
    if wrapped is not None or isinstance(exc, UserError):
        tp, message = wrapped or (type(exc), str(exc))
        if not issubclass(tp, UserError):
            return None
        message = _one_line(message)
        m = _FIELD_HEAD.match(message)  # "train.max_steps: expected ..." -> "expected ... (train.max_steps)"
        return f"{m.group(4)} ({m.group(2)})" if m else message
    if isinstance(exc, FILE_ERRORS):
        filename = getattr(exc, "filename", None)
        return f"{exc.strerror or type(exc).__name__} ({filename})" if filename else _one_line(str(exc))
    if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] in OPTIONAL_PACKAGES:
        return f"optional package {exc.name.split('.')[0]!r} is not installed ({exc})"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("OLAVLM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere, also after a subcommand
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except Exception as e:  # noqa: BLE001 - only user errors are turned into one line; the rest re-raises
        message = None if debug else user_error_message(e)
        if message is None:
            raise
        print(f"olavlm: error: {message}", file=sys.stderr, flush=True)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
