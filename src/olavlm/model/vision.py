"""Vision towers (frozen base encoders) and the weight-free geometry helper.

A tower is one :class:`TowerType` entry in :data:`TOWERS` (the HF class, how to find its vision
config, whether it has a CLS token); adding an encoder is one class + one entry. The tower returns
``hidden_states[model_cfg.vision_feature_layer]`` with the CLS token dropped when configured.

:func:`vision_geometry` reads only ``config.json`` and ``preprocessor_config.json`` (no weights),
so the data layer, the teachers and the training code can size things before any model is built.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from olavlm.config import ConfigError, ModelConfig
from olavlm.data.images import ImageSpec

# PIL resampling codes as written by HF image processors (PIL.Image.Resampling values).
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class TowerType:
    """Registry entry: how to load one family of vision encoders."""

    model_class: str  # transformers class name, e.g. "CLIPVisionModel"
    model_type: str  # config.model_type of the vision config (e.g. "clip_vision_model")
    parent_model_type: str  # model_type of a full (image+text) checkpoint holding `vision_config`
    has_cls: bool  # the tower prepends a CLS token to the patch tokens


TOWERS: dict[str, TowerType] = {
    "clip": TowerType("CLIPVisionModel", "clip_vision_model", "clip", has_cls=True),
    "siglip": TowerType("SiglipVisionModel", "siglip_vision_model", "siglip", has_cls=False),
}


@dataclass(frozen=True)
class VisionGeometry:
    """What the rest of the system needs to know about the tower's input and output."""

    num_tokens: int  # image tokens per image after CLS handling (what the LLM sees per image)
    grid: int  # patches per side (teacher grids must match: grid x grid)
    spec: ImageSpec  # square input size, normalisation and resampling of the tower
    hidden_size: int  # channels of the tower's features (projector input)


def tower_type(model_cfg: ModelConfig) -> TowerType:
    if model_cfg.vision_type not in TOWERS:
        raise ConfigError(f"model.vision_type: {model_cfg.vision_type!r} is not one of {sorted(TOWERS)}")
    return TOWERS[model_cfg.vision_type]


def drop_cls(model_cfg: ModelConfig) -> bool:
    """Whether the CLS token is dropped (None = the tower's default: drop it when there is one)."""
    tt = tower_type(model_cfg)
    if model_cfg.vision_drop_cls is None:
        return tt.has_cls
    if model_cfg.vision_drop_cls and not tt.has_cls:
        raise ConfigError(f"model.vision_drop_cls: a {model_cfg.vision_type!r} tower has no CLS token to drop")
    return model_cfg.vision_drop_cls


def _read_json(path_or_id: str, filename: str) -> dict[str, Any]:
    """Read a JSON file from a local folder, or from the hub cache/hub for a hub id."""
    local = Path(path_or_id)
    if local.is_dir():
        file = local / filename
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found (model.vision_tower={path_or_id!r})")
    else:
        from huggingface_hub import hf_hub_download

        file = Path(hf_hub_download(path_or_id, filename))
    return json.loads(file.read_text())


def _vision_config_dict(model_cfg: ModelConfig) -> dict[str, Any]:
    tt = tower_type(model_cfg)
    cfg = _read_json(model_cfg.vision_tower, "config.json")
    if cfg.get("model_type") == tt.parent_model_type and "vision_config" in cfg:
        cfg = cfg["vision_config"]
    elif cfg.get("model_type") != tt.model_type:
        raise ConfigError(
            f"model.vision_type: {model_cfg.vision_tower!r} has model_type {cfg.get('model_type')!r}, "
            f"expected {tt.model_type!r} or {tt.parent_model_type!r} for vision_type={model_cfg.vision_type!r}")
    return cfg


def _image_spec(model_cfg: ModelConfig, image_size: int) -> ImageSpec:
    pre = _read_json(model_cfg.vision_tower, "preprocessor_config.json")
    try:
        mean, std = tuple(float(v) for v in pre["image_mean"]), tuple(float(v) for v in pre["image_std"])
    except KeyError as e:
        raise ConfigError(f"model.vision_tower: preprocessor_config.json has no {e.args[0]}") from e
    resample = pre.get("resample", 3)
    if isinstance(resample, str) and resample.lower() in _RESAMPLE.values():
        return ImageSpec(size=image_size, mean=mean, std=std, resample=resample.lower())  # type: ignore[arg-type]
    if resample not in _RESAMPLE:
        raise ConfigError(f"model.vision_tower: unknown resample code {resample!r} in preprocessor_config.json")
    return ImageSpec(size=image_size, mean=mean, std=std, resample=_RESAMPLE[resample])  # type: ignore[arg-type]


def vision_geometry(model_cfg: ModelConfig) -> VisionGeometry:
    """Token count, grid and input spec of the configured tower, from its JSON files only."""
    from transformers import CONFIG_MAPPING

    raw = _vision_config_dict(model_cfg)
    vc = CONFIG_MAPPING[tower_type(model_cfg).model_type].from_dict(raw)  # fills the class defaults
    image_size, patch = int(vc.image_size), int(vc.patch_size)
    if image_size % patch:
        raise ConfigError(f"model.vision_tower: image_size {image_size} is not a multiple of patch_size {patch}")
    grid = image_size // patch
    dropped = drop_cls(model_cfg)  # validates the field even for towers without CLS
    keep_cls = tower_type(model_cfg).has_cls and not dropped
    tokens = grid * grid + (1 if keep_cls else 0)
    return VisionGeometry(num_tokens=tokens, grid=grid, spec=_image_spec(model_cfg, image_size),
                          hidden_size=int(vc.hidden_size))


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"model.dtype: {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


class VisionTower(nn.Module):
    """Frozen HF vision encoder returning the selected layer's patch features (N, P, C)."""

    def __init__(self, model: nn.Module, *, feature_layer: int, drop_cls: bool) -> None:
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer  # index into hidden_states (embeddings output is 0)
        self.drop_cls = drop_cls
        self.requires_grad_(False)
        self.model.eval()
        n = model.config.num_hidden_layers
        if not -(n + 1) <= feature_layer <= n:
            raise ConfigError(f"model.vision_feature_layer: {feature_layer} is outside -{n + 1}..{n} for this tower")

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, path: str | None = None) -> "VisionTower":
        import transformers

        tt = tower_type(model_cfg)
        hf_cls = getattr(transformers, tt.model_class)
        model = hf_cls.from_pretrained(path or model_cfg.vision_tower, dtype=torch_dtype(model_cfg.dtype),
                                       attn_implementation=model_cfg.attn_implementation
                                       if model_cfg.attn_implementation != "flash_attention_2" else "sdpa")
        return cls(model, feature_layer=model_cfg.vision_feature_layer, drop_cls=drop_cls(model_cfg))

    def train(self, mode: bool = True) -> "VisionTower":
        super().train(mode)
        if not any(p.requires_grad for p in self.parameters()):
            self.model.eval()  # frozen: dropout etc. stay off even in training mode
        return self

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        trainable = any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            out = self.model(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
            feats = out.hidden_states[self.feature_layer]
        return feats[:, 1:] if self.drop_cls else feats

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)


def patch_grid(num_tokens: int) -> int:
    """Side of the square token grid, or an error when ``num_tokens`` is not a square."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ConfigError(f"model.vision_drop_cls: {num_tokens} image tokens do not form a square grid")
    return side
