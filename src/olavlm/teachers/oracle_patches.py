"""ShapeWorld patch-feature oracle: the stand-in for DINOv2 patch tokens in the embedded demo.

``shapeworld_patches`` (tokens, (G*G, C)): per patch, the k x k sub-patch normalised log depths
(geometry) next to the patch's class histogram (sky, ground, circle, square, triangle: semantics),
lifted by a fixed seeded random feature map ``cos(W x + b)`` like the other oracles
(:mod:`olavlm.teachers.oracle`). A vision foundation model's patch tokens carry both kinds of
information; this gives an alignment (VIRAL-style) task in ShapeWorld a target on the image-token
grid without any weights. teacher_kwargs: ``dim`` (C, 32), ``seed`` (0), ``centre`` (false),
``sub`` (k, 2), ``bandwidth`` (4.0).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from olavlm.teachers.base import register_teacher
from olavlm.teachers.oracle import ShapeWorldDepthTeacher, ShapeWorldSegTeacher, _OracleTeacher


@register_teacher("shapeworld_patches")
class ShapeWorldPatchTeacher(_OracleTeacher):
    """(G*G, C) tokens: random Fourier features of [sub-patch log depths, class histogram] per patch."""

    layout = "tokens"
    options = {"sub": 2, "bandwidth": 4.0}

    def __init__(self, world_dir, *, grid: int, dim: int = 32, seed: int = 0, centre: bool = False, sub: int = 2,
                 bandwidth: float = 4.0) -> None:
        from olavlm.world.generate import CLASSES

        self.sub = int(sub)  # sub-patches per patch side (k)
        super().__init__(world_dir, grid=grid, dim=dim, seed=seed, in_features=self.sub * self.sub + len(CLASSES),
                         stream=3, centre=centre)
        if (self.image_size // self.grid) % self.sub:
            raise ValueError(f"{self.name}: sub={sub} must divide the patch side {self.image_size // self.grid}")
        self.bandwidth = float(bandwidth)
        self._init_centring()

    @property
    def target_shape(self) -> tuple[int, ...]:
        return (self.grid * self.grid, self.dim)

    def preprocessing(self) -> dict:
        return {**super().preprocessing(), "sub": self.sub, "bandwidth": self.bandwidth,
                "features": ["log_depth_subpatches", "class_histogram"]}

    def patch_features(self, key: str) -> np.ndarray:
        """(G*G, k*k + n_classes): row-major patches, depth sub-patches then class fractions."""
        depth = ShapeWorldDepthTeacher.patch_depth(self, key)
        hist = ShapeWorldSegTeacher.patch_histogram(self, key).reshape(self.grid * self.grid, -1)
        return np.concatenate([depth, hist], axis=1)

    def raw_targets(self, keys: list[str]) -> torch.Tensor:
        x = torch.from_numpy(np.stack([self.patch_features(k) for k in keys])).float()
        w, b = self.weight.detach().float().cpu(), self.bias.detach().float().cpu()
        return math.sqrt(2.0) * torch.cos(self.bandwidth * x @ w.T + b)  # (N, G*G, C)
