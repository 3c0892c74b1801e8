"""``olavlm data``: ``check`` (pre-flight), ``show`` (one sample as the model sees it), ``prepare``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_TASK_TOKENS = 24  # 3 tasks x 8 task tokens inserted after every image (docs/method.md, "Sequence layout")


def _add_sequence_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a trained model folder: template, tokenizer, BOS policy, geometry and image token count "
                        "from its processor (the flags below override them)")
    p.add_argument("--template", help="llava_llama_3, llava_phi_3, vicuna_v1, plain or chat_template")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (usually the LLM's)")
    p.add_argument("--add-bos", choices=["auto", "true", "false"], default=None,
                   help="BOS at the start of every sequence, as data.add_bos (default: the model's, else auto: "
                        "as the tokenizer does)")
    p.add_argument("--max-length", type=int, default=None,
                   help="maximum sequence length after image expansion (default 4096 when the image token "
                        "count is known)")
    p.add_argument("--num-image-tokens", type=int, default=None,
                   help="image tokens per image (default: read from --vision-tower)")
    p.add_argument("--vision-tower", default=None, help="vision tower folder/hub id to read the image token count from")
    p.add_argument("--vision-type", default="clip", help="vision registry key of --vision-tower (default clip)")
    p.add_argument("--task-tokens", type=int, default=DEFAULT_TASK_TOKENS,
                   help=f"task tokens inserted after every image (default {DEFAULT_TASK_TOKENS}; 0 = plain LLaVA)")


def register(sub) -> None:
    data = sub.add_parser("data", help="dataset tools: check, show, prepare",
                          description="Dataset tools for LLaVA-format JSON/JSONL files.")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    check = dsub.add_parser(
        "check", help="open every image, tokenize every conversation, report problems by reason",
        description="Pre-flight check: decodes every referenced image (in parallel), renders and tokenizes every "
                    "conversation, checks label masks and expanded length. Prints a table of problems by reason "
                    "and exits 1 when the bad fraction exceeds --max-bad-fraction (2 when the file is malformed).")
    check.add_argument("--data", required=True, help="LLaVA JSON list or JSONL file")
    check.add_argument("--image-folder", required=True, help="folder the records' image paths are relative to")
    _add_sequence_args(check)
    check.add_argument("--workers", type=int, default=4, help="threads decoding images (default 4)")
    check.add_argument("--image-geometry", choices=["pad", "square", "resize"], default=None,
                       help="data.image_geometry of the run, for the image size guard (default: the model's, else pad)")
    check.add_argument("--max-image-aspect", type=float, default=None,
                       help="data.max_image_aspect of the run (default 20): longer strips are bad_image_size")
    check.add_argument("--report", default=None, help="write the JSON report here")
    check.add_argument("--max-bad-fraction", type=float, default=0.0,
                       help="tolerated fraction of bad records before exiting non-zero (default 0)")
    check.add_argument("--no-progress", action="store_true", help="no progress bar")
    check.set_defaults(func=cmd_check, parser=check)

    show = dsub.add_parser("show", help="print one rendered sample with its supervised spans and token counts",
                           description="Print what the model sees for one record: the rendered sequence with "
                                       "supervised spans in [[...]], image placeholders, and token counts.")
    show.add_argument("--data", required=True, help="LLaVA JSON list or JSONL file")
    which = show.add_mutually_exclusive_group(required=True)
    which.add_argument("--index", type=int, help="record position (0-based)")
    which.add_argument("--id", dest="record_id", help="record id")
    _add_sequence_args(show)
    show.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="colour supervised spans")
    show.set_defaults(func=cmd_show, parser=show)

    from olavlm.prepare.cli import add_prepare_parser
    add_prepare_parser(dsub)


def _load_tokenizer(path: str):
    from olavlm.config import ModelConfig
    from olavlm.model.io import load_tokenizer
    return load_tokenizer(ModelConfig(llm=path))


def _apply_model(args) -> None:
    """``--model``: fill what the flags leave open from the folder's processor (weight-free)."""
    args.processor = None
    if args.model:
        from olavlm.data.processor import OlaProcessor

        tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
        proc = OlaProcessor.from_pretrained(args.model, tokenizer=tokenizer, template=args.template,
                                            add_bos=args.add_bos,
                                            image_geometry=getattr(args, "image_geometry", None))
        args.processor, args.template, args.add_bos = proc, proc.template, proc.add_bos
        if getattr(args, "image_geometry", None) is None:
            args.image_geometry = proc.image_geometry
        if args.num_image_tokens is None and args.vision_tower is None:
            args.num_image_tokens, args.task_tokens = proc.tokens_per_image, 0
        if args.max_length is None:
            args.max_length = proc.run.get("max_length")
    if args.add_bos is None:
        args.add_bos = "auto"
    if getattr(args, "image_geometry", "pad") is None:
        args.image_geometry = "pad"


