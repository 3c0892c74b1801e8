"""LLaVA-format training dataset: record -> tokenized conversation + shared-square images.

``LlavaDataset(data_cfg, tokenizer, image_spec=..., tokens_per_image=...)`` indexes the data file
once (:class:`~olavlm.data.records.RecordIndex`); all per-sample work (JSON read, template,
tokenization, image decoding) happens in ``__getitem__``, i.e. in dataloader workers.

Sample dict (input of :class:`olavlm.data.collate.Collator`)::

    id            str                  record id (or "#<index>" when the record has none)
    index         int                  record index actually used (after replacement)
    input_ids     long (T,)            one IMAGE_TOKEN_INDEX per image
    labels        long (T,)            IGNORE_INDEX except assistant replies + end-of-turn
    pixel_values  float (n, 3, H, W)   vision-tower input, n = images of the record (0 = text-only)
    images        uint8 (n, 3, S, S)   same square for online teachers (only with teacher_image_size)
    image_keys    list[str] (n)        image paths relative to the image folder
    targets       list[dict | None]    per image {task: tensor} from target_lookup (None = missing);
                                       absent without target_lookup
    skipped       dict[reason, int]    bad records replaced to produce this sample

Bad-input policy (``data_cfg.on_bad_sample``): ``error`` raises :class:`BadSample` naming the
record; ``skip`` replaces the record by a seeded walk over records of the SAME modality
(deterministic in (seed, index), so batch shapes and modality grouping are kept) and counts the
reasons. Order of checks: conversation -> tokenization/length -> images (cheapest first).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from olavlm.data.errors import BadSample
from olavlm.data.images import GEOMETRIES, ImageSpec, load_image, pixel_values, teacher_image, to_square
from olavlm.data.records import RecordIndex, record_images
from olavlm.data.tokenize import Encoded, check_template, encode_conversation, truncate

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 64  # attempts to find a valid replacement for a bad record before giving up


class LlavaDataset(Dataset):
    """Map-style dataset over a LLaVA JSON/JSONL file (see the module docstring for a sample)."""

    def __init__(self, data_cfg, tokenizer, *, image_spec: ImageSpec, tokens_per_image: int,
                 teacher_image_size: int | None = None,
                 target_lookup: Callable[[str], dict[str, torch.Tensor]] | None = None,
                 seed: int = 0, add_bos: bool | None = None) -> None:
        add_bos = getattr(data_cfg, "add_bos", "auto") if add_bos is None else add_bos
        check_template(data_cfg.template, tokenizer, add_bos)  # unusable template/tokenizer/BOS -> ValueError now
        if data_cfg.image_geometry not in GEOMETRIES:
            raise ValueError(f"data.image_geometry: {data_cfg.image_geometry!r} is not one of {GEOMETRIES}")
        if data_cfg.on_bad_sample not in ("skip", "error"):
            raise ValueError(f"data.on_bad_sample: {data_cfg.on_bad_sample!r} is not 'skip' or 'error'")
        if tokens_per_image < 1:
            raise ValueError(f"tokens_per_image must be >= 1, got {tokens_per_image}")
        if teacher_image_size is not None and teacher_image_size < 1:
            raise ValueError(f"teacher_image_size must be >= 1, got {teacher_image_size}")
        self.cfg = data_cfg
        self.tokenizer = tokenizer
        self.image_spec = image_spec
        self.tokens_per_image = tokens_per_image  # positions one image occupies after expansion
        self.teacher_image_size = teacher_image_size
        self.target_lookup = target_lookup
        self.seed = seed
        self.add_bos = add_bos  # auto | True | False (see olavlm.data.tokenize)
        self.image_folder = Path(data_cfg.image_folder) if data_cfg.image_folder else None
        self.index = RecordIndex.build(data_cfg.train_file)
        if len(self.index) == 0:
            raise ValueError(f"data.train_file: {data_cfg.train_file} contains no records")
        self._pools: dict[bool, np.ndarray] = {}
        self._bad: dict[int, BadSample] = {}  # per process: records already known to be bad

    # -- metadata used by samplers --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    @property
    def lengths(self) -> np.ndarray:
        """Signed word counts (int32): > 0 image records, < 0 text-only (spec §5.4)."""
        return self.index.lengths

    @property
    def modalities(self) -> np.ndarray:
        """bool per record: True = has an image."""
        return self.index.lengths > 0

    # -- one record -----------------------------------------------------------------------------
    def encode(self, record) -> tuple[Encoded, list[str]]:
        """Conversation -> token ids/labels with length policy applied; raises BadSample."""
        if not isinstance(record, dict):
            raise BadSample("bad_conversation", f"record is a {type(record).__name__}, not an object")
        try:
            keys = record_images(record)
        except ValueError as e:
            raise BadSample("bad_conversation", str(e)) from None
        enc = encode_conversation(record.get("conversations"), self.cfg.template, self.tokenizer,
                                  num_images=len(keys), add_bos=self.add_bos)
        n = enc.expanded_length(self.tokens_per_image)
        if n > self.cfg.max_length:
            if not self.cfg.truncate:
                raise BadSample("too_long", f"expanded length {n} > max_length {self.cfg.max_length} "
                                            f"({len(keys)} image(s) x {self.tokens_per_image} positions)")
            enc = truncate(enc, self.cfg.max_length, self.tokens_per_image)
        return enc, keys

    def image_path(self, key: str) -> Path:
        return self.image_folder / key if self.image_folder is not None else Path(key)

    def load(self, i: int) -> dict:
        """Build sample ``i`` or raise BadSample (message names the record)."""
        record = self.index[i]
        sid = str(record.get("id", f"#{i}")) if isinstance(record, dict) else f"#{i}"
        try:
            enc, keys = self.encode(record)
            images = [load_image(self.image_path(k)) for k in keys]
        except BadSample as e:
            raise BadSample(e.reason, f"record {i} (id {sid}): {e.msg}") from None
        spec, geometry = self.image_spec, self.cfg.image_geometry
        squares = [to_square(img, geometry, spec) for img in images]  # exactly the tower's processor input
        sample = {
            "id": sid,
            "index": i,
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "pixel_values": (torch.stack([pixel_values(s, spec) for s in squares]) if squares
                             else torch.zeros((0, 3, spec.size, spec.size))),
            "image_keys": keys,
        }
        if self.teacher_image_size is not None:
            side = self.teacher_image_size
            sample["images"] = (torch.stack([teacher_image(img, sq, geometry, spec, side)
                                             for img, sq in zip(images, squares)]) if squares
                                else torch.zeros((0, 3, side, side), dtype=torch.uint8))
        if self.target_lookup is not None:
            targets = []
            for k in keys:
                try:
                    targets.append(self.target_lookup(k))
                except KeyError:
                    targets.append(None)
            sample["targets"] = targets
        return sample

    # -- with the bad-input policy --------------------------------------------------------------
    def _replacement(self, i: int, rng: np.random.Generator) -> int:
        """A random record of the same modality as ``i`` (the seeded walk)."""
        modality = bool(self.index.lengths[i] > 0)
        if modality not in self._pools:
            self._pools[modality] = np.flatnonzero((self.index.lengths > 0) == modality)
        pool = self._pools[modality]
        return int(pool[rng.integers(len(pool))])

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        skipped: Counter = Counter()
        rng = None
        j = i
        for _ in range(MAX_REPLACEMENTS + 1):
            try:
                if j in self._bad:
                    raise self._bad[j]
                sample = self.load(j)
                sample["skipped"] = dict(skipped)
                return sample
            except BadSample as e:
                if self.cfg.on_bad_sample == "error":
                    raise
                self._bad[j] = e
                skipped[e.reason] += 1
                log.debug("skipping bad record: %s", e)
                if rng is None:
                    rng = np.random.default_rng([self.seed, i])
                j = self._replacement(i, rng)
        raise RuntimeError(f"{self.cfg.train_file}: no valid record found for index {i} after {MAX_REPLACEMENTS} "
                           f"replacements (skipped: {dict(skipped)}); run `olavlm data check` on the data")

