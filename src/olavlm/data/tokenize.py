"""Tokenization of a rendered conversation: the tokenizer's ids of the WHOLE prompt, labels from offsets.

A conversation is rendered (:mod:`olavlm.data.templates`) into one prompt string plus the character
spans of the assistant replies (+ end-of-turn text). The string is tokenized ONCE, with the
tokenizer's own fast (Rust) backend, so the ids are exactly what the tokenizer gives for the whole
prompt, for byte-level BPE and SentencePiece alike (tokenizing pieces separately would give every
piece a SentencePiece word-start ``▁`` and change the ids). Each ``<image>`` placeholder is kept
atomic, exactly as if it were an added token of the tokenizer (the text around it is tokenized as
around any special token of the prompt; see :func:`encode_text`), and becomes ONE
``IMAGE_TOKEN_INDEX`` (the model expands it to image + task tokens). The caller's tokenizer is
never modified.

Labels come from the character offsets of the tokens. Rule for a token that straddles a span
boundary: a token belongs to the span that holds its FIRST character. So a token that starts in the
prompt and reaches into a reply is not supervised (Phi-3's ``<|assistant|>`` swallowing a reply's
leading whitespace; Llama-3's ``\\n\\n\\n`` merging the header's ``\\n\\n`` with a reply's leading
``\\n``), and a token that starts in a reply and reaches past it is (Phi-3's ``<|end|>`` with the
``\\n`` it swallows). :func:`encode_prompt` tokenizes the open prompt the same way; its ids equal the
training ids up to the reply except when a token merges the prompt's last characters with the reply's
first ones into a different token (with the shipped templates and the Llama-3 / Phi-3 tokenizers:
only a reply starting with ``\\n`` after a header ending in ``\\n``, with Llama-3's byte-level BPE).

BOS (``add_bos``: ``"auto"``/None, True/``"true"``, False/``"false"``): ``auto`` does what the
tokenizer does (probe ``tokenizer("a")``); BOS is prepended as an id, never twice (a chat template
that writes ``{{ bos_token }}`` already has it); ``false`` with such a chat template is refused.
:func:`resolve_bos` gives the resulting policy, which training records so chat and eval use the same.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from dataclasses import dataclass
from operator import itemgetter

from olavlm.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from olavlm.data.errors import BadSample
from olavlm.data.templates import Rendered, get_template, normalize_conversation, render, terminator


@dataclass
class Encoded:
    """One tokenized conversation (lists of python ints, unexpanded images)."""

    input_ids: list[int]  # with one IMAGE_TOKEN_INDEX per image
    labels: list[int]  # IGNORE_INDEX except supervised positions
    num_images: int

    def expanded_length(self, tokens_per_image: int) -> int:
        """Sequence length after the model replaces each placeholder by ``tokens_per_image`` positions."""
        return len(self.input_ids) + self.num_images * (tokens_per_image - 1)


@dataclass
class Tokenized(Encoded):
    """:class:`Encoded` plus what produced it (for ``olavlm data show``)."""

    text: str = ""  # the rendered prompt
    offsets: list | None = None  # (start, end) in ``text`` per token; None for a prepended BOS
    bos: bool = False  # True when the sequence starts with BOS (prepended or written by the template)


def _cache_get(cache, tokenizer):
    try:
        return cache.get(tokenizer)
    except TypeError:  # not weak-referenceable / hashable
        return None


def _cache_set(cache, tokenizer, value) -> None:
    try:
        cache[tokenizer] = value
    except TypeError:
        pass


_start = itemgetter(0)
_ADDS_BOS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (bos id, adds BOS)
_MARKERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (size, (content, id) | None)
_BACKENDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (size, backend copy, image id)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` starts with BOS (Llama-3, Llama-2: yes; Phi-3: depends on its files)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    cached = _cache_get(_ADDS_BOS, tokenizer)
    if cached is not None and cached[0] == bos:
        return cached[1]
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    adds = bool(ids) and ids[0] == bos
    _cache_set(_ADDS_BOS, tokenizer, (bos, adds))
    return adds


def _backend(tokenizer):
    source = getattr(tokenizer, "backend_tokenizer", None)
    if source is None:
        raise ValueError(f"tokenizer: {type(tokenizer).__name__} is not a fast tokenizer (no tokenizer.json); "
                         "olavlm needs one to tokenize whole prompts with character offsets")
    return source


def _marker(tokenizer) -> tuple[str, int] | None:
    """An added token of the tokenizer that is matched verbatim and strips nothing (``<|begin_of_text|>``,
    ``<unk>``, ...): text after it is tokenized exactly as text after an ``<image>`` token would be."""
    backend = _backend(tokenizer)
    size = backend.get_vocab_size(with_added_tokens=True)
    cached = _cache_get(_MARKERS, tokenizer)
    if cached is not None and cached[0] == size:
        return cached[1]
    found = None
    for tid, tok in sorted(backend.get_added_tokens_decoder().items()):
        if not (tok.normalized or tok.lstrip or tok.rstrip or tok.single_word) and tok.content:
            enc = backend.encode(tok.content + "a", add_special_tokens=False)
            if enc.ids[:1] == [tid] and enc.offsets[0] == (0, len(tok.content)):
                found = (tok.content, tid)
                break
    _cache_set(_MARKERS, tokenizer, (size, found))
    return found


def _with_image_token(tokenizer):
    """(copy of the backend with ``<image>`` as an added token, its id); for tokenizers without a marker."""
    backend = _backend(tokenizer)
    size = backend.get_vocab_size(with_added_tokens=True)
    cached = _cache_get(_BACKENDS, tokenizer)
    if cached is not None and cached[0] == size:
        return cached[1], cached[2]
    import copy

    from tokenizers import AddedToken

    clone = copy.deepcopy(backend)
    clone.no_truncation()
    clone.no_padding()
    clone.add_special_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)])
    image_id = clone.token_to_id(IMAGE_PLACEHOLDER)
    _cache_set(_BACKENDS, tokenizer, (size, clone, image_id))
    return clone, image_id


def encode_text(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of the whole ``text`` with each ``<image>`` as one atomic token
    (id ``IMAGE_TOKEN_INDEX``); no special tokens added.

    The pieces between placeholders are tokenized by the tokenizer's backend, every piece after a
    placeholder behind a marker token (see :func:`_marker`) whose id is dropped: the tokenizer splits
    text at added tokens before anything else, so this equals tokenizing the whole text with
    ``<image>`` registered as an added token (which is done when the tokenizer has no marker).
    """
    backend = _backend(tokenizer)
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) == 1:
        enc = backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    marker = _marker(tokenizer)
    if marker is None:
        clone, image_id = _with_image_token(tokenizer)
        enc = clone.encode(text, add_special_tokens=False)
        return [IMAGE_TOKEN_INDEX if t == image_id else t for t in enc.ids], enc.offsets
    content, marker_id = marker
    enc = backend.encode(pieces[0], add_special_tokens=False)
    ids, offsets, pos = list(enc.ids), list(enc.offsets), len(pieces[0])
    for piece in pieces[1:]:
        ids.append(IMAGE_TOKEN_INDEX)
        offsets.append((pos, pos + len(IMAGE_PLACEHOLDER)))
        pos += len(IMAGE_PLACEHOLDER)
        if piece:
            enc = backend.encode(content + piece, add_special_tokens=False)
            shift = pos - len(content)
            ids += enc.ids[1:]
            offsets += [(s + shift, e + shift) for s, e in enc.offsets[1:]]
            pos += len(piece)
    return ids, offsets


