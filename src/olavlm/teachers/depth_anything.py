"""Depth teacher: the DINOv2 backbone of Depth-Anything (v2) (docs/method.md, "Teachers and targets").

Target = mean over the selected backbone blocks of their hidden states after the backbone's final
LayerNorm, CLS (and register) tokens removed: (grid * grid, hidden) in the "tokens" layout, e.g.
(24*24, 1024) for ViT-L/14 at 336 px. Unlike the reference (which fed BGR), the encoder sees RGB, normalised
with the checkpoint's own mean/std (ImageNet for DA-v2). Only the backbone is kept in memory; the
DPT neck and head are dropped after loading.
"""

from __future__ import annotations

import torch

from olavlm.teachers.base import IMAGENET_MEAN, IMAGENET_STD, Teacher, prepare_pixels, processor_dict, register_teacher

DEFAULT_SOURCE = "depth-anything/Depth-Anything-V2-Large-hf"


@register_teacher("depth_anything")
class DepthAnythingTeacher(Teacher):
    layout = "tokens"

    def __init__(self, backbone, *, grid: int, blocks: list[int], mean, std, source: str = "") -> None:
        super().__init__(source)
        self.backbone = backbone  # Dinov2Backbone (embeddings, encoder, layernorm)
        cfg = backbone.config
        self.grid = grid  # side of the target token grid
        self.patch_size = int(cfg.patch_size)
        self.hidden = int(cfg.hidden_size)
        n = int(cfg.num_hidden_layers)  # a negative block counts from the end (-1 = the last block)
        self.blocks = [int(b) + n if int(b) < 0 else int(b) for b in blocks]  # 0-based blocks averaged into the target
        self.num_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)  # CLS (+ registers) dropped
        self.mean, self.std = tuple(mean), tuple(std)
        bad = [b for b in self.blocks if not 0 <= b < cfg.num_hidden_layers]
        if not self.blocks or bad:
            raise ValueError(f"depth_anything: blocks {self.blocks} must be non-empty and within "
                             f"0..{cfg.num_hidden_layers - 1} of the backbone")
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_SOURCE, *, grid: int, blocks: list[int] | None = None,
                        dtype: torch.dtype | str | None = None, mean=None, std=None,
                        **hub_kwargs) -> "DepthAnythingTeacher":
        """``path``: hub id or folder of a ``DepthAnythingForDepthEstimation`` checkpoint.

        ``blocks`` (0-based) default to the checkpoint's DPT read-out blocks (backbone
        ``out_indices`` - 1), which are [4, 11, 17, 23] for the ViT-L checkpoints.
        ``mean``/``std`` default to the checkpoint's preprocessor config (ImageNet when absent).
        """
        from transformers import DepthAnythingForDepthEstimation

        model = DepthAnythingForDepthEstimation.from_pretrained(path, dtype=dtype, **hub_kwargs)
        backbone = model.backbone
        del model  # neck + head (DPT decoder) are not needed for targets
        if blocks is None:
            blocks = [i - 1 for i in backbone.config.out_indices]
        proc = processor_dict(path, **hub_kwargs)
        mean = mean if mean is not None else proc.get("image_mean", IMAGENET_MEAN)
        std = std if std is not None else proc.get("image_std", IMAGENET_STD)
        return cls(backbone, grid=grid, blocks=blocks, mean=mean, std=std, source=str(path))

    @property
    def input_size(self) -> int:
        return self.grid * self.patch_size

    @property
    def target_shape(self) -> tuple[int, ...]:
        return (self.grid * self.grid, self.hidden)

    def preprocessing(self) -> dict:
        return {"resize": self.input_size, "resample": "bicubic-antialias", "mean": list(self.mean),
                "std": list(self.std), "channels": "RGB", "blocks": self.blocks, "reduce": "mean",
                "layernorm": True, "drop_prefix_tokens": self.num_prefix}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_pixels(images, size=self.input_size, mean=self.mean, std=self.std,
                              device=self.device, dtype=self.dtype, mode="bicubic")

    def forward_features(self, inputs: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        bb = self.backbone
        hidden = bb.embeddings(inputs)
        layers = bb.encoder.layer
        total = None
        for i in range(max(self.blocks) + 1):  # later blocks do not influence the target
            hidden = layers[i](hidden)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            if i in self.blocks:
                feat = bb.layernorm(hidden)[:, self.num_prefix:].float()
                total = feat if total is None else total + feat
        return total / len(self.blocks)


class DepthDecoder:
    """Depth-Anything's own DPT neck + head, loaded on request (visualisation; never in training).

    :meth:`decode` feeds token features (N, grid*grid, C) to the four places the backbone's
    read-out features go (a zero CLS slot in front, as the neck drops it), so a predicted target
    is decoded exactly like the teacher's own features; :meth:`teacher_depth` is the full model on
    the teacher's preprocessed pixels. Outputs are the checkpoint's relative depth (N, H, W).
    """

    def __init__(self, model) -> None:
        self.model = model.eval().requires_grad_(False)  # DepthAnythingForDepthEstimation

    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_SOURCE, *, dtype=None, **hub_kwargs) -> "DepthDecoder":
        from transformers import DepthAnythingForDepthEstimation

        return cls(DepthAnythingForDepthEstimation.from_pretrained(path, dtype=dtype, **hub_kwargs))

    @property
    def num_inputs(self) -> int:
        return len(self.model.config.neck_hidden_sizes)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, grid: int) -> torch.Tensor:
        """tokens (N, grid*grid, C), or a list of ``num_inputs`` of them -> depth (N, H, W)."""
        feats = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens] * self.num_inputs
        dtype = next(self.model.parameters()).dtype
        feats = [torch.cat([f.new_zeros(f.shape[0], 1, f.shape[2]), f], 1).to(dtype) for f in feats]
        hidden = self.model.neck(feats, grid, grid)
        return self.model.head(hidden, grid, grid).float()

    @torch.no_grad()
    def teacher_depth(self, pixels: torch.Tensor) -> torch.Tensor:
        """The full model on preprocessed pixels (N, 3, S, S) -> depth (N, H, W)."""
        return self.model(pixel_values=pixels).predicted_depth.float()
