"""Distributed batch samplers yielding this rank's micro-batches (lists of dataset indices).

The epoch order is built identically on every rank from (seed, epoch) and cut into GLOBAL batches
of ``global_batch_size`` = ``micro_batch_size * world_size * accumulation``. Global batch ``g`` is
split into ``world_size * accumulation`` micro-batches; micro-batch ``k`` of it goes to
accumulation step ``k // world_size`` of rank ``k % world_size``. The order is padded (by
repeating indices of the same order, deterministically) to a multiple of the global batch, so
every rank gets the same number of full micro-batches.

* ``random``          - a seeded permutation.
* ``modality_length`` - LLaVA's ``group_by_modality_length`` with megabatch = global
  batch: image and text-only records (sign of the length) are shuffled separately, cut into
  global batches, each sorted by length (longest first) and split into micro-batches of balanced
  summed length (LLaVA ``split_to_even_chunks``); the full batches of both modalities are shuffled
  together; the two partial leftovers become ONE final mixed batch (padded) when they fit in one
  global batch, otherwise each is padded within its own modality. So every global batch is
  single-modality except possibly the last one.

``skip_batches=N`` drops this rank's first N micro-batches (mid-epoch resume); the rest equals the
tail of the full order. ``set_epoch(e)`` re-seeds for a new epoch (and clears the skip).
"""

from __future__ import annotations

import heapq
import typing
from typing import Iterator, Sequence

import numpy as np

from olavlm.config import SamplerKind

SAMPLERS = typing.get_args(SamplerKind)  # ("random", "modality_length")


class DistributedBatchSampler:
    """Base class: subclasses implement :meth:`global_order`."""

    def __init__(self, lengths: Sequence[int], *, global_batch_size: int, micro_batch_size: int, world_size: int,
                 rank: int, seed: int, epoch: int = 0, skip_batches: int = 0) -> None:
        if micro_batch_size < 1 or world_size < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and world_size ({world_size}) must be >= 1")
        if global_batch_size % (micro_batch_size * world_size):
            raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                             f"{micro_batch_size} x world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("the dataset has no records to sample")
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = epoch
        self.skip_batches = skip_batches

    @property
    def accumulation(self) -> int:
        """Micro-steps per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.skip_batches = skip_batches

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def global_order(self) -> np.ndarray:
        """All indices of the epoch, length a multiple of the global batch (same on every rank)."""
        raise NotImplementedError

    @property
    def num_global_batches(self) -> int:
        return -(-len(self.lengths) // self.global_batch_size)

    def micro_batches(self) -> list[list[int]]:
        """This rank's micro-batches of the epoch, before skipping."""
        order = self.global_order()
        G, m, W = self.global_batch_size, self.micro_batch_size, self.world_size
        assert len(order) == self.num_global_batches * G
        out = []
        for g in range(0, len(order), G):
            for a in range(self.accumulation):
                k = a * W + self.rank
                out.append(order[g + k * m: g + (k + 1) * m].tolist())
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.micro_batches()[self.skip_batches:]

    def __len__(self) -> int:
        return max(0, self.num_global_batches * self.accumulation - self.skip_batches)


def _pad(order: np.ndarray, size: int, source: np.ndarray) -> np.ndarray:
    """Extend ``order`` to a multiple of ``size`` with indices taken cyclically from ``source``."""
    missing = -len(order) % size
    if not missing:
        return order
    return np.concatenate([order, np.resize(source, missing)])


class RandomBatchSampler(DistributedBatchSampler):
    """Seeded permutation, padded by wrapping around."""

    def global_order(self) -> np.ndarray:
        perm = self._rng().permutation(len(self.lengths))
        return _pad(perm, self.global_batch_size, perm)


def split_to_even_chunks(indices: np.ndarray, lengths: np.ndarray, num_chunks: int) -> list[np.ndarray]:
    """LLaVA's greedy split: each index (in the given order, longest first) goes to the non-full
    chunk with the smallest summed length (lowest chunk number on ties)."""
    if len(indices) % num_chunks:
        raise ValueError(f"{len(indices)} indices cannot be split into {num_chunks} equal chunks")
    per = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    heap = [(0, c) for c in range(num_chunks)]  # (summed length, chunk) of the non-full chunks
    for idx, length in zip(indices.tolist(), lengths[indices].tolist()):
        total, c = heapq.heappop(heap)
        chunks[c].append(idx)
        if len(chunks[c]) < per:
            heapq.heappush(heap, (total + length, c))
    return [np.asarray(c, dtype=np.int64) for c in chunks]


class ModalityLengthBatchSampler(DistributedBatchSampler):
    """LLaVA's group_by_modality_length, megabatch = global batch."""

    def __init__(self, lengths: Sequence[int], **kwargs) -> None:
        super().__init__(lengths, **kwargs)
        if (self.lengths == 0).any():
            raise ValueError(f"modality_length sampler: {int((self.lengths == 0).sum())} length(s) are 0; lengths "
                             "must be > 0 for image records and < 0 for text-only ones")

    def _arrange(self, batch: np.ndarray, absl: np.ndarray) -> np.ndarray:
        """Sort a global batch by |length| (desc) and lay out balanced micro-batches."""
        batch = batch[np.argsort(-absl[batch], kind="stable")]
        chunks = split_to_even_chunks(batch, absl, self.world_size * self.accumulation)
        return np.concatenate(chunks)

    def global_order(self) -> np.ndarray:
        rng = self._rng()
        G = self.global_batch_size
        full, rest = [], []
        for mask in (self.lengths > 0, self.lengths < 0):
            idx = np.flatnonzero(mask)
            idx = idx[rng.permutation(len(idx))]
            cut = len(idx) - len(idx) % G
            full += [idx[i:i + G] for i in range(0, cut, G)]
            rest.append(idx[cut:])
        batches = [full[i] for i in rng.permutation(len(full))]
        leftover = [r for r in rest if len(r)]
        if sum(len(r) for r in leftover) <= G and leftover:
            merged = np.concatenate(leftover)
            batches.append(_pad(merged, G, merged))
        else:
            batches += [_pad(r, G, r) for r in leftover]
        absl = np.abs(self.lengths)
        return np.concatenate([self._arrange(b, absl) for b in batches])


def build_batch_sampler(kind: str, dataset_lengths: Sequence[int], *, global_batch_size: int, micro_batch_size: int,
                        world_size: int, rank: int, seed: int, epoch: int = 0,
                        skip_batches: int = 0) -> DistributedBatchSampler:
    """A ``batch_sampler`` for ``torch.utils.data.DataLoader`` (``kind``: random | modality_length)."""
    classes = {"random": RandomBatchSampler, "modality_length": ModalityLengthBatchSampler}
    if kind not in classes:
        raise ValueError(f"data.sampler: {kind!r} is not one of {SAMPLERS}")
    return classes[kind](dataset_lengths, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                         world_size=world_size, rank=rank, seed=seed, epoch=epoch, skip_batches=skip_batches)
