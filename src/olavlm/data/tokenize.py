"""Tokenization by segments: input ids and labels from concatenated per-segment token ids.

Every rendered segment (see :mod:`olavlm.data.templates`) is tokenized on its own with
``add_special_tokens=False`` and the ids are concatenated; a supervised segment (assistant reply +
end-of-turn) keeps its ids as labels, everything else is ``IGNORE_INDEX``. No prompt is
re-tokenized and no offset is subtracted (fix of D26), so decoding the supervised positions gives
back exactly the replies with their terminators. Each ``<image>`` placeholder becomes ONE
``IMAGE_TOKEN_INDEX`` id (the model expands it to image + task tokens).

BOS: added once at the start when the tokenizer itself would add it (``add_bos=None``: probe
``tokenizer("a")``) and the rendered text does not already start with it (chat templates often
render ``{{ bos_token }}``); ``add_bos=True/False`` forces it.

Note for SentencePiece tokenizers that prepend a dummy-prefix space to every call: the prefix then
appears at each segment start, identically in training and in :func:`encode_prompt`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from olavlm.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from olavlm.data.errors import BadSample
from olavlm.data.templates import normalize_conversation, render_segments, terminator


@dataclass
class Encoded:
    """One tokenized conversation (lists of python ints, unexpanded images)."""

    input_ids: list[int]  # with one IMAGE_TOKEN_INDEX per image
    labels: list[int]  # IGNORE_INDEX except supervised positions
    num_images: int

    def expanded_length(self, tokens_per_image: int) -> int:
        """Sequence length after the model replaces each placeholder by ``tokens_per_image`` positions."""
        return len(self.input_ids) + self.num_images * (tokens_per_image - 1)


_ADDS_BOS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (bos id, adds BOS)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` starts with BOS (Llama-3, Llama-2, Phi-3: yes; Qwen2: no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    try:
        cached = _ADDS_BOS.get(tokenizer)
    except TypeError:  # not weak-referenceable / hashable
        cached = None
    if cached is not None and cached[0] == bos:
        return cached[1]
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    adds = bool(ids) and ids[0] == bos
    try:
        _ADDS_BOS[tokenizer] = (bos, adds)
    except TypeError:
        pass
    return adds


def _tokenize_segments(segments, tokenizer, add_bos: bool | None) -> tuple[list[int], list[int]]:
    pieces: list[str] = []  # text pieces between image placeholders, in order
    owners: list[int] = []  # segment index of each piece (-1 = an image placeholder)
    for k, seg in enumerate(segments):
        parts = seg.text.split(IMAGE_PLACEHOLDER)
        for j, part in enumerate(parts):
            if j:
                pieces.append("")
                owners.append(-1)
            if part:
                pieces.append(part)
                owners.append(k)
    texts = [p for p, o in zip(pieces, owners) if o >= 0]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    ids: list[int] = []
    labels: list[int] = []
    if add_bos is None:
        first = segments[0].text if segments else ""
        add_bos = tokenizer_adds_bos(tokenizer) and not (tokenizer.bos_token and first.startswith(tokenizer.bos_token))
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for owner in owners:
        if owner < 0:
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
            continue
        piece = next(encoded)
        ids += piece
        labels += piece if segments[owner].supervised else [IGNORE_INDEX] * len(piece)
    return ids, labels


def encode_conversation(conversations, template: str, tokenizer, *, num_images: int,
                        add_bos: bool | None = None) -> Encoded:
    """Validate, render and tokenize a training conversation; raises BadSample for bad records."""
    messages = normalize_conversation(conversations, num_images)
    segments = render_segments(messages, template, tokenizer)
    ids, labels = _tokenize_segments(segments, tokenizer, add_bos)
    if all(label == IGNORE_INDEX for label in labels):
        raise BadSample("empty_target", "no supervised token after tokenization")
    return Encoded(ids, labels, num_images)


def truncate(enc: Encoded, max_length: int, tokens_per_image: int) -> Encoded:
    """Cut text from the end so the expanded length fits; never cuts an image placeholder.

    Raises BadSample ``too_long`` when an image would be cut, ``empty_target`` when nothing
    supervised is left.
    """
    if enc.expanded_length(tokens_per_image) <= max_length:
        return enc
    keep = max_length - enc.num_images * (tokens_per_image - 1)
    if keep < 1 or IMAGE_TOKEN_INDEX in enc.input_ids[keep:]:
        raise BadSample("too_long", f"expanded length {enc.expanded_length(tokens_per_image)} > {max_length} "
                                    "and truncation would cut an image")
    labels = enc.labels[:keep]
    if all(label == IGNORE_INDEX for label in labels):
        raise BadSample("empty_target", f"nothing supervised is left after truncation to {max_length}")
    return Encoded(enc.input_ids[:keep], labels, enc.num_images)


def encode_prompt(messages: list[dict], template: str, tokenizer, num_images: int | None = None,
                  *, add_bos: bool | None = None) -> list[int]:
    """Token ids of a conversation ending with an OPEN assistant turn (the generation prompt).

    ``messages`` alternate human/gpt and end with a human turn; images are handled exactly as in
    training (placeholder moved to the start of its turn + ``\\n``, one IMAGE_TOKEN_INDEX each).
    ``num_images=None`` counts the placeholders; when the text has none but ``num_images > 0``,
    that many placeholders are put at the start of the first human turn.
    """
    found = sum(m.get("value", "").count(IMAGE_PLACEHOLDER) for m in messages if isinstance(m, dict))
    if num_images is None:
        num_images = found
    if num_images and not found:
        messages = [dict(m) for m in messages]
        messages[0]["value"] = IMAGE_PLACEHOLDER * num_images + messages[0]["value"]
    try:
        normalized = normalize_conversation(messages, num_images, open_turn=True)
    except BadSample as e:
        raise ValueError(f"encode_prompt: {e}") from None
    ids, _ = _tokenize_segments(render_segments(normalized, template, tokenizer, open_turn=True), tokenizer, add_bos)
    return ids


def stop_token_ids(template: str, tokenizer) -> list[int]:
    """Token ids that end an assistant turn for ``template`` (first id of its terminator + EOS)."""
    term = terminator(template, tokenizer)
    ids = tokenizer(term, add_special_tokens=False)["input_ids"] if term else []
    out = [ids[0]] if ids else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(tokenizer.eos_token_id)
    return out