def parse_add_bos(add_bos) -> bool | None:
    """``auto``/None -> None (as the tokenizer does), ``true``/True -> True, ``false``/False -> False."""
    if add_bos is None or isinstance(add_bos, bool):
        return add_bos
    value = {"auto": None, "true": True, "false": False}.get(str(add_bos).lower(), "?")
    if value == "?":
        raise ValueError(f"data.add_bos: {add_bos!r} is not auto, true or false")
    return value


def _writes_bos(text: str, template: str, tokenizer) -> bool:
    """Whether a chat template wrote the BOS token itself at the start of ``text``."""
    bos = tokenizer.bos_token
    return template == "chat_template" and bool(bos) and text.startswith(bos)


def _prepend_bos(text: str, template: str, tokenizer, add_bos) -> bool:
    policy = parse_add_bos(add_bos)
    if _writes_bos(text, template, tokenizer):
        if policy is False:
            raise ValueError("data.add_bos: false, but the tokenizer's chat template writes the BOS token itself")
        return False
    if policy is None:
        return tokenizer_adds_bos(tokenizer)
    if policy and tokenizer.bos_token_id is None:
        raise ValueError("data.add_bos: true, but the tokenizer has no BOS token")
    return policy


_PROBE = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"},
          {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "B"}]


def check_template(template: str, tokenizer, add_bos=None) -> bool:
    """Refuse an unusable template x tokenizer x BOS choice up front (one-line ValueError).

    Renders and tokenizes a two-round probe conversation and its open prompt; returns whether
    sequences start with BOS (the policy to record for chat and eval).
    """
    tpl = get_template(template)
    parse_add_bos(add_bos)
    if tokenizer is None:
        return False
    _backend(tokenizer)
    tpl.terminator(tokenizer)
    probe = _PROBE[:2] if template == "plain" else _PROBE
    try:
        enc = tokenize_rendered(render(normalize_conversation(probe, 1), template, tokenizer), template, tokenizer,
                                add_bos=add_bos, num_images=1)
        tokenize_rendered(render(normalize_conversation(probe[:1], 1, open_turn=True), template, tokenizer,
                                 open_turn=True), template, tokenizer, add_bos=add_bos, num_images=1)
    except BadSample as e:
        raise ValueError(f"template {template!r} with this tokenizer: {e.msg}") from None
    return enc.bos


