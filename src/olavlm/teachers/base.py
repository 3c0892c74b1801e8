"""Teacher protocol and registry.

A teacher turns the batch's shared square images (uint8, (N, 3, S, S), the same geometry the
vision tower saw) into per-image targets for one task. Teachers are frozen, live beside the
model (never inside its state_dict, DDP/DeepSpeed/FSDP wrapping or checkpoints) and are only
loaded when ``build_teacher`` is called explicitly.

Target layouts (per image, the predictor's output must match exactly):
  "tokens" (Q, C)      e.g. depth: (24*24, 1024)
  "grid"   (C, h, w)   e.g. seg:   (1536, 24, 24), h * w = number of image tokens
  "vector" (1, C)      e.g. gen:   (1, 1024)
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from olavlm.errors import UserError
from olavlm.teachers.registry import TEACHERS, register_teacher, teacher_class  # noqa: F401 - the teachers' import point

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2 / Depth-Anything / Swin normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    @property
    def input_size(self) -> int:
        """Side (px) of the square the encoder reads; the shared square should be at least this big."""
        raise NotImplementedError

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) RGB on any device -> the encoder's float input on the teacher's device."""
        raise NotImplementedError

    def forward_features(self, inputs: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def preprocessing(self) -> dict:
        """The preprocessing parameters that influence the targets (part of the fingerprint)."""
        return {}

    def fingerprint(self) -> dict:
        """What produced the targets (recorded in the target cache): teacher, source, preprocessing."""
        return {"teacher": self.name, "class": type(self).__qualname__, "source": self.source,
                "input_size": self.input_size, "preprocessing": self.preprocessing(),
                "target_shape": list(self.target_shape)}

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


def prepare_pixels(images: torch.Tensor, *, size: int, mean: Sequence[float], std: Sequence[float],
                   device: torch.device, dtype: torch.dtype, mode: str = "bicubic", crop: int | None = None,
                   quantize: bool = True) -> torch.Tensor:
    """uint8 RGB (N, 3, S, S) -> normalised float (N, 3, c, c) on ``device`` in ``dtype``, batched.

    Resizes the square to ``size`` x ``size`` with antialiasing (torch's antialiased bicubic uses
    PIL's a = -0.5 kernel). With ``quantize`` it reproduces a PIL uint8 resize, which the Hugging
    Face image processors run: a horizontal pass, rounding to the 0..255 grid, a vertical pass,
    rounding again (measured: within 2 intensity levels of PIL, equal on > 97 % of pixels, even on
    noise images). Then centre-crops to ``crop`` (default: none), scales to [0, 1] and normalises
    with mean/std. All arithmetic is float32; the cast to ``dtype`` is the last step.
    """
    x = images.to(device=device, non_blocking=True).float()
    if x.shape[-1] != size or x.shape[-2] != size:
        if quantize:
            x = F.interpolate(x, size=(x.shape[-2], size), mode=mode, align_corners=False, antialias=True)
            x = x.round_().clamp_(0, 255)
            x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True)
            x = x.round_().clamp_(0, 255)
        else:
            x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True)
    if crop is not None and crop != size:
        if crop > size:
            raise ValueError(f"crop {crop} is larger than the resized side {size}")
        top = (size - crop) // 2
        x = x[..., top:top + crop, top:top + crop]
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return ((x / 255.0 - m) / s).to(dtype)


def processor_dict(path: str, subfolder: str | None = None, **hub_kwargs) -> dict:
    """The checkpoint's image-processor settings (preprocessor_config.json) as a plain dict, or {}
    when the checkpoint has none. Read with transformers' own loader (hub id or folder)."""
    from transformers.image_processing_utils import ImageProcessingMixin

    kwargs = dict(hub_kwargs)
    if subfolder:
        kwargs["subfolder"] = subfolder
    try:
        config, _ = ImageProcessingMixin.get_image_processor_dict(path, **kwargs)
    except OSError:
        where = f"{path}/{subfolder}" if subfolder else str(path)
        log.warning("%s has no image-processor config; the teacher uses its documented default "
                    "preprocessing (see the teacher's from_pretrained)", where)
        return {}
    return config


