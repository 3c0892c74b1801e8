"""The distributed engine around the loop: Accelerate with DDP, DeepSpeed ZeRO or FSDP.

One command runs everywhere: plain ``python``/``olavlm train`` (one process), ``torchrun`` or
``accelerate launch`` (DDP by default; ``train.deepspeed: configs/deepspeed/zero2.json`` or
``train.fsdp: true`` switch the engine). Batches never pass through Accelerate's dataloader
wrapper: each rank reads its own slice from our batch sampler.

Tested on CPU (gloo, two processes): single process, DDP, DeepSpeed ZeRO-2 (VPT/IFT/PT) and
ZeRO-3 (IFT/PT, parameters partitioned down to the smallest; PT equals ZeRO-2; resume), FSDP
(PT/IFT, resume). Under ZeRO-3 the teachers are loaded unpartitioned (:func:`unpartitioned_loading`),
OlaVLM keeps its ranks in lockstep (``olavlm.model.lockstep``), and ``TrainResult.model`` keeps
partitioned parameters (``deepspeed.zero.GatheredParameters`` reads them whole).

FSDP is torch's FSDP2 (``fully_shard``) applied here, the same way on CPUs (gloo) and GPUs (NCCL):
Accelerate's own FSDP plugin only engages on GPUs, so Accelerate runs its plain multi-process mode
(autocast, accumulation, clipping) and :func:`prepare` shards the model instead of wrapping it in
DDP. Sharding units are the modules OlaVLM calls: every decoder layer, the decoder (final norm),
the input embeddings, the LM head, the vision tower, and the root (projector, task tokens,
predictors, logit scales); each unit holds one dtype (trainables fp32, frozen weights in
``model.dtype``). Checkpoints are sharded ``torch.distributed.checkpoint`` folders of the trainable
parameters and the optimizer (every rank writes its shard); ``final/`` is written from the
gathered parameters (:func:`full_parameters`); ``TrainResult.model`` stays sharded (:func:`unsharded`
gathers it). More in docs/cluster.md.
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
    """Parameter dtypes for training: fp32 master weights of the trainable parameters under autocast
    (DDP, FSDP, one process; frozen weights stay in ``model.dtype``); DeepSpeed keeps its own fp32
    master copy (left as loaded)."""
    if not t.deepspeed:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()


def build_accelerator(t: TrainConfig, accum: int, *, no_split_modules: list[str] | None = None):
    """Accelerator for the configured engine; tf32 on CUDA; bf16 autocast when ``train.bf16``.
    (``no_split_modules`` is ignored: FSDP units are chosen by :func:`shard`.)"""
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


def check_shared_run_dir(accelerator, run_dir: Path) -> None:
    """Every rank must see the run directory the main process created: checkpoints are written by all
    ranks into one folder (RNG states, engine shards) that the main process then renames, so on
    several nodes ``train.output_dir`` has to be on a filesystem they share. One all-reduce."""
    if accelerator.num_processes == 1:
        return
    import uuid

    import torch.distributed as dist
    from accelerate.utils import broadcast_object_list

    token = broadcast_object_list([uuid.uuid4().hex if accelerator.is_main_process else None])[0]
    marker = Path(run_dir) / f".shared-check-{token}"
    if accelerator.is_main_process:
        marker.write_text(token)
    accelerator.wait_for_everyone()
    missing = torch.tensor([0.0 if marker.is_file() else 1.0], device=accelerator.device)
    dist.all_reduce(missing)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink()
    if missing.item():
        raise ConfigError(f"train.output_dir: {run_dir} is not shared by all ranks ({int(missing.item())} of "
                          f"{accelerator.num_processes} cannot see the main process's files); put it on a "
                          "filesystem every node mounts")


def uses_engine_state(accelerator) -> bool:
    """DeepSpeed and FSDP shard weights/optimizer: checkpoints go through :func:`save_engine_state`."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED or any(map(is_sharded, accelerator._models))


def is_deepspeed_zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


