"""MMStar evaluation: the benchmark's prompt suffix, answer matching and category averages.

Input: the hub's ``MMStar.tsv`` (columns ``index, question, answer, category, l2_category,
image`` with the image base64-encoded; the question already lists the options) or a JSON-lines
file with the same fields where ``image`` is a path relative to the file (small hand-made sets).

Scoring, as in MMStar's own evaluator:

* an output is correct when, lower-cased and stripped, its first character is the answer letter,
  or it starts with ``(`` followed by the letter, or with ``option `` / ``the answer is ``
  followed by the letter ("A", "(A)", "A.", "a" are all A; an empty output is wrong);
* accuracy per fine category (``l2_category``); a category's score is the mean of its fine
  categories; overall is the mean over all fine categories. The plain item accuracy is reported
  next to it.
"""

from __future__ import annotations

import base64
import csv
import sys
from collections import defaultdict
from pathlib import Path

from olavlm.errors import UserError
from olavlm.evaluation.jsonl import read_jsonl

SUFFIX = "\nAnswer with the option's letter from the given choices directly, such as answer letter 'A' only. \n"
FIELDS = ("index", "question", "answer", "category", "l2_category", "image")
_PREFIXES = ("(", "option ", "the answer is ")


class MMStarFormatError(UserError, ValueError):
    """An MMStar file or record that cannot be evaluated; the message names the line and field."""


def _check(rec: dict, where: str) -> dict:
    for key in FIELDS:
        if rec.get(key) in (None, ""):
            raise MMStarFormatError(f"{where}: missing field {key!r}")
    if not (len(str(rec["answer"]).strip()) == 1 and str(rec["answer"]).strip().isalpha()):
        raise MMStarFormatError(f"{where}: answer {rec['answer']!r} is not a single letter")
    return rec


def load_items(path: str | Path) -> list[dict]:
    """Records of an MMStar ``.tsv`` or ``.jsonl`` file, checked for the fields scoring needs."""
    path = Path(path)
    if not path.is_file():
        raise MMStarFormatError(f"{path}: no such file")
    items = []
    if path.suffix.lower() == ".tsv":
        csv.field_size_limit(sys.maxsize)  # base64 images are long fields
        with open(path, encoding="utf-8", newline="") as f:
            for lineno, rec in enumerate(csv.DictReader(f, delimiter="\t"), 2):
                items.append(_check(dict(rec), f"{path}:{lineno}"))
    else:
        items = [_check(rec, f"{path}:{lineno}") for lineno, rec in read_jsonl(path, MMStarFormatError)]
    if not items:
        raise MMStarFormatError(f"{path}: no records")
    keys = [str(it["index"]) for it in items]
    if len(set(keys)) != len(keys):
        raise MMStarFormatError(f"{path}: 'index' values are not unique")
    return items


def count_records(path: str | Path) -> int:
    return len(load_items(path))


def image_bytes(item: dict, items_by_index: dict[str, dict], base: Path) -> tuple[str, bytes]:
    """(name for messages, encoded image bytes) of a record: base64 in a TSV, else a file path.

    In the TSV layout a short numeric ``image`` refers to the record with that index (shared image).
    """
    value = str(item["image"])
    if value.isdigit() and value in items_by_index and value != str(item["index"]):
        value = str(items_by_index[value]["image"])
    if len(value) <= 256 and not (base / value).is_file():
        raise MMStarFormatError(f"MMStar index {item['index']}: image file {base / value} not found")
    if len(value) > 256:
        try:
            return f"MMStar index {item['index']}", base64.b64decode(value, validate=False)
        except (ValueError, TypeError):
            raise MMStarFormatError(f"MMStar index {item['index']}: image is neither a file nor base64") from None
    return str(base / value), (base / value).read_bytes()


def build_prompt(item: dict) -> str:
    return str(item["question"]) + SUFFIX


def is_correct(output: str, answer: str) -> bool:
    """MMStar's match: the answer letter first, or after ``(`` / ``option `` / ``the answer is ``."""
    gold = answer.strip().lower()
    pred = output.lower().replace("\n", " ").strip()
    if not pred:
        return False
    if pred[0] == gold:
        return True
    return any(pred.startswith(p) and pred[len(p):len(p) + 1] == gold for p in _PREFIXES)


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def score(items: list[dict], outputs: list[str]) -> dict:
    """``{"overall", "accuracy", "by_category", "by_l2_category", "n", "per_item"}`` (fractions)."""
    if len(items) != len(outputs):
        raise ValueError(f"score: {len(items)} items but {len(outputs)} outputs")
    fine: dict[tuple[str, str], list[float]] = defaultdict(list)
    per_item = []
    for item, out in zip(items, outputs):
        ok = is_correct(out, str(item["answer"]))
        fine[(item["category"], item["l2_category"])].append(float(ok))
        per_item.append({"index": item["index"], "category": item["category"], "l2_category": item["l2_category"],
                         "answer": item["answer"], "output": out, "correct": ok})
    by_l2 = {l2: _mean(v) for (_, l2), v in fine.items()}
    by_cat = {}
    for cat in sorted({c for c, _ in fine}):
        by_cat[cat] = _mean(_mean(v) for (c, _), v in fine.items() if c == cat)
    return {"overall": _mean(by_l2.values()), "accuracy": _mean(float(p["correct"]) for p in per_item),
            "by_category": by_cat, "by_l2_category": dict(sorted(by_l2.items())), "n": len(items),
            "per_item": per_item}


def format_table(result: dict) -> str:
    def pct(v):
        return "   -  " if v is None else f"{100 * v:5.1f}%"

    lines = [f"MMStar ({result['n']} items)",
             f"  overall {pct(result['overall'])}   item accuracy {pct(result['accuracy'])}"]
    lines += [f"  {cat:<24} {pct(v)}" for cat, v in result["by_category"].items()]
    return "\n".join(lines)


def run_mmstar(model_dir: str | Path, data: str | Path, *, output: str | Path | None = None,
               max_new_tokens: int = 8, batch_size: int = 8, limit: int | None = None,
               template: str | None = None, image_geometry: str | None = None, device: str | None = None,
               progress: bool = True, em=None, add_bos=None) -> dict:
    """Greedy answers of a trained model on MMStar, scored by :func:`score` (resumable like CV-Bench)."""
    from olavlm.data.images import decode_image_bytes
    from olavlm.evaluation.generation import Item, answer_and_score
    from olavlm.evaluation.runner import load_eval_model

    items = load_items(data)
    by_index = {str(it["index"]): it for it in items}
    items = items[:limit] if limit else items
    base = Path(data).parent
    em = em or load_eval_model(model_dir, template=template, image_geometry=image_geometry, add_bos=add_bos,
                               device=device)
    proc = em.processor
    settings = {"benchmark": "mmstar", "model": str(Path(model_dir).resolve()), "data": str(Path(data).resolve()),
                "template": em.template, "image_geometry": em.image_geometry, "max_new_tokens": max_new_tokens,
                "decoding": "greedy", "suffix": SUFFIX}

    def loader(item):
        def load():
            name, data_bytes = image_bytes(item, by_index, base)
            return decode_image_bytes(data_bytes, name, limits=proc.limits, geometry=proc.image_geometry, side=proc.max_side)
        return load

    queries = [Item(str(it["index"]), build_prompt(it), loader(it)) for it in items]
    return answer_and_score(em, items, queries, score, settings=settings, output=output, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, desc="mmstar", progress=progress)
