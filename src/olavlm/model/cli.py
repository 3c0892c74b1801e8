"""`olavlm convert open-clip` (the ConvNeXt trunk of an open_clip checkpoint -> a transformers folder)."""

from __future__ import annotations

from olavlm.cli_groups import CONVERT_HELP, command_group
from olavlm.dtypes import NAMES


def register(sub) -> None:
    register_convert(command_group(sub, "convert", CONVERT_HELP))


def register_convert(convert_sub) -> None:
    """Add `open-clip` to the sub-parsers of an `olavlm convert` parser."""
    p = convert_sub.add_parser(
        "open-clip", help="open_clip / timm CLIP-ConvNeXt trunk -> transformers ConvNextModel folder",
        description="Convert the ConvNeXt image trunk of an open_clip checkpoint (or of an OLA-VLM "
                    "checkpoint, prefix model.vision_tower.vision_tower.) into an ordinary Hugging Face "
                    "ConvNextModel folder for model.vision_type=convnext. Every trunk tensor is used "
                    "exactly once; the text tower and visual.head.proj are left out.")
    p.add_argument("src", help="hub id (e.g. laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup), "
                               "a folder, or a .safetensors / .bin file")
    p.add_argument("dst", help="output folder (config.json, model.safetensors, preprocessor_config.json)")
    p.add_argument("--image-size", type=int, default=768, help="input side the tower is used at (default 768)")
    p.add_argument("--prefix", default=None,
                   help="key prefix of the trunk (default: visual.trunk. or model.vision_tower.vision_tower., "
                        "whichever the checkpoint has)")
    p.add_argument("--norm-eps", type=float, default=None,
                   help="eps of every LayerNorm (default: timm's for the trunk's shape, 1e-5 for "
                        "convnext_xxlarge, 1e-6 for the other sizes)")
    p.add_argument("--dtype", default=None, choices=NAMES,
                   help="store the weights in this dtype (default: as in the source)")
    p.set_defaults(func=run_convert_open_clip)


def run_convert_open_clip(args) -> int:
    import sys

    from olavlm.model.convnext import convert_open_clip

    try:
        summary = convert_open_clip(args.src, args.dst, prefix=args.prefix, image_size=args.image_size,
                                    norm_eps=args.norm_eps, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as e:  # bad source / layout: one line, no traceback
        print(f"olavlm convert open-clip: {e}", file=sys.stderr)
        return 2
    print(f"converted {summary['tensors']} tensors ({summary['parameters']:,} parameters) under "
          f"{summary['prefix']!r} of {summary['source']} -> {summary['output']}; {summary['skipped']} other "
          f"tensor(s) left out; depths {summary['depths']}, widths {summary['hidden_sizes']}, "
          f"LayerNorm eps {summary['norm_eps']:g}, "
          f"{summary['image_size']} px -> {summary['grid']}x{summary['grid']} tokens")
    return 0
