"""`olavlm convert reference SRC DST` and `olavlm export llava SRC DST [--push-to-hub REPO]`."""

from __future__ import annotations

import argparse
import sys

from olavlm.cli_groups import CONVERT_HELP, command_group
from olavlm.dtypes import NAMES


def register(sub) -> None:
    convert = command_group(sub, "convert", CONVERT_HELP)
    p = convert.add_parser("reference", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           help="a released OLA-VLM checkpoint (PT pretrain_dsg_OLA-VLM-*, IFT/VPT OLA-VLM-*) "
                                "-> an olavlm model folder")
    p.add_argument("src", help="hub id (e.g. shi-labs/OLA-VLM-CLIP-ViT-Llama3-8b) or local folder")
    p.add_argument("dst", help="olavlm model folder to write")
    p.add_argument("--template", default=None, help="conversation template; None = llava_llama_3 / llava_phi_3 by LLM")
    p.add_argument("--image-geometry", default=None, choices=["pad", "square", "resize"],
                   help="None = from config.json image_aspect_ratio")
    p.add_argument("--task-token-format", default=None, choices=["expand_emb", "emb"],
                   help="IFT task-token insertion when config.json does not say: expand_emb = K pooled rows per "
                        "task, emb = every raw row")
    p.add_argument("--dtype", default="bfloat16", choices=NAMES,
                   help="model.dtype of the converted folder (tensors keep their stored precision)")
    p.add_argument("--vision-heads", type=int, default=None, help="CLIP ViT attention heads; None = hidden // 64")
    p.add_argument("--vision-act", default="quick_gelu", help="CLIP ViT activation")
    p.add_argument("--vision-eps", type=float, default=1e-5, help="CLIP ViT LayerNorm eps")
    p.add_argument("--vision-image-size", type=int, default=None,
                   help="ConvNeXt input side; None = the '-res<N>' suffix of mm_vision_tower (released: 768)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder / hub id; None = the checkpoint's own files")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.add_argument("--hub-endpoint", default=None, help="Hub endpoint for a hub-id SRC (default: HF_ENDPOINT or huggingface.co)")
    p.set_defaults(func=_convert)

    export = command_group(sub, "export", "export an olavlm model to another library's layout")
    e = export.add_parser("llava", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          help="olavlm IFT/VPT folder -> transformers LlavaForConditionalGeneration folder")
    e.add_argument("src", help="olavlm model folder (RUN_DIR/final or a converted folder) or hub id")
    e.add_argument("dst", help="folder to write")
    e.add_argument("--template", default=None, help="None = the template of SRC's processor")
    e.add_argument("--image-geometry", default=None, choices=["pad", "square", "resize"],
                   help="None = the geometry of SRC's processor")
    e.add_argument("--allow-token-mismatch", action="store_true",
                   help="export even when the chat template does not reproduce olavlm's token ids")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    e.add_argument("--push-to-hub", default=None, metavar="REPO", help="then upload DST to this Hub repository")
    e.add_argument("--private", action="store_true", help="create the Hub repository as private")
    e.add_argument("--hub-endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    e.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")
    e.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    e.set_defaults(func=_export)


def _fail(err) -> int:
    print(f"olavlm: error: {err}", file=sys.stderr)
    return 2


def _convert(args) -> int:
    from olavlm.errors import UserError
    from olavlm.interop.reference import convert_reference
    from olavlm.interop.reference_config import ConvertOptions

    opts = ConvertOptions(template=args.template, image_geometry=args.image_geometry,
                          task_token_format=args.task_token_format, dtype=args.dtype, vision_heads=args.vision_heads,
                          vision_act=args.vision_act, vision_eps=args.vision_eps, tokenizer=args.tokenizer,
                          vision_image_size=args.vision_image_size)
    try:
        rec = convert_reference(args.src, args.dst, opts, overwrite=args.overwrite, endpoint=args.hub_endpoint)
    except UserError as err:
        return _fail(err)
    n = rec["tensors"]
    print(f"converted {args.src} ({rec['source_model_type']}, stage {rec['stage']}) -> {args.dst}: "
          f"{n['llm']} LLM, {n['vision']} vision, {n['projector']} projector, {n['task_tokens']} task-token, "
          f"{n['predictors']} predictor, {n['logit_scales']} logit-scale tensors; dropped {rec['dropped']['teachers']} "
          f"teacher and {len(rec['dropped']['unsupervised_depth_outputs'])} unsupervised-output tensors "
          f"(details in {args.dst}/olavlm_conversion.json)")
    return 0


def _export(args) -> int:
    from olavlm.errors import UserError
    from olavlm.interop.llava_export import export_llava

    try:
        info = export_llava(args.src, args.dst, template=args.template, image_geometry=args.image_geometry,
                            allow_token_mismatch=args.allow_token_mismatch, overwrite=args.overwrite)
        print(f"exported {args.src} -> {args.dst}: LlavaForConditionalGeneration, {info['tensors']} tensors, "
              f"{len(info['task_tokens'])} task tokens after every image (template {info['template']})")
        if args.push_to_hub:
            from olavlm.interop.hub import push_folder

            url = push_folder(args.dst, args.push_to_hub, endpoint=args.hub_endpoint, token=args.token,
                              private=args.private, revision=args.revision)
            print(f"pushed {args.dst} to {args.push_to_hub}: {url}")
    except UserError as err:
        return _fail(err)
    return 0
