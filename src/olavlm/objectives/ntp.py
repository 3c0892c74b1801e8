"""Next-token prediction on supervised positions only (never a full (B, L, vocab) fp32 logits tensor).

The LM head runs only on the hidden states that predict a supervised label (shifted), in chunks
that are recomputed in backward, with fp32 cross-entropy. No (B, L, vocab) logits tensor is ever
materialised; the value equals the standard ``labels=`` loss (mean over non-ignored tokens).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from olavlm.constants import IGNORE_INDEX


def _chunk_ce_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), target, reduction="sum")


def ntp_loss(hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
             *, chunk_size: int = 2048, num_chunks: int | None = None) -> tuple[torch.Tensor, int]:
    """Mean shifted cross-entropy over positions whose label is not IGNORE_INDEX.

    hidden (B, L, d) final-norm states; labels (B, L); head maps (M, d) -> (M, vocab).
    Returns (loss, number of supervised tokens). With none, the loss is a graph-connected zero.
    ``num_chunks``: call ``head`` exactly that many times (trailing chunks may be empty; at least
    :func:`chunks_needed`), recomputing in backward iff it is > 1 — ranks whose head weight is
    partitioned (DeepSpeed ZeRO-3) must all call it equally often. None: as many as the tokens need.
    """
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    h = hidden[:, :-1][keep]
    y = target[keep]
    count = int(y.numel())
    needed = chunks_needed(count, chunk_size)
    if num_chunks is None:
        if count == 0:
            return hidden.sum() * 0.0, 0
        num_chunks = needed
    elif num_chunks < max(needed, 1):
        raise ValueError(f"num_chunks={num_chunks} < {max(needed, 1)} chunk(s) of {chunk_size} for {count} tokens")
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, num_chunks * chunk_size, chunk_size):
        hc, yc = h[i:i + chunk_size], y[i:i + chunk_size]
        if torch.is_grad_enabled() and num_chunks > 1:  # logits of a chunk are recomputed in backward
            total = total + checkpoint(_chunk_ce_sum, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(head, hc, yc)
    return total / max(count, 1), count


def chunks_needed(count: int, chunk_size: int = 2048) -> int:
    """Head calls :func:`ntp_loss` makes for ``count`` supervised tokens (0 for none)."""
    return -(-count // chunk_size)
