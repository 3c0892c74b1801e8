"""Exact parameter counts of a (meta-device) OlaVLM, per group, per predictor and per stage.

Groups are ``model.param_groups()`` (llm, vision, projector, task_tokens, predictors,
logit_scales); what trains in each stage comes from ``olavlm.train.stages.configure_trainable``
applied to the model itself, so the plan states the same policy the trainer logs at start-up.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from olavlm.config import TrainConfig
from olavlm.train.stages import configure_trainable


@dataclass
class GroupCount:
    params: int  # elements
    bytes: int  # as built (LLM / tower in model.dtype, extras fp32)
    dtypes: list[str] = field(default_factory=list)


@dataclass
class LLMDims:
    """What the FLOP and activation formulas need about the decoder."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int  # rows of the output embedding (after a pad token is added)
    tied: bool

    @classmethod
    def of(cls, llm: nn.Module) -> "LLMDims":
        c = llm.config
        heads = int(c.num_attention_heads)
        hidden = int(c.hidden_size)
        head_dim = int(getattr(c, "head_dim", None) or hidden // heads)
        out = llm.get_output_embeddings()
        return cls(layers=int(c.num_hidden_layers), hidden=hidden, heads=heads,
                   kv_heads=int(getattr(c, "num_key_value_heads", None) or heads), head_dim=head_dim,
                   intermediate=int(c.intermediate_size), vocab=int(out.weight.shape[0]),
                   tied=out.weight is llm.get_input_embeddings().weight)


@dataclass
class VisionDims:
    layers: int
    hidden: int
    intermediate: int
    patch: int
    image_size: int
    tokens: int  # sequence inside the tower (patches + CLS); ConvNeXt: positions of its last stage
    channels: int = 3
    depths: tuple[int, ...] = ()  # ConvNeXt only: blocks per stage (empty = a ViT)
    widths: tuple[int, ...] = ()  # ConvNeXt only: channels per stage

    @classmethod
    def of(cls, tower: nn.Module, vision_type: str) -> "VisionDims":
        """Dims of a ViT tower (``vision_type`` names its registry entry, which says if it has a CLS
        token) or of a ConvNeXt tower (stem patch, blocks and widths per stage)."""
        from olavlm.geometry import TOWERS

        c = tower.model.config
        if TOWERS[vision_type].family == "convnext":
            patch = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
            side = int(c.image_size) // (int(patch) * 2 ** (len(c.depths) - 1))
            widths = tuple(int(w) for w in c.hidden_sizes)
            return cls(layers=sum(c.depths), hidden=widths[-1], intermediate=4 * widths[-1], patch=int(patch),
                       image_size=int(c.image_size), tokens=side * side, channels=int(getattr(c, "num_channels", 3)),
                       depths=tuple(int(d) for d in c.depths), widths=widths)
        grid = int(c.image_size) // int(c.patch_size)
        has_cls = TOWERS[vision_type].has_cls
        return cls(layers=int(c.num_hidden_layers), hidden=int(c.hidden_size), intermediate=int(c.intermediate_size),
                   patch=int(c.patch_size), image_size=int(c.image_size), tokens=grid * grid + int(has_cls),
                   channels=int(getattr(c, "num_channels", 3)))


def numel(params) -> int:
    return sum(p.numel() for p in params)


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def group_counts(model) -> dict[str, GroupCount]:
    """{group: count, bytes, dtypes} over ``model.param_groups()`` (shared parameters once)."""
    seen: set[int] = set()
    out: dict[str, GroupCount] = {}
    for name, params in model.param_groups().items():
        params = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in params)
        out[name] = GroupCount(numel(params), nbytes(params), sorted({str(p.dtype).replace("torch.", "") for p in params}))
    return out


def predictor_counts(model) -> dict[str, dict[str, Any]]:
    """{task: {"per_layer": {layer: params}, "output_mlp": params of the supervised output MLP per layer,
    "dim": D, "queries": Q, "out_dim": C, "output_shape": [...]}}."""
    from olavlm.config import task_stages

    out: dict[str, dict[str, Any]] = {}
    for task, by_layer in model.predictors.items():
        first = next(iter(by_layer.values()))
        tc = model.cfg.tasks[task]
        if tc.kind == "alignment":  # token-wise MLP d -> m -> m -> C on each of the P image tokens
            lin = [m for m in first.mlp if isinstance(m, torch.nn.Linear)]
            out[task] = {"kind": "alignment", "stages": list(task_stages(tc)),
                         "per_layer": {int(layer): numel(p.parameters()) for layer, p in by_layer.items()},
                         "mlp_dim": lin[0].out_features, "out_dim": first.out_dim, "tokens": first.num_tokens,
                         "output_shape": list(first.output_shape)}
            continue
        out[task] = {"kind": "embedding", "stages": list(task_stages(tc)),
            "per_layer": {int(layer): numel(p.parameters()) for layer, p in by_layer.items()},
            "output_mlp": numel(first.output_mlp.parameters()) if first.output_mlp is not None else 0,
            "dim": first.proj_in.out_features, "queries": first.num_queries, "out_dim": first.out_dim,
            "blocks": len(first.blocks), "heads": first.blocks[0].attn.heads,
            "dim_head": first.blocks[0].attn.dim_head,
            "ff_mult": first.blocks[0].ff[1].out_features // first.proj_in.out_features,
            "query_source": model.cfg.tasks[task].predictor.query_source,
            "output_shape": list(first.output_shape),
        }
    return out


def stage_counts(model, stage: str, train_cfg: TrainConfig) -> dict[str, dict[str, int]]:
    """{group: {"trainable", "frozen"}} under the stage policy (the model's flags are left as they were)."""
    train, _ = trainable_split(model, stage, train_cfg)
    ids = {id(p) for p in train}
    seen: set[int] = set()
    out: dict[str, dict[str, int]] = {}
    for group, params in model.param_groups().items():
        params = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in params)
        t = numel(p for p in params if id(p) in ids)
        out[group] = {"trainable": t, "frozen": numel(params) - t}
    return out


def trainable_split(model, stage: str, train_cfg: TrainConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(trainable, frozen) parameters of ``model`` under the stage policy (flags restored)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    logger = logging.getLogger("olavlm.train.stages")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        configure_trainable(model, stage, copy.deepcopy(train_cfg))
        seen: set[int] = set()
        train, frozen = [], []
        for p in model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            (train if p.requires_grad else frozen).append(p)
    finally:
        logger.setLevel(level)
        for p, flag in flags:
            p.requires_grad_(flag)
    return train, frozen
