"""``olavlm data show``: one record exactly as the model sees it and learns from it.

Prints the prompt as the tokens cover it (BOS and template text included), the supervised tokens
marked ``[[...]]`` (and coloured on a terminal), each image placeholder with the number of positions
it expands to, the BOS policy, the number of tokens before the first image, and the token counts.
"""

from __future__ import annotations

from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from olavlm.data.errors import BadSample
from olavlm.data.records import RecordIndex, iter_records, record_images
from olavlm.data.tokenize import explain_conversation, parse_add_bos

OPEN, CLOSE = "[[", "]]"  # markers around supervised spans
GREEN, RESET = "\033[32m", "\033[0m"


def find_record(data_file, *, index: int | None = None, record_id: str | None = None) -> tuple[int, dict]:
    """Record by position or by its ``id`` field."""
    if (index is None) == (record_id is None):
        raise ValueError("give exactly one of index / record_id")
    if index is not None:
        idx = RecordIndex.build(data_file)
        if not 0 <= index < len(idx):
            raise IndexError(f"--index {index} is outside 0..{len(idx) - 1} ({data_file} has {len(idx)} records)")
        return index, idx[index]
    for i, (_, _, record) in enumerate(iter_records(data_file)):
        if isinstance(record, dict) and str(record.get("id")) == record_id:
            return i, record
    raise KeyError(f"no record with id {record_id!r} in {data_file}")


def _display_pieces(tok, tokenizer, image_label: str) -> list[tuple[str, bool]]:
    """(text, supervised) pieces: each token shown as the characters of the prompt it covers.

    Showing the prompt's own characters (not decoded ids) keeps what a lossy round trip drops: an
    added token that swallows whitespace next to it (Phi-3's ``<|end|>`` and role tokens eat the
    ``\\n`` after them) is shown as the token, then the swallowed whitespace outside any span.
    """
    added = {tid: str(t) for tid, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    text, pieces, cursor = tok.text, [], 0
    for tid, label, off in zip(tok.input_ids, tok.labels, tok.offsets):
        sup = label != IGNORE_INDEX
        if off is None:  # BOS prepended as an id
            pieces.append((tokenizer.bos_token, sup))
            continue
        start, end = max(off[0], cursor), off[1]
        if end <= cursor:  # characters already shown (byte pieces of one character)
            continue
        if tid == IMAGE_TOKEN_INDEX:
            pieces.append((image_label, False))
        else:
            core, content = text[start:end], added.get(tid)
            if content and core != content and content in core:
                k = core.index(content)
                pieces += [(core[:k], False), (content, sup), (core[k + len(content):], False)]
            else:
                pieces.append((core, sup))
        cursor = end
    pieces.append((text[cursor:], False))
    return pieces


def render_sample(record: dict, template: str, tokenizer, *, tokens_per_image: int | None = None,
                  max_length: int | None = None, color: bool = False, add_bos="auto") -> str:
    """Human-readable view of one record; raises BadSample for a bad record."""
    if not isinstance(record, dict):
        raise BadSample("bad_conversation", f"record is a {type(record).__name__}, not an object")
    try:
        keys = record_images(record)
    except ValueError as e:
        raise BadSample("bad_conversation", str(e)) from None
    tok = explain_conversation(record.get("conversations"), template, tokenizer, num_images=len(keys),
                               add_bos=add_bos)
    per_image = f" x{tokens_per_image}" if tokens_per_image else ""
    runs: list[list] = []
    for text, sup in _display_pieces(tok, tokenizer, f"<image{per_image}>"):
        if not text:
            continue
        if runs and runs[-1][1] == sup:
            runs[-1][0] += text
        else:
            runs.append([text, sup])
    shown = "".join((f"{GREEN}{OPEN}{t}{CLOSE}{RESET}" if color else f"{OPEN}{t}{CLOSE}") if sup else t
                    for t, sup in runs)
    n_sup = sum(1 for label in tok.labels if label != IGNORE_INDEX)
    policy = "auto" if parse_add_bos(add_bos) is None else str(parse_add_bos(add_bos)).lower()
    before = (f"{tok.input_ids.index(IMAGE_TOKEN_INDEX)} tokens (BOS included)" if tok.bos else
              f"{tok.input_ids.index(IMAGE_TOKEN_INDEX)} tokens") if keys else "- (no image)"
    lines = [
        f"id: {record.get('id', '?')}   template: {template}   images: {len(keys)} {keys if keys else ''}".rstrip(),
        f"--- what the model sees (supervised spans in {OPEN} {CLOSE}) ---",
        shown,
        "--- tokens ---",
        f"BOS:              {'yes' if tok.bos else 'no'} (data.add_bos: {policy})",
        f"before 1st image: {before}",
        f"text tokens:      {len(tok.input_ids) - len(keys)} (supervised {n_sup})",
    ]
    if tokens_per_image:
        total = tok.expanded_length(tokens_per_image)
        lines.append(f"image positions:  {len(keys)} x {tokens_per_image} = {len(keys) * tokens_per_image}")
        limit = f" (max_length {max_length}{', TOO LONG' if max_length and total > max_length else ''})" \
            if max_length else ""
        lines.append(f"expanded length:  {total}{limit}")
    else:
        lines.append(f"image placeholders: {len(keys)} (pass --num-image-tokens or --vision-tower for the expanded "
                     "length)")
    return "\n".join(lines)
