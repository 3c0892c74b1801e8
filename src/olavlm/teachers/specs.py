"""Weight-free target specs: a teacher's target shape and input side, from its JSON files only.

The pre-flight compares these with the predictors' output shapes before anything heavy loads, and
the probe uses them to size the teachers' square exactly as training does. Each function mirrors
the corresponding teacher's ``from_pretrained`` + ``target_shape`` / ``input_size`` (the tests
check every one against the loaded teacher) but reads only ``config.json``,
``preprocessor_config.json`` or a ShapeWorld ``world.json``. The table in
``olavlm.teachers.registry`` pairs each teacher name with its function here; a teacher without one
cannot be checked early (the loaded teacher is still checked at start-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class TargetSpec:
    """What one teacher produces per image and what it reads."""

    shape: tuple[int, ...]  # per-image target shape (tokens (Q, C) | grid (C, h, w) | vector (1, C))
    input_size: int  # side (px) of the square the encoder reads
    layout: str  # tokens | grid | vector


class SpecError(ValueError):
    """A teacher's JSON files are missing, unreadable, or describe a teacher that cannot serve the run."""


def _auto_config(path: str, subfolder: str | None = None):
    from transformers import AutoConfig

    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        where = f"{path}/{subfolder}" if subfolder else path
        raise SpecError(f"cannot read the config.json of {where}: {str(e).splitlines()[0]}") from None


def depth_anything(path: str | None, grid: int, kwargs: dict) -> TargetSpec:
    from olavlm.teachers.depth_anything import DEFAULT_SOURCE

    cfg = _auto_config(path or DEFAULT_SOURCE)
    bb = getattr(cfg, "backbone_config", None)
    if bb is None:
        raise SpecError(f"{path}: config.json has no backbone_config (not a Depth-Anything checkpoint)")
    blocks = kwargs.get("blocks")
    blocks = [i - 1 for i in bb.out_indices] if blocks is None else list(blocks)
    if not blocks or any(not 0 <= b < bb.num_hidden_layers for b in blocks):
        raise SpecError(f"blocks {blocks} must be non-empty and within 0..{bb.num_hidden_layers - 1} of the backbone")
    return TargetSpec((grid * grid, int(bb.hidden_size)), grid * int(bb.patch_size), "tokens")


def oneformer(path: str | None, grid: int, kwargs: dict) -> TargetSpec:
    from olavlm.teachers.oneformer import DEFAULT_SOURCE

    cfg = _auto_config(path or DEFAULT_SOURCE)
    bb = getattr(cfg, "backbone_config", None)
    embed, depths = getattr(bb, "embed_dim", None), getattr(bb, "depths", None)
    if bb is None or not isinstance(embed, int) or not depths:
        raise SpecError(f"{path}: no Swin-like backbone_config (embed_dim, depths) to size the targets from")
    stage = bb.stage_names.index(bb.out_features[-1])  # "stageK" is index K; each stage after the first halves the map
    channels = embed * 2 ** max(stage - 1, 0)
    size = kwargs.get("image_size") or grid * int(bb.patch_size) * 2 ** max(stage - 1, 0)
    return TargetSpec((channels, grid, grid), int(size), "grid")


def unclip(path: str | None, grid: int, kwargs: dict) -> TargetSpec:
    from olavlm.teachers.base import _side, processor_dict
    from olavlm.teachers.unclip import DEFAULT_SOURCE

    path = path or DEFAULT_SOURCE
    cfg = _auto_config(path, kwargs.get("subfolder", "image_encoder"))
    cfg = getattr(cfg, "vision_config", cfg)
    proc = processor_dict(path, kwargs.get("processor_subfolder", "feature_extractor"))
    size = int(cfg.image_size)
    resize = _side(proc.get("size"), "shortest_edge") or size
    crop = _side(proc.get("crop_size"), "height") or resize
    if crop != size:
        raise SpecError(f"processor crop {crop} != encoder image_size {size} in {path}")
    return TargetSpec((1, int(cfg.projection_dim)), int(resize), "vector")


def dinov2(path: str | None, grid: int, kwargs: dict) -> TargetSpec:
    from olavlm.teachers.dinov2 import DEFAULT_SOURCE

    cfg = _auto_config(path or DEFAULT_SOURCE)
    if getattr(cfg, "model_type", None) != "dinov2":
        raise SpecError(f"{path}: config.json is a {getattr(cfg, 'model_type', None)!r} model, not dinov2")
    return TargetSpec((grid * grid, int(cfg.hidden_size)), grid * int(cfg.patch_size), "tokens")


def oracle(layout: str) -> Callable[[str | None, int, dict], TargetSpec]:
    def spec(path: str | None, grid: int, kwargs: dict) -> TargetSpec:
        from olavlm.world.generate import read_meta

        if path is None:
            raise SpecError("a ShapeWorld teacher needs teacher_path (the world folder)")
        try:
            size = int(read_meta(path)["spec"]["size"])
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise SpecError(str(e)) from None
        if grid < 1 or size % grid:
            raise SpecError(f"grid {grid} must divide the world's image size {size}")
        dim = int(kwargs.get("dim", 32))
        shape = {"tokens": (grid * grid, dim), "grid": (dim, grid, grid), "vector": (1, dim)}[layout]
        return TargetSpec(shape, size, layout)

    return spec


def teacher_side(model_cfg, grid: int, teacher_image_size: int | None = None) -> int | None:
    """Side of the square training gives its teachers: ``data.teacher_image_size`` or the largest
    input of the teachers of the tasks with predictor layers (None when one has no spec)."""
    from olavlm.teachers.registry import target_spec

    if teacher_image_size:
        return int(teacher_image_size)
    sides = []
    for task in model_cfg.tasks.values():
        if task.layers:
            spec = target_spec(task.teacher, task.teacher_path, grid=grid, **dict(task.teacher_kwargs))
            if spec is None:
                return None
            sides.append(spec.input_size)
    return max(sides, default=None)