@contextlib.contextmanager
def full_parameters(accelerator, model):
    """Yields the model with full (gathered) parameters, e.g. to save it: ``accelerator.unwrap_model
    (model)`` itself for DDP / ZeRO-1/2, the same with its parameters gathered for ZeRO-3, and for
    FSDP an unsharded CPU copy on the main process (None on the others). Collective: every rank enters."""
    if is_deepspeed_zero3(accelerator):
        import deepspeed

        inner = accelerator.unwrap_model(model)
        with deepspeed.zero.GatheredParameters(list(inner.parameters()), modifier_rank=None):
            yield inner
    elif is_sharded(accelerator.unwrap_model(model)):
        yield whole_copy(accelerator.unwrap_model(model), main=accelerator.is_main_process)
    else:
        yield accelerator.unwrap_model(model)


# -- FSDP (torch fully_shard) ------------------------------------------------------------------------


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def fsdp_units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def whole_copy(model, *, main: bool):
    """An unsharded copy of an FSDP-sharded OlaVLM on the CPU for the main process (None elsewhere):
    the full state dict is gathered to it (collective) and assigned to a weight-free build of the
    same config, so no second copy of the weights is made."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from olavlm.plan.meta import meta_model

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    copy = meta_model(model.cfg, with_predictors=bool(len(model.predictors)))
    copy.load_state_dict(state, strict=True, assign=True)
    copy.cfg, copy.tokenizer, copy.max_length = model.cfg, model.tokenizer, model.max_length
    return copy


@contextlib.contextmanager
def unsharded(model):
    """Inside, every FSDP unit of ``model`` holds its whole parameters (collective: all ranks enter)."""
    units = fsdp_units(model)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def shard(model) -> None:
    """``fully_shard`` the units OlaVLM calls (see the module doc), innermost first, then the root."""
    from torch.distributed.fsdp import fully_shard

    from olavlm.model.io import decoder_of

    llm = model.llm
    head, emb = llm.get_output_embeddings(), llm.get_input_embeddings()
    if head is not None and head.weight is emb.weight:
        raise ConfigError(f"train.fsdp: {type(llm).__name__} ties its input and output embeddings, which olavlm "
                          "shards as separate units; train it with DDP or train.deepspeed")
    decoder, layers = decoder_of(llm)
    for unit in [*layers, emb, head, decoder, model.vision]:
        if unit is not None and any(True for _ in unit.parameters()):
            fully_shard(unit)
    fully_shard(model)


def prepare(accelerator, model, optimizer, t: TrainConfig):
    """``accelerator.prepare`` for DDP / DeepSpeed; for ``train.fsdp`` shard the model, point the
    (not yet stepped) optimizer's groups at the sharded parameters and let Accelerate add only
    device placement and autocast."""
    import torch.distributed as dist

    if not t.fsdp:
        return accelerator.prepare(model, optimizer)
    if not (dist.is_available() and dist.is_initialized()):
        log.warning("train.fsdp with one process: nothing to shard, the model trains whole")
        return accelerator.prepare(model, optimizer)
    if optimizer.state:
        raise RuntimeError("train.fsdp: the optimizer must not have stepped before the model is sharded")
    model.to(accelerator.device)
    names = {id(p): n for n, p in model.named_parameters()}
    before = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    shard(model)  # replaces every parameter by its sharded DTensor
    params = dict(model.named_parameters())
    for group, keys in zip(optimizer.param_groups, before):
        group["params"] = [params[k] for k in keys]
    model = accelerator.prepare_model(model, evaluation_mode=True)  # autocast + placement, no DDP wrapper
    return model, accelerator.prepare_optimizer(optimizer)


def save_engine_state(accelerator, model, optimizer, folder: Path) -> None:
    """Sharded state of a DeepSpeed or FSDP run, written by every rank into ``folder``: DeepSpeed's
    own format (frozen weights excluded) or a ``torch.distributed.checkpoint`` of the trainable
    parameters and the optimizer."""
    if not is_sharded(accelerator.unwrap_model(model)):
        accelerator.save_state(str(folder), exclude_frozen_parameters=True)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, _inner(optimizer), options=opts)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def load_engine_state(accelerator, model, optimizer, folder: Path) -> None:
    """Restore what :func:`save_engine_state` wrote (same engine, any rank count for FSDP)."""
    if not is_sharded(accelerator.unwrap_model(model)):
        accelerator.load_state(str(folder), load_module_strict=False)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    opts = StateDictOptions(ignore_frozen_params=True, strict=False)
    model_state, optim_state = get_state_dict(model, _inner(optimizer), options=opts)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, _inner(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=opts)


def _inner(optimizer):
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
