"""ShapeWorld oracle teachers: targets computed from the world's ground truth, not from pixels.

They stand in for Depth-Anything / OneFormer / unCLIP in the embedded demo and are registered the
same way (``shapeworld_depth``, ``shapeworld_seg``, ``shapeworld_gen``). ``path`` is the world
folder written by :func:`olavlm.world.generate.generate_world`; ``encode(images, keys)`` reads the
ground truth of each image by its dataset key (``images/<stem>.png``). The pixels are not used, but
their count must match ``keys``.

* depth (tokens, (G*G, C)): per patch, the k x k sub-patch means of the normalised log depth are
  lifted by a fixed seeded random feature map ``cos(W x + b)`` (random Fourier features);
* seg (grid, (C, G, G)): per patch, the histogram of the class map lifted by a fixed random feature
  map ``cos(W h + b)`` (every token then has about the same norm, like a normalised ViT output);
* gen (vector, (1, C)): a global scene descriptor (object counts per colour x shape and per size,
  number of objects, depth statistics, class-pixel histogram) through a fixed projection.

Random Fourier features keep every token at about the same norm (the predictors end in a
LayerNorm, like the real teachers' normalised features); ``bandwidth`` trades smoothness (easy to
regress) against how much targets of different images differ (sky and ground look alike everywhere). ``centre=True`` additionally
centres every target on the world's mean target and divides by its spread.
The random maps are seeded by ``seed`` (teacher_kwargs), so the same world + kwargs always yield
identical targets, and stored as frozen parameters so ``.to(dtype)`` works like a real teacher.
teacher_kwargs: ``dim`` (C, default 32), ``seed`` (0), ``centre`` (false); depth also ``sub`` (k, 2)
and ``bandwidth`` (4.0); seg also ``bandwidth`` (4.0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from olavlm.dtypes import torch_dtype
from olavlm.teachers.base import Teacher, register_teacher


class _OracleTeacher(Teacher):
    """Shared plumbing: world metadata, grid checks, key -> ground-truth lookup, fixed random maps."""

    layout = "tokens"

    options: dict = {}  # extra teacher_kwargs of a subclass -> default

    def __init__(self, world_dir: str | Path, *, grid: int, dim: int, seed: int, in_features: int,
                 stream: int = 0, centre: bool = False) -> None:
        from olavlm.world.generate import CLASSES, read_meta

        super().__init__(source=str(world_dir))
        self.world_dir = Path(world_dir)
        meta = read_meta(world_dir)
        self.image_size = int(meta["spec"]["size"])  # side of the world's images (px)
        self.classes = list(meta["classes"])
        if list(CLASSES) != self.classes:
            raise ValueError(f"{self.name}: {world_dir} was written with classes {self.classes}, this code "
                             f"expects {list(CLASSES)}; regenerate the world")
        self.meta = meta
        if grid < 1 or self.image_size % grid:
            raise ValueError(f"{self.name}: grid {grid} must divide the world's image size {self.image_size}")
        if dim < 1:
            raise ValueError(f"{self.name}: dim must be >= 1, got {dim}")
        self.grid, self.dim, self.seed = int(grid), int(dim), int(seed)
        gen = torch.Generator().manual_seed(self.seed * 1009 + stream)  # one stream per teacher kind
        weight = torch.randn(self.dim, in_features, generator=gen) / math.sqrt(in_features)
        self.weight = nn.Parameter(weight, requires_grad=False)  # fixed projection / feature map
        self.bias = nn.Parameter(torch.rand(self.dim, generator=gen) * 2 * math.pi, requires_grad=False)
        self.centre = bool(centre)  # subtract the world's mean target and divide by its spread
        self.register_buffer("mean_target", torch.zeros(0), persistent=False)
        self.register_buffer("spread", torch.ones(()), persistent=False)

    def _init_centring(self, max_images: int = 256) -> None:
        """Mean target and scalar spread over (a fixed subset of) the world's images.

        ShapeWorld's sky and ground look alike in every image, so raw targets share a large common
        component (cosine ~0.99 between any two images): the contrastive term could not tell images
        apart and probes would score ~1 for a constant. Centred targets keep only what differs.
        """
        if not self.centre:
            return
        keys = sorted(json.loads((self.world_dir / "scenes.json").read_text()))
        keys = keys[:: max(1, len(keys) // max_images)][:max_images]
        raw = self.raw_targets(keys)
        self.mean_target = raw.mean(0)
        self.spread = (raw - self.mean_target).pow(2).mean().sqrt().clamp_min(1e-6)

    def raw_targets(self, keys: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, inputs: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        raw = self.raw_targets(self._check_keys(inputs, keys)).to(self.device)
        if not self.centre:
            return raw
        return (raw - self.mean_target.float()) / self.spread.float()

    @classmethod
    def from_pretrained(cls, path: str, *, grid: int, dim: int = 32, seed: int = 0, centre: bool = False,
                        dtype=None, **kwargs) -> "_OracleTeacher":
        """``path`` = world folder; ``dim`` = target channels C; ``seed`` seeds the fixed maps;
        ``centre`` = subtract the world's mean target (see ``_init_centring``)."""
        unknown = sorted(set(kwargs) - set(cls.options))
        if unknown:
            raise TypeError(f"{cls.name}: unknown teacher_kwargs {unknown} "
                            f"(known: dim, seed, centre{''.join(', ' + k for k in cls.options)})")
        teacher = cls(path, grid=grid, dim=dim, seed=seed, centre=centre, **{**cls.options, **kwargs})
        if dtype is not None:
            teacher.to(dtype=torch_dtype(dtype, "teacher dtype"))
        return teacher.eval()

    @property
    def input_size(self) -> int:
        return self.image_size

    def preprocessing(self) -> dict:
        return {"oracle": True, "grid": self.grid, "dim": self.dim, "seed": self.seed, "centre": self.centre,
                "generator_version": self.meta.get("generator_version")}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return images  # ground truth comes from the keys; pixels only fix the batch size

    def _check_keys(self, inputs: torch.Tensor, keys: list[str] | None) -> list[str]:
        if keys is None:
            raise ValueError(f"{self.name}: oracle teachers need the images' keys (batch['image_keys'])")
        if len(keys) != inputs.shape[0]:
            raise ValueError(f"{self.name}: {inputs.shape[0]} images but {len(keys)} keys")
        return list(keys)

    def _maps(self, key: str) -> dict[str, np.ndarray]:
        from olavlm.world.generate import load_maps

        maps = load_maps(self.world_dir, key)
        if maps["depth"].shape != (self.image_size, self.image_size):
            raise ValueError(f"{self.name}: maps of {key!r} have shape {maps['depth'].shape}, expected "
                             f"{self.image_size}x{self.image_size}")
        return maps

    def _pool(self, x: np.ndarray, cells: int) -> np.ndarray:
        """(S, S) -> (cells, cells) block means."""
        b = self.image_size // cells
        return x.reshape(cells, b, cells, b).mean(axis=(1, 3))


