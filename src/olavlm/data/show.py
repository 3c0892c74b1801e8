"""``olavlm data show``: one record exactly as the model sees it and learns from it.

Prints the token sequence decoded span by span (BOS and template text included), the supervised
spans marked ``[[...]]`` (and coloured on a terminal), each image placeholder with the number of
positions it expands to, and the token counts.
"""

from __future__ import annotations

from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from olavlm.data.errors import BadSample
from olavlm.data.records import RecordIndex, iter_records, record_images
from olavlm.data.tokenize import encode_conversation

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


def render_sample(record: dict, template: str, tokenizer, *, tokens_per_image: int | None = None,
                  max_length: int | None = None, color: bool = False) -> str:
    """Human-readable view of one record; raises BadSample for a bad record."""
    if not isinstance(record, dict):
        raise BadSample("bad_conversation", f"record is a {type(record).__name__}, not an object")
    try:
        keys = record_images(record)
    except ValueError as e:
        raise BadSample("bad_conversation", str(e)) from None
    enc = encode_conversation(record.get("conversations"), template, tokenizer, num_images=len(keys))
    pieces, run, sup = [], [], False

    def flush():
        if run:
            text = tokenizer.decode(run)
            pieces.append((f"{GREEN}{OPEN}{text}{CLOSE}{RESET}" if color else f"{OPEN}{text}{CLOSE}") if sup else text)
            run.clear()

    per_image = f" x{tokens_per_image}" if tokens_per_image else ""
    for tid, label in zip(enc.input_ids, enc.labels):
        if tid == IMAGE_TOKEN_INDEX:
            flush()
            pieces.append(f"<image{per_image}>")
            continue
        if (label != IGNORE_INDEX) != sup:
            flush()
            sup = label != IGNORE_INDEX
        run.append(tid)
    flush()
    n_sup = sum(1 for label in enc.labels if label != IGNORE_INDEX)
    lines = [
        f"id: {record.get('id', '?')}   template: {template}   images: {len(keys)} {keys if keys else ''}".rstrip(),
        f"--- what the model sees (supervised spans in {OPEN} {CLOSE}) ---",
        "".join(pieces),
        "--- tokens ---",
        f"text tokens:      {len(enc.input_ids) - len(keys)} (supervised {n_sup})",
    ]
    if tokens_per_image:
        total = enc.expanded_length(tokens_per_image)
        lines.append(f"image positions:  {len(keys)} x {tokens_per_image} = {len(keys) * tokens_per_image}")
        limit = f" (max_length {max_length}{', TOO LONG' if max_length and total > max_length else ''})" \
            if max_length else ""
        lines.append(f"expanded length:  {total}{limit}")
    else:
        lines.append(f"image placeholders: {len(keys)} (pass --num-image-tokens or --vision-tower for the expanded "
                     "length)")
    return "\n".join(lines)
