"""Shared plumbing of the evaluation commands: load a trained folder, batch prompts and images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class EvalModel:
    model: object  # olavlm.model.vlm.OlaVLM in eval mode
    processor: object  # olavlm.data.processor.OlaProcessor: template, BOS policy, geometry the model was trained with
    device: torch.device

    tokenizer = property(lambda self: self.processor.tokenizer)
    template = property(lambda self: self.processor.template)
    image_geometry = property(lambda self: self.processor.image_geometry)  # pad | square | resize
    add_bos = property(lambda self: self.processor.add_bos)


def load_eval_model(model_dir: str | Path, *, template: str | None = None, image_geometry: str | None = None,
                    add_bos=None, device: str | None = None, with_predictors: bool = False) -> EvalModel:
    """A final folder written by ``olavlm train`` and its processor (template / BOS / geometry may be
    overridden; an old folder's ``olavlm_run.json`` is read when it has no processor)."""
    from olavlm.data.processor import OlaProcessor
    from olavlm.model.vlm import OlaVLM

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = OlaVLM.from_pretrained(model_dir, with_predictors=with_predictors).to(dev).eval()
    processor = OlaProcessor.from_pretrained(model_dir, model=model, template=template,
                                             image_geometry=image_geometry, add_bos=add_bos)
    return EvalModel(model, processor, dev)


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
