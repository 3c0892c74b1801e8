"""Shared plumbing of the evaluation commands: load a trained folder, batch prompts and images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class EvalModel:
    model: object  # olavlm.model.vlm.OlaVLM in eval mode
    tokenizer: object
    template: str  # data template the model was trained with
    image_geometry: str  # pad | square | resize
    device: torch.device
    add_bos: bool | str = "auto"  # the BOS policy the model was trained with (olavlm_run.json)


def load_eval_model(model_dir: str | Path, *, template: str | None = None, image_geometry: str | None = None,
                    device: str | None = None, with_predictors: bool = False) -> EvalModel:
    """A final folder written by ``olavlm train``; template / geometry from its ``olavlm_run.json``."""
    from olavlm.infer.chat import RUN_INFO, read_run_info
    from olavlm.model.vlm import OlaVLM

    info = read_run_info(model_dir)
    template = template or info.get("template")
    image_geometry = image_geometry or info.get("image_geometry")
    if not template or not image_geometry:
        raise ValueError(f"{model_dir}: no {RUN_INFO} with the data template / image geometry; pass "
                         "--template and --image-geometry (the values the model was trained with)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = OlaVLM.from_pretrained(model_dir, with_predictors=with_predictors).to(dev).eval()
    return EvalModel(model, model.tokenizer, template, image_geometry, dev, info.get("add_bos", "auto"))


def load_squares(paths: list[Path], geometry: str, spec) -> list:
    """Decode images and bring each to the shared square the vision tower sees."""
    from olavlm.data.images import load_image, to_square

    return [to_square(load_image(p, geometry=geometry, side=spec.size), geometry, spec, spec.size) for p in paths]


def pixel_batch(squares: list, spec) -> torch.Tensor:
    from olavlm.data.images import pixel_values

    return torch.stack([pixel_values(sq, spec) for sq in squares])


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> right-padded ids (B, T) and attention mask (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids, mask


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]