def _prepare_tokenizer(args):
    """The tokenizer checked against the template and BOS choice; (None, message) when unusable."""
    from olavlm.data.tokenize import check_template

    if args.processor is not None:
        return args.processor.tokenizer, None
    try:
        tokenizer = _load_tokenizer(args.tokenizer)
    except (OSError, ValueError) as e:
        return None, f"--tokenizer {args.tokenizer}: cannot load a tokenizer ({str(e).splitlines()[0] if str(e) else e})"
    try:
        check_template(args.template, tokenizer, args.add_bos)
    except ValueError as e:
        return None, str(e)
    return tokenizer, None


def _tokens_per_image(args) -> int | None:
    n = args.num_image_tokens
    if n is None and args.vision_tower:
        from olavlm.config import ModelConfig
        from olavlm.geometry import vision_geometry
        n = vision_geometry(ModelConfig(vision_tower=args.vision_tower, vision_type=args.vision_type)).num_tokens
    if n is None:
        return None
    if n < 1 or args.task_tokens < 0:
        args.parser.error("--num-image-tokens must be >= 1 and --task-tokens >= 0")
    return n + args.task_tokens


def _sequence_settings(args, need_template: bool):
    _apply_model(args)
    if need_template and args.processor is None and (not args.tokenizer or not args.template):
        args.parser.error("--model, or --tokenizer and --template, are required")
    if args.tokenizer and not args.template:
        args.parser.error("--tokenizer needs --template")
    tpi = _tokens_per_image(args)
    max_length = args.max_length
    if max_length is not None and tpi is None:
        args.parser.error("--max-length needs --num-image-tokens or --vision-tower (to expand images)")
    if max_length is None and tpi is not None:
        max_length = 4096
    return tpi, max_length


def cmd_check(args) -> int:
    from olavlm.data.check import format_report, run_check
    from olavlm.data.records import RecordFileError

    tpi, max_length = _sequence_settings(args, need_template=False)
    tokenizer = None
    if args.tokenizer or args.processor is not None:
        tokenizer, problem = _prepare_tokenizer(args)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    if tokenizer is None:
        print("note: no --tokenizer: checking records and images only", file=sys.stderr)
    elif max_length is None:
        print("note: no --num-image-tokens / --vision-tower: expanded length not checked", file=sys.stderr)
    from olavlm.data.images import DEFAULT_LIMITS

    limits = args.processor.limits if args.processor is not None else DEFAULT_LIMITS
    if args.max_image_aspect is not None:
        import dataclasses
        if not args.max_image_aspect > 0:
            args.parser.error("--max-image-aspect must be > 0")
        limits = dataclasses.replace(limits, max_aspect=args.max_image_aspect)
    try:
        report, messages = run_check(args.data, args.image_folder, tokenizer=tokenizer, template=args.template,
                                     max_length=max_length, tokens_per_image=tpi, workers=args.workers,
                                     progress=not args.no_progress, image_geometry=args.image_geometry,
                                     limits=limits, add_bos=args.add_bos)
    except (RecordFileError, FileNotFoundError) as e:
        print(f"olavlm: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report, messages))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    bad = report["total"] - report["ok"]
    fraction = bad / report["total"] if report["total"] else 0.0
    if bad and fraction > args.max_bad_fraction:
        print(f"FAILED: {bad} bad record(s) = {fraction:.4%} > --max-bad-fraction {args.max_bad_fraction}",
              file=sys.stderr)
        return 1
    return 0


def cmd_show(args) -> int:
    from olavlm.data.errors import BadSample
    from olavlm.data.show import find_record, render_sample

    tpi, max_length = _sequence_settings(args, need_template=True)
    tokenizer, problem = _prepare_tokenizer(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        i, record = find_record(args.data, index=args.index, record_id=args.record_id)
    except (IndexError, KeyError, FileNotFoundError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(f"record {i} of {args.data}")
    try:
        print(render_sample(record, args.template, tokenizer, tokens_per_image=tpi, max_length=max_length,
                            color=color, add_bos=args.add_bos))
    except BadSample as e:
        print(f"bad record: {e}", file=sys.stderr)
        return 1
    return 0
