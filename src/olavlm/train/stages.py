"""What trains in each stage (docs/method.md, "Stages"): the ONE place that states the policy.

=========  =================================================================================
stage      trainable parameter groups (``model.param_groups()``)
=========  =================================================================================
``pt``     projector + predictors + task_tokens + logit_scales (LLM and vision tower frozen)
``vpt``    llm + projector (NTP only; task tokens frozen, predictors dropped)
``ift``    llm + projector (same as vpt)
``probe``  probes only: one per (task, layer) on the frozen model (LLM, tower, projector and task
           tokens frozen; the overrides below are refused)
=========  =================================================================================

Auxiliary tasks are active in the stages ``model.tasks.<name>.stages`` names (None = the kind's
default: embedding/OLA tasks in ``pt``, alignment/VIRAL tasks in ``ift``). An alignment task
active in ``vpt``/``ift`` adds its fresh projector ("predictors" group) to what trains there.

With ``train.lora`` the ``lora`` group (peft adapters, see olavlm.model.lora) trains instead of
``llm``, whose base weights stay frozen.

Overrides: ``train.freeze_task_tokens`` (None = stage default: trainable in PT, frozen after,
docs/method.md, "One task-token policy in every stage") and ``train.unfreeze_vision_tower`` (adds the vision tower in any stage).
VPT/IFT models are built or loaded ``with_predictors=False``; a model that still carries predictor
or logit-scale parameters there is refused instead of silently training dead weights.
"""

from __future__ import annotations

import logging
import typing
from typing import Iterable

from torch import nn

from olavlm.config import (ConfigError, ModelConfig, Stage, TaskConfig, TrainConfig,  # noqa: F401
                           active_tasks, task_stages)  # active_tasks re-exported

log = logging.getLogger(__name__)

STAGES = typing.get_args(Stage)  # ("pt", "vpt", "ift", "probe")
GROUPS = ("llm", "lora", "vision", "projector", "task_tokens", "predictors", "logit_scales", "probes")
# groups each stage trains by default (before the two overrides)
_DEFAULT = {
    "pt": {"projector", "predictors", "task_tokens", "logit_scales"},
    "vpt": {"llm", "projector"},
    "ift": {"llm", "projector"},
    "probe": {"probes"},
}


def uses_predictors(stage: str) -> bool:
    """Whether a stage builds/loads the embedding predictors and needs teacher targets (PT only)."""
    _check_stage(stage)
    return stage == "pt"


def stage_model_config(saved: ModelConfig, recipe: ModelConfig, stage: str) -> ModelConfig:
    """A VPT/IFT model config loaded from ``train.init_from`` plus the recipe's alignment tasks
    active in ``stage`` (they are new in this stage; the saved tasks stay as saved)."""
    import copy

    if stage != "pt":
        saved.tasks.update({n: copy.deepcopy(t) for n, t in active_tasks(recipe, stage).items()})
    return saved


def uses_teachers(stage: str) -> bool:
    """Whether a stage needs teacher targets (live or cached): PT and the probe stage."""
    _check_stage(stage)
    return stage in ("pt", "probe")


def trainable_groups(stage: str, train_cfg: TrainConfig) -> set[str]:
    """The parameter groups that train in ``stage`` after applying the config overrides."""
    _check_stage(stage)
    groups = set(_DEFAULT[stage])
    if stage == "probe":  # the probed model stays exactly as trained
        if train_cfg.freeze_task_tokens is False or train_cfg.unfreeze_vision_tower:
            raise ConfigError("train.stage probe trains the probes only: unset train.freeze_task_tokens=false "
                              "and train.unfreeze_vision_tower")
        return groups
    if train_cfg.freeze_task_tokens is True:
        groups.discard("task_tokens")
    elif train_cfg.freeze_task_tokens is False:
        groups.add("task_tokens")
    if train_cfg.unfreeze_vision_tower:
        groups.add("vision")
    if getattr(train_cfg, "lora", None) is not None and "llm" in groups:
        groups.discard("llm")
        groups.add("lora")
    return groups


def configure_trainable(model: nn.Module, stage: str, train_cfg: TrainConfig) -> dict[str, int]:
    """Set ``requires_grad`` on every parameter of ``model`` per the stage policy.

    Returns ``{group: number of trainable elements}`` for every group of ``model.param_groups()``
    (0 for frozen groups) and logs a table of trainable / total counts per group.
    Parameters that belong to no group are frozen (and reported as ``other``).
    """
    groups: dict[str, list[nn.Parameter]] = model.param_groups()
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"model.param_groups() returned unknown group(s) {unknown}; known: {list(GROUPS)}")
    wanted = trainable_groups(stage, train_cfg)
    if stage != "pt":
        predictors = getattr(model, "predictors", None)
        carried = list(predictors) if isinstance(predictors, nn.ModuleDict) else []
        active = active_tasks(model.cfg, stage) if carried else {}
        stray = [t for t in carried if t not in active]
        leftover = [g for g in ("logit_scales",) if _numel(groups.get(g, []))]
        leftover += ["predictors"] if stray or (not carried and _numel(groups.get("predictors", []))) else []
        if leftover:
            raise ValueError(
                f"stage {stage!r} trains NTP and its active alignment tasks only, but the model carries "
                f"{leftover} parameters ({stray or 'not of an active task'}); build or load it with "
                "with_predictors=False")
        if active:
            wanted.add("predictors")  # the alignment projectors of the tasks active in this stage

    if "lora" in wanted and not _numel(groups.get("lora", [])):
        raise ValueError("train.lora is set but the model has no LoRA adapters (olavlm.model.lora.apply_lora)")
    model.requires_grad_(False)
    seen: set[int] = set()
    counts: dict[str, int] = {}
    totals: dict[str, int] = {}
    for name in (g for g in GROUPS if g in groups):  # only the groups this model has
        params = [p for p in groups[name] if id(p) not in seen]
        seen.update(id(p) for p in params)
        train = name in wanted
        for p in params:
            p.requires_grad_(train)
        totals[name] = _numel(params)
        counts[name] = totals[name] if train else 0
    other = [p for p in model.parameters() if id(p) not in seen]
    totals["other"], counts["other"] = _numel(other), 0

    width = max(len(g) for g in totals)
    lines = [f"  {g:<{width}}  {counts[g]:>14,} / {totals[g]:>14,}" for g in totals if totals[g]]
    log.info("stage %s: trainable / total parameters per group\n%s\n  %-*s  %14s / %14s", stage,
             "\n".join(lines), width, "total", f"{sum(counts.values()):,}", f"{sum(totals.values()):,}")
    for name in ("other", "lora"):  # reported only when the model has them
        if not totals.get(name):
            counts.pop(name, None)
    return counts


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer gets (after :func:`configure_trainable`), deduplicated."""
    out, seen = [], set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    if not out:
        raise ValueError("no trainable parameters: check train.stage and the freezing options")
    return out


def _numel(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ConfigError(f"train.stage: {stage!r} is not one of {list(STAGES)}")
