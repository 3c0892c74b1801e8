"""`olavlm plan`: everything a person wants to know before asking for GPUs, from configs alone.

:func:`make_plan` builds the run's model (and teachers) on the meta device with olavlm's own
builders and returns a plain dict (the ``--json`` output): exact parameter counts per group,
predictor and stage; memory per GPU for DDP / ZeRO-2 / ZeRO-3 / FSDP; FLOPs per optimizer step
per component; the step count; the time at a stated MFU; target-cache and checkpoint sizes.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from olavlm.config import RunConfig, active_tasks
from olavlm.plan import flops as F
from olavlm.plan import memory as M
from olavlm.plan.counts import LLMDims, VisionDims, group_counts, nbytes, numel, predictor_counts, stage_counts, \
    trainable_split
from olavlm.plan.hardware import lookup
from olavlm.plan.meta import meta_model, meta_teachers, resolve_paths

log = logging.getLogger(__name__)

# Sizes of the public data files the recipes name (used when the file itself is not on this machine).
KNOWN_SAMPLES = {"blip_laion_cc_sbu_558k.json": 558_128, "llava_v1_5_mix665k.json": 665_298}
EXTRA_GROUPS = ("projector", "task_tokens", "predictors", "logit_scales")


def count_samples(train_file: str, override: int | None) -> tuple[int | None, str]:
    """(samples, where the number comes from)."""
    if override is not None:
        return override, "--samples"
    path = Path(train_file) if train_file else None
    if path is not None and path.is_file():
        if path.suffix == ".jsonl":
            with path.open() as f:
                return sum(1 for line in f if line.strip()), str(path)
        data = json.loads(path.read_text())
        return (len(data), str(path)) if isinstance(data, list) else (None, f"{path} is not a JSON list")
    if path is not None and path.name in KNOWN_SAMPLES:
        return KNOWN_SAMPLES[path.name], f"known size of {path.name} (file not on this machine)"
    return None, "unknown: data.train_file not found; pass --samples"


def _deepspeed_settings(path: str | None) -> dict[str, int]:
    if not path or not Path(path).is_file():
        return {}
    z = json.loads(Path(path).read_text()).get("zero_optimization", {})
    keys = {"reduce_bucket_size": "reduce_bucket", "allgather_bucket_size": "allgather_bucket",
            "stage3_max_live_parameters": "max_live"}
    return {ours: int(z[k]) for k, ours in keys.items() if isinstance(z.get(k), (int, float))}


def _static_inputs(model, stage: str, run: RunConfig, world: int) -> M.StaticInputs:
    from olavlm.model.io import decoder_of

    train, frozen = trainable_split(model, stage, run.train)
    train_ids = {id(p) for p in train}
    groups = model.param_groups()
    root = 4 * sum(numel(p for p in groups[g] if id(p) in train_ids) for g in EXTRA_GROUPS)
    _, layers = decoder_of(model.llm)
    layer = max(layers, key=lambda m: numel(m.parameters()))
    layer_params = list(layer.parameters())
    layer_trains = any(id(p) in train_ids for p in layer_params)
    return M.StaticInputs(
        world=world, trainable=numel(train), frozen=numel(frozen), frozen_bytes=nbytes(frozen), root_bytes=root,
        largest_layer=numel(layer_params),
        largest_layer_bytes=4 * numel(layer_params) if layer_trains else nbytes(layer_params),
        weight_bytes=2 if run.train.bf16 else 4, autocast_copies=run.train.bf16,
        **_deepspeed_settings(run.train.deepspeed))


def _checkpoints(model, stage: str, run: RunConfig) -> dict[str, Any]:
    """Bytes of one periodic checkpoint per engine and of ``final/``."""
    train, frozen = trainable_split(model, stage, run.train)
    pt = numel(train)
    w = 2 if run.train.bf16 else 4
    final_plain = nbytes(frozen) + 4 * pt  # trainables are fp32 master weights at the end
    final_ds = w * (numel(frozen) + pt)  # DeepSpeed holds every weight in its bf16 module
    return {"periodic": {"ddp": 12 * pt, "fsdp": 12 * pt, "deepspeed": (w + 12) * pt},
            "final": {"ddp": final_plain, "fsdp": final_plain, "deepspeed": final_ds},
            "keep_last": run.train.keep_last}


@dataclass
class _Run:
    """What every section of the plan reads: the configs, the meta models and the batch shape."""

    run: RunConfig
    mcfg: Any  # the ModelConfig with hub ids resolved to local config folders
    world: int
    notes: list[str]
    models: dict[str, Any]  # stage -> the meta model that stage trains
    model: Any  # models[run.train.stage]
    with_pred: Any  # every task with layers (counts, cache)
    llm: LLMDims
    vis: VisionDims
    length: int  # sequence length the memory and FLOPs are computed at
    accum: int | None  # gradient accumulation steps (None: the batch does not divide)
    tdtype: torch.dtype  # teacher dtype
    online: bool  # teachers run live (no cache, or cache misses filled online)
    teachers: Any  # meta TeacherSet or None

    @property
    def online_teachers(self) -> list:
        return list(self.teachers.teachers.values()) if (self.teachers and self.online) else []

    @property
    def supervised(self) -> int:
        return max(1, self.length - self.model.tokens_per_image)


def _setup(run: RunConfig, world: int, seq_len: int | None, hub_configs, notes: list[str]) -> _Run:
    from olavlm.teachers.targets import target_mode, teacher_dtype
    from olavlm.train.stages import STAGES

    t, d = run.train, run.data
    mcfg = resolve_paths(run.model, hub_configs)
    with_pred = meta_model(mcfg, with_predictors=True, notes=notes)
    built: dict[tuple[str, ...], Any] = {}

    def stage_model(stage: str):
        """The model ``stage`` trains: the predictors of its active tasks only (PT: OLA's, IFT: VIRAL's)."""
        active = tuple(active_tasks(mcfg, stage))
        if active not in built:
            built[active] = meta_model(mcfg, with_predictors=bool(active), tasks=list(active))
        return built[active]

    models = {s: stage_model(s) for s in STAGES}
    model = models[t.stage]
    micro = t.micro_batch_size
    accum = t.global_batch_size // (micro * world) if t.global_batch_size % (micro * world) == 0 else None
    if accum is None:
        notes.append(f"train.global_batch_size {t.global_batch_size} is not divisible by micro {micro} x world "
                     f"{world}: the run would refuse to start")
    tdtype = teacher_dtype(run)
    online = bool(model.target_shapes) and target_mode(d) != "cache"  # teachers run: live or cache+live
    teachers = meta_teachers(model.cfg, model.geometry.grid, tdtype, model.target_shapes,
                             tasks=list(model.predictors)) if model.target_shapes else None
    return _Run(run=run, mcfg=mcfg, world=world, notes=notes, models=models, model=model, with_pred=with_pred,
                llm=LLMDims.of(model.llm), vis=VisionDims.of(model.vision, mcfg.vision_type),
                length=seq_len or d.max_length, accum=accum, tdtype=tdtype, online=online, teachers=teachers)


def _parameters(r: _Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parameter counts per group / predictor / stage, the teachers' facts)."""
    from olavlm.train.stages import STAGES

    params = {"groups": {g: vars(c) for g, c in group_counts(r.model).items()},
              "predictors": predictor_counts(r.with_pred), "total": numel(r.model.parameters()),
              "stages": {s: stage_counts(r.models[s], s, r.run.train) for s in STAGES}}
    teacher_info = {task: {"class": type(tt).__name__, "source": tt.source, "params": numel(tt.parameters()),
                           "dtype": str(r.tdtype).replace("torch.", ""), "input_size": tt.input_size,
                           "target_shape": list(tt.target_shape), "online": r.online}
                    for task, tt in (r.teachers.teachers.items() if r.teachers else [])}
    return params, teacher_info


