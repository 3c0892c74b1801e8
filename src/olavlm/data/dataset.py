"""LLaVA-format training dataset: record -> tokenized conversation + shared-square images.

``LlavaDataset(data_cfg, processor=...)`` (or the processor's parts: ``tokenizer, image_spec=...,
tokens_per_image=...``) indexes the data file once (:class:`~olavlm.data.records.RecordIndex`); all per-sample work (JSON read, template,
tokenization, image decoding, all through the model's :class:`~olavlm.data.processor.OlaProcessor`)
happens in ``__getitem__``, i.e. in dataloader workers.

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
    skipped       dict[reason, int]    {reason: 1} when the requested record was bad and replaced, else {}
    replacements  dict[str, int]       "attempts": records tried for the replacement (bad ones included),
                                       "cross_modality": 1 when it came from the other modality

Bad-input policy (``data_cfg.on_bad_sample``): ``error`` raises :class:`BadSample` naming the
record; ``skip`` replaces the record by a seeded walk (deterministic in (seed, index)): random
records of the SAME modality first (keeps modality grouping), then every record of that modality,
then every record of the other one (counted in ``replacements``). Only a data set without a single
valid record raises (:class:`~olavlm.data.errors.NoValidRecord`). ``skipped`` counts the requested
record only, so over an epoch it sums to the number of distinct bad records drawn, however many
bad records the replacement walks met (those are in ``replacements["attempts"]``).
Order of checks: conversation -> tokenization/length -> image headers (size guard) -> decoding.

Target lookup: ``target_lookup(key)``, or ``target_lookup(key, sha1=...)`` when it accepts a
``sha1`` keyword (``TargetCache.get``): the sha1 of the image bytes just read, so a cache entry
made from other bytes (image edited after precompute) is a miss, never a wrong target.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from olavlm.config_parsing import ConfigError
from olavlm.data.errors import BadSample, NoValidRecord
from olavlm.data.images import GEOMETRIES, ImageLimits, ImageSpec
from olavlm.data.processor import OlaProcessor
from olavlm.data.records import RecordIndex, record_images
from olavlm.data.tokenize import Encoded, truncate

log = logging.getLogger(__name__)

RANDOM_REPLACEMENTS = 64  # random same-modality draws before the walk scans every record in turn


class LlavaDataset(Dataset):
    """Map-style dataset over a LLaVA JSON/JSONL file (see the module docstring for a sample)."""

    def __init__(self, data_cfg, tokenizer=None, *, processor: OlaProcessor | None = None,
                 image_spec: ImageSpec | None = None, tokens_per_image: int | None = None,
                 teacher_image_size: int | None = None,
                 target_lookup: Callable[[str], dict[str, torch.Tensor]] | None = None,
                 seed: int = 0, add_bos: bool | None = None) -> None:
        """``processor``: the model's processor (template, BOS, geometry, image spec, teacher side);
        without it one is built from ``data_cfg`` and the given parts."""
        if data_cfg.on_bad_sample not in ("skip", "error"):
            raise ConfigError(f"data.on_bad_sample: {data_cfg.on_bad_sample!r} is not 'skip' or 'error'")
        if processor is None:
            processor = _processor(data_cfg, tokenizer, image_spec, tokens_per_image, teacher_image_size, add_bos)
        self.cfg = data_cfg
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_spec = processor.image_spec
        self.tokens_per_image = processor.tokens_per_image  # positions one image occupies after expansion
        self.teacher_image_size = processor.teacher_image_size
        self.target_lookup = target_lookup
        self.seed = seed
        self.add_bos = processor.add_bos  # resolved: whether sequences start with BOS
        self.image_folder = Path(data_cfg.image_folder) if data_cfg.image_folder else None
        self.limits = processor.limits
        self._lookup_sha1 = target_lookup is not None and _accepts_sha1(target_lookup)
        self.index = RecordIndex.build(data_cfg.train_file)
        if len(self.index) == 0:
            raise ConfigError(f"data.train_file: {data_cfg.train_file} contains no records")
        self._pools: dict[bool, np.ndarray] = {}
        self._bad: dict[int, BadSample] = {}  # per process: records already known to be bad
        self._warned_cross = False

    # -- metadata used by samplers --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    @property
    def lengths(self) -> np.ndarray:
        """Signed word counts (int32): > 0 image records, < 0 text-only (LLaVA's group_by_modality_length)."""
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
        enc = self.processor.encode(record.get("conversations"), len(keys))
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
            images, digests = self._images(keys)
            inputs = self.processor.images(images)  # the tower's pixels (+ the teachers' square)
        except BadSample as e:
            raise BadSample(e.reason, f"record {i} (id {sid}): {e.msg}") from None
        sample = {"id": sid, "index": i, "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                  "labels": torch.tensor(enc.labels, dtype=torch.long), **inputs, "image_keys": keys}
        if self.target_lookup is not None:
            sample["targets"] = [self._target(k, d) for k, d in zip(keys, digests)]
        return sample

    def _images(self, keys: list[str]) -> tuple[list, list[str | None]]:
        """Decoded images (size guard on the header first) and, for a hash-checking lookup, their sha1."""
        if not self._lookup_sha1:
            return [self.processor.load_image(self.image_path(k)) for k in keys], [None] * len(keys)
        pairs = [self.processor.read_image(self.image_path(k)) for k in keys]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def _target(self, key: str, sha1: str | None) -> dict | None:
        """Cached targets of one image; None = a miss (filled online, or masked out of the loss)."""
        from olavlm.errors import CacheError, StaleTarget

        try:
            return self.target_lookup(key, sha1=sha1) if self._lookup_sha1 else self.target_lookup(key)
        except StaleTarget as e:
            if self.cfg.cache_miss == "online":
                return None  # the online teachers compute this image's targets live
            raise CacheError(f"{e.args[0]}; re-run `olavlm targets precompute` or set data.cache_miss=online") \
                from None
        except KeyError:
            return None

    # -- with the bad-input policy --------------------------------------------------------------
    def _pool(self, modality: bool) -> np.ndarray:
        if modality not in self._pools:
            self._pools[modality] = np.flatnonzero((self.index.lengths > 0) == modality)
        return self._pools[modality]

    def _candidates(self, i: int) -> Iterator[tuple[int, bool]]:
        """(record, from the other modality) in the order the seeded replacement walk tries them."""
        rng = np.random.default_rng([self.seed, i])
        modality = bool(self.index.lengths[i] > 0)
        same, other = self._pool(modality), self._pool(not modality)
        if len(same) > 1:
            for _ in range(RANDOM_REPLACEMENTS):
                yield int(same[rng.integers(len(same))]), False
        for pool, cross in ((same, False), (other, True)):  # then every record, so only "none valid" fails
            if len(pool):
                for j in np.roll(pool, -int(rng.integers(len(pool)))):
                    yield int(j), cross

    def _try(self, j: int) -> dict:
        if j in self._bad:
            raise self._bad[j]
        try:
            return self.load(j)
        except BadSample as e:
            self._bad[j] = e
            raise

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        try:
            sample = self._try(i)
            sample["skipped"], sample["replacements"] = {}, {}
            return sample
        except BadSample as e:
            if self.cfg.on_bad_sample == "error":
                raise
            first = e
        log.debug("skipping bad record: %s", first)
        attempts = 0
        for j, cross in self._candidates(i):
            attempts += 1
            try:
                sample = self._try(j)
            except BadSample:
                continue
            if cross and not self._warned_cross:
                self._warned_cross = True
                log.warning("record %d is bad (%s) and no valid record of its modality was found: replaced by "
                            "record %d of the other modality (counted in replacements/cross_modality)", i,
                            first.reason, j)
            sample["skipped"] = {first.reason: 1}
            sample["replacements"] = {"attempts": attempts, "cross_modality": int(cross)}
            return sample
        reasons: dict[str, int] = {}
        for bad in self._bad.values():
            reasons[bad.reason] = reasons.get(bad.reason, 0) + 1
        raise NoValidRecord(f"data.train_file: {self.cfg.train_file} has no valid record in {len(self)} "
                            f"(reasons: {reasons}); run `olavlm data check` on the data")


def _accepts_sha1(fn) -> bool:
    try:
        return "sha1" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def _processor(data_cfg, tokenizer, image_spec, tokens_per_image, teacher_image_size, add_bos) -> OlaProcessor:
    """The processor the dataset's parts describe (checked: unusable template/tokenizer/BOS -> ValueError)."""
    if data_cfg.image_geometry not in GEOMETRIES:
        raise ConfigError(f"data.image_geometry: {data_cfg.image_geometry!r} is not one of {GEOMETRIES}")
    if image_spec is None or tokens_per_image is None:
        raise ValueError("LlavaDataset: pass processor=, or image_spec= and tokens_per_image=")
    add_bos = getattr(data_cfg, "add_bos", "auto") if add_bos is None else add_bos
    return OlaProcessor(tokenizer, data_cfg.template, add_bos, data_cfg.image_geometry, image_spec,
                        tokens_per_image, teacher_image_size, ImageLimits.from_config(data_cfg))
