"""Precomputed teacher targets: safetensors shards + ``index.json`` (docs/method.md, "Teachers are batched, outside the model, and can be cached").

Layout of a cache folder (written by ``olavlm targets precompute``, see ``precompute.py``)::

    index.json                 format, dtype, per-task shape + fingerprint, image geometry,
                               shard list, shard_files {name: {size, sha256}},
                               entries {image key: [shard, row, sha1]}, unreadable images
    shard-00000.safetensors    one tensor per task, (rows, *target_shape); its metadata repeats the
    shard-00001.safetensors    keys, sha1s and unreadable images of the shard (the index is rebuilt
    ...                        from these headers, so a shard is self-describing)
    shard-00000.safetensors.sha256   size + sha256 of the shard, written by the rank that wrote it

Integrity: :meth:`TargetCache.open` checks, before any training step, every shard the entries use:
file present, size as recorded, safetensors header readable (a truncated file fails here), written
by the same precompute run (``run_digest``), rows and shapes as the index says, and for every entry
that the header's key and sha1 at its row are the entry's (swapped or out-of-range rows, a
same-named shard of another cache). ``olavlm targets verify --deep`` also re-hashes every shard
(sha256). :meth:`TargetCache.get` with ``sha1=`` (the dataset passes the hash of the bytes it just
read) raises :class:`StaleTarget` (a ``KeyError``: a cache miss) when the image changed after the
precompute; the dataset then computes it online (``data.cache_miss: online``) or stops (``error``).

An image is keyed by its path relative to the image folder (``batch["image_keys"]``) and by the
sha1 of its file bytes (:meth:`TargetCache.get_by_hash`). Reads are memory-mapped
(``safe_open``), shards are opened lazily per process, so a ``TargetCache`` can be pickled into
dataloader workers and :meth:`get` is cheap there.

Fingerprints are plain dicts; :meth:`TargetCache.verify` compares only the keys the caller gives,
so a training run can check a cache against its *config* (:func:`config_fingerprints`, no teacher
weights loaded) or against loaded teachers (``TeacherSet.fingerprints()``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from olavlm import dtypes
from olavlm.errors import CacheError, StaleTarget, UserError  # noqa: F401  (the cache's errors, re-exported)

INDEX = "index.json"
FORMAT = "olavlm-target-cache"
VERSION = 1
DIGEST_SUFFIX = ".sha256"  # sidecar of a shard: {"size": bytes, "sha256": hex}


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """The name a cache index records for a storage dtype (olavlm.dtypes)."""
    try:
        return dtypes.dtype_name(dtype, "target cache dtype")
    except dtypes.DtypeError as e:
        raise CacheError(str(e)) from None


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
        self.dtype: torch.dtype = dtypes.torch_dtype(index["dtype"])  # storage dtype of the targets
        self.shards: list[str] = list(index["shards"])  # shard file names, position = shard id
        self.entries: dict[str, list] = index["entries"]  # key -> [shard, row, sha1]
        self.unreadable: dict[str, str] = index.get("unreadable", {})  # key -> reason
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        self._by_hash: dict[str, str] | None = None

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, check: bool = True) -> "TargetCache":
        """Open a cache folder; ``check`` runs the fast integrity check (:meth:`check_files`)."""
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
        if index.get("dtype") not in dtypes.NAMES:
            raise CacheError(f"{file}: unknown dtype {index.get('dtype')!r}")
        for key, kind in (("tasks", dict), ("shards", list), ("entries", dict)):
            if not isinstance(index.get(key), kind):
                raise CacheError(f"{file}: field {key!r} is missing or not a {kind.__name__}")
        cache = cls(root, index)
        if check:
            cache.check_files()
        return cache

    # -- integrity -------------------------------------------------------------------------------
    def check_files(self, *, deep: bool = False) -> dict[str, int]:
        """Raise :class:`CacheError` (one line, naming the file) at the first damage found: see the
        module docstring. ``deep`` also re-hashes every used shard against its recorded sha256.
        Returns ``{"shards": checked, "entries": checked, "hashed": shards re-hashed}``."""
        rows_of = self._entry_rows()
        recorded = self.index.get("shard_files") or {}
        hashed = 0
        listed = {i for i, name in enumerate(self.shards) if name in recorded}
        for shard in sorted(set(rows_of) | listed):
            path = self.root / self.shards[shard]
            if not path.is_file():
                raise CacheError(f"{path}: shard used by {len(rows_of.get(shard, {}))} cache entries is missing")
            info = recorded.get(self.shards[shard])
            size = path.stat().st_size
            if info is not None and size != info.get("size"):
                raise CacheError(f"{path}: {size} bytes, the index recorded {info.get('size')} (truncated or "
                                 "replaced shard); rebuild it with `olavlm targets precompute`")
            self._check_header(shard, path, rows_of.get(shard, {}))
            if deep:
                if info is None or not info.get("sha256"):
                    raise CacheError(f"{path}: no sha256 recorded in {INDEX} (cache written by an older olavlm); "
                                     "rebuild the index with `olavlm targets precompute`")
                if file_sha256(path) != info["sha256"]:
                    raise CacheError(f"{path}: sha256 differs from the one recorded in {INDEX} (damaged or "
                                     "replaced shard); rebuild it with `olavlm targets precompute`")
                hashed += 1
        return {"shards": len(set(rows_of) | listed), "entries": len(self.entries), "hashed": hashed}

    def _entry_rows(self) -> dict[int, dict[int, tuple[str, str]]]:
        """{shard: {row: (key, sha1)}} from the entries, with their form and range checked."""
        rows_of: dict[int, dict[int, tuple[str, str]]] = {}
        for key, entry in self.entries.items():
            ok = (isinstance(entry, list) and len(entry) == 3 and all(isinstance(v, int) for v in entry[:2])
                  and isinstance(entry[2], str))
            if not ok or not 0 <= entry[0] < len(self.shards) or entry[1] < 0:
                raise CacheError(f"{self.root / INDEX}: entry {key!r} = {entry!r} is not [shard, row, sha1] within "
                                 f"the {len(self.shards)} shard(s) (edited or damaged index)")
            shard, row, digest = entry
            if row in rows_of.setdefault(shard, {}):
                raise CacheError(f"{self.root / INDEX}: entries {rows_of[shard][row][0]!r} and {key!r} both point "
                                 f"at row {row} of {self.shards[shard]} (edited or damaged index)")
            rows_of[shard][row] = (key, digest)
        return rows_of

    def _check_header(self, shard: int, path: Path, rows: dict[int, tuple[str, str]]) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                shapes = {t: list(f.get_slice(t).get_shape()) for t in f.keys()}
            keys, digests = json.loads(meta["keys"]), json.loads(meta["sha1"])
        except Exception as e:  # noqa: BLE001 - any unreadable header is the same damage to report
            raise CacheError(f"{path}: not a readable target shard ({type(e).__name__}: {str(e)[:120]}); "
                             "truncated or damaged: rebuild it with `olavlm targets precompute`") from None
        run_digest = self.index.get("run_digest")
        if run_digest is not None and meta.get("run_digest") != run_digest:
            raise CacheError(f"{path}: written by another precompute run than {INDEX} (a shard of another cache?)")
        for task, info in self.index["tasks"].items():
            want = [len(keys), *info["shape"]]
            if shapes.get(task) != want:
                raise CacheError(f"{path}: tensor {task!r} has shape {shapes.get(task)}, expected {want}")
        for row, (key, digest) in rows.items():
            if row >= len(keys):
                raise CacheError(f"{self.root / INDEX}: entry {key!r} points at row {row} of {path.name}, which has "
                                 f"{len(keys)} rows (edited or damaged index)")
            if keys[row] != key or digests[row] != digest:
                raise CacheError(f"{self.root / INDEX}: entry {key!r} points at row {row} of {path.name}, which holds "
                                 f"{keys[row]!r} (edited index or a shard of another cache)")

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

    def get(self, key: str, tasks: Iterable[str] | None = None, *, sha1: str | None = None) -> dict[str, torch.Tensor]:
        """``{task: (*target_shape)}`` for one image key (its path relative to the image folder);
        KeyError when the image is not in the cache, :class:`StaleTarget` (a KeyError) when ``sha1``
        (of the image bytes now) differs from the one the targets were computed from."""
        try:
            shard, row, digest = self.entries[key]
        except KeyError:
            why = f" (unreadable when the cache was built: {self.unreadable[key]})" if key in self.unreadable else ""
            raise KeyError(f"{key!r} is not in the target cache {self.root}{why}") from None
        if sha1 is not None and sha1 != digest:
            raise StaleTarget(f"image {key!r} changed after its targets were cached in {self.root} "
                              f"(sha1 {sha1[:12]}..., cached from {digest[:12]}...)")
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

    def mismatches(self, tasks: Iterable[str], fingerprints: dict[str, dict] | None = None, *,
                   shapes: dict[str, tuple[int, ...]] | None = None,
                   geometry: dict[str, Any] | None = None) -> list[str]:
        """One line per mismatch, naming the field: a task absent from the cache, a fingerprint key
        whose value differs, a target shape different from the predictor's (``shapes``, e.g.
        ``model.target_shapes``) or a different image geometry."""
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
        return problems

    def verify(self, tasks: Iterable[str], fingerprints: dict[str, dict] | None = None, *,
               shapes: dict[str, tuple[int, ...]] | None = None, geometry: dict[str, Any] | None = None) -> None:
        """Raise :class:`CacheError` with one line per :meth:`mismatches` entry, each naming this cache."""
        problems = self.mismatches(tasks, fingerprints, shapes=shapes, geometry=geometry)
        if problems:
            lines = [f"target cache {self.root}: {p}" for p in problems]
            lines[-1] += "; rebuild it with `olavlm targets precompute` into a new folder"
            raise CacheError("\n".join(lines))

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
