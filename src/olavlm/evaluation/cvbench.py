"""CV-Bench evaluation (docs/method.md, "Inference"): prompt, answer parsing, accuracy per source / task / type.

Works on the real ``nyu-visionx/CV-Bench`` ``test.jsonl`` layout (fields ``idx, type, task,
question, choices, answer "(A)", prompt, filename, source, ...``) and on ShapeWorld's
``cvbench.jsonl`` (same fields).

Protocol:
* prompt = the record's pre-formatted ``prompt`` (question + lettered choices; built from
  ``question`` + ``choices`` when absent) + :data:`SUFFIX`;
* the answer is the first ``(X)`` in the output, else its first non-blank character when that
  is a letter; nothing else counts. Each item is parsed on its own (the reference leaks the
  previous item's prediction, as the reference's parser did);
* accuracy per source and per task; 2D = mean over the 2D sources (ADE20K, COCO), 3D = mean over
  the 3D sources (Omni3D), overall = mean(2D, 3D).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from olavlm.errors import UserError
from olavlm.evaluation.jsonl import read_jsonl

SUFFIX = "\nOnly answer the option as the output. For example, if your answer is the option A, answer (A)."
_PAREN = re.compile(r"\(([A-Za-z])\)")
_ANSWER = re.compile(r"^\(([A-Z])\)$")


class CVBenchFormatError(UserError, ValueError):
    """A CV-Bench file or record that cannot be evaluated; the message names the line and field."""


def load_items(path: str | Path) -> list[dict]:
    """Read a CV-Bench jsonl; every record is checked for the fields the protocol needs."""
    items = []
    for lineno, rec in read_jsonl(path, CVBenchFormatError):
        for key in ("type", "task", "answer", "source"):
            if key not in rec:
                raise CVBenchFormatError(f"{path}:{lineno}: missing field {key!r}")
        if "prompt" not in rec and not ("question" in rec and "choices" in rec):
            raise CVBenchFormatError(f"{path}:{lineno}: needs 'prompt' or 'question' + 'choices'")
        if not _ANSWER.match(str(rec["answer"])):
            raise CVBenchFormatError(f"{path}:{lineno}: answer {rec['answer']!r} is not like '(A)'")
        if image_path(rec) is None:
            raise CVBenchFormatError(f"{path}:{lineno}: no image path ('filename' or 'image')")
        rec.setdefault("idx", len(items))
        items.append(rec)
    if not items:
        raise CVBenchFormatError(f"{path}: no records")
    return items


def count_records(path: str | Path) -> int:
    return len(load_items(path))


def image_path(item: dict) -> str | None:
    """Relative image path of a record: ``filename`` (real CV-Bench) or a string ``image``."""
    if isinstance(item.get("filename"), str):
        return item["filename"]
    if isinstance(item.get("image"), str):
        return item["image"]
    return None


def build_prompt(item: dict) -> str:
    """The question text sent to the model (without the image placeholder)."""
    if "prompt" in item:
        body = item["prompt"]
    else:
        letters = [f"({chr(65 + i)}) {c}" for i, c in enumerate(item["choices"])]
        body = item["question"] + " Select from the following choices.\n" + "\n".join(letters)
    return body + SUFFIX


def parse_answer(text: str) -> str | None:
    """``"(B)"``-style option in the output, else the first character if it is a letter; else None."""
    m = _PAREN.search(text)
    if m:
        return m.group(1).upper()
    stripped = text.strip()
    if stripped and stripped[0].isalpha() and stripped[0].isascii():
        return stripped[0].upper()
    return None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score(items: list[dict], outputs: list[str]) -> dict:
    """Accuracy per source, task and type, plus 2D / 3D / overall as defined by CV-Bench.

    Returns ``{"overall", "2D", "3D", "by_source", "by_task", "by_type_task", "n", "n_unparsed",
    "per_item"}``; accuracies are fractions in [0, 1] (None where a group is empty).
    """
    if len(items) != len(outputs):
        raise ValueError(f"score: {len(items)} items but {len(outputs)} outputs")
    per_item, groups = [], defaultdict(list)
    for item, out in zip(items, outputs):
        pred = parse_answer(out)
        gold = _ANSWER.match(item["answer"]).group(1)
        ok = float(pred == gold)
        per_item.append({"idx": item["idx"], "type": item["type"], "task": item["task"],
                         "source": item["source"], "answer": item["answer"], "output": out,
                         "prediction": f"({pred})" if pred else None, "correct": bool(ok)})
        groups[("source", item["type"], item["source"])].append(ok)
        groups[("task", item["task"])].append(ok)
        groups[("type_task", item["type"], item["task"])].append(ok)
    by_source = {k[2]: _mean(v) for k, v in groups.items() if k[0] == "source"}
    by_task = {k[1]: _mean(v) for k, v in groups.items() if k[0] == "task"}
    by_type_task = {f"{k[1]}/{k[2]}": _mean(v) for k, v in groups.items() if k[0] == "type_task"}
    kind = {}
    for t in ("2D", "3D"):
        kind[t] = _mean([_mean(v) for k, v in groups.items() if k[0] == "source" and k[1] == t])
    present = [v for v in kind.values() if v is not None]
    return {
        "overall": _mean(present), "2D": kind["2D"], "3D": kind["3D"],
        "by_source": dict(sorted(by_source.items())), "by_task": dict(sorted(by_task.items())),
        "by_type_task": dict(sorted(by_type_task.items())),
        "n": len(items), "n_unparsed": sum(p["prediction"] is None for p in per_item), "per_item": per_item,
    }


def format_table(result: dict) -> str:
    """A small plain-text table of a :func:`score` result."""
    def pct(v):
        return "   -  " if v is None else f"{100 * v:5.1f}%"

    lines = [f"CV-Bench ({result['n']} items, {result['n_unparsed']} unparsed)",
             f"  overall {pct(result['overall'])}   2D {pct(result['2D'])}   3D {pct(result['3D'])}"]
    lines += [f"  task   {task:<10} {pct(v)}" for task, v in result["by_task"].items()]
    lines += [f"  source {src:<10} {pct(v)}" for src, v in result["by_source"].items()]
    return "\n".join(lines)


def run_cvbench(model_dir: str | Path, data: str | Path, image_root: str | Path | None = None, *,
                output: str | Path | None = None, max_new_tokens: int = 8, batch_size: int = 8,
                limit: int | None = None, template: str | None = None, image_geometry: str | None = None,
                device: str | None = None, progress: bool = True, em=None, add_bos=None) -> dict:
    """Greedy answers of a trained model on a CV-Bench jsonl, scored by :func:`score`.

    ``image_root``: folder the records' ``filename`` is relative to (default: the jsonl's folder).
    Writes ``output`` (JSON with the scores, every item's output and the settings) when given;
    answers are kept in ``<output>.partial.jsonl`` as they come, so a killed run resumes.
    ``em``: an already loaded :class:`~olavlm.evaluation.runner.EvalModel` (``eval all``).
    """
    from olavlm.evaluation.generation import Item, answer_and_score
    from olavlm.evaluation.runner import load_eval_model

    items = load_items(data)[:limit] if limit else load_items(data)
    root = Path(image_root) if image_root is not None else Path(data).parent
    em = em or load_eval_model(model_dir, template=template, image_geometry=image_geometry, add_bos=add_bos,
                               device=device)
    settings = {"benchmark": "cvbench", "model": str(Path(model_dir).resolve()), "data": str(Path(data).resolve()),
                "image_root": str(root.resolve()), "template": em.template, "image_geometry": em.image_geometry,
                "max_new_tokens": max_new_tokens, "decoding": "greedy", "suffix": SUFFIX}

    def loader(item):
        return lambda: em.processor.load_image(root / image_path(item))

    queries = [Item(f"{i}:{it['idx']}", build_prompt(it), loader(it)) for i, it in enumerate(items)]
    return answer_and_score(em, items, queries, score, settings=settings, output=output, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, desc="cvbench", progress=progress)
