"""Atomic, verified, rotating training checkpoints and exact resume.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step-00000200/``::

    state.json              TrainState: step, epoch, position inside the epoch, counters (checked strictly)
    config.json             the run configuration it was written under (resume reports changed fields)
    trainable.safetensors   the trainable parameters only (frozen LLM / tower weights are not copied)
    optimizer.pt            optimizer state (plain / DDP engines): tensors and numbers only
    scheduler.pt            LR scheduler state: numbers only
    rng/rank<R>.json        python / numpy / torch (CPU + CUDA) RNG states of every rank, as JSON
    engine/                 DeepSpeed or FSDP engines: their sharded states (``engine.save_engine_state``)
                            instead of trainable.safetensors + optimizer.pt (frozen weights excluded)
    manifest.json           size and sha256 of every file above (see manifest.py)
    complete                marker, written last

Nothing in a checkpoint is unpickled: ``.pt`` files load with ``torch.load(weights_only=True)``,
and while Accelerate / DeepSpeed read ``engine/`` every ``torch.load`` is forced to
``weights_only=True`` too (:func:`weights_only_loads`). A file holding anything else is refused
with a one-line :class:`CheckpointError`, so a planted payload never runs.

Writing: everything goes to ``checkpoints/.tmp-step-<N>-<pid>/``; every file is hashed and fsynced,
the manifest is written and fsynced, then the marker; the folder is renamed into place
(``os.replace``) and the parent directory fsynced. A process killed while writing leaves the
previous checkpoints untouched and only its temporary folder behind. Choosing what to resume from
(verification, fallback past damaged checkpoints) is in ``olavlm.train.rundir``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from olavlm.errors import UserError, read_json_object
from olavlm.train import manifest, rng

log = logging.getLogger(__name__)

PREFIX = "step-"  # checkpoint folder name: step-<8-digit optimizer step>
TMP_PREFIX = ".tmp-"  # in-progress folders (.tmp-step-<N>-<pid>), never picked by resume
MARKER = "complete"  # written last inside a checkpoint
CONFIG = "config.json"


class CheckpointError(UserError):
    """A checkpoint that is damaged, unsafe to load, or does not fit this run; names the file."""


@dataclass
class TrainState:
    """Where training stands; everything besides tensors that resume needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done inside ``epoch`` (sampler position = this x accum)
    samples: int = 0  # samples consumed over all ranks
    tokens: int = 0  # sequence tokens (after image expansion) over all ranks
    wall_time: float = 0.0  # seconds spent in the loop over all invocations
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples replaced, by reason (all ranks)
    world_size: int = 1  # processes when written (resume under another size is allowed, not exact)
    accumulation: int = 1  # micro-batches per optimizer step when written

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "state.json") -> "TrainState":
        """Parse strictly: every field present, nothing unknown, integers >= 0 (sizes >= 1)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{source}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing, unknown = [n for n in names if n not in data], sorted(set(data) - set(names))
        if missing or unknown:
            raise CheckpointError(f"{source}: " + "; ".join(
                ([f"missing field(s) {', '.join(missing)}"] if missing else [])
                + ([f"unknown field(s) {', '.join(unknown)}"] if unknown else [])))
        for name in ("step", "epoch", "step_in_epoch", "samples", "tokens", "world_size", "accumulation"):
            low = 1 if name in ("world_size", "accumulation") else 0
            if type(data[name]) is not int or data[name] < low:
                raise CheckpointError(f"{source}: {name} must be an integer >= {low}, got {data[name]!r}")
        wall = data["wall_time"]
        if type(wall) not in (int, float) or not math.isfinite(wall) or wall < 0:
            raise CheckpointError(f"{source}: wall_time must be a number >= 0, got {wall!r}")
        skipped = data["skipped"]
        if not isinstance(skipped, dict) or not all(type(v) is int and v >= 0 for v in skipped.values()):
            raise CheckpointError(f"{source}: skipped must map reasons to integers >= 0, got {skipped!r}")
        return cls(**{**data, "wall_time": float(wall)})


# -- finding checkpoints ------------------------------------------------------------------------


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "state.json").is_file()


def step_of(path: Path) -> int | None:
    """The step in a ``step-<N>`` folder name, None for other names."""
    if not path.name.startswith(PREFIX):
        return None
    try:
        return int(path.name[len(PREFIX):])
    except ValueError:
        return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints of a run that carry the completion marker, oldest first (not yet verified)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := step_of(p)) is not None and is_complete(p)]
    return [p for _, p in sorted(found)]


def read_state(path: Path) -> TrainState:
    """The checkpoint's TrainState, checked strictly and against the folder's step."""
    file = path / "state.json"
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: cannot be read ({type(e).__name__})") from None
    state = TrainState.from_json(text, source=str(file))
    if step_of(path) is not None and state.step != step_of(path):
        raise CheckpointError(f"{file}: step {state.step} does not match the folder name {path.name}")
    return state


def read_config(path: Path) -> dict[str, Any]:
    """The configuration a checkpoint was written under (``config.json``)."""
    return read_json_object(path / CONFIG, CheckpointError)


def verify(path: Path, accelerator=None) -> str | None:
    """Full check of one checkpoint (same verdict on every rank): marker, manifest, sizes and sha256
    of every file, and the JSON files' contents. None when intact, else one line naming the file."""
    main = accelerator is None or accelerator.is_main_process
    if manifest.broadcast(not (path / MARKER).is_file() if main else None, accelerator):
        return f"{MARKER} marker is missing"
    problem = manifest.verify(path, accelerator, skip=(MARKER,))
    if problem is None and main:
        try:
            read_state(path)
            for file in sorted((path / "rng").glob("rank*.json")):
                parse_rng(file)
            if (path / CONFIG).exists():
                read_config(path)
        except CheckpointError as e:
            problem = str(e).replace(f"{path}/", "")
    return manifest.broadcast(problem, accelerator)


