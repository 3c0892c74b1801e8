"""Alignment loss (VIRAL-style visual representation alignment) of one (task, layer).

``L_align = mean over valid images n of [ mean over image tokens p of -cos(pred[n, p], target[n, p]) ]``

An image is valid when it exists in the batch (text-only samples contribute no image: the span
layout lists only real images) and its target is present (``valid``, e.g. the target cache's
mask). The caller averages this over the task's layers and multiplies by the task weight (0.5 in
the VIRAL recipe): total = NTP + weight * mean over layers. With no valid image the loss is a
graph-connected zero (DDP sees every parameter used). Cosine is computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def alignment_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                   *, eps: float = 1e-8) -> torch.Tensor:
    """pred/target (N, P, C), valid bool (N,) (None = all valid) -> 0-dim loss."""
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"alignment: prediction {tuple(pred.shape)} and target {tuple(target.shape)} must both be "
                         "(images, tokens, channels)")
    if valid is None:
        valid = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
    valid = valid.to(device=pred.device, dtype=torch.bool)
    if not bool(valid.any()):
        return pred.sum() * 0.0
    p = pred[valid].float()
    t = target.to(pred.device)[valid].float()  # masked targets (even NaN) are never read
    cos = F.cosine_similarity(p, t, dim=-1, eps=eps)  # (n, P)
    return (-cos).mean(1).mean(0)


def alignment_task_loss(task: str, by_layer: dict[int, torch.Tensor], target: torch.Tensor, valid: torch.Tensor,
                        weight: float, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """``weight`` x mean over the task's layers of :func:`alignment_loss`; logs
    ``loss/<task>/layer<l>/neg_cosine`` and ``loss/<task>`` into ``metrics``."""
    per_layer = []
    for layer, pred in by_layer.items():
        value = alignment_loss(pred, target, valid)
        metrics[f"loss/{task}/layer{layer}/neg_cosine"] = value.detach()
        per_layer.append(value)
    task_loss = weight * torch.stack(per_layer).mean()
    metrics[f"loss/{task}"] = task_loss.detach()
    return task_loss
