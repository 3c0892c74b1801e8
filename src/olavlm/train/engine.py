"""The distributed engine around the loop: Accelerate with DDP, DeepSpeed ZeRO or FSDP.

One command runs everywhere: plain ``python``/``olavlm train`` (one process), ``torchrun`` or
``accelerate launch`` (DDP by default; ``train.deepspeed: configs/deepspeed/zero2.json`` or
``train.fsdp: true`` switch the engine). Batches never pass through Accelerate's dataloader
wrapper: each rank reads its own slice from our batch sampler.

Tested on CPU (gloo, two processes): single process, DDP, DeepSpeed ZeRO-2 (VPT/IFT/PT) and
ZeRO-3 (IFT/PT, parameters partitioned down to the smallest; PT equals ZeRO-2; resume). Under ZeRO-3
the teachers are loaded unpartitioned (:func:`unpartitioned_loading`), OlaVLM keeps its ranks in
lockstep (``olavlm.model.lockstep``), and ``TrainResult.model`` keeps partitioned parameters
(``deepspeed.zero.GatheredParameters`` reads them whole). FSDP needs GPUs in Accelerate and has
not been run (no GPU where this was written).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from olavlm.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)


def world_size() -> int:
    """Number of processes of this launch, read from the launcher's environment (torchrun,
    accelerate launch, MPI) without initialising anything; the Accelerator later confirms it."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def _cpu_only(t: TrainConfig) -> bool:
    """No CUDA device: tell Accelerate, so torchrun on CPUs becomes MULTI_CPU (gloo) and not N single
    processes. DeepSpeed must not get the flag (Accelerate would silently drop the plugin); it runs
    its own CPU accelerator (DS_ACCELERATOR=cpu)."""
    return not torch.cuda.is_available() and not t.deepspeed


def accumulation_steps(global_batch: int, micro_batch: int, world: int) -> int:
    """Micro-batches per optimizer step so that micro x world x accum = global batch."""
    per_step = micro_batch * world
    if global_batch % per_step:
        raise ConfigError(
            f"train.global_batch_size: {global_batch} is not divisible by train.micro_batch_size x world size "
            f"= {micro_batch} x {world} = {per_step}; change the global or micro batch size")
    return global_batch // per_step


def apply_precision_policy(model, t: TrainConfig) -> None:
    """Parameter dtypes for training. FSDP flattens each wrapped unit into one tensor, so one dtype
    (fp32, sharded; bf16 compute under autocast); DDP / one process: fp32 master weights of the
    trainable parameters under autocast; DeepSpeed keeps its own fp32 master copy (left as loaded)."""
    if t.fsdp:
        model.float()
    elif not t.deepspeed:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()


def build_accelerator(t: TrainConfig, accum: int, *, no_split_modules: list[str] | None = None):
    """Accelerator for the configured engine; tf32 on CUDA; bf16 autocast when ``train.bf16``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # one process may train several stages in a row (ShapeWorld demo, tests): start each from a fresh
    # Accelerate state (precision, accumulation, plugins) while keeping the process group
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
    kwargs = {}
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    if t.deepspeed:
        kwargs["deepspeed_plugin"] = _deepspeed_plugin(t, accum)
        if not torch.cuda.is_available():  # DeepSpeed on CPUs: name the backend, or Accelerate counts 1 process
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    elif t.fsdp:
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            use_orig_params=True,  # frozen and trainable parameters share wrapped units
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=no_split_modules or None,
            activation_checkpointing=False,  # train.gradient_checkpointing is applied on the LLM itself
        )
    accelerator = Accelerator(
        cpu=_cpu_only(t),
        mixed_precision="bf16" if t.bf16 else "no",
        gradient_accumulation_steps=accum,
        step_scheduler_with_optimizer=False,  # the loop steps the scheduler once per optimizer step
        kwargs_handlers=handlers,
        **kwargs,
    )
    if accelerator.num_processes != world_size():
        raise RuntimeError(f"Accelerate sees {accelerator.num_processes} process(es) but the launcher started "
                           f"{world_size()}: check the launch command / accelerate config")
    return accelerator


def _deepspeed_plugin(t: TrainConfig, accum: int):
    from accelerate.utils import DeepSpeedPlugin

    path = Path(t.deepspeed)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed: {path} does not exist (ship-ready configs: configs/deepspeed/*.json)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed: {path} is not valid JSON: {e}") from e
    ds.setdefault("train_micro_batch_size_per_gpu", t.micro_batch_size)
    if ds["train_micro_batch_size_per_gpu"] == "auto":  # we do not hand Accelerate a dataloader to read it from
        ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    clip = ds.get("gradient_clipping", "auto")
    if clip != "auto" and t.max_grad_norm is not None and float(clip) != t.max_grad_norm:
        log.warning("train.deepspeed sets gradient_clipping=%s, train.max_grad_norm=%s is ignored", clip,
                    t.max_grad_norm)
    return DeepSpeedPlugin(hf_ds_config=ds, gradient_accumulation_steps=accum,
                           gradient_clipping=t.max_grad_norm if t.max_grad_norm is not None else 0.0)


@contextlib.contextmanager
def unpartitioned_loading(accelerator):
    """Inside, transformers' ``from_pretrained`` builds ordinary modules even under ZeRO-3.

    Accelerate registers its DeepSpeed config with transformers, which then partitions every model
    loaded while ZeRO-3 is configured (``deepspeed.zero.Init``). Models that never enter the engine
    (the frozen teachers) must keep their full weights on every rank; a no-op for other engines."""
    if not is_deepspeed_zero3(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    plugin = accelerator.state.deepspeed_plugin
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # the engine's own later loads (none today) see ZeRO-3 again


def uses_engine_state(accelerator) -> bool:
    """DeepSpeed and FSDP shard weights/optimizer: checkpoints go through ``accelerator.save_state``."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def is_deepspeed_zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


@contextlib.contextmanager
def full_parameters(accelerator, model):
    """Inside, ``accelerator.unwrap_model(model)`` holds full (gathered) parameters on every rank:
    a no-op for DDP / ZeRO-1/2, parameter gathering for ZeRO-3, ``summon_full_params`` for FSDP."""
    from accelerate.utils import DistributedType

    if is_deepspeed_zero3(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(accelerator.unwrap_model(model).parameters()), modifier_rank=None):
            yield
    elif accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False, rank0_only=False):
            yield
    else:
        yield
