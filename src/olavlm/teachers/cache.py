"""Precomputed teacher targets: safetensors shards + ``index.json`` (spec §11 item 5, fix of D10).

Layout of a cache folder (written by ``olavlm targets precompute``, see ``precompute.py``)::

    index.json                 format, dtype, per-task shape + fingerprint, image geometry,
                               shard list, entries {image key: [shard, row, sha1]}, unreadable images
    shard-00000.safetensors    one tensor per task, (rows, *target_shape); its metadata repeats the
    shard-00001.safetensors    keys, sha1s and unreadable images of the shard (the index is rebuilt
    ...                        from these headers, so a shard is self-describing)

An image is keyed by its path relative to the image folder (``batch["image_keys"]``) and by the
sha1 of its file bytes (:meth:`TargetCache.get_by_hash`). Reads are memory-mapped
(``safe_open``), shards are opened lazily per process, so a ``TargetCache`` can be pickled into
dataloader workers and :meth:`get` is cheap there.

Fingerprints are plain dicts; :meth:`TargetCache.verify` compares only the keys the caller gives,
so a training run can check a cache against its *config* (:func:`config_fingerprints`, no teacher
weights loaded) or against loaded teachers (``TeacherSet.fingerprints()``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

INDEX = "index.json"
FORMAT = "olavlm-target-cache"
VERSION = 1
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class CacheError(ValueError):
    """The target cache is missing, malformed, incomplete or built for something else."""


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise CacheError(f"target cache dtype must be one of {sorted(_DTYPES)}, got {dtype}")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def task_fingerprint(task_cfg, grid: int) -> dict[str, Any]:
    """What the config says about a task's teacher (comparable without loading any weights)."""
    return {"teacher": task_cfg.teacher, "teacher_path": task_cfg.teacher_path,
            "teacher_kwargs": dict(task_cfg.teacher_kwargs), "grid": int(grid)}


