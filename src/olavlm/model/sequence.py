"""Sequence builder: expand image placeholders and RECORD where everything lands (docs/method.md, "Sequence layout").

Each ``IMAGE_TOKEN_INDEX`` placeholder becomes ``P`` image-feature positions followed by the task
tokens (``K`` per task, in ``model.task_order``). Nothing here is a constant offset: the number of
system/text tokens, image tokens and task tokens is whatever the template, encoder and config
produce, and :class:`SequenceLayout` says, per sample and per image, where each part is.
Text-only samples get no image or task tokens. Padding is on the right for training (positions
0..L-1) and on the left for batched generation.

Packed rows (``segment_ids``, see docs/architecture.md "Packing"): one row holds several samples
back to back; positions restart at every sample, the first label of every sample is ignored (it
would be predicted from the previous sample), and :meth:`SequenceLayout.block_attention_mask`
keeps attention inside each sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, KIND_IMAGE, KIND_PAD, KIND_TASK0, KIND_TEXT


class SequenceTooLong(ValueError):
    """A sample exceeds ``max_length`` after image/task-token expansion (data reason ``too_long``)."""

    reason = "too_long"

    def __init__(self, samples: list[int], lengths: list[int], max_length: int) -> None:
        self.samples, self.lengths, self.max_length = samples, lengths, max_length
        super().__init__(
            f"too_long: sample(s) {samples} have {lengths} tokens after image/task-token expansion, "
            f"more than max_length={max_length} (the data layer should have rejected them)")


@dataclass
class SequenceLayout:
    """Where every token of the expanded batch is. B samples, N images, L positions."""

    token_kind: torch.Tensor  # long (B, L): KIND_PAD / KIND_TEXT / KIND_IMAGE / KIND_TASK0 + j
    attention_mask: torch.Tensor  # bool (B, L): False on padding
    position_ids: torch.Tensor  # long (B, L): 0..len-1 over each sample's real tokens
    labels: torch.Tensor | None  # long (B, L): IGNORE_INDEX on image, task and padding positions
    lengths: torch.Tensor  # long (B,): expanded length per sample
    image_sample: torch.Tensor  # long (N,): sample of each image (sample-major, placeholder order)
    image_start: torch.Tensor  # long (N,): first position of each image's features
    task_start: torch.Tensor  # long (N, T): first position of task j's tokens after image n
    text_batch: torch.Tensor  # long (M,): sample of each text token
    text_pos: torch.Tensor  # long (M,): its position in the expanded sequence
    text_ids: torch.Tensor  # long (M,): its token id
    num_image_tokens: int  # P
    num_task_tokens: int  # K per task
    task_order: tuple[str, ...]  # tasks whose tokens are in the sequence, in order
    segment_ids: torch.Tensor | None = None  # long (B, L), packed rows only: sample of each position, -1 on padding
    image_segment: torch.Tensor | None = None  # long (N,), packed rows only: sample of each image

    @property
    def num_images(self) -> int:
        return int(self.image_sample.numel())

    @property
    def tokens_per_image(self) -> int:
        return self.num_image_tokens + len(self.task_order) * self.num_task_tokens

    def image_positions(self) -> torch.Tensor:
        """long (N, P): positions of each image's feature tokens."""
        return self.image_start[:, None] + torch.arange(self.num_image_tokens, device=self.image_start.device)

    def task_positions(self, task: str) -> torch.Tensor:
        """long (N, K): positions of ``task``'s tokens after each image."""
        j = self.task_order.index(task)
        return self.task_start[:, j:j + 1] + torch.arange(self.num_task_tokens, device=self.task_start.device)

    def predictor_key_mask(self, task: str, *, include_text: bool) -> torch.Tensor:
        """bool (N, L): what image n's predictor for ``task`` may attend to (never padding nor another task's tokens).

        Text/system tokens of the image's sample (when ``include_text``), this image's tokens and
        this task's tokens of this image; never padding, other images or other tasks' tokens.
        """
        length = self.token_kind.shape[1]
        pos = torch.arange(length, device=self.token_kind.device)[None]
        start = self.image_start[:, None]
        mask = (pos >= start) & (pos < start + self.num_image_tokens)
        if include_text:
            text = self.token_kind[self.image_sample] == KIND_TEXT
            if self.segment_ids is not None:  # a packed row: only the image's own sample
                text &= self.segment_ids[self.image_sample] == self.image_segment[:, None]
            mask |= text
        if task in self.task_order:
            t0 = self.task_start[:, self.task_order.index(task)][:, None]
            mask |= (pos >= t0) & (pos < t0 + self.num_task_tokens)
        return mask

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    def block_attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, L, L) mask of a packed batch: query i may see key j iff causal and the same sample.
        ``torch.bool``: True where allowed (sdpa); a float dtype: additive, 0 / the dtype's minimum
        (eager). Padding sees padding only (no empty rows)."""
        seg = self.segment_ids
        length = seg.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
        allowed = causal[None] & (seg[:, :, None] == seg[:, None, :])
        if dtype == torch.bool:
            return allowed[:, None]
        out = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        return out.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def build_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, *, num_image_tokens: int, task_order: list[str] | tuple[str, ...],
                 num_task_tokens: int, max_length: int | None = None, padding_side: str = "right",
                 segment_ids: torch.Tensor | None = None) -> SequenceLayout:
    """Compute the expanded layout of a batch of placeholder sequences (no embeddings yet).
    ``segment_ids`` long (B, T): packed rows, the sample of every input token (ignored on padding)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    device = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    order = tuple(task_order) if num_task_tokens else ()
    per_image = num_image_tokens + len(order) * num_task_tokens
    is_img = (input_ids == IMAGE_TOKEN_INDEX) & valid
    is_text = valid & ~is_img
    width = is_text.long() + is_img.long() * per_image
    start = torch.cumsum(width, 1) - width  # position of each input token in its expanded row
    lengths = width.sum(1)
    if max_length is not None and bool((lengths > max_length).any()):
        bad = torch.nonzero(lengths > max_length).flatten().tolist()
        raise SequenceTooLong(bad, lengths[bad].tolist(), max_length)
    batch, length = input_ids.shape[0], int(lengths.max()) if lengths.numel() else 0
    shift = (length - lengths) if padding_side == "left" else torch.zeros_like(lengths)
    start = start + shift[:, None]

    text_batch, text_col = torch.nonzero(is_text, as_tuple=True)
    text_pos = start[text_batch, text_col]
    img_batch, img_col = torch.nonzero(is_img, as_tuple=True)  # row-major = sample-major, placeholder order
    image_start = start[img_batch, img_col]
    task_start = image_start[:, None] + num_image_tokens + num_task_tokens * torch.arange(len(order), device=device)

    kind = torch.full((batch, length), KIND_PAD, dtype=torch.long, device=device)
    kind[text_batch, text_pos] = KIND_TEXT
    img_pos = image_start[:, None] + torch.arange(num_image_tokens, device=device)
    kind[img_batch[:, None].expand_as(img_pos), img_pos] = KIND_IMAGE
    for j in range(len(order)):
        pos = task_start[:, j:j + 1] + torch.arange(num_task_tokens, device=device)
        kind[img_batch[:, None].expand_as(pos), pos] = KIND_TASK0 + j
    mask = kind != KIND_PAD
    positions = (torch.arange(length, device=device)[None] - shift[:, None]).clamp(min=0)
    new_labels = None
    if labels is not None:
        new_labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=device)
        new_labels[text_batch, text_pos] = labels[text_batch, text_col].long()
    seg = image_segment = None
    if segment_ids is not None:
        if padding_side != "right":
            raise ValueError("packed rows (segment_ids) are right-padded")
        seg, image_segment, positions = _expand_segments(segment_ids, valid, text_batch, text_col, text_pos, img_batch,
                                                         img_col, image_start, per_image, length)
        if new_labels is not None:  # a sample's first token is never a target (unpacked, nothing precedes it)
            new_labels[positions == 0] = IGNORE_INDEX
    return SequenceLayout(
        token_kind=kind, attention_mask=mask, position_ids=positions, labels=new_labels, lengths=lengths,
        image_sample=img_batch, image_start=image_start, task_start=task_start, text_batch=text_batch,
        text_pos=text_pos, text_ids=input_ids[text_batch, text_col], num_image_tokens=num_image_tokens,
        num_task_tokens=num_task_tokens, task_order=order, segment_ids=seg, image_segment=image_segment)


