"""The processor of a model: a record, or a prompt + images, -> the model's inputs (HF-style).

One :class:`OlaProcessor` owns everything that turns data into inputs for one model: the data
template, the tokenizer with the BOS policy resolved, the image geometry (``pad | square |
resize``), the vision tower's :class:`~olavlm.data.images.ImageSpec`, the side of the teachers'
square (None when no teacher runs) and the positions one image expands to. Training's dataset,
``data check`` / ``data show``, chat, evaluation, the probe and ``targets precompute`` all build
inputs through it, so the tower's pixels and the teachers' images are made one way everywhere.

Saved with every model folder: ``save_pretrained(folder)`` writes ``olavlm_processor.json`` (with a
``version`` field, plus a ``run`` section: stage, run dir, ... of the run that wrote it) and the
tokenizer files; ``from_pretrained(folder)`` loads it. A folder written before the processor
existed has only ``olavlm_run.json`` (template, BOS policy, geometry): it is read as a fallback, the
image facts then come from the loaded model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from olavlm.data.images import (DEFAULT_LIMITS, GEOMETRIES, ImageLimits, ImageSpec, load_image, pixel_values,
                                read_image, teacher_image, to_square)
from olavlm.data.tokenize import check_template, encode_conversation, encode_prompt, parse_add_bos, stop_token_ids
from olavlm.errors import UserError, read_json_object

log = logging.getLogger(__name__)

PROCESSOR_FILE = "olavlm_processor.json"
LEGACY_FILE = "olavlm_run.json"  # what folders written before the processor carry (template, BOS, geometry)
VERSION = 1
_LIMIT_FIELDS = ("max_pixels", "max_aspect", "max_geometry_pixels")


class ProcessorConfigError(UserError, ValueError):
    """A olavlm_processor.json (or olavlm_run.json) that cannot be used; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class OlaProcessor:
    tokenizer: Any
    template: str
    add_bos: bool  # whether sequences start with BOS (the policy resolved against the tokenizer)
    image_geometry: str
    image_spec: ImageSpec
    tokens_per_image: int  # positions one image placeholder expands to (image tokens + task tokens)
    teacher_image_size: int | None = None  # side of the teachers' uint8 square; None = no teacher images
    limits: ImageLimits = DEFAULT_LIMITS
    run: dict = dataclasses.field(default_factory=dict)  # provenance of the folder (stage, run_dir, ...)

    def __post_init__(self) -> None:
        if self.image_geometry not in GEOMETRIES:
            raise ValueError(f"image_geometry: {self.image_geometry!r} is not one of {GEOMETRIES}")
        if self.tokens_per_image < 1:
            raise ValueError(f"tokens_per_image must be >= 1, got {self.tokens_per_image}")
        if self.teacher_image_size is not None and self.teacher_image_size < 1:
            raise ValueError(f"teacher_image_size must be >= 1, got {self.teacher_image_size}")
        # an unusable template x tokenizer x BOS choice fails here (one-line ValueError); the policy
        # is kept as the bool it resolves to, which is what the folder records
        object.__setattr__(self, "add_bos", check_template(self.template, self.tokenizer, self.add_bos))

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model, data_cfg, *, teacher_image_size: int | None = None, run: dict | None = None,
                  add_bos=None) -> "OlaProcessor":
        """The processor of ``model`` (anything with ``tokenizer``, ``image_spec``, ``tokens_per_image``)
        for a run's ``data`` section (template, ``add_bos``, geometry, image limits)."""
        return cls(model.tokenizer, data_cfg.template, getattr(data_cfg, "add_bos", "auto") if add_bos is None
                   else add_bos, data_cfg.image_geometry, model.image_spec, model.tokens_per_image,
                   teacher_image_size, ImageLimits.from_config(data_cfg), dict(run or {}))

    def with_overrides(self, *, template: str | None = None, add_bos=None, image_geometry: str | None = None,
                       teacher_image_size: int | None = None) -> "OlaProcessor":
        """A copy with the given fields replaced (None = keep); the command-line overrides."""
        changes = {k: v for k, v in (("template", template), ("add_bos", add_bos), ("image_geometry", image_geometry),
                                     ("teacher_image_size", teacher_image_size)) if v is not None}
        if "add_bos" in changes:
            changes["add_bos"] = parse_add_bos(changes["add_bos"])
            if changes["add_bos"] is None:  # "auto": what the tokenizer does
                changes["add_bos"] = "auto"
        elif "template" in changes:
            changes["add_bos"] = "auto"  # a recorded policy belongs to the recorded template
        return dataclasses.replace(self, **changes) if changes else self

    # -- images ---------------------------------------------------------------------------------
    @property
    def max_side(self) -> int:
        """Largest square side an image is cut at (the size guard runs on the header with it)."""
        return max(self.image_spec.size, self.teacher_image_size or 0)

    def load_image(self, path) -> Any:
        """Decode ``path`` (size guard on the header first); raises BadSample."""
        return load_image(path, limits=self.limits, geometry=self.image_geometry, side=self.max_side)

    def read_image(self, path) -> tuple[Any, str]:
        """:meth:`load_image` plus the sha1 of the file's bytes."""
        return read_image(path, limits=self.limits, geometry=self.image_geometry, side=self.max_side)

    def square(self, img) -> Any:
        """The geometry's square at the tower's side (the tower's processor input)."""
        return to_square(img, self.image_geometry, self.image_spec, limits=self.limits)

    def teacher_image(self, img, square=None, size: int | None = None) -> torch.Tensor:
        """The teachers' uint8 (3, S, S) input: the geometry's square cut from the original image at
        max(tower side, S), resized to S (``size`` or ``teacher_image_size``)."""
        side = size or self.teacher_image_size
        if side is None:
            raise ValueError("teacher_image: this processor has no teacher_image_size")
        return teacher_image(img, square, self.image_geometry, self.image_spec, side, limits=self.limits)

    def images(self, images: list, *, teacher: bool | None = None) -> dict[str, torch.Tensor]:
        """Decoded images -> ``pixel_values`` float (n, 3, H, W) and, with a teacher size (or
        ``teacher=True``), ``images`` uint8 (n, 3, S, S) for the teachers."""
        spec = self.image_spec
        squares = [self.square(img) for img in images]
        out = {"pixel_values": (torch.stack([pixel_values(s, spec) for s in squares]) if squares
                                else torch.zeros((0, 3, spec.size, spec.size)))}
        if teacher is None:
            teacher = self.teacher_image_size is not None
        if teacher:
            side = self.teacher_image_size or 0
            out["images"] = (torch.stack([self.teacher_image(img, sq) for img, sq in zip(images, squares)])
                             if squares else torch.zeros((0, 3, side, side), dtype=torch.uint8))
        return out

    # -- text -----------------------------------------------------------------------------------
    def encode(self, conversations, num_images: int):
        """Training ids / labels of a conversation (:class:`~olavlm.data.tokenize.Encoded`)."""
        return encode_conversation(conversations, self.template, self.tokenizer, num_images=num_images,
                                   add_bos=self.add_bos)

    def prompt_ids(self, messages: list[dict], num_images: int) -> list[int]:
        """Ids of ``messages`` with an open assistant turn: the training ids up to the reply."""
        return encode_prompt(messages, self.template, self.tokenizer, num_images=num_images, add_bos=self.add_bos)

    def stop_token_ids(self) -> list[int]:
        return stop_token_ids(self.template, self.tokenizer)

    # -- whole inputs ---------------------------------------------------------------------------
    def __call__(self, conversations, image_paths: list = ()) -> dict[str, torch.Tensor]:
        """A training record (conversations + image paths) -> ``input_ids``, ``labels``,
        ``pixel_values`` (+ ``images`` for teachers). No length policy (the dataset applies it)."""
        enc = self.encode(conversations, len(image_paths))
        return {"input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                "labels": torch.tensor(enc.labels, dtype=torch.long),
                **self.images([self.load_image(p) for p in image_paths])}

    def generation_inputs(self, messages: list[dict], image_paths: list = ()) -> dict[str, torch.Tensor | None]:
        """A prompt (messages, open assistant turn) + image paths -> ``input_ids`` (1, T) and
        ``pixel_values`` (n, 3, H, W) or None for a text-only prompt."""
        ids = self.prompt_ids(messages, len(image_paths))
        pixels = self.images([self.load_image(p) for p in image_paths], teacher=False)["pixel_values"]
        return {"input_ids": torch.tensor([ids], dtype=torch.long), "pixel_values": pixels if len(image_paths) else None}

    # -- saving / loading -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        spec = self.image_spec
        return {"version": VERSION, "template": self.template, "add_bos": self.add_bos,
                "image_geometry": self.image_geometry,
                "image_spec": {"size": spec.size, "mean": list(spec.mean), "std": list(spec.std),
                               "resample": spec.resample},
                "tokens_per_image": self.tokens_per_image, "teacher_image_size": self.teacher_image_size,
                "limits": {k: getattr(self.limits, k) for k in _LIMIT_FIELDS}, "run": self.run}

    def save_pretrained(self, folder: str | Path, *, tokenizer: bool = True) -> Path:
        """``folder/olavlm_processor.json`` (+ the tokenizer files unless ``tokenizer=False``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if tokenizer:
            self.tokenizer.save_pretrained(folder)
        (folder / PROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return folder / PROCESSOR_FILE

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, model=None, tokenizer=None, **overrides) -> "OlaProcessor":
        """Load ``folder``'s processor. ``model`` (tokenizer, image_spec, tokens_per_image) is checked
        against the saved facts and supplies them for an old folder with only ``olavlm_run.json``;
        ``overrides``: template / add_bos / image_geometry / teacher_image_size (None = saved value)."""
        from olavlm.data.processor_io import load_processor

        return load_processor(cls, Path(folder), model=model, tokenizer=tokenizer, overrides=overrides)


def read_settings(folder: str | Path) -> dict:
    """The saved text/image settings of a folder without loading anything: ``template``, ``add_bos``,
    ``image_geometry`` and ``run`` (stage, run_dir, init_from, ...) from its olavlm_processor.json, or
    from an old folder's olavlm_run.json; {} when the folder has neither."""
    folder = Path(folder)
    if (folder / PROCESSOR_FILE).is_file():
        from olavlm.data.processor_io import parse_file

        fields = parse_file(folder / PROCESSOR_FILE)
        return {k: fields[k] for k in ("template", "add_bos", "image_geometry", "run")}
    if (folder / LEGACY_FILE).is_file():
        info = _read_json(folder / LEGACY_FILE)
        run = {k: v for k, v in info.items() if k not in ("template", "image_geometry", "add_bos")}
        return {**{k: info[k] for k in ("template", "image_geometry") if k in info},
                "add_bos": info.get("add_bos", "auto"), "run": run}
    return {}


def read_run_section(folder: str | Path) -> dict:
    """The ``run`` section of a folder's processor (stage, run_dir, init_from, ...), {} when unknown."""
    return dict(read_settings(folder).get("run") or {})


def _read_json(file: Path) -> dict:
    return read_json_object(file, ProcessorConfigError)
