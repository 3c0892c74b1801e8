"""Analytic FLOPs of one training sample, per component (the formulas are in docs/cluster.md).

Counted as ``torch.utils.flop_counter.FlopCounterMode`` counts (the benchmarks' convention): 2 FLOPs
per multiply-add of every matmul and convolution, attention as its two batched matmuls over the full
(unmasked) score matrix, nothing for norms, softmax or element-wise ops. The tests check every
forward formula against the counter on tiny models of the same classes.

Training FLOPs of a component = forward x (1 + input-gradient pass + weight-gradient pass), each
backward pass costing one forward: frozen modules that gradients flow through (the PT LLM) x 2,
trainable ones x 3, modules without gradients (vision tower, teachers) x 1. These are "model FLOPs"
(the MFU basis): activation checkpointing recomputes one LLM forward on top (reported separately).
"""

from __future__ import annotations

from typing import Any

from olavlm.plan.counts import LLMDims, VisionDims


def llm_forward(d: LLMDims, length: int, supervised: int) -> dict[str, int]:
    """One sample of ``length`` positions through the decoder, LM head on ``supervised`` positions."""
    h, kv = d.hidden, d.kv_heads * d.head_dim
    q_dim = d.heads * d.head_dim
    per_layer = 2 * length * (h * (q_dim + 2 * kv) + q_dim * h + 3 * h * d.intermediate)
    attention = 4 * length * length * q_dim
    return {"matmul": d.layers * per_layer, "attention": d.layers * attention,
            "head": 2 * supervised * h * d.vocab}


def vit_forward(*, layers: int, hidden: int, intermediate: int, tokens: int, patch: int, grid: int,
                channels: int = 3) -> dict[str, int]:
    """A ViT (CLIP / DINOv2): patch convolution, ``layers`` blocks over ``tokens`` positions."""
    conv = 2 * grid * grid * hidden * channels * patch * patch
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate)
    return {"matmul": conv + layers * per_layer, "attention": layers * 4 * tokens * tokens * hidden}


def vision_forward(v: VisionDims) -> dict[str, int]:
    grid = v.image_size // v.patch
    return vit_forward(layers=v.layers, hidden=v.hidden, intermediate=v.intermediate, tokens=v.tokens,
                       patch=v.patch, grid=grid, channels=v.channels)


def projector_forward(in_dim: int, out_dim: int, linears: int, tokens: int) -> dict[str, int]:
    """``mlp<N>x_gelu`` (N linears; ``linear`` is N = 1) on ``tokens`` image features: the first
    linear (whose input, the frozen tower's features, needs no gradient) and the others."""
    return {"first": 2 * tokens * in_dim * out_dim, "rest": 2 * tokens * (linears - 1) * out_dim * out_dim}


def predictor_forward(p: dict[str, Any], llm_dim: int, length: int, batch: int) -> dict[str, int]:
    """One (task, layer) predictor for a batch of ``batch`` one-image samples of ``length`` positions;
    ``p`` is a :func:`olavlm.plan.counts.predictor_counts` entry. Per-batch totals (the task-token
    queries are projected once per batch)."""
    D, Q, C = p["dim"], p["queries"], p["out_dim"]
    inner = p["heads"] * p["dim_head"]
    n = batch
    states = 2 * batch * length * llm_dim * D  # proj_in on every position of every sample
    if p["query_source"] == "task_tokens":
        queries = 2 * Q * llm_dim * D  # the task's rows, once per batch
    else:
        queries = 2 * n * llm_dim * D  # the image's task tokens pooled to one query
    keys = length + Q
    per_block = (2 * n * keys * D * 2 * inner + 2 * n * Q * D * inner + 2 * n * Q * inner * D
                 + 2 * 2 * n * Q * D * D * p["ff_mult"])
    attention = 4 * n * Q * keys * inner
    head = 2 * n * Q * D * C + (2 * 2 * n * Q * C * C if p["output_mlp"] else 0)
    return {"matmul": states + queries + p["blocks"] * per_block + head, "attention": p["blocks"] * attention}


def contrastive_forward(output_shape: list[int], batch: int, world: int) -> int:
    """InfoNCE logits of one (task, layer): local predictions x all ranks' targets."""
    flat = 1
    for s in output_shape:
        flat *= s
    return 2 * batch * batch * world * flat


