"""Running under partitioned parameters (DeepSpeed ZeRO-3, torch FSDP).

ZeRO-3 leaves each rank a shard of every parameter and gathers a module's parameters, collectively,
around each call of that module (forward, and again in backward). Every rank must therefore call the
same modules, equally often, in the same order, whatever its own batch holds: OlaVLM runs the vision
tower on a blank image for a text-only batch and agrees on the number of LM-head calls of the NTP loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from olavlm.constants import IGNORE_INDEX
from olavlm.objectives.ntp import chunks_needed


def is_partitioned(param: torch.Tensor) -> bool:
    """DeepSpeed ZeRO-3 marks each parameter it manages with ``ds_id`` (its own ``is_zero_param`` test)."""
    return hasattr(param, "ds_id")


def is_fully_sharded(module: torch.nn.Module) -> bool:
    """torch FSDP (``fully_shard``) gathers each unit's parameters collectively around its calls too."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def agreed_ntp_chunks(labels: torch.Tensor) -> int:
    """LM-head calls every rank makes for the NTP loss of its batch (``labels`` (B, L), unshifted):
    the largest number any rank's supervised tokens need (one all-reduce when distributed), at least 1."""
    need = torch.tensor([chunks_needed(int((labels[:, 1:] != IGNORE_INDEX).sum()))], device=labels.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(need, op=dist.ReduceOp.MAX)
    return max(int(need.item()), 1)
