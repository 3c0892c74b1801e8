"""The auxiliary (non-NTP) loss of one batch: the sum over tasks of each task's layer losses.

Two task kinds (``model.tasks.<t>.kind``):

* ``embedding`` (OLA): per layer :func:`olavlm.objectives.embedding.embedding_loss` (smooth-L1 +
  contrastive with the task's learnable logit scale); the task loss is ``weight x sum over layers``.
* ``alignment`` (VIRAL-style): :func:`olavlm.objectives.alignment.alignment_task_loss`, i.e.
  ``weight x mean over layers`` of the negative cosine.

Metrics (detached 0-dim tensors): ``loss/<task>``, ``loss/<task>/layer<l>/{sl1,contrastive}`` or
``.../neg_cosine``, and ``logit_scale/<task>`` (the clamped scale) for contrastive tasks.
"""

from __future__ import annotations

import torch

from olavlm.objectives.alignment import alignment_task_loss
from olavlm.objectives.embedding import embedding_loss


def auxiliary_losses(predictions: dict[str, dict[int, torch.Tensor]], targets: dict[str, torch.Tensor],
                     target_mask: torch.Tensor | None, cfg, logit_scales: dict[str, torch.Tensor] | None, *,
                     num_images: int, target_shapes: dict[str, tuple[int, ...]],
                     device: torch.device | None = None) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """(loss, metrics) of ``predictions`` {task: {layer: (N, *shape)}} against ``targets``
    {task: (N, *target_shapes[task])}; ``target_mask`` bool (N,) excludes images (None = all valid).
    ``cfg``: the model config (tasks, weights, contrastive settings); ``logit_scales`` {task: theta}
    (the model's ``logit_scales()``; read only when ``cfg.use_contrastive``). The loss is None when
    nothing is predicted."""
    n = num_images
    metrics: dict[str, torch.Tensor] = {}
    valid = torch.ones(n, dtype=torch.bool, device=device) if target_mask is None else target_mask.bool()
    if valid.shape != (n,):
        raise ValueError(f"target_mask must be bool ({n},) (one flag per image), got {tuple(valid.shape)}")
    total = None
    for task, by_layer in predictions.items():
        if task not in targets:
            raise ValueError(f"targets: missing task {task!r} (the model predicts {sorted(predictions)})")
        target = targets[task]
        expected = (n, *target_shapes[task])
        if tuple(target.shape) != expected:
            raise ValueError(f"targets[{task!r}]: shape {tuple(target.shape)} != expected {expected}")
        tc = cfg.tasks[task]
        if tc.kind == "alignment":
            task_loss = alignment_task_loss(task, by_layer, target, valid, tc.weight, metrics)
        else:
            scale = logit_scales[task] if cfg.use_contrastive else None
            task_loss = _embedding_task_loss(task, by_layer, target, valid, scale, cfg, metrics)
        total = task_loss if total is None else total + task_loss
    return total, metrics


def _embedding_task_loss(task: str, by_layer: dict[int, torch.Tensor], target: torch.Tensor, valid: torch.Tensor,
                         scale: torch.Tensor | None, cfg, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """``weight`` x sum over the task's layers of :func:`embedding_loss`, with its metrics."""
    task_sum = None
    for layer, pred in by_layer.items():
        e = embedding_loss(pred, target, valid, scale, beta=cfg.smooth_l1_beta,
                           contrastive_weight=cfg.contrastive_weight, scale_max=cfg.logit_scale_max)
        metrics[f"loss/{task}/layer{layer}/sl1"] = e.sl1.detach()
        metrics[f"loss/{task}/layer{layer}/contrastive"] = e.contrastive.detach()
        task_sum = e.total if task_sum is None else task_sum + e.total
    task_loss = cfg.tasks[task].weight * task_sum
    metrics[f"loss/{task}"] = task_loss.detach()
    if scale is not None:
        metrics[f"logit_scale/{task}"] = scale.detach().exp().clamp(max=cfg.logit_scale_max)
    return task_loss
