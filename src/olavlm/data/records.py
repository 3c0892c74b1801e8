"""Compact record index for LLaVA-format JSON (one list) and JSONL (one object per line) files.

The file is scanned ONCE at start (streaming, bounded memory): every record is parsed to validate
the file and to compute its modality length, and only three numpy arrays are kept — byte offset,
byte size and signed word count per record (20 bytes per record, ~13 MB for 665K records).
A record is re-read from disk on access (``os.pread``, safe in forked dataloader workers).
A malformed file fails here, at start, with its line and column (:class:`RecordFileError`).

Modality length (LLaVA's group_by_modality_length): whitespace word count of all turns, positive for records with an
image, negative for text-only ones; never 0 (a record without words counts as 1 word) so every
record belongs to a modality. Per-record shape problems (missing ``conversations``, wrong types)
are left to the dataset, which reports them as ``bad_conversation``.
"""

from __future__ import annotations

import codecs
import json
import os
from array import array
from pathlib import Path
from typing import Iterator

import numpy as np

from olavlm.errors import UserError

_CHUNK = 8 << 20  # bytes read per step of the JSON-list scan
_MAX_RECORD_CHARS = 256 << 20  # a single record larger than this is treated as a syntax error
_WS = " \t\r\n"


class RecordFileError(UserError, ValueError):
    """The data file itself is malformed (not JSON / not a list / bad line)."""


def record_images(record) -> list[str]:
    """Relative image paths of a record: ``image`` may be absent/None, a string or a list of strings."""
    image = record.get("image") if isinstance(record, dict) else None
    if image is None or image == "":
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(x, str) and x for x in image):
        return list(image)
    raise ValueError(f"'image' must be a string or a list of strings, got {image!r:.80}")


def modality_length(record) -> int:
    """Signed word count (LLaVA's group_by_modality_length): > 0 with an image, < 0 text-only, never 0."""
    words = 0
    convs = record.get("conversations") if isinstance(record, dict) else None
    if isinstance(convs, list):
        for turn in convs:
            if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                words += len(turn["value"].split())
    words = max(words, 1)
    try:
        has_image = bool(record_images(record))
    except ValueError:
        has_image = bool(record.get("image"))
    return words if has_image else -words


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, int, object]]:
    """Yield ``(byte_offset, byte_size, record)`` for every record of a JSON list or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf" + _WS.encode())
    if head.startswith(b"["):
        yield from _iter_json_list(path)
    else:
        yield from _iter_jsonl(path)


def _iter_jsonl(path: Path):
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            lead = len(line) - len(line.lstrip())
            if lineno == 1 and text.startswith(b"\xef\xbb\xbf"):
                text, lead = text[3:], lead + 3
            if text:
                try:
                    record = json.loads(text)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    col = getattr(e, "colno", 0)
                    raise RecordFileError(f"{path}: line {lineno}, column {col}: invalid JSON (read as JSONL, "
                                          f"one record per line): {getattr(e, 'msg', e)}") from None
                yield offset + lead, len(text), record
            offset += len(line)


class _Window:
    """Decoded text window over a file; ``byte`` is the byte offset of ``text[pos]``."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "rb")
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.pos = 0  # char index into text
        self.byte = 0  # byte offset of text[pos] in the file
        self.line, self.col = 1, 1  # file position of text[0]
        self.eof = False
        self.path = path
        if self.file.read(3) == b"\xef\xbb\xbf":  # UTF-8 byte-order mark
            self.byte = 3
        else:
            self.file.seek(0)

    def more(self) -> bool:
        """Append the next chunk (dropping the consumed text first); False at end of file."""
        if self.eof:
            return False
        done = self.text[: self.pos]
        nl = done.count("\n")
        self.line += nl
        self.col = len(done) - done.rfind("\n") if nl else self.col + len(done)
        self.text, self.pos = self.text[self.pos:], 0
        chunk = self.file.read(_CHUNK)
        self.eof = not chunk
        try:
            self.text += self.decoder.decode(chunk, final=self.eof)
        except UnicodeDecodeError as e:
            raise RecordFileError(f"{self.path}: near byte {self.byte}: not UTF-8: {e.reason}") from None
        return True

    def advance(self, end: int) -> None:
        """Move ``pos`` to ``end`` (all text in between is consumed)."""
        self.byte += len(self.text[self.pos:end].encode("utf-8"))
        self.pos = end

    def skip_ws(self) -> str:
        """Advance past whitespace; the next char, or '' at end of file."""
        while True:
            n = len(self.text)
            start = self.pos
            while self.pos < n and self.text[self.pos] in _WS:
                self.pos += 1
            self.byte += self.pos - start  # whitespace is ASCII
            if self.pos < n:
                return self.text[self.pos]
            if not self.more():
                return ""

    def fail(self, pos: int, msg: str) -> RecordFileError:
        before = self.text[:pos]
        nl = before.count("\n")
        col = (len(before) - before.rfind("\n")) if nl else self.col + len(before)
        return RecordFileError(f"{self.path}: line {self.line + nl}, column {col}: {msg}")


