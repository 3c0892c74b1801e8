"""Weight-free facts about a vision tower: its input spec, token grid and feature width.

Everything here reads only JSON (a tower's ``config.json`` and ``preprocessor_config.json``), so the
data layer, the teachers, the planner and the pre-flight can size things before any weights load.
This module sits on the lowest floor of the layering (docs/architecture.md, "Layering"): it imports
nothing from olavlm except :mod:`olavlm.errors`.

* :class:`ImageSpec` - how the tower wants its input (side, mean/std, resampling);
* :data:`TOWERS` / :class:`TowerType` - the tower registry (HF class, model_type, CLS, family);
  adding an encoder is one entry here and nothing else in the geometry;
* :func:`vision_geometry` -> :class:`VisionGeometry` (tokens per image, grid, spec, width);
* :func:`read_json` - one JSON file of a checkpoint folder or hub id (the one reader of a tower's
  ``config.json`` / ``preprocessor_config.json``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olavlm.errors import ConfigError

# PIL resampling codes as written by HF image processors (PIL.Image.Resampling values) -> names
RESAMPLE_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
RESAMPLE_NAMES = frozenset(RESAMPLE_CODES.values())


@dataclass(frozen=True)
class ImageSpec:
    """How the vision tower wants its input (read from the tower's preprocessor config)."""

    size: int  # side of the square input (e.g. 336)
    mean: tuple[float, float, float]  # normalisation mean (also the pad colour, int(255 * mean) as in LLaVA)
    std: tuple[float, float, float]
    resample: str = "bicubic"  # PIL filter used for resizing

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"ImageSpec.size must be >= 1, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"ImageSpec.mean/std need 3 channels, got {self.mean} / {self.std}")
        if self.resample not in RESAMPLE_NAMES:
            raise ValueError(f"ImageSpec.resample {self.resample!r} is not one of {sorted(RESAMPLE_NAMES)}")

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """Background of the ``pad`` geometry: ``int(255 * mean)`` as in LLaVA's expand2square."""
        return tuple(int(255 * m) for m in self.mean)  # type: ignore[return-value]



@dataclass(frozen=True)
class TowerType:
    """Registry entry: how to load one family of vision encoders."""

    model_class: str  # transformers class name, e.g. "CLIPVisionModel"
    model_type: str  # config.model_type of the vision config (e.g. "clip_vision_model")
    parent_model_type: str | None  # model_type of a full (image+text) checkpoint holding `vision_config`
    has_cls: bool  # the tower prepends a CLS token to the patch tokens
    family: str = "vit"  # "vit": hidden_states[layer] (N, P, C); "convnext": last stage (N, C, H, W), flattened


TOWERS: dict[str, TowerType] = {
    "clip": TowerType("CLIPVisionModel", "clip_vision_model", "clip", has_cls=True),
    "siglip": TowerType("SiglipVisionModel", "siglip_vision_model", "siglip", has_cls=False),
    # CLIP-ConvNeXt (open_clip) converted by `olavlm convert open-clip` into a ConvNextModel folder
    "convnext": TowerType("ConvNextModel", "convnext", None, has_cls=False, family="convnext"),
}


@dataclass(frozen=True)
class VisionGeometry:
    """What the rest of the system needs to know about the tower's input and output."""

    num_tokens: int  # image tokens per image after CLS handling (what the LLM sees per image)
    grid: int  # patches per side (teacher grids must match: grid x grid)
    spec: ImageSpec  # square input size, normalisation and resampling of the tower
    hidden_size: int  # channels of the tower's features (projector input)


def tower_type(model_cfg) -> TowerType:
    if model_cfg.vision_type not in TOWERS:
        raise ConfigError(f"model.vision_type: {model_cfg.vision_type!r} is not one of {sorted(TOWERS)}")
    return TOWERS[model_cfg.vision_type]


def drop_cls(model_cfg) -> bool:
    """Whether the CLS token is dropped (None = the tower's default: drop it when there is one)."""
    tt = tower_type(model_cfg)
    if model_cfg.vision_drop_cls is None:
        return tt.has_cls
    if model_cfg.vision_drop_cls and not tt.has_cls:
        raise ConfigError(f"model.vision_drop_cls: a {model_cfg.vision_type!r} tower has no CLS token to drop")
    return model_cfg.vision_drop_cls


def read_json(path_or_id: str, filename: str) -> dict[str, Any]:
    """Read a JSON file from a local folder, or from the hub cache/hub for a hub id."""
    local = Path(path_or_id)
    if local.is_dir():
        file = local / filename
        if not file.is_file():
            hint = ""
            if (local / "open_clip_config.json").is_file():
                hint = "; it is an open_clip checkpoint: convert it with `olavlm convert open-clip SRC DST`"
            raise FileNotFoundError(f"{file} not found (model.vision_tower={path_or_id!r}){hint}")
    else:
        from huggingface_hub import hf_hub_download

        file = Path(hf_hub_download(path_or_id, filename))
    return json.loads(file.read_text())


def convnext_stride(config) -> int:
    """Output stride of the last stage: stem patch size x 2 per downsampling stage."""
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    return int(patch) * 2 ** (int(config.num_stages) - 1)


def convnext_width(config) -> int:
    """Channels of the last stage (the tower's feature width)."""
    return int(config.hidden_sizes[-1])


def vision_config_dict(model_cfg) -> dict[str, Any]:
    """The tower's vision config as a dict (the ``vision_config`` of a full image+text checkpoint)."""
    tt = tower_type(model_cfg)
    cfg = read_json(model_cfg.vision_tower, "config.json")
    if tt.parent_model_type and cfg.get("model_type") == tt.parent_model_type and "vision_config" in cfg:
        cfg = cfg["vision_config"]
    elif cfg.get("model_type") != tt.model_type:
        hint = ""
        if tt.family == "convnext" and "model_type" not in cfg:
            hint = " (an open_clip checkpoint? convert it: olavlm convert open-clip SRC DST)"
        expected = " or ".join(repr(t) for t in (tt.model_type, tt.parent_model_type) if t)
        raise ConfigError(
            f"model.vision_type: {model_cfg.vision_tower!r} has model_type {cfg.get('model_type')!r}, "
            f"expected {expected} for vision_type={model_cfg.vision_type!r}{hint}")
    return cfg


def tower_image_spec(model_cfg, image_size: int) -> ImageSpec:
    """The tower's :class:`ImageSpec` at ``image_size`` from its ``preprocessor_config.json``."""
    pre = read_json(model_cfg.vision_tower, "preprocessor_config.json")
    try:
        mean, std = tuple(float(v) for v in pre["image_mean"]), tuple(float(v) for v in pre["image_std"])
    except KeyError as e:
        raise ConfigError(f"model.vision_tower: preprocessor_config.json has no {e.args[0]}") from e
    resample = pre.get("resample", 3)
    if isinstance(resample, str) and resample.lower() in RESAMPLE_NAMES:
        return ImageSpec(size=image_size, mean=mean, std=std, resample=resample.lower())  # type: ignore[arg-type]
    if resample not in RESAMPLE_CODES:
        raise ConfigError(f"model.vision_tower: unknown resample code {resample!r} in preprocessor_config.json")
    return ImageSpec(size=image_size, mean=mean, std=std, resample=RESAMPLE_CODES[resample])  # type: ignore[arg-type]


def _grid_and_width(model_cfg, vc) -> tuple[int, int, int]:
    """(input side, tokens per side, feature width) of a vision config, by tower family."""
    image_size = int(vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0])
    if tower_type(model_cfg).family == "convnext":
        n = int(vc.num_stages)
        if model_cfg.vision_feature_layer not in (-1, n):
            raise ConfigError(f"model.vision_feature_layer: {model_cfg.vision_feature_layer} is not available: "
                              f"a convnext tower gives its last stage only (set -1)")
        stride, width = convnext_stride(vc), convnext_width(vc)
    else:
        stride, width = int(vc.patch_size), int(vc.hidden_size)
    if image_size % stride:
        raise ConfigError(f"model.vision_tower: image_size {image_size} is not a multiple of the tower's "
                          f"stride {stride}")
    return image_size, image_size // stride, width


def vision_geometry(model_cfg) -> VisionGeometry:
    """Token count, grid and input spec of the configured tower (``model_cfg``: a ModelConfig),
    from its JSON files only."""
    from transformers import CONFIG_MAPPING

    raw = vision_config_dict(model_cfg)
    vc = CONFIG_MAPPING[tower_type(model_cfg).model_type].from_dict(raw)  # fills the class defaults
    image_size, grid, width = _grid_and_width(model_cfg, vc)
    dropped = drop_cls(model_cfg)  # validates the field even for towers without CLS
    keep_cls = tower_type(model_cfg).has_cls and not dropped
    tokens = grid * grid + (1 if keep_cls else 0)
    return VisionGeometry(num_tokens=tokens, grid=grid, spec=tower_image_spec(model_cfg, image_size), hidden_size=width)