def swin_forward(cfg, image_size: int) -> dict[str, int]:
    """Swin backbone (OneFormer's encoder): window attention inside ``window_size`` windows."""
    side = image_size // cfg.patch_size
    c = cfg.embed_dim
    matmul = 2 * side * side * c * getattr(cfg, "num_channels", 3) * cfg.patch_size ** 2
    attention = 0
    for stage, depth in enumerate(cfg.depths):
        t = side * side
        w = min(cfg.window_size, side)
        hidden = int(cfg.mlp_ratio * c)
        matmul += depth * (2 * t * 4 * c * c + 2 * t * 2 * c * hidden)
        attention += depth * 4 * t * w * w * c
        if stage < len(cfg.depths) - 1:  # patch merging: Linear(4C -> 2C) on a quarter of the tokens
            matmul += 2 * (t // 4) * 4 * c * 2 * c
            side, c = side // 2, c * 2
    return {"matmul": matmul, "attention": attention}


def teacher_forward(teacher) -> dict[str, int]:
    """Forward FLOPs of one image through a built teacher (its classes' geometry); {} when unknown."""
    name = getattr(teacher, "name", "")
    if name == "depth_anything":
        c = teacher.backbone.config
        grid = teacher.input_size // teacher.patch_size
        return vit_forward(layers=max(teacher.blocks) + 1, hidden=c.hidden_size,
                           intermediate=int(c.hidden_size * c.mlp_ratio), tokens=grid * grid + teacher.num_prefix,
                           patch=teacher.patch_size, grid=grid)
    if name == "oneformer":
        return swin_forward(teacher.backbone.config, teacher.input_size)
    if name == "unclip":
        c = teacher.encoder.config
        grid = c.image_size // c.patch_size
        out = vit_forward(layers=c.num_hidden_layers, hidden=c.hidden_size, intermediate=c.intermediate_size,
                          tokens=grid * grid + 1, patch=c.patch_size, grid=grid)
        out["matmul"] += 2 * c.hidden_size * c.projection_dim  # the projection of the pooled token
        return out
    return {}


def total(parts: dict[str, int]) -> int:
    return int(sum(parts.values()))


def micro_batch_flops(*, llm: LLMDims, vision: VisionDims, projector: tuple[int, int, int], predictors: dict,
                      stage: str, length: int, supervised: int, batch: int, world: int, image_tokens: int,
                      teachers: list | None, vision_trains: bool = False) -> dict[str, dict[str, int]]:
    """Training FLOPs of one micro-batch on one rank, per component: ``{"forward": {...},
    "train": {...}}`` with components llm, vision, projector, predictors, losses, teachers.
    ``projector`` = (in_dim, out_dim, linears); ``supervised`` = supervised positions per sample;
    ``teachers`` = built teachers when they run online (None with cached targets)."""
    pt = stage == "pt"
    body = llm_forward(llm, length, supervised)
    proj = projector_forward(*projector, image_tokens)
    fwd = {"llm": batch * total(body), "vision": batch * total(vision_forward(vision)),
           "projector": batch * total(proj)}
    llm_train = batch * ((2 if pt else 3) * (body["matmul"] + body["head"]) + 3 * body["attention"])
    vis = vision_forward(vision)
    train = {"llm": llm_train,
             "vision": batch * ((3 * vis["matmul"] + 3 * vis["attention"]) if vision_trains else total(vis)),
             "projector": batch * (2 * proj["first"] + 3 * proj["rest"])}
    fwd["predictors"] = fwd["losses"] = train["predictors"] = train["losses"] = 0
    if pt:
        for p in predictors.values():
            for _ in p["per_layer"]:
                f = predictor_forward(p, llm.hidden, length, batch)
                fwd["predictors"] += total(f)
                train["predictors"] += 3 * f["matmul"] + 3 * f["attention"]
                c = contrastive_forward(p["output_shape"], batch, world)
                fwd["losses"] += c
                train["losses"] += 2 * c  # gradient w.r.t. the predictions only
    fwd["teachers"] = batch * sum(total(teacher_forward(t)) for t in teachers) if teachers else 0
    train["teachers"] = fwd["teachers"]
    return {"forward": fwd, "train": train}
