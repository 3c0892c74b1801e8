"""The visual-representation distillation methods olavlm compares, as recipe chains (docs/methods.md).

* ``baseline``: PT with NTP only (task tokens kept, no predictors), then IFT with NTP only.
* ``ola`` (OLA-VLM): PT with NTP + embedding losses (Perceiver predictors, smooth-L1 + InfoNCE,
  depth/seg/gen teachers), then IFT with NTP only.
* ``viral`` (VIRAL-style): the baseline PT, then IFT with NTP + 0.5 x alignment loss (token-wise MLP
  at the image tokens of one layer, -cosine to patch-level teacher tokens).

:func:`shapeworld_plan` says which ``configs/shapeworld`` recipes a method runs and which overrides
the demo adds to them beyond its usual paths, so ``olavlm demo --compare`` can train and evaluate
the three side by side through the same ``stage_config`` / ``run_stage`` path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

METHODS = ("baseline", "ola", "viral")
EMBEDDING_TASKS = ("gen", "depth", "seg")  # the OLA tasks of configs/shapeworld/pt.yaml


@dataclass(frozen=True)
class ShapeWorldPlan:
    """The PT -> IFT chain of one method on ShapeWorld."""

    method: str
    pt_recipe: str  # file name in configs/shapeworld
    pt_embedding_losses: bool  # False: PT runs with model.tasks.{gen,depth,seg}.layers=[] (the baseline PT)
    ift_recipe: str
    ift_world_tasks: tuple[str, ...] = ()  # IFT tasks whose teacher reads the world folder (teacher_path)
    probe_tasks: tuple[str, ...] = ()  # extra tasks to probe on the IFT model (besides the demo's own)

    def pt_overrides(self) -> list[str]:
        """Overrides for the PT recipe beyond the demo's paths."""
        return [] if self.pt_embedding_losses else [f"model.tasks.{t}.layers=[]" for t in EMBEDDING_TASKS]

    def ift_overrides(self, world: str | Path) -> list[str]:
        """Overrides for the IFT recipe beyond the demo's paths (the world folder of its teachers)."""
        return [f"model.tasks.{t}.teacher_path={world}" for t in self.ift_world_tasks]


_PLANS = {
    "baseline": ShapeWorldPlan("baseline", "pt.yaml", False, "ift.yaml"),
    "ola": ShapeWorldPlan("ola", "pt.yaml", True, "ift.yaml"),
    "viral": ShapeWorldPlan("viral", "pt.yaml", False, "viral_ift.yaml", ift_world_tasks=("viral",),
                            probe_tasks=("viral",)),
}


def shapeworld_plan(method: str) -> ShapeWorldPlan:
    """The recipes and extra overrides of ``method`` (one of :data:`METHODS`) on ShapeWorld."""
    if method not in _PLANS:
        raise ValueError(f"method {method!r} is not one of {list(METHODS)}")
    return _PLANS[method]


def shapeworld_stage_overrides(method: str, stage: str, world: str | Path) -> tuple[str, list[str]]:
    """(recipe file name in configs/shapeworld, extra overrides) of ``method``'s ``stage`` ("pt" | "ift")."""
    plan = shapeworld_plan(method)
    if stage == "pt":
        return plan.pt_recipe, plan.pt_overrides()
    if stage == "ift":
        return plan.ift_recipe, plan.ift_overrides(world)
    raise ValueError(f"stage {stage!r} is not 'pt' or 'ift'")
