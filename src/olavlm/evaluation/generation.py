"""Batched greedy answers for a benchmark, with a progress bar and resume.

Every finished batch is appended to a *partial* file (JSON lines) next to the result file; a
killed evaluation started again with the same settings skips the items already answered and goes
on where it stopped. The first line records the settings; a partial file written with other
settings (another model, prompt, decoding length...) is refused with a one-line error rather than
mixed in. A line cut short by the kill is ignored (that item is answered again).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from olavlm.errors import UserError


class PartialMismatch(UserError, ValueError):
    """A partial file from an evaluation with other settings."""


@dataclass
class Item:
    """One question: a unique key, the prompt text (without image placeholder) and its image."""

    key: str
    prompt: str
    image: Callable[[], object]  # -> RGB PIL image (loaded lazily, one batch at a time)


def partial_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".partial.jsonl")


def read_partial(path: Path, settings: dict) -> dict[str, str]:
    """Answers already in ``path`` (key -> output); {} when there is no such file."""
    if not path.is_file():
        return {}
    done: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    try:
        head = json.loads(lines[0])["settings"]
    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
        raise PartialMismatch(f"{path}: not a partial evaluation file (first line has no settings); "
                              "delete it to start over") from None
    if head != settings:
        diff = sorted(k for k in set(head) | set(settings) if head.get(k) != settings.get(k))
        raise PartialMismatch(f"{path}: written by an evaluation with other settings ({', '.join(diff)}); "
                              "delete it to start over or rerun with the same settings")
    for line in lines[1:]:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done[str(rec["key"])] = str(rec["output"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # the last line of a killed run may be cut short: that item is answered again
    return done


def _open_partial(path: Path, settings: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.is_file()
    f = open(path, "a", encoding="utf-8")
    if fresh:
        f.write(json.dumps({"settings": settings}) + "\n")
    else:
        f.write("\n")  # a cut-short last line stays on its own (and is ignored on reading)
    f.flush()
    return f


def answer_all(em, items: list[Item], *, settings: dict, partial: Path | None = None, batch_size: int = 8,
               max_new_tokens: int = 8, desc: str = "eval", progress: bool = True) -> list[str]:
    """Greedy outputs of ``em`` (an :class:`~olavlm.evaluation.runner.EvalModel`) for ``items``, in order.

    With ``partial``, answers are appended there after each batch and reused on the next call.
    """
    from tqdm.auto import tqdm

    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("answer_all: item keys are not unique")
    done = read_partial(partial, settings) if partial is not None else {}
    todo = [it for it in items if it.key not in done]
    sink = _open_partial(partial, settings) if partial is not None else None
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, disable=not progress,
               dynamic_ncols=True)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            outs = generate_batch(em, [it.prompt for it in chunk], [it.image() for it in chunk], max_new_tokens)
            for it, out in zip(chunk, outs):
                done[it.key] = out
                if sink is not None:
                    sink.write(json.dumps({"key": it.key, "output": out}) + "\n")
            if sink is not None:
                sink.flush()
                os.fsync(sink.fileno())
            bar.update(len(chunk))
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    return [done[k] for k in keys]


def answer_and_score(em, items: list, queries: list[Item], score: Callable[[list, list[str]], dict], *,
                     settings: dict, output: str | Path | None, batch_size: int, max_new_tokens: int,
                     desc: str, progress: bool) -> dict:
    """Answer ``queries`` (resumable through ``<output>.partial.jsonl``), score them against ``items``
    and write the result (scores, outputs, settings) to ``output`` when given."""
    partial = partial_path(output) if output is not None else None
    outputs = answer_all(em, queries, settings=settings, partial=partial, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, desc=desc, progress=progress)
    result = score(items, outputs)
    result["settings"] = settings
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=1) + "\n")
        partial.unlink(missing_ok=True)
    return result


def generate_batch(em, prompts: list[str], images: list, max_new_tokens: int) -> list[str]:
    """Greedy decode of one batch of (prompt, RGB image); each output cut at the first stop token."""
    import torch

    from olavlm.evaluation.runner import pad_right

    proc = em.processor
    stop = proc.stop_token_ids()
    seqs = [proc.prompt_ids([{"from": "human", "value": p}], num_images=1) for p in prompts]
    ids, mask = pad_right(seqs, em.tokenizer.pad_token_id)
    pixels = proc.images(images, teacher=False)["pixel_values"]
    with torch.no_grad():
        new = em.model.generate(ids.to(em.device), pixels.to(em.device), mask.to(em.device),
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop)
    outs = []
    for row in new.tolist():
        end = next((i for i, t in enumerate(row) if t in stop), len(row))
        outs.append(em.tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return outs