# -- RNG ------------------------------------------------------------------------------------------


def parse_rng(file: Path) -> dict[str, Any]:
    """A saved RNG file (``rng/rank<R>.json``), checked; see olavlm.train.rng."""
    try:
        return rng.parse(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: not a valid RNG state ({e})") from None


def restore_rng(path: str | Path, rank: int) -> None:
    """Set this rank's RNG states to the checkpoint's (call right before the first resumed step)."""
    file = Path(path) / "rng" / f"rank{rank}.json"
    if not file.is_file():
        log.warning("%s missing: rank %d keeps its fresh RNG state", file, rank)
        return
    rng.apply(parse_rng(file))


# -- pickle-free loading ----------------------------------------------------------------------------


def _refusal(file: Path, error: Exception) -> CheckpointError:
    """One line for a file ``torch.load(weights_only=True)`` would not read."""
    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        return CheckpointError(f"{file}: refused, it holds Python objects{what} besides tensors and numbers, "
                               "and loading it could run code")
    return CheckpointError(f"{file}: cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:200]})")


def load_torch_file(file: Path) -> Any:
    """A ``.pt`` file of tensors, numbers, strings and containers (never arbitrary objects)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to read is a damaged or foreign file: name it
        raise _refusal(file, e) from None


def _engine_safe_classes() -> list[Any]:
    """Plain-data classes DeepSpeed stores in its optimizer states (loss scaler settings, ZeRO stage
    enum, fragment addresses): allowed attribute containers, none runs code when rebuilt. Empty
    unless DeepSpeed is in use (already imported)."""
    if "deepspeed" not in sys.modules:
        return []
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every ``torch.load`` (Accelerate's and DeepSpeed's included, which ask for
    ``weights_only=False``) runs with ``weights_only=True``."""
    real = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(_engine_safe_classes()):
            yield
    finally:
        torch.load = real


# -- trainable weights ----------------------------------------------------------------------------


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Named trainable parameters (CPU copies), the unit plain checkpoints store."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved trainable weights into ``model``; the saved and current trainable names must match."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{source}: trainable parameters differ from the checkpoint (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}); was it written by another stage or config?")
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if t.shape != p.shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(t.shape)}, model has {tuple(p.shape)}")
            p.copy_(t.to(device=p.device, dtype=p.dtype))


# -- save / load ------------------------------------------------------------------------------------


