"""Vision towers (frozen base encoders) and the weight-free geometry helper.

A tower is one :class:`TowerType` entry in :data:`TOWERS` (the HF class, how to find its vision
config, whether it has a CLS token, its family); adding an encoder is one class + one entry. A ViT
tower returns ``hidden_states[model_cfg.vision_feature_layer]`` with the CLS token dropped when
configured; a ConvNeXt tower returns its raw last-stage map (no final norm), flattened row-major to
(N, H*W, C) (token n = row n // W, column n % W), with the exact LayerNorm eps of its config
(``olavlm.model.convnext``).

:func:`vision_geometry` reads only ``config.json`` and ``preprocessor_config.json`` (no weights),
so the data layer, the teachers and the training code can size things before any model is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from olavlm.config import ConfigError, ModelConfig
from olavlm.data.images import ImageSpec
from olavlm.model import convnext

# PIL resampling codes as written by HF image processors (PIL.Image.Resampling values).
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


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
            hint = ""
            if (local / "open_clip_config.json").is_file():
                hint = "; it is an open_clip checkpoint: convert it with `olavlm convert open-clip SRC DST`"
            raise FileNotFoundError(f"{file} not found (model.vision_tower={path_or_id!r}){hint}")
    else:
        from huggingface_hub import hf_hub_download

        file = Path(hf_hub_download(path_or_id, filename))
    return json.loads(file.read_text())


def _vision_config_dict(model_cfg: ModelConfig) -> dict[str, Any]:
    tt = tower_type(model_cfg)
    cfg = _read_json(model_cfg.vision_tower, "config.json")
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


def _grid_and_width(model_cfg: ModelConfig, vc) -> tuple[int, int, int]:
    """(input side, tokens per side, feature width) of a vision config, by tower family."""
    image_size = int(vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0])
    if tower_type(model_cfg).family == "convnext":
        n = int(vc.num_stages)
        if model_cfg.vision_feature_layer not in (-1, n):
            raise ConfigError(f"model.vision_feature_layer: {model_cfg.vision_feature_layer} is not available: "
                              f"a convnext tower gives its last stage only (set -1)")
        stride, width = convnext.convnext_stride(vc), convnext.convnext_width(vc)
    else:
        stride, width = int(vc.patch_size), int(vc.hidden_size)
    if image_size % stride:
        raise ConfigError(f"model.vision_tower: image_size {image_size} is not a multiple of the tower's "
                          f"stride {stride}")
    return image_size, image_size // stride, width


def vision_geometry(model_cfg: ModelConfig) -> VisionGeometry:
    """Token count, grid and input spec of the configured tower, from its JSON files only."""
    from transformers import CONFIG_MAPPING

    raw = _vision_config_dict(model_cfg)
    vc = CONFIG_MAPPING[tower_type(model_cfg).model_type].from_dict(raw)  # fills the class defaults
    image_size, grid, width = _grid_and_width(model_cfg, vc)
    dropped = drop_cls(model_cfg)  # validates the field even for towers without CLS
    keep_cls = tower_type(model_cfg).has_cls and not dropped
    tokens = grid * grid + (1 if keep_cls else 0)
    return VisionGeometry(num_tokens=tokens, grid=grid, spec=_image_spec(model_cfg, image_size), hidden_size=width)


def torch_dtype(name: str) -> torch.dtype:
    """``model.dtype`` -> torch dtype, through the one table (olavlm.dtypes)."""
    from olavlm.dtypes import torch_dtype as parse

    return parse(name, "model.dtype")


class VisionTower(nn.Module):
    """Frozen HF vision encoder returning patch features (N, P, C): the selected hidden layer of a ViT
    (CLS dropped when configured), or the flattened last-stage map of a ConvNeXt."""

    def __init__(self, model: nn.Module, *, feature_layer: int, drop_cls: bool, family: str = "vit") -> None:
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer  # index into hidden_states (embeddings output is 0)
        self.drop_cls = drop_cls
        self.family = family
        self.requires_grad_(False)
        self.model.eval()
        n = model.config.num_hidden_layers
        if family == "convnext":
            if feature_layer not in (-1, n):
                raise ConfigError(f"model.vision_feature_layer: {feature_layer} is not available: a convnext "
                                  "tower gives its last stage only (set -1)")
            eps = getattr(model.config, "norm_eps", None)  # transformers hard-codes 1e-6 in its norms
            if eps is not None:
                convnext.apply_norm_eps(model, eps)
        elif not -(n + 1) <= feature_layer <= n:
            raise ConfigError(f"model.vision_feature_layer: {feature_layer} is outside -{n + 1}..{n} for this tower")

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, path: str | None = None) -> "VisionTower":
        import transformers

        tt = tower_type(model_cfg)
        hf_cls = getattr(transformers, tt.model_class)
        source = path or model_cfg.vision_tower
        kwargs: dict[str, Any] = {"dtype": torch_dtype(model_cfg.dtype)}
        if tt.family == "vit":
            kwargs["attn_implementation"] = (model_cfg.attn_implementation
                                             if model_cfg.attn_implementation != "flash_attention_2" else "sdpa")
        model, info = hf_cls.from_pretrained(source, output_loading_info=True, **kwargs)
        if tt.family == "convnext" and info["missing_keys"]:  # never train on a half-random tower
            missing = sorted(info["missing_keys"])
            raise ConfigError(f"model.vision_tower: {source} lacks {len(missing)} {tt.model_class} weight(s), "
                              f"e.g. {missing[:3]}")
        return cls(model, feature_layer=model_cfg.vision_feature_layer, drop_cls=drop_cls(model_cfg),
                   family=tt.family)

    def train(self, mode: bool = True) -> "VisionTower":
        super().train(mode)
        if not any(p.requires_grad for p in self.parameters()):
            self.model.eval()  # frozen: dropout etc. stay off even in training mode
        return self

    @property
    def hidden_size(self) -> int:
        if self.family == "convnext":
            return convnext.convnext_width(self.model.config)
        return self.model.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        trainable = any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            if self.family == "convnext":  # raw last stage (no final norm), (N, C, H, W) -> (N, H*W, C)
                last = self.model(pixel_values=pixel_values.to(self.dtype)).last_hidden_state
                return last.flatten(2).transpose(1, 2)
            out = self.model(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
            feats = out.hidden_states[self.feature_layer]
        return feats[:, 1:] if self.drop_cls else feats

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
