"""Atomic, rotating training checkpoints and exact resume (issue 5 part 5).

Layout of one checkpoint, ``RUN_DIR/checkpoints/step-00000200/``::

    state.json              TrainState: step, epoch, position inside the epoch, counters
    trainable.safetensors   the trainable parameters only (frozen LLM / tower weights are not copied)
    optimizer.pt            optimizer state (plain / DDP engines)
    scheduler.pt            LR scheduler state
    rng/rank<R>.pt          python / numpy / torch (CPU + CUDA) RNG states of every rank
    engine/                 DeepSpeed or FSDP engines: their sharded states (``engine.save_engine_state``)
                            instead of trainable.safetensors + optimizer.pt (frozen weights excluded)
    complete                marker, written last

Everything is first written to ``checkpoints/.tmp-step-<N>/`` and then renamed into place
(``os.replace``), so a process killed while writing leaves the previous checkpoints untouched and
only a temporary folder behind; ``--resume auto`` picks the newest folder that has the marker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PREFIX = "step-"  # checkpoint folder name: step-<8-digit optimizer step>
TMP_PREFIX = ".tmp-"  # in-progress folders, never picked by resume
MARKER = "complete"  # written last inside a checkpoint


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
    def from_json(cls, text: str) -> "TrainState":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# -- finding checkpoints ------------------------------------------------------------------------


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "state.json").is_file()


def _step_of(path: Path) -> int | None:
    if not path.name.startswith(PREFIX):
        return None
    try:
        return int(path.name[len(PREFIX):])
    except ValueError:
        return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := _step_of(p)) is not None and is_complete(p)]
    return [p for _, p in sorted(found)]


def find_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """Resolve ``--resume``: "auto" = newest complete checkpoint (None if there is none),
    "none"/None = start fresh, anything else = that checkpoint folder (must be complete)."""
    if resume is None or resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {MARKER!r} marker "
                                "or state.json); pass a checkpoints/step-* folder, 'auto' or 'none'")
    return path


# -- RNG ------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- trainable weights ----------------------------------------------------------------------------


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Named trainable parameters (CPU copies), the unit plain checkpoints store."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved trainable weights into ``model``; the saved and current trainable names must match."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{source}: trainable parameters differ from the checkpoint (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); was it written by another stage or config?")
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if t.shape != p.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}, model has {tuple(p.shape)}")
            p.copy_(t.to(device=p.device, dtype=p.dtype))


# -- save / load ------------------------------------------------------------------------------------


def save_checkpoint(accelerator, model, optimizer, scheduler, state: TrainState, output_dir: str | Path,
                    *, keep_last: int, engine_state: bool) -> Path:
    """Write a checkpoint for ``state.step`` atomically on all ranks and drop the oldest beyond
    ``keep_last``. ``engine_state`` (DeepSpeed / FSDP) delegates model + optimizer to Accelerate."""
    from safetensors.torch import save_file

    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{state.step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
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
    torch.save(rng_state(), tmp / "rng" / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if main:
        (tmp / "state.json").write_text(state.to_json())
        (tmp / MARKER).write_text(f"step {state.step}\n")
        if final.exists():  # re-saving the same step (e.g. stop right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _rotate(root, keep_last)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _rotate(root: Path, keep_last: int) -> None:
    done = list_checkpoints(root.parent)
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # leftovers of killed writers
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: str | Path, accelerator, model, optimizer, scheduler, *, engine_state: bool) -> TrainState:
    """Restore weights, optimizer and scheduler (not RNG: see :func:`restore_rng`) from ``path``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete checkpoint")
    state = TrainState.from_json((path / "state.json").read_text())
    if engine_state:
        if not (path / "engine").is_dir():
            raise ValueError(f"{path}: written without DeepSpeed/FSDP (no engine/ folder); resume with the same engine")
        from olavlm.train.engine import load_engine_state

        load_engine_state(accelerator, model, optimizer, path / "engine")
    else:
        if not (path / "trainable.safetensors").is_file():
            raise ValueError(f"{path}: written by a DeepSpeed/FSDP run (engine/ folder); resume with the same engine")
        load_trainable_state_dict(accelerator.unwrap_model(model), load_file(str(path / "trainable.safetensors")),
                                  str(path))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
    if state.world_size != accelerator.num_processes:
        log.warning("%s was written by %d processes, resuming with %d: the data position is kept by optimizer "
                    "step, RNG streams are not", path, state.world_size, accelerator.num_processes)
    return state


def restore_rng(path: str | Path, rank: int) -> None:
    """Set this rank's RNG states to the checkpoint's (call right before the first resumed step)."""
    file = Path(path) / "rng" / f"rank{rank}.pt"
    if not file.is_file():
        log.warning("%s missing: rank %d keeps its fresh RNG state", file, rank)
        return
    set_rng_state(torch.load(file, map_location="cpu", weights_only=False))

