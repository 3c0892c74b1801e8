"""Teacher protocol and registry.

A teacher turns the batch's shared square images (uint8, (N, 3, S, S), the same geometry the
vision tower saw) into per-image targets for one task. Teachers are frozen, live beside the
model (never inside its state_dict, DDP/DeepSpeed/FSDP wrapping or checkpoints) and are only
loaded when ``build_teacher`` is called explicitly.

Target layouts (per image, the predictor's output must match exactly):
  "tokens" (Q, C)      e.g. depth: (576, 1024)
  "grid"   (C, h, w)   e.g. seg:   (1536, 24, 24), h * w = number of image tokens
  "vector" (1, C)      e.g. gen:   (1, 1024)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Teacher(nn.Module):
    """Base class. Subclasses set ``name`` and implement ``from_pretrained``, ``preprocess`` and
    ``forward_features``; ``encode`` is the batched, no-grad entry point used everywhere."""

    name: str = ""  # registry key
    layout: str = "tokens"  # tokens | grid | vector

    def __init__(self, source: str = "") -> None:
        super().__init__()
        self.source = source  # hub id or folder the weights came from
        self.requires_grad_(False)

    # -- to implement ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, *, grid: int, **kwargs) -> "Teacher":
        """Load weights from a hub id or folder. ``grid`` is the side of the image-token grid."""
        raise NotImplementedError

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one image's target (without the batch dimension)."""
        raise NotImplementedError

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) RGB on any device -> the encoder's float input on the teacher's device."""
        raise NotImplementedError

    def forward_features(self, inputs: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What produced the targets (recorded in the target cache): teacher, source, preprocessing."""
        return {"teacher": self.name, "source": self.source, "target_shape": list(self.target_shape)}

    # -- provided ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    @torch.no_grad()
    def encode(self, images: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        """Targets for a batch of images in one call: (N, *target_shape) in the teacher's dtype.

        ``keys`` are the images' dataset paths; only oracle teachers (ShapeWorld) use them.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected uint8 images (N, 3, S, S), got {tuple(images.shape)} {images.dtype}")
        if images.shape[0] == 0:
            return torch.zeros((0, *self.target_shape), dtype=self.dtype, device=self.device)
        out = self.forward_features(self.preprocess(images), keys)
        return out.to(self.dtype)


TEACHERS: dict[str, type[Teacher]] = {}


def register_teacher(name: str) -> Callable[[type[Teacher]], type[Teacher]]:
    """Class decorator: ``@register_teacher("depth_anything")``."""

    def wrap(cls: type[Teacher]) -> type[Teacher]:
        if name in TEACHERS and TEACHERS[name] is not cls:
            raise ValueError(f"teacher {name!r} registered twice")
        cls.name = name
        TEACHERS[name] = cls
        return cls

    return wrap


def _import_builtin_teachers() -> None:
    """Import the modules that register teachers (kept lazy: importing olavlm loads no teacher)."""
    import importlib

    for module in ("olavlm.teachers.depth_anything", "olavlm.teachers.oneformer", "olavlm.teachers.unclip",
                   "olavlm.teachers.oracle"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if not (e.name and module.startswith(e.name)):
                raise


def build_teacher(name: str, path: str, *, grid: int, **kwargs) -> Teacher:
    """Instantiate a registered teacher from a hub id or folder (the only place teachers load)."""
    _import_builtin_teachers()
    if name not in TEACHERS:
        raise KeyError(f"unknown teacher {name!r}; registered: {sorted(TEACHERS)}")
    return TEACHERS[name].from_pretrained(path, grid=grid, **kwargs)


class TeacherSet:
    """The run's teachers, keyed by task; deliberately not an nn.Module (never wrapped or saved)."""

    def __init__(self, teachers: dict[str, Teacher]) -> None:
        self.teachers = teachers

    def __contains__(self, task: str) -> bool:
        return task in self.teachers

    def __getitem__(self, task: str) -> Teacher:
        return self.teachers[task]

    def to(self, device=None, dtype=None) -> "TeacherSet":
        for t in self.teachers.values():
            t.to(device=device, dtype=dtype)
            t.eval()
        return self

    def encode(self, images: torch.Tensor, keys: list[str] | None = None,
               tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """One batched call per teacher."""
        return {task: t.encode(images, keys) for task, t in self.teachers.items() if tasks is None or task in tasks}
