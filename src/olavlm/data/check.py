"""Pre-flight check of a LLaVA-format dataset (``olavlm data check``).

Every record is examined in the order the dataset uses (conversation -> tokenization and
expanded length -> images) and gets at most ONE reason from :data:`olavlm.data.REASONS`; every
referenced image is fully decoded (in parallel threads, each path once) behind the same size guard
training uses (``image_geometry`` + ``limits``, :class:`olavlm.data.images.ImageLimits`). Without a
tokenizer only the records' structure and the images are checked.

Report: ``{"total": n, "ok": n, "problems": {reason: count}, "examples": {reason: [ids]}}``.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from olavlm.data.errors import REASONS, BadSample
from olavlm.data.images import DEFAULT_LIMITS, ImageLimits, load_image
from olavlm.data.records import RecordIndex, record_images
from olavlm.data.templates import get_template, normalize_conversation
from olavlm.data.tokenize import check_template, encode_conversation

MAX_EXAMPLES = 5  # record ids kept per reason in the report
_BLOCK = 64  # records per thread-pool task


class _Checker:
    def __init__(self, index: RecordIndex, image_folder: str | Path, tokenizer, template, max_length,
                 tokens_per_image, add_bos="auto", image_opts: dict | None = None) -> None:
        self.index = index
        self.image_opts = image_opts or {}  # limits / geometry / side of the size guard
        self.folder = Path(image_folder)
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.tokens_per_image = tokens_per_image
        self.add_bos = add_bos
        self._images: dict[str, BadSample | None] = {}  # path -> problem (None = fine)
        self._lock = threading.Lock()
        self._tok_lock = threading.Lock()  # HF tokenizers are not safe to call from several threads

    def image(self, key: str) -> None:
        with self._lock:
            known = key in self._images
            problem = self._images.get(key)
        if not known:
            try:
                load_image(self.folder / key, **self.image_opts)
                problem = None
            except BadSample as e:
                problem = e
            with self._lock:
                self._images[key] = problem
        if problem is not None:
            raise problem

    def record(self, i: int) -> tuple[str, str | None, str]:
        """(id, reason or None, message) of record ``i``."""
        record = self.index[i]
        rid = str(record.get("id", f"#{i}")) if isinstance(record, dict) else f"#{i}"
        try:
            if not isinstance(record, dict):
                raise BadSample("bad_conversation", f"record is a {type(record).__name__}, not an object")
            try:
                keys = record_images(record)
            except ValueError as e:
                raise BadSample("bad_conversation", str(e)) from None
            conv = record.get("conversations")
            if self.tokenizer is None:
                normalize_conversation(conv, len(keys))
            else:
                with self._tok_lock:
                    enc = encode_conversation(conv, self.template, self.tokenizer, num_images=len(keys),
                                              add_bos=self.add_bos)
                if self.max_length is not None:
                    n = enc.expanded_length(self.tokens_per_image)
                    if n > self.max_length:
                        raise BadSample("too_long", f"expanded length {n} > max_length {self.max_length}")
            for key in keys:
                self.image(key)
        except BadSample as e:
            return rid, e.reason, e.msg
        return rid, None, ""


def run_check(data_file, image_folder, *, tokenizer=None, template: str | None = None, max_length: int | None = None,
              tokens_per_image: int | None = None, workers: int = 4, progress: bool = True,
              max_examples: int = MAX_EXAMPLES, image_geometry: str | None = "pad",
              image_side: int | None = None, limits: ImageLimits = DEFAULT_LIMITS,
              add_bos="auto") -> tuple[dict, dict[str, str]]:
    """:func:`check_dataset` plus the first message per reason (for the CLI table).

    An unusable template x tokenizer x ``add_bos`` choice raises a one-line ValueError before any record.
    """
    if tokenizer is not None:
        if template is None:
            raise ValueError("check_dataset: a template is needed to tokenize (template=...)")
        get_template(template)
        if max_length is not None and tokens_per_image is None:
            raise ValueError("check_dataset: max_length needs tokens_per_image (positions per image after expansion)")
        check_template(template, tokenizer, add_bos)
    index = RecordIndex.build(data_file)
    checker = _Checker(index, image_folder, tokenizer, template, max_length, tokens_per_image, add_bos,
                       {"limits": limits, "geometry": image_geometry, "side": image_side})
    problems: Counter = Counter()
    examples: dict[str, list[str]] = {}
    messages: dict[str, str] = {}
    blocks = [range(s, min(s + _BLOCK, len(index))) for s in range(0, len(index), _BLOCK)]

    def run(block):
        return [checker.record(i) for i in block]

    from tqdm.auto import tqdm

    with tqdm(total=len(index), desc="data check", unit="rec", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for results in pool.map(run, blocks):  # in order, so examples are the first ids
            for rid, reason, msg in results:
                if reason is not None:
                    problems[reason] += 1
                    if len(examples.setdefault(reason, [])) < max_examples:
                        examples[reason].append(rid)
                    messages.setdefault(reason, f"{rid}: {msg}")
            bar.update(len(results))
    order = {r: k for k, r in enumerate(REASONS)}
    problems = dict(sorted(problems.items(), key=lambda kv: order[kv[0]]))
    report = {"total": len(index), "ok": len(index) - sum(problems.values()), "problems": problems,
              "examples": {r: examples[r] for r in problems}}
    return report, messages


def check_dataset(data_file, image_folder, *, tokenizer=None, template: str | None = None,
                  max_length: int | None = None, tokens_per_image: int | None = None, workers: int = 4,
                  progress: bool = True, image_geometry: str | None = "pad", image_side: int | None = None,
                  limits: ImageLimits = DEFAULT_LIMITS, add_bos="auto") -> dict:
    """Check every record and image of ``data_file``; returns the report dict (module docstring).

    Raises :class:`~olavlm.data.records.RecordFileError` when the file itself is malformed.
    """
    report, _ = run_check(data_file, image_folder, tokenizer=tokenizer, template=template, max_length=max_length,
                          tokens_per_image=tokens_per_image, workers=workers, progress=progress,
                          image_geometry=image_geometry, image_side=image_side, limits=limits, add_bos=add_bos)
    return report


def format_report(report: dict, messages: dict[str, str] | None = None) -> str:
    """Plain-text table of problems by reason with example ids."""
    lines = [f"records: {report['total']}   ok: {report['ok']}   with problems: {report['total'] - report['ok']}"]
    if report["problems"]:
        width = max(len(r) for r in report["problems"])
        lines.append(f"{'reason'.ljust(width)}  {'count':>8}  examples")
        for reason, n in report["problems"].items():
            lines.append(f"{reason.ljust(width)}  {n:>8}  {', '.join(report['examples'].get(reason, []))}")
            if messages and reason in messages:
                lines.append(f"{''.ljust(width)}  {'':>8}  e.g. {messages[reason]}")
    return "\n".join(lines)