def resolve_bos(add_bos, template: str, tokenizer) -> bool:
    """Whether token sequences of ``template`` start with BOS under ``add_bos`` (recorded at training)."""
    return check_template(template, tokenizer, add_bos)


def tokenize_rendered(rendered: Rendered, template: str, tokenizer, *, add_bos=None, num_images: int) -> Tokenized:
    """Whole-prompt ids of ``rendered``, labels = ids of the tokens whose first character is supervised."""
    ids, offsets = encode_text(tokenizer, rendered.text)
    if ids.count(IMAGE_TOKEN_INDEX) != num_images:
        raise BadSample("image_token_mismatch", f"{ids.count(IMAGE_TOKEN_INDEX)} image placeholder(s) in the "
                                                f"rendered prompt for {num_images} image(s)")
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in rendered.spans:  # token starts are sorted: the tokens starting in [a, b) are contiguous
        i, j = bisect_left(offsets, a, key=_start), bisect_left(offsets, b, key=_start)
        labels[i:j] = ids[i:j]
    bos = _prepend_bos(rendered.text, template, tokenizer, add_bos)
    if bos:
        ids, labels, offsets = [tokenizer.bos_token_id, *ids], [IGNORE_INDEX, *labels], [None, *offsets]
    return Tokenized(ids, labels, num_images, rendered.text, offsets,
                     bos or _writes_bos(rendered.text, template, tokenizer))


def explain_conversation(conversations, template: str, tokenizer, *, num_images: int, add_bos=None) -> Tokenized:
    """Like :func:`encode_conversation`, keeping the rendered text and token offsets."""
    messages = normalize_conversation(conversations, num_images)
    tok = tokenize_rendered(render(messages, template, tokenizer), template, tokenizer, add_bos=add_bos,
                            num_images=num_images)
    if tok.labels.count(IGNORE_INDEX) == len(tok.labels):
        raise BadSample("empty_target", "no supervised token after tokenization")
    return tok


def encode_conversation(conversations, template: str, tokenizer, *, num_images: int, add_bos=None) -> Encoded:
    """Validate, render and tokenize a training conversation; raises BadSample for bad records."""
    tok = explain_conversation(conversations, template, tokenizer, num_images=num_images, add_bos=add_bos)
    return Encoded(tok.input_ids, tok.labels, num_images)


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
                  *, add_bos=None) -> list[int]:
    """Token ids of a conversation ending with an OPEN assistant turn (the generation prompt).

    ``messages`` alternate human/gpt and end with a human turn; images are handled exactly as in
    training (placeholder moved to the start of its turn + ``\\n``, one IMAGE_TOKEN_INDEX each).
    ``num_images=None`` counts the placeholders; when the text has none but ``num_images > 0``,
    that many placeholders are put at the start of the first human turn. ``add_bos``: the policy
    the model was trained with (see :func:`resolve_bos`).
    """
    found = sum(m.get("value", "").count(IMAGE_PLACEHOLDER) for m in messages if isinstance(m, dict))
    if num_images is None:
        num_images = found
    if num_images and not found:
        messages = [dict(m) for m in messages]
        messages[0]["value"] = IMAGE_PLACEHOLDER * num_images + messages[0]["value"]
    try:
        normalized = normalize_conversation(messages, num_images, open_turn=True)
        rendered = render(normalized, template, tokenizer, open_turn=True)
        return tokenize_rendered(rendered, template, tokenizer, add_bos=add_bos, num_images=num_images).input_ids
    except BadSample as e:
        raise ValueError(f"encode_prompt: {e}") from None


def stop_token_ids(template: str, tokenizer) -> list[int]:
    """Token ids that end an assistant turn for ``template`` (first id of its terminator + EOS)."""
    term = terminator(template, tokenizer)
    ids = tokenizer(term, add_special_tokens=False)["input_ids"] if term else []
    out = [ids[0]] if ids else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(tokenizer.eos_token_id)
    return out
