"""Vision towers (frozen base encoders); their weight-free facts live in :mod:`olavlm.geometry`.

A tower is one :class:`~olavlm.geometry.TowerType` entry in :data:`olavlm.geometry.TOWERS` (the HF
class, how to find its vision config, whether it has a CLS token, its family); adding an encoder is
one class + one entry. A ViT tower returns ``hidden_states[model_cfg.vision_feature_layer]`` with
the CLS token dropped when configured; a ConvNeXt tower returns its raw last-stage map (no final
norm), flattened row-major to (N, H*W, C) (token n = row n // W, column n % W), with the exact
LayerNorm eps of its config (``olavlm.model.convnext``).

:func:`olavlm.geometry.vision_geometry` (re-exported here with the registry) reads only
``config.json`` and ``preprocessor_config.json`` (no weights), so the data layer, the teachers and
the training code can size things before any model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from olavlm.config import ConfigError, ModelConfig
from olavlm.geometry import (TOWERS, ImageSpec, TowerType, VisionGeometry, drop_cls,  # noqa: F401  (re-exported)
                             tower_type, vision_geometry)
from olavlm.model import convnext

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