def save_due(step: int, save_every: int | None, total_steps: int, *, stopping: bool = False) -> bool:
    """A checkpoint after this optimizer step: every ``save_every`` steps before the last (the last
    writes final/ instead), and when the run stops early (``stopping``)."""
    return stopping or bool(save_every and step % save_every == 0 and step < total_steps)


def at_epoch_boundary(state: TrainState, steps_per_epoch: int) -> TrainState:
    """The state as resume must see it: an epoch finished exactly here continues at the next one."""
    if state.step_in_epoch < steps_per_epoch:
        return state
    return TrainState(**{**vars(state), "epoch": state.epoch + 1, "step_in_epoch": 0, "skipped": dict(state.skipped)})


def save_checkpoint(accelerator, model, optimizer, scheduler, state: TrainState, output_dir: str | Path,
                    *, keep_last: int, engine_state: bool, config: dict | None = None) -> Path:
    """Write a checkpoint for ``state.step`` atomically and durably on all ranks and drop the oldest
    beyond ``keep_last``. ``engine_state`` (DeepSpeed / FSDP) delegates model + optimizer to Accelerate."""
    from safetensors.torch import save_file

    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{state.step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}-{manifest.broadcast(os.getpid(), accelerator)}"  # the writer's pid
    main = accelerator.is_main_process
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    accelerator.wait_for_everyone()
    if engine_state:
        from olavlm.train.engine import save_engine_state

        save_engine_state(accelerator, model, optimizer, tmp / "engine")
    elif main:
        save_file(trainable_state_dict(accelerator.unwrap_model(model)), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(state.to_json())
        if config is not None:
            (tmp / CONFIG).write_text(json.dumps(config, indent=1))
    (tmp / "rng" / f"rank{accelerator.process_index}.json").write_text(json.dumps(rng.capture()))
    accelerator.wait_for_everyone()
    manifest.write_manifest(tmp, accelerator, skip=(MARKER,))  # hashes + fsyncs every file, then the manifest
    if main:
        manifest.write_durable(tmp / MARKER, f"step {state.step}\n")
        manifest.fsync_path(tmp)
        if final.exists():  # re-saving the same step (e.g. stop right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        manifest.fsync_path(root)
        _rotate(root, keep_last)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _rotate(root: Path, keep_last: int) -> None:
    done = list_checkpoints(root.parent)
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # leftovers of killed writers (the run-dir lock excludes live ones)
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: str | Path, accelerator, model, optimizer, scheduler, *, engine_state: bool) -> TrainState:
    """Restore weights, optimizer and scheduler (not RNG: see :func:`restore_rng`) from ``path``,
    without unpickling anything. Integrity is checked before (:func:`verify`); here each file's
    content is checked as it is read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint")
    state = read_state(path)
    if engine_state:
        if not (path / "engine").is_dir():
            raise CheckpointError(f"{path}: written without DeepSpeed/FSDP (no engine/ folder); "
                                  "resume with the same engine")
        from olavlm.train.engine import load_engine_state

        try:
            with weights_only_loads():
                load_engine_state(accelerator, model, optimizer, path / "engine")
        except Exception as e:  # DeepSpeed / Accelerate / torch.distributed.checkpoint raise many types
            raise _refusal(path / "engine", e) from None
    else:
        weights = path / "trainable.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{path}: written by a DeepSpeed/FSDP run (engine/ folder); "
                                  "resume with the same engine")
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{weights}: cannot be read ({e})") from None
        load_trainable_state_dict(accelerator.unwrap_model(model), tensors, str(path))
        _load_into(optimizer, path / "optimizer.pt")
    _load_into(scheduler, path / "scheduler.pt")
    if state.world_size != accelerator.num_processes:
        log.warning("%s was written by %d processes, resuming with %d: the data position is kept by optimizer "
                    "step, RNG streams are not", path, state.world_size, accelerator.num_processes)
    return state


def _load_into(obj, file: Path) -> None:
    """``obj.load_state_dict`` from a weights-only file; a state that does not fit is a CheckpointError."""
    data = load_torch_file(file)
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a state dict, got {type(data).__name__}")
    try:
        obj.load_state_dict(data)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: does not fit this run's {type(obj).__name__} ({e})") from None

