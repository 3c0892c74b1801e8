"""FLOP counts and MFU for the step benchmarks.

Counts are measured, not guessed: ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of
every matmul, convolution and attention kernel one call executes (forward and backward). Per
component (LLM, vision tower, projector, predictors, teachers) we count forward passes separately
(module attribution is exact in forward; in backward it is not), and the whole training step once.
The analytic formulas these numbers follow are in benchmarks/README.md (section MFU).

MFU = step FLOPs / (median step seconds x peak FLOP/s). The peak is the device's dense bf16 (or
fp32 when autocast is off) rate, given with ``--peak-tflops``; without it only achieved TFLOP/s is
reported.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def count(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """(total FLOPs of one call of ``fn``, {module path: FLOPs})."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    per_module = {name: int(sum(ops.values())) for name, ops in fc.get_flop_counts().items()}
    return int(fc.get_total_flops()), per_module


def forward_split(model, inputs: dict, components: dict[str, str], *, autocast) -> dict[str, int]:
    """Forward FLOPs per component: ``components`` maps a label to a module path prefix as the flop
    counter names them (e.g. ``{"llm": "OlaVLM.llm", "vision": "OlaVLM.vision"}``). Runs with grad
    enabled (the counter's module tracker needs graph nodes on parameter views) and drops the graph."""
    with autocast:
        _, per_module = count(lambda: model(**inputs).loss.detach())
    return {label: subtree_flops(per_module, prefix) for label, prefix in components.items()}


def subtree_flops(per_module: dict[str, int], prefix: str) -> int:
    """FLOPs under module path ``prefix``: containers that are never called themselves (a ModuleDict
    of predictors, an LLM whose decoder is called directly) have no entry, so sum the outermost
    entries below it."""
    inside = [k for k in per_module if k == prefix or k.startswith(prefix + ".")]
    outer = [k for k in inside if not any(k != o and k.startswith(o + ".") for o in inside)]
    return sum(per_module[k] for k in outer)


def teacher_forward(teachers, images: torch.Tensor) -> dict[str, int]:
    """Forward FLOPs of each teacher's batched encode."""
    return {task: count(lambda t=t: t.encode(images))[0] for task, t in teachers.teachers.items()}


def throughput(flops: int, seconds: float, peak_tflops: float | None) -> dict[str, Any]:
    """Achieved TFLOP/s and MFU (None without a peak)."""
    achieved = flops / seconds / 1e12
    return {"step_flops": flops, "achieved_tflops": achieved, "peak_tflops": peak_tflops,
            "mfu": achieved / peak_tflops if peak_tflops else None}
