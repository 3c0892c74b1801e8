"""Padding-free packing (``data.packing: true``): the samples of one micro-batch are laid back to
back into as few rows as fit ``data.max_length`` (after image and task-token expansion).

Rows are as few as first-fit-decreasing needs at ``max_length`` and then evened out (the smallest
capacity that still needs that many rows), so padding to the longest row stays small. The
sampler is untouched: a micro-batch still holds the same samples (same modality grouping,
same DDP shards, same resume position); only how they are laid out changes. Each row carries
``segment_ids`` (the sample of every token, -1 on padding); the model restarts position ids per
sample and never lets attention cross samples (see docs/architecture.md "Packing"). Per-sample and
per-image keys (``pixel_values``, ``num_images``, ``sample_ids``, targets) follow the packed order.
"""

from __future__ import annotations

from typing import Sequence

import torch

from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX


def expanded_length(input_ids: torch.Tensor, tokens_per_image: int) -> int:
    """Positions a sample takes in the model's sequence: each image placeholder becomes
    ``tokens_per_image`` positions."""
    images = int((input_ids == IMAGE_TOKEN_INDEX).sum())
    return int(input_ids.numel()) + images * (tokens_per_image - 1)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing bin packing: rows of sample indices whose lengths sum to <= ``capacity``.
    Deterministic (ties keep index order); each row lists its samples in increasing index order and
    rows are ordered by their first sample."""
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"packing: sample(s) {too_long} are longer than the row capacity {capacity} "
                         "(data.max_length; the data layer should have rejected them)")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return sorted((sorted(r) for r in rows), key=lambda r: r[0])


def pack_balanced(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """As few rows as :func:`pack_rows` needs at ``capacity``, but with the smallest row capacity that
    still gives that many rows (binary search), so rows come out even and padding to the longest row
    is small."""
    rows = pack_rows(lengths, capacity)
    k, total = len(rows), sum(lengths)
    lo, hi = max(max(lengths, default=0), -(-total // max(k, 1))), capacity
    while lo < hi:
        mid = (lo + hi) // 2
        if len(pack_rows(lengths, mid)) <= k:
            hi = mid
        else:
            lo = mid + 1
    tight = pack_rows(lengths, lo)
    return tight if len(tight) <= k else rows


def pack_samples(samples: list[dict], capacity: int, tokens_per_image: int) -> tuple[list[dict], list[list[int]]]:
    """The samples in packed order and the rows as lists of indices into that order."""
    lengths = [expanded_length(s["input_ids"], tokens_per_image) for s in samples]
    rows = pack_balanced(lengths, capacity)
    order = [i for row in rows for i in row]
    packed, at = [], 0
    for row in rows:
        packed.append(list(range(at, at + len(row))))
        at += len(row)
    return [samples[i] for i in order], packed


def packed_rows(samples: list[dict], rows: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels``, ``attention_mask`` and ``segment_ids`` (R, T) for the rows, each
    row the concatenation of its samples, right-padded (pad / IGNORE_INDEX / False / -1)."""
    widths = [sum(len(samples[i]["input_ids"]) for i in row) for row in rows]
    shape = (len(rows), max(widths))
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.bool)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(samples[i]["input_ids"])
            input_ids[r, at:at + n] = samples[i]["input_ids"]
            labels[r, at:at + n] = samples[i]["labels"]
            attention_mask[r, at:at + n] = True
            segment_ids[r, at:at + n] = i
            at += n
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "segment_ids": segment_ids}


def padding_fraction(lengths: Sequence[int], rows: list[list[int]] | None = None) -> float:
    """Share of a batch's positions that are padding: rows padded to the longest (one sample per row
    when ``rows`` is None)."""
    rows = [[i] for i in range(len(lengths))] if rows is None else rows
    widths = [sum(lengths[i] for i in row) for row in rows]
    total = len(rows) * max(widths)
    return 1.0 - sum(widths) / total
