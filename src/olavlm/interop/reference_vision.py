"""The vision tower of a released checkpoint -> an olavlm ``vision/`` folder, one function per tower kind.

* CLIP ViT (``model.vision_tower.vision_tower.vision_model.*``): the reference wraps a transformers
  ``CLIPVisionModel``, so the keys lose the ``model.vision_tower.vision_tower.`` prefix (and the
  ``vision_model.`` level when the installed transformers no longer has it). Its config is
  not stored: sizes come from the tensor shapes; attention heads, activation and LayerNorm eps are
  options with the OpenAI CLIP defaults (:class:`~olavlm.interop.reference_config.ConvertOptions`).
* ConvNeXt (``model.vision_tower.vision_tower.{stem,stages,head.norm}.*``): the timm trunk of
  open_clip's CLIP-ConvNeXt, written as a transformers ``ConvNextModel`` folder by
  :func:`olavlm.model.convnext.convert_reference_tower` (the one owner of the key mapping). Depths and
  widths come from the tensors, the LayerNorm eps from timm's choice for that shape, the input size
  from the ``-res<N>`` suffix of ``mm_vision_tower`` (or ``--vision-image-size``); the olavlm tower
  reads the raw last stage (``vision_feature_layer`` -1), as the reference does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from olavlm.interop import InteropError
from olavlm.interop.reference_config import ConvertOptions
from olavlm.interop.shards import Checkpoint, ShardWriter, check_shapes, iter_tensors, meta_state_shapes

PREFIX = "model.vision_tower.vision_tower."
_CLIP = PREFIX + "vision_model."
_CONVNEXT = tuple(PREFIX + p for p in ("stem.", "stages.", "head.norm."))


@dataclass
class VisionResult:
    """What the rest of the conversion needs to know about the written tower."""

    vision_type: str  # olavlm vision registry key
    hidden_size: int  # feature channels (projector input)
    keys: list[str]  # reference keys consumed
    facts: dict[str, Any] = field(default_factory=dict)  # recorded in olavlm_conversion.json
    config: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields the tower decides (over config.json's)


def tower_kind(keys: list[str]) -> str:
    """``clip_vit`` or ``convnext`` from the key names; error when neither (or both) is present."""
    vit = any(k.startswith(_CLIP) for k in keys)
    convnext = any(k.startswith(_CONVNEXT) for k in keys)
    if vit == convnext:
        sample = next((k for k in keys if k.startswith(PREFIX)), PREFIX + "vision_model.*")
        what = "both CLIP ViT and ConvNeXt" if vit else "no known vision tower"
        raise InteropError(f"{sample}: the checkpoint holds {what} keys under {PREFIX}")
    return "clip_vit" if vit else "convnext"


def _clip_config(ckpt: Checkpoint, keys: list[str], opts: ConvertOptions):
    from transformers import CLIPVisionConfig

    def shape(name: str) -> tuple[int, ...]:
        key = _CLIP + name
        if key not in ckpt:
            raise InteropError(f"{key}: missing from the checkpoint (needed to size the CLIP tower)")
        return ckpt.shape(key)

    hidden, _, patch, _ = shape("embeddings.patch_embedding.weight")
    positions = shape("embeddings.position_embedding.weight")[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise InteropError(f"{_CLIP}embeddings.position_embedding.weight: {positions} positions are not a "
                           "square grid + CLS")
    layers = {int(m.group(1)) for k in keys if (m := re.match(re.escape(_CLIP) + r"encoder\.layers\.(\d+)\.", k))}
    heads = opts.vision_heads or max(1, hidden // 64)
    if hidden % heads:
        raise InteropError(f"--vision-heads: {heads} does not divide the CLIP hidden size {hidden}")
    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=shape("encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=len(layers), num_attention_heads=heads, num_channels=3, image_size=grid * patch,
        patch_size=patch, hidden_act=opts.vision_act, layer_norm_eps=opts.vision_eps)


def _clip_name(key: str, expected: dict) -> str:
    """The installed ``CLIPVisionModel``'s name for a reference key (transformers 5 dropped the
    ``vision_model.`` level that the 4.x checkpoints have)."""
    rest = key[len(PREFIX):]
    inner = rest[len("vision_model."):] if rest.startswith("vision_model.") else rest
    return rest if rest in expected or inner not in expected else inner


def preprocessor_config(image_size: int, opts: ConvertOptions) -> dict[str, Any]:
    """CLIPImageProcessor settings of the reference tower (resize shortest side, centre crop, CLIP stats)."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(opts.image_mean), "image_std": list(opts.image_std), "do_convert_rgb": True}