def _side(value, key: str) -> int | None:
    """An image-processor size entry (int or dict) -> one side in px."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    for k in (key, "shortest_edge", "height"):
        if k in value:
            return int(value[k])
    raise ValueError(f"cannot read a side from the processor size {value!r}")


def build_teacher(name: str, path: str | None = None, *, grid: int, **kwargs) -> Teacher:
    """Instantiate a registered teacher from a hub id or folder (the only place teachers load).
    ``path=None`` uses the teacher class's default source."""
    cls = teacher_class(name)
    return cls.from_pretrained(grid=grid, **kwargs) if path is None else cls.from_pretrained(path, grid=grid, **kwargs)


class TeacherShapeError(UserError, ValueError):
    """A teacher's target shape does not match what the model's predictor produces."""


class TeacherSet:
    """The run's teachers, keyed by task; deliberately not an nn.Module (never wrapped or saved)."""

    def __init__(self, teachers: dict[str, Teacher]) -> None:
        self.teachers = teachers

    def __contains__(self, task: str) -> bool:
        return task in self.teachers

    def __getitem__(self, task: str) -> Teacher:
        return self.teachers[task]

    def __len__(self) -> int:
        return len(self.teachers)

    @property
    def tasks(self) -> list[str]:
        return list(self.teachers)

    @property
    def input_size(self) -> int:
        """Largest teacher input side: the side of the square the data layer carries for them."""
        return max((t.input_size for t in self.teachers.values()), default=0)

    @property
    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        return {task: tuple(t.target_shape) for task, t in self.teachers.items()}

    def fingerprints(self) -> dict[str, dict]:
        return {task: t.fingerprint() for task, t in self.teachers.items()}

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Raise naming the task and both shapes when a teacher's target shape differs from the
        predictor output shape ``expected[task]`` (e.g. ``model.target_shapes``)."""
        for task, teacher in self.teachers.items():
            if task not in expected:
                raise TeacherShapeError(f"teacher for task {task!r} has no predictor output shape to check against "
                                        f"(model tasks: {sorted(expected)})")
            want, got = tuple(expected[task]), tuple(teacher.target_shape)
            if want != got:
                raise TeacherShapeError(
                    f"task {task!r}: teacher {teacher.name!r} ({teacher.source}) produces targets of shape {got} "
                    f"but the predictor outputs {want}; fix model.tasks.{task}.predictor (out_dim / layout / "
                    f"queries) or the teacher")

    def to(self, device=None, dtype=None) -> "TeacherSet":
        for t in self.teachers.values():
            t.to(device=device, dtype=dtype)
            t.eval()
        return self

    def encode(self, images: torch.Tensor, keys: list[str] | None = None,
               tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """One batched call per teacher."""
        return {task: t.encode(images, keys) for task, t in self.teachers.items() if tasks is None or task in tasks}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` ... -> torch dtype (None stays None), by olavlm.dtypes."""
    from olavlm.dtypes import torch_dtype

    return torch_dtype(dtype, "teacher dtype")


def build_teachers(model_cfg, grid: int, device=None, dtype=None, *,
                   expected: dict[str, tuple[int, ...]] | None = None,
                   tasks: list[str] | None = None) -> TeacherSet:
    """The teachers of the tasks that have predictors (``layers`` non-empty), loaded on ``device``
    in ``dtype`` (the training dtype). With ``expected`` ({task: predictor output shape}, e.g.
    ``model.target_shapes``) each target shape is checked at start-up (:class:`TeacherShapeError`).
    ``tasks`` restricts the set further (default: every task with layers)."""
    dtype = resolve_dtype(dtype)
    teachers: dict[str, Teacher] = {}
    for task, tc in model_cfg.tasks.items():
        if not tc.layers or (tasks is not None and task not in tasks):
            continue
        teacher = build_teacher(tc.teacher, tc.teacher_path, grid=grid, **dict(tc.teacher_kwargs))
        teachers[task] = teacher.to(device=device, dtype=dtype).eval()
    if tasks is not None and (unknown := set(tasks) - set(teachers)):
        raise KeyError(f"tasks {sorted(unknown)} have no teacher with predictor layers in model.tasks")
    out = TeacherSet(teachers)
    if expected is not None:
        out.check_shapes(expected)
    return out