def _iter_json_list(path: Path):
    decoder = json.JSONDecoder()
    w = _Window(path)
    try:
        if w.skip_ws() != "[":
            raise w.fail(w.pos, "a JSON data file must be a list of records")
        w.advance(w.pos + 1)
        if w.skip_ws() == "]":
            w.advance(w.pos + 1)
        else:
            while True:
                if w.skip_ws() == "":
                    raise w.fail(w.pos, "unexpected end of file inside the list")
                while True:
                    try:
                        record, end = decoder.raw_decode(w.text, w.pos)
                    except json.JSONDecodeError as e:
                        if len(w.text) - w.pos < _MAX_RECORD_CHARS and w.more():
                            continue
                        raise w.fail(e.pos, f"invalid JSON: {e.msg}") from None
                    if end == len(w.text) and w.more():
                        continue  # the value may continue in the next chunk
                    break
                start = w.byte
                w.advance(end)
                yield start, w.byte - start, record
                nxt = w.skip_ws()
                if nxt not in (",", "]"):
                    raise w.fail(w.pos, f"expected ',' or ']' after a record, found {nxt or 'end of file'!r}")
                w.advance(w.pos + 1)
                if nxt == "]":
                    break
        if w.skip_ws() != "":
            raise w.fail(w.pos, "unexpected data after the closing ']'")
    finally:
        w.file.close()


class RecordIndex:
    """Offsets, sizes and modality lengths of every record; records are read back on demand."""

    def __init__(self, path: str | os.PathLike, offsets: np.ndarray, sizes: np.ndarray, lengths: np.ndarray) -> None:
        self.path = str(path)
        self.offsets = offsets  # int64 byte offset of each record
        self.sizes = sizes  # int32 byte size of each record
        self.lengths = lengths  # int32 signed word count (LLaVA's group_by_modality_length)
        self._fd: int | None = None
        self._pid: int | None = None

    @classmethod
    def build(cls, path: str | os.PathLike) -> "RecordIndex":
        offsets, sizes, lengths = array("q"), array("i"), array("i")  # compact while scanning
        for offset, size, record in iter_records(path):
            offsets.append(offset)
            sizes.append(size)
            lengths.append(modality_length(record))
        return cls(path, np.frombuffer(offsets, dtype=np.int64).copy(), np.frombuffer(sizes, dtype=np.int32).copy(),
                   np.frombuffer(lengths, dtype=np.int32).copy())

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        """Memory held by the index arrays."""
        return self.offsets.nbytes + self.sizes.nbytes + self.lengths.nbytes

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range (0..{len(self) - 1})")
        if self._fd is None or self._pid != os.getpid():  # reopen after fork
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        raw = os.pread(self._fd, int(self.sizes[i]), int(self.offsets[i]))
        return json.loads(raw)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None
        return state

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


def image_paths(data_file: str | os.PathLike) -> list[str]:
    """Unique image paths (relative to the image folder) of a data file, in first-seen order.

    Records whose ``image`` field is malformed are skipped (``olavlm data check`` reports them).
    """
    seen: dict[str, None] = {}
    for _, _, record in iter_records(data_file):
        try:
            for p in record_images(record):
                seen.setdefault(p, None)
        except ValueError:
            continue
    return list(seen)
