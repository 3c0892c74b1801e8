"""DINOv2 teacher (VIRAL-style alignment targets): patch tokens after the final LayerNorm.

``transformers.Dinov2Model`` on the shared square resized to ``grid * patch_size`` px (336 px for
ViT-B/14 and a 24 x 24 image-token grid), so its patch grid IS the image-token grid: the position
embeddings are interpolated to that grid by the model itself (``Dinov2Embeddings`` always
resamples them to the input size). Target = ``last_hidden_state`` (after the final LayerNorm)
without the CLS token: (grid * grid, hidden) in the "tokens" layout, e.g. (24 * 24, 768).

Normalisation: the checkpoint's own mean/std (its preprocessor config; ImageNet when absent).
VIRAL fed DINOv2 the CLIP-normalised image instead; olavlm gives every teacher its own
normalisation (see docs/methods.md). The processor's shortest-edge resize + centre crop is not
used: the whole square is resized, so every target token covers the same pixels as the image
token it supervises.
"""

from __future__ import annotations

import torch

from olavlm.teachers.base import IMAGENET_MEAN, IMAGENET_STD, Teacher, prepare_pixels, processor_dict, register_teacher

DEFAULT_SOURCE = "facebook/dinov2-base"


@register_teacher("dinov2")
class Dinov2Teacher(Teacher):
    layout = "tokens"

    def __init__(self, model, *, grid: int, mean, std, source: str = "") -> None:
        super().__init__(source)
        self.model = model  # Dinov2Model (embeddings, encoder, layernorm)
        cfg = model.config
        self.grid = grid  # side of the image-token grid = side of the target patch grid
        self.patch_size = int(cfg.patch_size)
        self.hidden = int(cfg.hidden_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_SOURCE, *, grid: int, dtype: torch.dtype | str | None = None,
                        mean=None, std=None, **hub_kwargs) -> "Dinov2Teacher":
        """``path``: hub id or folder of a ``Dinov2Model`` checkpoint (e.g. facebook/dinov2-base).
        ``mean``/``std`` default to the checkpoint's preprocessor config (ImageNet when absent)."""
        from transformers import Dinov2Model

        model = Dinov2Model.from_pretrained(path, dtype=dtype, **hub_kwargs)
        proc = processor_dict(path, **hub_kwargs)
        mean = mean if mean is not None else proc.get("image_mean", IMAGENET_MEAN)
        std = std if std is not None else proc.get("image_std", IMAGENET_STD)
        return cls(model, grid=grid, mean=mean, std=std, source=str(path))

    @property
    def input_size(self) -> int:
        return self.grid * self.patch_size

    @property
    def target_shape(self) -> tuple[int, ...]:
        return (self.grid * self.grid, self.hidden)

    def preprocessing(self) -> dict:
        return {"resize": self.input_size, "resample": "bicubic-antialias", "mean": list(self.mean),
                "std": list(self.std), "channels": "RGB", "layernorm": True, "drop_prefix_tokens": 1,
                "position_embeddings": f"interpolated to {self.grid}x{self.grid}"}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_pixels(images, size=self.input_size, mean=self.mean, std=self.std,
                              device=self.device, dtype=self.dtype, mode="bicubic")

    def forward_features(self, inputs: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        out = self.model(pixel_values=inputs).last_hidden_state  # final LayerNorm applied
        patches = out[:, 1:].float()
        if patches.shape[1] != self.grid * self.grid:
            raise ValueError(f"dinov2: {patches.shape[1]} patch tokens for a {self.grid}x{self.grid} grid")
        return patches