def _memory(r: _Run, device) -> dict[str, Any]:
    """Memory per GPU for each engine, and whether it fits ``device``."""
    t = r.run.train
    act_bytes = 2 if t.bf16 else 4
    common = dict(llm=r.llm, vision=r.vis, predictors=predictor_counts(r.model), stage=t.stage,
                  batch=t.micro_batch_size, length=r.length, act_bytes=act_bytes)
    act, act_ckpt = M.activations(**common, checkpointing=False), M.activations(**common, checkpointing=True)
    t_weights = sum(nbytes(tt.parameters()) for tt in r.online_teachers)
    static = M.static_memory(_static_inputs(r.model, t.stage, r.run, r.world))
    memory = M.per_gpu(static, act, act_ckpt, t_weights,
                       M.teacher_transient(r.online_teachers, t.micro_batch_size, act_bytes))
    for engine in memory.values():
        key = "total_ckpt" if t.gradient_checkpointing else "total"
        engine["fits"] = engine[key] <= device.memory_bytes
    return memory


def _flops(r: _Run) -> dict[str, Any]:
    """FLOPs of one micro-batch forward, of one optimizer step per component, and the recompute."""
    t, model = r.run.train, r.model
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.projector.modules())
    mb = F.micro_batch_flops(llm=r.llm, vision=r.vis, projector=(r.vis.hidden, r.llm.hidden, linears),
                             predictors=predictor_counts(model), stage=t.stage, length=r.length,
                             supervised=r.supervised, batch=t.micro_batch_size, world=r.world,
                             image_tokens=model.num_image_tokens, teachers=r.online_teachers,
                             vision_trains=t.unfreeze_vision_tower)
    per_step = (r.accum or 0) * r.world
    step = {k: v * per_step for k, v in mb["train"].items()}
    body = F.llm_forward(r.llm, r.length, r.supervised)
    recompute = per_step * t.micro_batch_size * (body["matmul"] + body["attention"]) if t.gradient_checkpointing else 0
    return {"per_micro_batch_forward": mb["forward"], "per_step": step, "total_per_step": F.total(step),
            "recompute_per_step": recompute}