def convert_clip_vit(ckpt: Checkpoint, keys: list[str], opts: ConvertOptions, out: Path,
                     image_size: int | None = None) -> VisionResult:
    """The transformers ``CLIPVisionModel`` (sizes from the tensors; ``image_size`` is not used)."""
    from transformers import CLIPVisionModel

    cfg = _clip_config(ckpt, keys, opts)
    expected = meta_state_shapes(lambda: CLIPVisionModel(cfg))
    names = {k: _clip_name(k, expected) for k in keys}
    source = {v: k for k, v in names.items()}
    check_shapes({names[k]: ckpt.shape(k) for k in keys}, expected, "CLIP vision tower",
                 lambda k: source.get(k) or _CLIP + (k[len("vision_model."):] if k.startswith("vision_model.") else k))
    writer = ShardWriter(out)
    for key, tensor in iter_tensors(ckpt, keys):
        writer.add(names[key], tensor)
    writer.close()
    cfg.architectures = ["CLIPVisionModel"]
    cfg.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(cfg.image_size, opts), indent=2) + "\n")
    facts = {"kind": "clip_vit", "image_size": cfg.image_size, "patch_size": cfg.patch_size,
             "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
             "hidden_act": cfg.hidden_act, "layer_norm_eps": cfg.layer_norm_eps,
             "image_mean": list(opts.image_mean), "image_std": list(opts.image_std)}
    return VisionResult("clip", cfg.hidden_size, list(keys), facts)


def convert_convnext(ckpt: Checkpoint, keys: list[str], opts: ConvertOptions, out: Path, image_size: int | None) -> VisionResult:
    """The timm ConvNeXt trunk -> a ``ConvNextModel`` folder (key mapping and checks in
    :func:`olavlm.model.convnext.convert_reference_tower`); the tower gives its raw last stage."""
    from olavlm.model.convnext import ConvNextKeyError, convert_reference_tower

    if image_size is None:
        raise InteropError(f"config.json: mm_vision_tower: no '-res<N>' suffix gives the ConvNeXt input size; "
                           "pass --vision-image-size (the released models use 768)")
    try:
        facts = convert_reference_tower(ckpt, keys, PREFIX, out, image_size=image_size, mean=opts.image_mean,
                                        std=opts.image_std)
    except ConvNextKeyError as e:
        raise InteropError(str(e)) from None
    facts = {"kind": "convnext", **facts, "image_mean": list(opts.image_mean), "image_std": list(opts.image_std)}
    return VisionResult("convnext", facts["hidden_sizes"][-1], list(keys), facts,
                        config={"vision_feature_layer": -1, "vision_drop_cls": None})


TOWER_CONVERTERS: dict[str, Callable[..., VisionResult]] = {"clip_vit": convert_clip_vit, "convnext": convert_convnext}


def convert_vision(ckpt: Checkpoint, keys: list[str], opts: ConvertOptions, out: Path,
                   image_size: int | None = None) -> VisionResult:
    """``image_size``: the input side for towers whose weights do not fix it (ConvNeXt)."""
    return TOWER_CONVERTERS[tower_kind(keys)](ckpt, keys, opts, out, image_size)