def normalised_log_depth(depth: np.ndarray, z_min: float, z_max: float) -> np.ndarray:
    """Depth in world units -> [0, 1] on a log scale (z_min -> 0, z_max -> 1)."""
    d = np.clip(depth.astype(np.float64), z_min, z_max)
    return (np.log(d) - math.log(z_min)) / (math.log(z_max) - math.log(z_min))


@register_teacher("shapeworld_depth")
class ShapeWorldDepthTeacher(_OracleTeacher):
    """(G*G, C) tokens: random Fourier features of the k x k sub-patch log depths of each patch."""

    layout = "tokens"
    options = {"sub": 2, "bandwidth": 4.0}

    def __init__(self, world_dir, *, grid: int, dim: int = 32, seed: int = 0, centre: bool = False, sub: int = 2,
                 bandwidth: float = 4.0) -> None:
        self.sub = int(sub)  # sub-patches per patch side (k)
        super().__init__(world_dir, grid=grid, dim=dim, seed=seed, in_features=self.sub * self.sub, centre=centre)
        if (self.image_size // self.grid) % self.sub:
            raise ValueError(f"{self.name}: sub={sub} must divide the patch side {self.image_size // self.grid}")
        self.bandwidth = float(bandwidth)  # frequency scale of the random features
        self._init_centring()

    @property
    def target_shape(self) -> tuple[int, ...]:
        return (self.grid * self.grid, self.dim)

    def preprocessing(self) -> dict:
        return {**super().preprocessing(), "sub": self.sub, "bandwidth": self.bandwidth}

    def patch_depth(self, key: str) -> np.ndarray:
        """(G*G, k*k) normalised log depth of each patch's sub-patches, row-major patches."""
        from olavlm.world.generate import SKY_DEPTH

        d = normalised_log_depth(self._maps(key)["depth"], self.meta["spec"]["camera"]["z_min"], SKY_DEPTH)
        g, k = self.grid, self.sub
        cells = self._pool(d, g * k)  # (g*k, g*k)
        return cells.reshape(g, k, g, k).transpose(0, 2, 1, 3).reshape(g * g, k * k)

    def raw_targets(self, keys: list[str]) -> torch.Tensor:
        x = torch.from_numpy(np.stack([self.patch_depth(k) for k in keys])).float()
        w, b = self.weight.detach().float().cpu(), self.bias.detach().float().cpu()
        return math.sqrt(2.0) * torch.cos(self.bandwidth * x @ w.T + b)  # (N, G*G, C)


@register_teacher("shapeworld_seg")
class ShapeWorldSegTeacher(_OracleTeacher):
    """(C, G, G) grid: per-patch class histogram (sky, ground, circle, square, triangle) projected."""

    layout = "grid"

    options = {"bandwidth": 4.0}

    def __init__(self, world_dir, *, grid: int, dim: int = 32, seed: int = 0, centre: bool = False,
                 bandwidth: float = 4.0) -> None:
        from olavlm.world.generate import CLASSES

        super().__init__(world_dir, grid=grid, dim=dim, seed=seed, in_features=len(CLASSES), stream=1, centre=centre)
        self.bandwidth = float(bandwidth)  # frequency scale of the random features
        self._init_centring()

    @property
    def target_shape(self) -> tuple[int, ...]:
        return (self.dim, self.grid, self.grid)

    def patch_histogram(self, key: str) -> np.ndarray:
        """(G, G, n_classes) fraction of each patch's pixels per class."""
        seg = self._maps(key)["seg"]
        onehot = (seg[..., None] == np.arange(len(self.classes))).astype(np.float64)
        b = self.image_size // self.grid
        return onehot.reshape(self.grid, b, self.grid, b, -1).mean(axis=(1, 3))

    def preprocessing(self) -> dict:
        return {**super().preprocessing(), "bandwidth": self.bandwidth}

    def raw_targets(self, keys: list[str]) -> torch.Tensor:
        h = torch.from_numpy(np.stack([self.patch_histogram(k) for k in keys])).float()
        w, b = self.weight.detach().float().cpu(), self.bias.detach().float().cpu()
        out = math.sqrt(2.0) * torch.cos(self.bandwidth * h @ w.T + b)  # (N, G, G, C)
        return out.permute(0, 3, 1, 2).contiguous()


@register_teacher("shapeworld_gen")
class ShapeWorldGenTeacher(_OracleTeacher):
    """(1, C) vector: a global scene descriptor through a fixed projection."""

    layout = "vector"

    def __init__(self, world_dir, *, grid: int, dim: int = 32, seed: int = 0, centre: bool = False) -> None:
        from olavlm.world.generate import CLASSES, COLOURS, SHAPES, SIZES

        self._combos = [(c, s) for c in COLOURS for s in SHAPES]
        self._sizes = list(SIZES)
        n_in = len(self._combos) + len(self._sizes) + 5 + len(CLASSES)
        super().__init__(world_dir, grid=grid, dim=dim, seed=seed, in_features=n_in, stream=2, centre=centre)
        scenes = self.world_dir / "scenes.json"
        if not scenes.is_file():
            raise FileNotFoundError(f"{self.name}: {scenes} is missing; regenerate the world")
        self.scenes = json.loads(scenes.read_text())  # image key -> scene
        self._init_centring()

    @property
    def target_shape(self) -> tuple[int, ...]:
        return (1, self.dim)

    def descriptor(self, key: str) -> np.ndarray:
        if key not in self.scenes:
            raise KeyError(f"{self.name}: image {key!r} is not in {self.world_dir / 'scenes.json'}")
        objs = self.scenes[key]["objects"]
        cam = self.meta["spec"]["camera"]
        combo = [sum(o["colour"] == c and o["shape"] == s for o in objs) for c, s in self._combos]
        sizes = [sum(o["size"] == s for o in objs) for s in self._sizes]
        z = np.array([(o["Z"] - cam["z_min"]) / (cam["z_max"] - cam["z_min"]) for o in objs])
        x = np.array([o["X"] / cam["x_max"] for o in objs])
        stats = [len(objs) / 4.0, float(z.mean()), float(z.min()), float(x.std()),
                 (self.scenes[key].get("horizon", cam["horizon"]) - cam["horizon"]) / max(cam["horizon_jitter"], 1e-6)]
        seg = self._maps(key)["seg"]
        hist = np.bincount(seg.ravel(), minlength=len(self.classes)) / seg.size
        return np.concatenate([combo, sizes, stats, hist]).astype(np.float64)

    def raw_targets(self, keys: list[str]) -> torch.Tensor:
        d = torch.from_numpy(np.stack([self.descriptor(k) for k in keys])).float()
        return (d @ self.weight.detach().float().cpu().T).unsqueeze(1)  # (N, 1, C)
