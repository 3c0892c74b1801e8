"""Batch collation: samples of :class:`~olavlm.data.dataset.LlavaDataset` -> the batch dict of
docs/architecture.md, section 1.

Keys: ``input_ids`` long (B, T) right-padded with ``pad_token_id``; ``labels`` long (B, T) with
IGNORE_INDEX on padding; ``attention_mask`` bool (B, T); ``pixel_values`` float (N, 3, H, W)
sample-major in placeholder order; ``images`` uint8 (N, 3, S, S) when the samples carry them;
``image_keys`` list[str] (N); ``num_images`` long (B,); ``sample_ids`` list[str] (B);
``skipped`` {reason: count} (bad records replaced), ``replacements`` {"attempts", "cross_modality": count}
(how the replacements were found); and, when the samples carry targets, ``targets`` {task: (N, *shape)}
plus ``target_mask`` bool (N,) (False where the target cache had no entry; those rows are zeros).

With ``pack_length`` (``data.packing``) the rows are packed (olavlm.data.packing): ``input_ids`` /
``labels`` / ``attention_mask`` are (R, T) rows holding several samples each, ``segment_ids`` (R, T)
says which sample every token belongs to (-1 on padding), and every per-sample / per-image key is in
the packed order (B = number of samples, R <= B rows).
"""

from __future__ import annotations

from collections import Counter

import torch

from olavlm.constants import IGNORE_INDEX


class Collator:
    """Callable ``collate_fn`` for a DataLoader."""

    def __init__(self, pad_token_id: int, target_shapes: dict[str, tuple[int, ...]] | None = None, *,
                 pack_length: int | None = None, tokens_per_image: int = 1) -> None:
        if pad_token_id is None or pad_token_id < 0:
            raise ValueError(f"Collator needs a non-negative pad_token_id, got {pad_token_id!r} "
                             "(load the tokenizer with olavlm.model.io.load_tokenizer, which adds one)")
        self.pad_token_id = pad_token_id
        # per-task target shape: lets a batch whose images all miss the cache still carry zero rows
        self.target_shapes = {k: tuple(v) for k, v in (target_shapes or {}).items()}
        self.pack_length, self.tokens_per_image = pack_length, tokens_per_image  # packing: row capacity

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("Collator: empty list of samples")
        rows = None
        if self.pack_length is not None:
            from olavlm.data.packing import pack_samples

            samples, rows = pack_samples(samples, self.pack_length, self.tokens_per_image)
        lengths = [len(s["input_ids"]) for s in samples]
        B, T = len(samples), max(lengths)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.bool)
        for b, (s, n) in enumerate(zip(samples, lengths)):
            input_ids[b, :n] = s["input_ids"]
            labels[b, :n] = s["labels"]
            attention_mask[b, :n] = True
        skipped: Counter = Counter()
        replacements: Counter = Counter()
        for s in samples:
            skipped.update(s.get("skipped", {}))
            replacements.update(s.get("replacements", {}))
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "image_keys": [k for s in samples for k in s["image_keys"]],
            "num_images": torch.tensor([len(s["image_keys"]) for s in samples], dtype=torch.long),
            "sample_ids": [s["id"] for s in samples],
            "skipped": dict(skipped),
            "replacements": dict(replacements),
        }
        has_images = ["images" in s for s in samples]
        if any(has_images):
            if not all(has_images):
                raise ValueError("Collator: some samples carry teacher images and some do not")
            batch["images"] = torch.cat([s["images"] for s in samples])
        if any("targets" in s for s in samples):
            batch["targets"], batch["target_mask"] = self._targets(samples)
        if rows is not None:
            from olavlm.data.packing import packed_rows

            batch.update(packed_rows(samples, rows, self.pad_token_id))
        return batch

    def _targets(self, samples: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        per_image = [t for s in samples for t in s.get("targets", [None] * len(s["image_keys"]))]
        mask = torch.tensor([t is not None for t in per_image], dtype=torch.bool)
        shapes, dtypes = dict(self.target_shapes), {}
        for t in per_image:
            for task, value in (t or {}).items():
                shape = tuple(value.shape)
                if shapes.setdefault(task, shape) != shape:
                    raise ValueError(f"Collator: target {task!r} has shape {shape}, expected {shapes[task]}")
                dtypes.setdefault(task, value.dtype)
        targets = {}
        for task, shape in shapes.items():
            out = torch.zeros((len(per_image), *shape), dtype=dtypes.get(task, torch.float32))
            for n, t in enumerate(per_image):
                if t is not None:
                    if task not in t:
                        raise ValueError(f"Collator: a cached target has no task {task!r} (has {sorted(t)})")
                    out[n] = t[task]
            targets[task] = out
        return targets, mask