def config_fingerprints(model_cfg, grid: int, tasks: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`task_fingerprint` of every task with predictor layers (or of ``tasks``)."""
    names = [t for t, tc in model_cfg.tasks.items() if tc.layers] if tasks is None else list(tasks)
    return {t: task_fingerprint(model_cfg.tasks[t], grid) for t in names}


def geometry_fingerprint(image_geometry: str, spec, teacher_image_size: int) -> dict[str, Any]:
    """The shared-square geometry the teachers' input was cut with (data.image_geometry + tower spec)."""
    return {"image_geometry": image_geometry, "vision_size": int(spec.size), "mean": [float(m) for m in spec.mean],
            "std": [float(s) for s in spec.std], "resample": spec.resample,
            "square_side": max(int(spec.size), int(teacher_image_size)), "teacher_image_size": int(teacher_image_size)}


def _diff(want: dict, have: dict, where: str) -> list[str]:
    out = []
    for key, value in want.items():
        if key not in have:
            out.append(f"{where}.{key}: cache has no value, expected {value!r}")
        elif _canon(have[key]) != _canon(value):
            out.append(f"{where}.{key}: cache has {have[key]!r}, run expects {value!r}")
    return out


def _canon(value):
    """JSON round trip so tuples/lists and int/float spellings compare equal."""
    return json.loads(json.dumps(value, sort_keys=True))


class TargetCache:
    """Read access to a finished (or partially finished) target cache folder."""

    def __init__(self, root: str | os.PathLike, index: dict[str, Any]) -> None:
        self.root = Path(root)
        self.index = index
        self.tasks: list[str] = list(index["tasks"])  # tasks stored in every shard
        self.dtype: torch.dtype = _DTYPES[index["dtype"]]  # storage dtype of the targets
        self.shards: list[str] = list(index["shards"])  # shard file names, position = shard id
        self.entries: dict[str, list] = index["entries"]  # key -> [shard, row, sha1]
        self.unreadable: dict[str, str] = index.get("unreadable", {})  # key -> reason
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        self._by_hash: dict[str, str] | None = None

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "TargetCache":
        root = Path(path)
        file = root / INDEX
        if not file.is_file():
            raise CacheError(f"{root}: not a target cache (no {INDEX}); write one with `olavlm targets precompute`")
        try:
            index = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{file}: invalid JSON: {e}") from e
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise CacheError(f"{file}: format {index.get('format')!r} v{index.get('version')} is not "
                             f"{FORMAT!r} v{VERSION}")
        if index.get("dtype") not in _DTYPES:
            raise CacheError(f"{file}: unknown dtype {index.get('dtype')!r}")
        return cls(root, index)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        state["_by_hash"] = None
        return state

    def _shard(self, i: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # forked into a worker: never share file handles
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(i)
        if handle is None:
            handle = self._handles[i] = safe_open(str(self.root / self.shards[i]), framework="pt", device="cpu")
        return handle

    # -- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    @property
    def complete(self) -> bool:
        """True when every planned shard was written when the index was built."""
        return bool(self.index.get("complete", False))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t: tuple(v["shape"]) for t, v in self.index["tasks"].items()}

    @property
    def fingerprints(self) -> dict[str, dict[str, Any]]:
        return {t: v["fingerprint"] for t, v in self.index["tasks"].items()}

    @property
    def geometry(self) -> dict[str, Any]:
        return dict(self.index.get("geometry", {}))

    def sha1(self, key: str) -> str:
        return self.entries[key][2]

    def get(self, key: str, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """``{task: (*target_shape)}`` for one image key (its path relative to the image folder);
        KeyError when the image is not in the cache."""
        try:
            shard, row, _ = self.entries[key]
        except KeyError:
            why = f" (unreadable when the cache was built: {self.unreadable[key]})" if key in self.unreadable else ""
            raise KeyError(f"{key!r} is not in the target cache {self.root}{why}") from None
        handle = self._shard(shard)
        return {t: handle.get_slice(t)[row:row + 1][0] for t in (self.tasks if tasks is None else tasks)}

    def get_by_hash(self, sha1: str, tasks: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Targets of the image whose file bytes have this sha1 (any path)."""
        if self._by_hash is None:
            self._by_hash = {}
            for key, (_, _, digest) in self.entries.items():
                self._by_hash.setdefault(digest, key)
        if sha1 not in self._by_hash:
            raise KeyError(f"no image with sha1 {sha1} in the target cache {self.root}")
        return self.get(self._by_hash[sha1], tasks)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Keys (deduplicated, in order) that have no targets in the cache."""
        seen: dict[str, None] = {}
        for k in keys:
            if k not in self.entries:
                seen.setdefault(k, None)
        return list(seen)

    def verify(self, tasks: Iterable[str], fingerprints: dict[str, dict] | None = None, *,
               shapes: dict[str, tuple[int, ...]] | None = None, geometry: dict[str, Any] | None = None) -> None:
        """Raise :class:`CacheError` listing every mismatch: a task absent from the cache, a
        fingerprint key whose value differs, a target shape different from the predictor's
        (``shapes``, e.g. ``model.target_shapes``) or a different image geometry."""
        problems = []
        for task in tasks:
            if task not in self.index["tasks"]:
                problems.append(f"task {task!r}: not in the cache (it has {self.tasks})")
                continue
            if fingerprints and task in fingerprints:
                problems += _diff(fingerprints[task], self.index["tasks"][task]["fingerprint"], task)
            if shapes and task in shapes and tuple(shapes[task]) != self.shapes[task]:
                problems.append(f"{task}: cache targets have shape {self.shapes[task]}, "
                                f"the predictor outputs {tuple(shapes[task])}")
        if geometry:
            problems += _diff(geometry, self.geometry, "geometry")
        if problems:
            raise CacheError(f"target cache {self.root} does not match this run:\n  " + "\n  ".join(problems)
                             + "\nrebuild it with `olavlm targets precompute` into a new folder")

    def check_coverage(self, keys: Iterable[str], *, max_listed: int = 10) -> None:
        """Raise :class:`CacheError` naming (up to ``max_listed``) image keys without targets.
        Images recorded as unreadable by the precompute are not counted: the dataset meets the same
        unreadable file and applies its bad-sample policy (``data.on_bad_sample``)."""
        missing = [k for k in self.missing(keys) if k not in self.unreadable]
        if missing:
            listed = ", ".join(repr(k) for k in missing[:max_listed])
            more = f" and {len(missing) - max_listed} more" if len(missing) > max_listed else ""
            raise CacheError(f"target cache {self.root} lacks {len(missing)} image(s): {listed}{more} "
                             "(finish `olavlm targets precompute`, or set data.cache_miss=online)")