def _steps_and_time(r: _Run, flops: dict[str, Any], device, mfu: float, samples: int | None):
    """(the step count and where the sample count comes from, the time at ``mfu``)."""
    t = r.run.train
    n, source = count_samples(r.run.data.train_file, samples)
    steps_per_epoch = math.ceil(n / t.global_batch_size) if n else None
    total_steps = t.max_steps or (steps_per_epoch * t.epochs if steps_per_epoch else None)
    step_flops = flops["total_per_step"]
    sec = step_flops / (r.world * device.bf16_tflops * 1e12 * mfu) if step_flops else None
    time_info = {"mfu": mfu, "peak_tflops_per_gpu": device.bf16_tflops, "seconds_per_step": sec,
                 "hours_total": sec * total_steps / 3600 if sec and total_steps else None,
                 "gpu_hours_total": sec * total_steps * r.world / 3600 if sec and total_steps else None}
    steps = {"samples": n, "samples_source": source, "steps_per_epoch": steps_per_epoch, "epochs": t.epochs,
             "total": total_steps}
    return steps, time_info


def _target_cache(r: _Run, images: int | None) -> dict[str, Any]:
    """Size of the target cache of the tasks this stage trains (PT: OLA's; IFT: VIRAL's)."""
    elem = torch.empty((), dtype=r.tdtype).element_size()
    shapes = r.model.target_shapes
    per_image = sum(math.prod(s) for s in shapes.values()) * elem
    return {"bytes_per_image": per_image, "dtype": str(r.tdtype).replace("torch.", ""),
            "images": images if shapes else None, "bytes": per_image * images if (images and shapes) else None,
            "shapes": {k: list(s) for k, s in shapes.items()}}


def make_plan(run: RunConfig, *, gpus: int = 8, nodes: int = 1, gpu: str = "h100", mfu: float = 0.4,
              peak_tflops: float | None = None, gpu_memory: float | None = None, seq_len: int | None = None,
              samples: int | None = None, hub_configs: str | Path | None = None,
              config_path: str | None = None) -> dict[str, Any]:
    notes: list[str] = []
    device = lookup(gpu, peak_tflops=peak_tflops, memory_gib=gpu_memory)
    r = _setup(run, gpus * nodes, seq_len, hub_configs, notes)
    t, model, mcfg = run.train, r.model, r.mcfg
    params, teacher_info = _parameters(r)
    memory = _memory(r, device)
    flops = _flops(r)
    steps, time_info = _steps_and_time(r, flops, device, mfu, samples)
    if r.length == run.data.max_length:
        notes.append(f"sequence length = data.max_length ({r.length}), the longest sample the run accepts: memory "
                     "and time are upper bounds; pass --seq-len with your data's typical expanded length")
    return {
        "config": config_path, "stage": t.stage, "engine": "deepspeed" if t.deepspeed else "fsdp" if t.fsdp else "ddp",
        "world": {"gpus_per_node": gpus, "nodes": nodes, "world_size": r.world},
        "gpu": {"key": gpu, "name": device.name, "bf16_tflops": device.bf16_tflops, "memory_gib": device.memory_gib},
        "model": {"llm": mcfg.llm, "vision_tower": mcfg.vision_tower, "llm_dims": vars(r.llm),
                  "vision_dims": vars(r.vis), "image_tokens": model.num_image_tokens,
                  "tokens_per_image": model.tokens_per_image, "dtype": mcfg.dtype},
        "parameters": params, "teachers": teacher_info,
        "batch": {"micro": t.micro_batch_size, "global": t.global_batch_size, "accumulation": r.accum,
                  "sequence_length": r.length, "supervised_positions": r.supervised,
                  "activation_bytes": 2 if t.bf16 else 4, "gradient_checkpointing": t.gradient_checkpointing},
        "memory": memory, "flops": flops, "steps": steps, "time": time_info,
        "target_cache": _target_cache(r, steps["samples"]), "checkpoints": _checkpoints(model, t.stage, run),
        "notes": notes,
    }