def _expand_segments(segment_ids, valid, text_batch, text_col, text_pos, img_batch, img_col, image_start,
                     per_image: int, length: int):
    """Expanded sample ids (B, L) (-1 on padding), the sample of each image, and position ids that
    restart at 0 where each sample (and the trailing padding) begins."""
    segment_ids = segment_ids.to(valid.device).long()
    if segment_ids.shape != valid.shape:
        raise ValueError(f"segment_ids {tuple(segment_ids.shape)} must match input_ids {tuple(valid.shape)}")
    masked = torch.where(valid, segment_ids, segment_ids.new_full((), -1))
    real = masked[valid]
    if bool((real < 0).any()):
        raise ValueError("segment_ids must be >= 0 on real tokens")
    ahead = torch.where(valid[:, 1:] & valid[:, :-1], masked[:, 1:] - masked[:, :-1], 0)
    if bool((ahead < 0).any()):
        raise ValueError("segment_ids: each sample's tokens must be contiguous and in increasing order within a row")
    seg = torch.full((valid.shape[0], length), -1, dtype=torch.long, device=valid.device)
    seg[text_batch, text_pos] = masked[text_batch, text_col]
    image_segment = masked[img_batch, img_col]
    span = image_start[:, None] + torch.arange(per_image, device=valid.device)
    seg[img_batch[:, None].expand_as(span), span] = image_segment[:, None].expand_as(span)
    pos = torch.arange(length, device=valid.device)[None].expand_as(seg)
    begins = torch.ones_like(seg, dtype=torch.bool)
    begins[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = torch.where(begins, pos, torch.zeros_like(pos)).cummax(1).values
    return seg, image_segment, pos - first


def assemble_embeddings(layout: SequenceLayout, text_embeds: torch.Tensor, image_features: torch.Tensor,
                        task_tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """inputs_embeds (B, L, d) from the layout's text embeddings (M, d), image features (N, P, d)
    and the per-image task tokens (T*K, d). Padding positions are zeros. Differentiable in all three."""
    n, p = layout.num_images, layout.num_image_tokens
    if image_features.shape[:2] != (n, p):
        raise ValueError(f"image features {tuple(image_features.shape)} do not match {n} images x {p} tokens")
    d = text_embeds.shape[-1]
    tk = task_tokens.shape[0]
    batch, length = layout.token_kind.shape
    img_pos = layout.image_positions()
    task_pos = layout.image_start[:, None] + p + torch.arange(tk, device=img_pos.device)
    rows = torch.cat([layout.text_batch, layout.image_sample.repeat_interleave(p),
                      layout.image_sample.repeat_interleave(tk)])
    cols = torch.cat([layout.text_pos, img_pos.flatten(), task_pos.flatten()])
    values = torch.cat([text_embeds.to(dtype), image_features.reshape(n * p, d).to(dtype),
                        task_tokens.to(dtype)[None].expand(n, tk, d).reshape(n * tk, d)])
    out = torch.zeros(batch, length, d, dtype=dtype, device=text_embeds.device)
    return out.index_put((rows, cols), values)
