"""Memory per GPU under DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP: a stated estimate (docs/cluster.md).

Static state, with N ranks, Pt trainable and Pf frozen parameters (Bf = frozen bytes as built: the
LLM / tower in ``model.dtype``), AdamW (two fp32 moments):

* DDP: weights Bf + 4 Pt (the loop keeps trainables as fp32 master weights), grads 4 Pt, DDP's
  all-reduce buckets 4 Pt (N > 1) and, under bf16 autocast, the bf16 copies of the trainable weights
  autograd keeps until backward (2 Pt), optimizer 8 Pt.
* ZeRO-2: every weight in bf16 (DeepSpeed casts the module), grads 2 Pt / N + reduce/all-gather
  buckets, optimizer 12 Pt / N (fp32 master + moments).
* ZeRO-3: weights 2 (Pf + Pt) / N + the gathered working set (two largest decoder layers, capped by
  ``stage3_max_live_parameters``), grads 2 Pt / N + reduce bucket, optimizer 12 Pt / N.
* FSDP (olavlm's FSDP2 sharding, docs/cluster.md): weights (Bf + 4 Pt) / N + the unsharded root
  group (projector, task tokens, predictors, logit scales) + two decoder layers unsharded + the
  autocast copies (2 Pt, whole: autograd keeps them), grads 4 Pt / N, optimizer 8 Pt / N.

Teachers (online PT) are whole on every rank in the teacher dtype. Activations are per micro-batch
(``a`` bytes per element: 2 under bf16 autocast): see :func:`activations`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from olavlm.plan.counts import LLMDims, VisionDims

ENGINES = ("ddp", "zero2", "zero3", "fsdp")
HEAD_CHUNK = 2048  # rows of the NTP head per chunk (olavlm.objectives.ntp)


@dataclass
class StaticInputs:
    world: int
    trainable: int  # Pt elements
    frozen: int  # Pf elements
    frozen_bytes: int  # Bf as built
    root_bytes: int  # FSDP root group (extras) as trained (fp32)
    largest_layer: int  # elements of the largest decoder layer
    largest_layer_bytes: int  # as built
    weight_bytes: int = 2  # DeepSpeed module dtype (bf16 / fp16 = 2, fp32 = 4)
    reduce_bucket: int = 500_000_000  # DeepSpeed zero_optimization.reduce_bucket_size (elements)
    allgather_bucket: int = 500_000_000  # allgather_bucket_size (ZeRO-2)
    max_live: int = 1_000_000_000  # stage3_max_live_parameters
    autocast_copies: bool = True  # bf16 autocast over fp32 trainables keeps bf16 weight copies until backward


def static_memory(s: StaticInputs) -> dict[str, dict[str, int]]:
    """{engine: {"weights", "grads", "optimizer", "buffers"}} in bytes per GPU."""
    n, pt, pf = s.world, s.trainable, s.frozen
    w = s.weight_bytes
    copies = 2 * pt if s.autocast_copies else 0
    out = {
        "ddp": {"weights": s.frozen_bytes + 4 * pt, "grads": 4 * pt, "optimizer": 8 * pt,
                "buffers": (4 * pt if n > 1 else 0) + copies},
        "zero2": {"weights": w * (pf + pt), "grads": w * pt // n, "optimizer": 12 * pt // n,
                  "buffers": w * (min(s.reduce_bucket, pt) + min(s.allgather_bucket, pt))},
        "zero3": {"weights": w * (pf + pt) // n, "grads": w * pt // n, "optimizer": 12 * pt // n,
                  "buffers": w * (min(s.max_live, 2 * s.largest_layer) + min(s.reduce_bucket, pt))},
        "fsdp": {"weights": (s.frozen_bytes + 4 * pt) // n, "grads": 4 * pt // n, "optimizer": 8 * pt // n,
                 "buffers": s.root_bytes + 2 * s.largest_layer_bytes + copies},
    }
    return out


def llm_layer_bytes(d: LLMDims, stage: str, *, batch: int, length: int, act_bytes: int) -> int:
    """Bytes one decoder layer keeps for backward (checked against autograd's saved tensors in the
    tests). Per position: the two RMSNorm inputs, upcast to fp32 (2h x 4 bytes), their inverse RMS
    (2 x 4 bytes) and the attention's log-sum-exp (heads x 4 bytes); in the activation dtype the
    attention's q, k, v and output (2h + 2 kv) and the SiLU input and output and the up projection
    (3i). Frozen weights (PT) keep no linear inputs; trainable ones (VPT/IFT) add the normalised
    states for the norm weights (2h), the inputs of q/k/v, o and gate/up (3h) and of down (i). Per
    layer, the rotary cos/sin (2 x head_dim per position)."""
    h, kv, i = d.hidden, d.kv_heads * d.head_dim, d.intermediate
    elements = 2 * h + 2 * kv + 3 * i if stage == "pt" else 7 * h + 2 * kv + 4 * i
    per_token = 8 * h + 8 + 4 * d.heads + act_bytes * elements
    return batch * length * per_token + 2 * length * d.head_dim * act_bytes


def predictor_elements(p: dict[str, Any], llm_dim: int, length: int, batch: int) -> int:
    """Elements one (task, layer) predictor keeps for backward over a micro-batch (one image per
    sample): the projected states, their per-image copy and LayerNorm, keys/values over states and
    queries, and the query-side block and head."""
    D, Q, C = p["dim"], p["queries"], p["out_dim"]
    inner = p["heads"] * p["dim_head"]
    states = batch * length * D * 3
    keys = batch * (length + Q) * (D + 2 * inner)
    queries = batch * Q * (6 * D + 2 * p["ff_mult"] * D + 3 * C + (3 * C if p["output_mlp"] else 0))
    return p["blocks"] * (keys + queries) + states


def activations(*, llm: LLMDims, vision: VisionDims, predictors: dict, stage: str, batch: int, length: int,
                act_bytes: int, checkpointing: bool) -> dict[str, int]:
    """Bytes of the training activations of one micro-batch on one rank.

    * LLM without checkpointing: layers x :func:`llm_layer_bytes`, plus the embeddings and the
      final norm (3h per position);
    * with checkpointing: each layer keeps its input (h per position) and one layer is recomputed
      at a time: layers x B x L x h x a + :func:`llm_layer_bytes`;
    * NTP head: one chunk of at most 2048 supervised rows of fp32 logits and their gradient
      (V x (a + 8) bytes per row);
    * predictors (PT): :func:`predictor_elements` x a each, plus the fp32 flattened, normalised
      predictions and targets of the losses (3 x F x 4 bytes per image);
    * the vision tower runs before the LLM without gradients: all its hidden states (layers + 1)
      and one block's working set, freed before the LLM runs (a separate peak).
    """
    per_layer = llm_layer_bytes(llm, stage, batch=batch, length=length, act_bytes=act_bytes)
    tokens = batch * length
    if checkpointing:
        body = llm.layers * llm.hidden * tokens * act_bytes + per_layer
    else:
        body = llm.layers * per_layer
    body += 3 * llm.hidden * tokens * act_bytes
    head = min(tokens, HEAD_CHUNK) * llm.vocab * (act_bytes + 8)
    pred = 0
    if stage == "pt":
        for p in predictors.values():
            flat = 1
            for s in p["output_shape"]:
                flat *= s
            for _ in p["per_layer"]:
                pred += predictor_elements(p, llm.hidden, length, batch) * act_bytes + 3 * batch * flat * 4
    vis = batch * vision.tokens * (vision.hidden * (vision.layers + 1) + 3 * vision.hidden + vision.intermediate)
    return {"llm": body, "head": head, "predictors": pred, "vision_transient": vis * act_bytes}


def teacher_transient(teachers, batch: int, act_bytes: int) -> int:
    """Peak working set of the largest teacher forward (no gradients): its widest stage's tokens x
    (4 x channels + MLP width) per image; freed before the model's forward."""
    peak = 0
    for t in teachers or []:
        name = getattr(t, "name", "")
        if name == "depth_anything":
            c = t.backbone.config
            side = t.input_size // t.patch_size
            peak = max(peak, (side * side + 1) * (4 * c.hidden_size + int(c.mlp_ratio * c.hidden_size)))
        elif name == "oneformer":
            c = t.backbone.config
            side = t.input_size // c.patch_size
            peak = max(peak, side * side * (4 * c.embed_dim + int(c.mlp_ratio * c.embed_dim)))
        elif name == "unclip":
            c = t.encoder.config
            side = c.image_size // c.patch_size
            peak = max(peak, (side * side + 1) * (4 * c.hidden_size + c.intermediate_size))
    return peak * batch * act_bytes


def per_gpu(static: dict[str, dict[str, int]], act: dict[str, int], act_ckpt: dict[str, int],
            teacher_weights: int, teacher_peak: int) -> dict[str, dict[str, int]]:
    """Totals per engine: static + teachers + the larger of the training activations and the
    transient peaks before them (vision tower, teachers); with and without checkpointing."""
    out = {}
    for engine, parts in static.items():
        base = sum(parts.values()) + teacher_weights
        train = act["llm"] + act["head"] + act["predictors"]
        train_ckpt = act_ckpt["llm"] + act_ckpt["head"] + act_ckpt["predictors"]
        transient = max(act["vision_transient"], teacher_peak)
        out[engine] = {**parts, "teachers": teacher_weights, "activations": train, "activations_ckpt": train_ckpt,
                       "transient": transient, "total": base + max(train, transient),
                       "total_ckpt": base + max(train_ckpt, transient)}
    return out
