"""The run directory: one writer at a time, what a re-run does, and which checkpoint it resumes.

- ``train.lock``: an advisory ``flock`` held by the writing process (global rank 0) for the whole
  run, naming its pid and host. A second ``olavlm train`` on the directory stops with one line
  naming them; the kernel drops the lock when its holder dies, so a stale file is simply taken over.
- A finished run (``summary.json`` says so and ``final/`` exists) re-run with ``--resume auto``
  reports that and trains nothing; ``--force`` trains it again from step 0.
- Resume: ``auto`` verifies the newest ``step-*`` checkpoint and falls back past damaged ones (one
  log line each, naming the damaged file); an explicit ``--resume PATH`` that is damaged is an error.
- Whatever lies beyond the step training continues from (newer or damaged checkpoints, ``final/``)
  is moved to ``superseded/<time>-from-step-<N>/``, never deleted, and the move is logged.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olavlm.errors import UserError
from olavlm.train import checkpoint as ckpt

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"
SUPERSEDED = "superseded"


class RunDirLocked(UserError):
    """Another process is training into the same run directory."""


def is_writer_rank() -> bool:
    """Global rank 0 of this launch (read from the launcher's environment, before any process group)."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0) == 0


# -- the lock -------------------------------------------------------------------------------------


def _holder(fd: int) -> dict[str, Any]:
    """What the lock file says about its holder ({} when empty or unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


class RunDirLock:
    """``with RunDirLock(run_dir):`` holds ``run_dir/train.lock`` (no-op when ``enabled`` is False).
    A directory the lock had to create is removed again if nothing else was written into it."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> "RunDirLock":
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            log.warning("%s: file locks are not available here; make sure no other run uses this directory",
                        self.run_dir)
            return
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunDirLocked(
                    f"{self.run_dir}: another olavlm train is using this run directory (pid {holder.get('pid', '?')} "
                    f"on host {holder.get('host', '?')}, since {holder.get('started', '?')}; lock {self.path}); "
                    "wait for it to end or choose another --output-dir") from None
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.warning("%s: the filesystem does not support file locks (%s); make sure no other run uses "
                            "this directory", self.run_dir, e.strerror)
                return
            try:  # the file may have been replaced between open and flock: lock the current one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _holder(fd)
        if previous.get("pid") not in (None, os.getpid()):
            log.warning("%s: taking over the lock left by pid %s on host %s (that process has ended)",
                        self.run_dir, previous.get("pid"), previous.get("host", "?"))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        if self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
            self.path.unlink()  # nothing was written: leave no directory behind (still locked while unlinking)
            self.run_dir.rmdir()
        os.close(self.fd)  # closing drops the flock
        self.fd = None


# -- finished runs ----------------------------------------------------------------------------------


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary when it finished (summary.json says so and final/ holds the model), else None."""
    if not (run_dir / "final" / "config.json").is_file():
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) and summary.get("finished") is True else None


# -- choosing the checkpoint --------------------------------------------------------------------


@dataclass
class ResumePlan:
    candidates: list[Path]  # checkpoint folders to try, newest first
    explicit: bool  # --resume PATH: damage is an error, not a reason to fall back


def plan_resume(run_dir: Path, resume: str | None) -> ResumePlan:
    """Resolve ``--resume`` before any weights load: "auto" = every ``step-*`` folder of the run,
    newest first; "none"/None = start fresh; a PATH is checked cheaply here (marker, manifest,
    file sizes, state.json) and fully once the processes are up (:func:`choose_checkpoint`)."""
    if resume is None or resume == "none":
        return ResumePlan([], explicit=False)
    if resume == "auto":
        root = ckpt.checkpoint_root(run_dir)
        found = [(s, p) for p in root.iterdir() if (s := ckpt.step_of(p)) is not None and p.is_dir()] \
            if root.is_dir() else []
        return ResumePlan([p for _, p in sorted(found, reverse=True)], explicit=False)
    path = Path(resume)
    if not path.is_dir():
        raise ckpt.CheckpointError(f"--resume {resume}: no such checkpoint folder; pass a checkpoints/step-* "
                                   "folder, 'auto' or 'none'")
    if not (path / ckpt.MARKER).is_file():
        raise ckpt.CheckpointError(f"--resume {resume}: not a complete checkpoint (no {ckpt.MARKER!r} marker)")
    from olavlm.train.manifest import check_listing

    problem = check_listing(path, skip=(ckpt.MARKER,))
    if problem is None:
        try:
            ckpt.read_state(path)
        except ckpt.CheckpointError as e:
            problem = str(e).replace(f"{path}/", "")
    if problem:
        raise ckpt.CheckpointError(f"--resume {resume}: damaged checkpoint ({problem})")
    return ResumePlan([path], explicit=True)


def choose_checkpoint(plan: ResumePlan, accelerator) -> Path | None:
    """The newest intact candidate (same answer on every rank), logging one line per damaged one."""
    damaged: list[tuple[Path, str]] = []
    for path in plan.candidates:
        problem = ckpt.verify(path, accelerator)
        if problem is None:
            if accelerator.is_main_process:
                for bad, why in damaged:
                    log.warning("checkpoint %s is damaged (%s); resuming from %s instead", bad, why, path.name)
            return path
        if plan.explicit:
            raise ckpt.CheckpointError(f"--resume {path}: damaged checkpoint ({problem})")
        damaged.append((path, problem))
    if damaged:
        bad, why = damaged[0]
        more = f" (and {len(damaged) - 1} older, damaged too)" if len(damaged) > 1 else ""
        raise ckpt.CheckpointError(f"{bad.parent}: no intact checkpoint; newest {bad.name} is damaged ({why}){more}; "
                                   "--resume none starts over and moves them aside")
    return None


# -- what lies beyond the starting step -----------------------------------------------------------


def set_aside_newer(run_dir: Path, start_step: int) -> Path | None:
    """Main process: move checkpoints beyond ``start_step`` and a final model to ``superseded/``
    (with a copy of metrics.jsonl); returns the folder, None when there was nothing to move."""
    root = ckpt.checkpoint_root(run_dir)
    newer = sorted(p for p in root.iterdir() if (s := ckpt.step_of(p)) is not None and s > start_step) \
        if root.is_dir() else []
    final = run_dir / "final"
    if not newer and not final.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run_dir / SUPERSEDED / f"{stamp}-from-step-{start_step}"
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir / SUPERSEDED / f"{stamp}-from-step-{start_step}-{n}"
    (dest / "checkpoints").mkdir(parents=True)
    for p in newer:
        os.replace(p, dest / "checkpoints" / p.name)
    moved = [f"checkpoints/{p.name}" for p in newer]
    if final.exists():
        for name in ("final", "summary.json", "loss.png"):
            if (run_dir / name).exists():
                os.replace(run_dir / name, dest / name)
                moved.append(name)
    if (run_dir / "metrics.jsonl").is_file():
        shutil.copy2(run_dir / "metrics.jsonl", dest / "metrics.jsonl")
    log.warning("training continues from step %d: moved %s aside to %s (kept, not deleted)", start_step,
                ", ".join(moved), dest)
    return dest


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def report_config_changes(checkpoint: Path, config: dict[str, Any]) -> list[str]:
    """Log (and return) one line per configuration field that differs from the checkpoint's."""
    if not (checkpoint / ckpt.CONFIG).is_file():  # written by a caller that passed no configuration
        return []
    old = _flat(ckpt.read_config(checkpoint))
    new = _flat(json.loads(json.dumps(config)))  # the same JSON round trip as the saved one (tuples -> lists)

    def shown(values: dict[str, Any], key: str) -> str:
        return json.dumps(values[key]) if key in values else "(unset)"

    lines = [f"resume from {checkpoint.name}: {key} changed {shown(old, key)} -> {shown(new, key)}"
             for key in sorted(set(old) | set(new)) if shown(old, key) != shown(new, key)]
    for line in lines:
        log.warning("%s", line)
    return lines


def resume_state(cfg, plan: ResumePlan, accelerator, model, optimizer, scheduler, *, engine_state: bool,
                 accum: int, steps_per_epoch: int) -> tuple[ckpt.TrainState, Path | None]:
    """Verify and load the checkpoint to continue from (None: start fresh); set aside what lies
    beyond it and report configuration fields that changed since it was written."""
    resume_from = choose_checkpoint(plan, accelerator)
    state = ckpt.TrainState(world_size=accelerator.num_processes, accumulation=accum)
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, accelerator, model, optimizer, scheduler, engine_state=engine_state)
        state.world_size, state.accumulation = accelerator.num_processes, accum
        log.info("resumed from %s at step %d (epoch %d, step %d of %d)", resume_from, state.step, state.epoch,
                 state.step_in_epoch, steps_per_epoch)
    if accelerator.is_main_process:
        set_aside_newer(Path(cfg.train.output_dir), state.step)
        if resume_from is not None:
            report_config_changes(resume_from, cfg.to_dict())
    return state, resume_from
