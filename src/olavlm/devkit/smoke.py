"""CPU smoke runs of any recipe: tiny models from ``olavlm make-tiny`` + a generated 8-image dataset.

    olavlm train RECIPE $(python -m olavlm.devkit.smoke --tiny runs/tiny --recipe RECIPE)

``python -m olavlm.devkit.smoke --tiny runs/tiny --recipe configs/llama3_8b_clip336/pt.yaml``
prints (one per line) the ``--section.key=value`` overrides that point the recipe at the tiny
checkpoints (the tiny LLM of its template, the tiny tower of its ``model.vision_type``: CLIP,
SigLIP or ConvNeXt), shrink batch sizes and layers to them, train in fp32 (``--keep-precision``
keeps bf16) and stop after 2 optimizer steps; the ``scripts/train/*.sh`` wrappers use it when
``TINY`` is set. Everything else in the recipe (stage,
template, geometry, sampler, schedule, freezing, gradient checkpointing) is exercised as written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

# tiny LLM folder of `olavlm make-tiny` standing in for each template's real LLM
TINY_LLM = {"llava_llama_3": "llm-llama", "llava_phi_3": "llm-phi3"}
# tiny vision tower of `olavlm make-tiny` standing in for each vision registry entry
TINY_VISION = {"clip": "vision-clip", "siglip": "vision-siglip", "convnext": "vision-convnext"}
# tiny teacher folder of `olavlm make-tiny` per teacher registry name
TINY_TEACHER = {"depth_anything": "teacher-depth", "oneformer": "teacher-seg", "unclip": "teacher-gen",
                "dinov2": "teacher-dinov2"}


def write_smoke_dataset(out: str | Path, *, num_images: int = 8, text_only: int = 2, seed: int = 0) -> Path:
    """``out/train.json`` (LLaVA format) + ``out/images/*.png``: image records with a caption or a
    two-turn exchange, plus ``text_only`` records without an image. Returns the json path."""
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = ["red", "green", "blue", "yellow"]
    records = []
    for i in range(num_images):
        w, h = int(rng.integers(40, 96)), int(rng.integers(40, 96))
        c = i % len(colours)
        pixels = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        pixels[h // 4: 3 * h // 4, w // 4: 3 * w // 4, c % 3] = 230
        Image.fromarray(pixels).save(out / "images" / f"{i:03d}.png")
        conv = [{"from": "human", "value": "<image>\nDescribe the image in two lines."},
                {"from": "gpt", "value": f"There is a {colours[c]} square in the middle."}]
        if i % 2:
            conv += [{"from": "human", "value": "How many objects are there?"}, {"from": "gpt", "value": "one"}]
        records.append({"id": f"img{i}", "image": f"{i:03d}.png", "conversations": conv})
    for i in range(text_only):
        records.append({"id": f"txt{i}", "conversations": [
            {"from": "human", "value": "What is the quick brown fox doing?"},
            {"from": "gpt", "value": "It jumps over the lazy dog."}]})
    path = out / "train.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def _remap(path: str | None, out: Path) -> str | None:
    """runs/<variant>/<stage> -> <out>/<variant>/<stage> (keeps the recipe's chaining)."""
    if path is None:
        return None
    parts = Path(path).parts
    return str(out.joinpath(*parts[1:])) if len(parts) > 1 else str(out / path)


def smoke_overrides(tiny: str | Path, recipe: str | Path, out: str | Path = "runs/smoke", *,
                    max_steps: int = 2, fp32: bool = True) -> list[str]:
    """Overrides that turn ``recipe`` into a CPU smoke run on the ``make-tiny`` folder ``tiny``.

    ``fp32``: train in float32 without autocast (CPUs without native bf16 run bf16 autocast ~10x
    slower than fp32 at these sizes); False keeps the recipe's precision."""
    from olavlm.config import ConfigError, load_config
    from olavlm.geometry import vision_geometry
    from olavlm.teachers import build_teacher

    tiny, out = Path(tiny), Path(out)
    cfg = load_config(recipe)
    llm = tiny / TINY_LLM.get(cfg.data.template, "llm-llama")
    layers = json.loads((llm / "config.json").read_text())["num_hidden_layers"]
    vision_type = cfg.model.vision_type
    if vision_type not in TINY_VISION:
        raise ConfigError(f"model.vision_type: no tiny stand-in for {vision_type!r} (have {sorted(TINY_VISION)})")
    vision = tiny / TINY_VISION[vision_type]
    data_json = out / "data" / "train.json"
    if not data_json.is_file():
        write_smoke_dataset(out / "data")
    o = [f"--model.llm={llm}", f"--model.vision_tower={vision}", f"--model.vision_type={vision_type}",
         "--model.tokenizer=null", "--model.layer_spec=null", "--model.weight_spec=null",
         f"--data.train_file={data_json}", f"--data.image_folder={out / 'data' / 'images'}",
         "--data.num_workers=0", "--data.teacher_image_size=null", "--data.target_cache=null",
         "--train.global_batch_size=2", "--train.micro_batch_size=2", f"--train.max_steps={max_steps}",
         "--train.deepspeed=null", "--train.fsdp=false", "--train.save_every=0", "--train.report_to=[]",
         f"--train.output_dir={_remap(cfg.train.output_dir, out)}"]
    if fp32:
        o += ["--model.dtype=float32", "--train.bf16=false"]
    if cfg.train.init_from:
        o.append(f"--train.init_from={_remap(cfg.train.init_from, out)}")
    cfg.model.vision_tower, cfg.model.vision_type = str(vision), vision_type
    grid = vision_geometry(cfg.model).grid
    spread = {0: [max(1, layers // 2), layers], 1: [max(1, layers // 2), layers - 1], 2: [1, layers]}
    for i, (name, task) in enumerate(sorted(cfg.model.tasks.items())):
        folder = tiny / "teachers" / TINY_TEACHER.get(task.teacher, "")
        if task.teacher not in TINY_TEACHER or not folder.is_dir():
            o.append(f"--model.tasks.{name}.layers=[]")  # no tiny stand-in: tokens only, no predictor
            continue
        shape = build_teacher(task.teacher, str(folder), grid=grid, **task.teacher_kwargs).target_shape
        out_dim = shape[0] if task.predictor.output_layout == "grid" else shape[-1]
        layer_list = ",".join(str(x) for x in spread[i % 3])  # no spaces: the output may be word-split by a shell
        o += [f"--model.tasks.{name}.teacher_path={folder}", f"--model.tasks.{name}.layers=[{layer_list}]",
              f"--model.tasks.{name}.predictor.out_dim={out_dim}", f"--model.tasks.{name}.predictor.dim=32"]
        if task.kind == "alignment":  # the token-wise MLP's hidden width (2048 in the recipes)
            o.append(f"--model.tasks.{name}.predictor.mlp_dim=32")
    return o


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m olavlm.devkit.smoke", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", required=True, help="folder written by `olavlm make-tiny`")
    p.add_argument("--recipe", required=True, help="recipe YAML to smoke-run")
    p.add_argument("--out", default="runs/smoke", help="where the smoke data and runs go")
    p.add_argument("--max-steps", type=int, default=2)
    p.add_argument("--keep-precision", action="store_true", help="keep the recipe's bf16 settings (default: fp32)")
    args = p.parse_args(argv)
    print("\n".join(smoke_overrides(args.tiny, args.recipe, args.out, max_steps=args.max_steps,
                                    fp32=not args.keep_precision)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
