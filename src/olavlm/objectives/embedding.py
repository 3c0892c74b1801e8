"""Per-layer embedding loss (docs/method.md, "Losses"), with the per-image mask applied to both terms.

``L_emb = smooth_L1 + contrastive_weight * InfoNCE(pred -> targets of all ranks)``

* smooth-L1 (``beta``): mean over all elements of the VALID images (masked images add nothing).
* InfoNCE: flattened, L2-normalised vectors; logits = scale * P_local @ T_global^T with the targets
  gathered from every rank through a differentiable all-gather (ranks may hold different numbers
  of images: padded, with a validity mask); invalid targets are never negatives; mean CE over the
  valid local rows; scale = min(exp(theta), scale_max), theta a learnable scalar per task.

With no valid image both terms are graph-connected zeros (DDP sees every parameter used), and
every rank always takes part in the gather, whatever its image count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class EmbeddingLoss:
    total: torch.Tensor  # sl1 + contrastive_weight * contrastive
    sl1: torch.Tensor
    contrastive: torch.Tensor  # 0 when the contrastive term is disabled


def masked_smooth_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Mean smooth-L1 over every element of the valid images; pred/target (N, ...), valid bool (N,)."""
    p, t = pred[valid].float(), target[valid].float()
    if p.shape[0] == 0:
        return pred.sum() * 0.0
    return F.smooth_l1_loss(p, t, beta=beta, reduction="mean")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_targets(t: torch.Tensor, valid: torch.Tensor, *, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All ranks' targets (W * maxN, D), their validity, and the row offset of this rank."""
    if not (gather and _distributed()):
        return t, valid, 0
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    count = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    width = int(max(int(c) for c in counts))
    pad = width - t.shape[0]
    t_pad = torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t
    v_pad = torch.cat([valid, valid.new_zeros(pad)]) if pad else valid
    gathered = torch.cat(all_gather(t_pad), 0)  # differentiable
    flags = [torch.zeros_like(v_pad, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(flags, v_pad.to(torch.uint8))
    return gathered, torch.cat(flags).bool(), rank * width


def info_nce(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, log_scale: torch.Tensor,
             *, scale_max: float, gather: bool = True) -> torch.Tensor:
    """One-directional InfoNCE pred -> gathered targets, mean over this rank's valid rows.
    ``gather=False`` keeps the negatives local even under torch.distributed."""
    p = F.normalize(pred.flatten(1).float(), dim=1)
    t = F.normalize(target.flatten(1).float(), dim=1)
    t = torch.where(valid[:, None], t, torch.zeros_like(t))  # a masked target (even NaN) never reaches a gradient
    all_t, all_valid, offset = gather_targets(t, valid, gather=gather)
    scale = log_scale.float().exp().clamp(max=scale_max)
    logits = scale * (p @ all_t.T)
    logits = logits.masked_fill(~all_valid[None], float("-inf"))
    labels = offset + torch.arange(p.shape[0], device=p.device)
    if not bool(valid.any()):
        return logits.masked_fill(~all_valid[None], 0.0).sum() * 0.0 + scale * 0.0
    return F.cross_entropy(logits[valid], labels[valid])


def embedding_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                   log_scale: torch.Tensor | None = None, *, beta: float = 1.0, contrastive_weight: float = 0.3,
                   scale_max: float = 100.0, gather: bool = True) -> EmbeddingLoss:
    """Loss of one (task, layer): pred/target (N, *shape), valid bool (N,) (None = all valid).
    ``log_scale`` None disables the contrastive term (``use_contrastive=False``)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if valid is None:
        valid = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
    valid = valid.to(device=pred.device, dtype=torch.bool)
    target = target.to(pred.device)
    sl1 = masked_smooth_l1(pred, target, valid, beta=beta)
    if log_scale is None:
        zero = sl1.new_zeros(())
        return EmbeddingLoss(total=sl1, sl1=sl1, contrastive=zero)
    con = info_nce(pred, target, valid, log_scale, scale_max=scale_max, gather=gather)
    return EmbeddingLoss(total=sl1 + contrastive_weight * con, sl1=sl1, contrastive=con)
