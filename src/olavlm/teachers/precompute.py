"""``olavlm targets precompute``: run the configured teachers once over the dataset's images.

Plan: the unique image paths of ``data.train_file`` (first-seen order) cut into shards of
``shard_size`` images; shard ``i`` is done by rank ``i % world_size`` (torchrun / accelerate launch
give each rank a disjoint share). Every image goes through exactly the pipeline training uses for
online teachers (``olavlm.data.images.teacher_image``: ``load_image`` -> ``to_square(data.image_geometry)``
-> ``uint8_tensor(teacher side)``), is sha1-hashed, and the teachers encode batches of them in the
training teacher dtype. A finished shard is written atomically (tmp file + rename) with its keys,
hashes, unreadable images and the run digest in the safetensors header, so an interrupted run
resumes by skipping shards whose header matches the plan; the writing rank also records the shard's
size and sha256 in a ``.sha256`` sidecar. Rank 0 finally rebuilds ``index.json`` from the shard
headers and sidecars (``shard_files``: size + sha256 per shard, checked by ``TargetCache.open`` and
``olavlm targets verify --deep``). Unreadable / missing / oversized images are counted and listed,
never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from olavlm.teachers.cache import (DIGEST_SUFFIX, FORMAT, INDEX, VERSION, CacheError, config_fingerprints,
                                   dtype_name, file_sha256, geometry_fingerprint, shard_name)
from olavlm.teachers.targets import teacher_dtype  # the run's teacher dtype (training uses the same rule)

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1024  # images per shard file (~1.2-3 GB per shard for the paper's teachers in bf16)


def teacher_image_size(run_cfg, teachers) -> int:
    """Side of the uint8 square given to teachers: data.teacher_image_size or the largest teacher input."""
    return int(run_cfg.data.teacher_image_size or teachers.input_size)


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, like disk sizes)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class _ImageReader(Dataset):
    """(shard, key) -> (shard, key, sha1 | None, uint8 (3, T, T) | None, error | None); runs in workers.
    The teachers' square comes from the run's processor, as in training."""

    def __init__(self, items: list[tuple[int, str]], folder: str, processor) -> None:
        self.items, self.folder, self.processor = items, folder, processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from olavlm.data.errors import BadSample

        shard, key = self.items[i]
        path = Path(self.folder) / key if self.folder else Path(key)
        try:
            img, sha1 = self.processor.read_image(path)
            return shard, key, sha1, self.processor.teacher_image(img), None
        except BadSample as e:
            return shard, key, None, None, str(e)


class _ImageFacts:
    """What a processor needs of a model for images only (no tokenizer: precompute tokenizes nothing)."""

    def __init__(self, image_spec, tokens_per_image: int) -> None:
        self.tokenizer, self.image_spec, self.tokens_per_image = None, image_spec, tokens_per_image


def _collate(items):
    return items


def plan_shards(keys: list[str], shard_size: int) -> list[list[str]]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [keys[i:i + shard_size] for i in range(0, len(keys), shard_size)]


def _shard_header(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - a truncated/foreign file is simply "not finished"
        return None


def _shard_done(path: Path, run_digest: str, plan_digest: str) -> bool:
    meta = _shard_header(path) if path.is_file() else None
    if meta is None:
        return False
    if meta.get("run_digest") != run_digest:
        raise CacheError(f"{path} was written for different teachers / geometry / dtype / shard size than "
                         "this run; use a new target_cache folder (or delete the old one)")
    return meta.get("plan_digest") == plan_digest


def _write_shard(path: Path, buf: dict, tasks: list[str], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {t: torch.cat(buf["tensors"][t]) if buf["tensors"][t] else torch.zeros((0, *buf["shapes"][t]),
                                                                                      dtype=buf["dtype"])
               for t in tasks}
    meta = {**meta, "keys": json.dumps(buf["keys"]), "sha1": json.dumps(buf["sha1"]),
            "unreadable": json.dumps(buf["unreadable"])}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({t: v.contiguous() for t, v in tensors.items()}, str(tmp), metadata=meta)
    digest = {"size": tmp.stat().st_size, "sha256": file_sha256(tmp)}
    sidecar = path.with_name(path.name + DIGEST_SUFFIX)
    sidecar.unlink(missing_ok=True)  # never leave an old shard's digest beside the new shard
    os.replace(tmp, path)
    sidecar_tmp = sidecar.with_name(sidecar.name + f".tmp{os.getpid()}")
    sidecar_tmp.write_text(json.dumps(digest))
    os.replace(sidecar_tmp, sidecar)


def _shard_digest(path: Path) -> dict[str, Any]:
    """{size, sha256} of a shard: from its sidecar when that matches the file's size, else hashed now."""
    sidecar = path.with_name(path.name + DIGEST_SUFFIX)
    size = path.stat().st_size
    try:
        digest = json.loads(sidecar.read_text())
        if digest.get("size") == size and isinstance(digest.get("sha256"), str):
            return {"size": size, "sha256": digest["sha256"]}
    except (OSError, ValueError, AttributeError):
        pass
    return {"size": size, "sha256": file_sha256(path)}


def write_index(root: Path, header: dict[str, Any], num_shards: int) -> dict[str, Any]:
    """Rebuild ``index.json`` from the shard headers; returns the index (``complete`` = all shards there)."""
    entries, unreadable, present, files = {}, {}, [], {}
    for i in range(num_shards):
        meta = _shard_header(root / shard_name(i)) if (root / shard_name(i)).is_file() else None
        if meta is None or meta.get("run_digest") != header["run_digest"]:
            continue
        present.append(i)
        files[shard_name(i)] = _shard_digest(root / shard_name(i))
        for row, (key, digest) in enumerate(zip(json.loads(meta["keys"]), json.loads(meta["sha1"]))):
            entries[key] = [i, row, digest]
        unreadable.update(json.loads(meta["unreadable"]))
    index = {**header, "shards": [shard_name(i) for i in range(num_shards)], "shard_files": files,
             "present_shards": len(present),
             "complete": len(present) == num_shards, "entries": entries, "unreadable": unreadable}
    tmp = root / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, root / INDEX)
    return index


def precompute(run_cfg, *, batch_size: int = 32, dtype: torch.dtype | str | None = None, workers: int | None = None,
               progress: bool = True, shard_size: int = DEFAULT_SHARD_SIZE, device=None,
               rank: int | None = None, world_size: int | None = None, teachers=None,
               on_shard_written: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fill ``run_cfg.data.target_cache`` with the targets of every image of ``data.train_file``.

    ``dtype``: storage dtype (default: the training teacher dtype, which is also the compute
    dtype). ``rank``/``world_size`` default to the launcher's (accelerate ``PartialState``).
    ``teachers`` lets tests pass a prebuilt TeacherSet. Returns a summary dict.
    """
    from olavlm.data.records import image_paths
    from olavlm.geometry import vision_geometry
    from olavlm.dtypes import torch_dtype
    from olavlm.teachers.base import build_teachers

    data = run_cfg.data
    if not data.target_cache:
        raise CacheError("data.target_cache: set the folder to write the targets to")
    rank, world_size, device, barrier = _launch(rank, world_size, device)
    main = rank == 0
    geo = vision_geometry(run_cfg.model)
    compute_dtype = teacher_dtype(run_cfg)
    store_dtype = torch_dtype(dtype, "--dtype") or compute_dtype
    if teachers is None:
        from olavlm.config import active_tasks  # the tasks the recipe's stage trains (OLA: pt, VIRAL: ift)

        teachers = build_teachers(run_cfg.model, geo.grid, device=device, dtype=compute_dtype,
                                  tasks=list(active_tasks(run_cfg.model, run_cfg.train.stage)))
    if len(teachers) == 0:
        raise CacheError(f"model.tasks: no task has predictor layers active in stage {run_cfg.train.stage!r}, so "
                         "there are no targets to cache")
    side = teacher_image_size(run_cfg, teachers)
    root = Path(data.target_cache)
    root.mkdir(parents=True, exist_ok=True)

    header = _run_header(run_cfg, geo, teachers, side, store_dtype, compute_dtype, shard_size)
    task_info = header["tasks"]
    keys = image_paths(data.train_file)
    shards = plan_shards(keys, shard_size)
    per_image = sum(torch.Size(s["shape"]).numel() for s in task_info.values()) * store_dtype.itemsize
    if main and progress:
        layout = ", ".join(f"{t} {tuple(s['shape'])}" for t, s in task_info.items())
        print(f"targets: {len(keys)} unique images in {len(shards)} shard(s) of {shard_size}, "
              f"{layout} in {dtype_name(store_dtype)}: "
              f"{human_bytes(per_image)} per image, estimated {human_bytes(per_image * len(keys))} -> {root}",
              flush=True)

    mine = [i for i in range(len(shards)) if i % world_size == rank]
    plan_digests = {i: _digest(shards[i]) for i in mine}
    todo = [i for i in mine if not _shard_done(root / shard_name(i), header["run_digest"], plan_digests[i])]
    summary = {"images": len(keys), "shards": len(shards), "rank": rank, "world_size": world_size,
               "shards_skipped": len(mine) - len(todo), "shards_written": 0, "encoded": 0, "unreadable": 0,
               "bytes_per_image": per_image, "estimated_bytes": per_image * len(keys), "path": str(root)}
    items = [(i, k) for i in todo for k in shards[i]]
    if items:
        loader = _image_loader(run_cfg, geo, side, items, batch_size, data.num_workers if workers is None else workers)
        bar = None
        if progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc=f"targets (rank {rank}/{world_size})", unit="img")
        _encode_into_shards(loader, teachers, shards, task_info, store_dtype, root, header["run_digest"], plan_digests,
                            summary, bar, on_shard_written)
        if bar is not None:
            bar.close()
    log.info("targets rank %d/%d: %d shard(s) written, %d already done, %d image(s) encoded, %d unreadable",
             rank, world_size, summary["shards_written"], summary["shards_skipped"], summary["encoded"],
             summary["unreadable"])
    barrier()
    if main:
        _finish_index(root, header, len(shards), summary, progress)
    barrier()
    return summary


def _image_loader(run_cfg, geo, side: int | None, items, batch_size: int, workers: int) -> DataLoader:
    """The (shard, key) items read through the run's processor (images only: geometry, tower spec, teacher side)."""
    from olavlm.data.processor import OlaProcessor
    from olavlm.model.task_tokens import task_tokens_per_image

    processor = OlaProcessor.for_model(_ImageFacts(geo.spec, geo.num_tokens + task_tokens_per_image(run_cfg.model)),
                                       run_cfg.data, teacher_image_size=side, add_bos=False)
    reader = _ImageReader(items, run_cfg.data.image_folder, processor)
    return DataLoader(reader, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def _launch(rank: int | None, world_size: int | None, device) -> tuple[int, int, Any, Callable[[], None]]:
    """(rank, world size, device, barrier): the launcher's (accelerate ``PartialState``) unless all given."""
    if rank is not None and world_size is not None and device is not None:
        return rank, world_size, device, lambda: None  # explicit single-process simulation of a rank
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: torchrun on CPU uses gloo
    rank = state.process_index if rank is None else rank
    world_size = state.num_processes if world_size is None else world_size
    device = state.device if device is None else device
    return rank, world_size, device, state.wait_for_everyone if state.num_processes > 1 else (lambda: None)


def _run_header(run_cfg, geo, teachers, side: int, store_dtype: torch.dtype, compute_dtype: torch.dtype,
                shard_size: int) -> dict[str, Any]:
    """The cache header: tasks (shape + fingerprints), geometry, dtypes, and the run digest every shard carries."""
    data = run_cfg.data
    cfg_fps = config_fingerprints(run_cfg.model, geo.grid, teachers.tasks)
    task_info = {t: {"shape": list(teachers[t].target_shape),
                     "fingerprint": {**cfg_fps[t], **teachers[t].fingerprint()}} for t in teachers.tasks}
    geometry = geometry_fingerprint(data.image_geometry, geo.spec, side)
    header = {"format": FORMAT, "version": VERSION, "dtype": dtype_name(store_dtype),
              "compute_dtype": dtype_name(compute_dtype), "tasks": task_info, "geometry": geometry,
              "data_file": str(data.train_file), "image_folder": str(data.image_folder), "shard_size": shard_size}
    header["run_digest"] = _digest({k: header[k] for k in ("format", "version", "dtype", "compute_dtype", "tasks",
                                                          "geometry", "shard_size")})
    return header


def _encode_into_shards(loader, teachers, shards: list[list[str]], task_info: dict, store_dtype: torch.dtype,
                        root: Path, run_digest: str, plan_digests: dict[int, str], summary: dict, bar,
                        on_shard_written: Callable[[int], None] | None) -> None:
    """Encode the loader's images and write each shard as soon as all its images are seen."""
    shapes = {t: tuple(s["shape"]) for t, s in task_info.items()}
    bufs: dict[int, dict] = {}
    for batch in loader:
        ok = [b for b in batch if b[3] is not None]
        if ok:
            out = teachers.encode(torch.stack([b[3] for b in ok]), [b[1] for b in ok])
            out = {t: v.to(device="cpu", dtype=store_dtype) for t, v in out.items()}
        row = 0
        for shard, key, sha1, image, err in batch:
            buf = bufs.setdefault(shard, {"keys": [], "sha1": [], "unreadable": {}, "seen": 0,
                                          "tensors": {t: [] for t in task_info}, "shapes": shapes,
                                          "dtype": store_dtype})
            buf["seen"] += 1
            if image is None:
                buf["unreadable"][key] = err
                summary["unreadable"] += 1
            else:
                buf["keys"].append(key)
                buf["sha1"].append(sha1)
                for t in task_info:
                    buf["tensors"][t].append(out[t][row:row + 1])
                row += 1
                summary["encoded"] += 1
            if buf["seen"] == len(shards[shard]):
                _write_shard(root / shard_name(shard), bufs.pop(shard), list(task_info),
                             {"run_digest": run_digest, "plan_digest": plan_digests[shard]})
                summary["shards_written"] += 1
                if on_shard_written is not None:
                    on_shard_written(shard)
        if bar is not None:
            bar.update(len(batch))


def _finish_index(root: Path, header: dict, num_shards: int, summary: dict, progress: bool) -> None:
    """Rank 0: ``index.json`` from the shards present, with the totals in ``summary``."""
    index = write_index(root, header, num_shards)
    summary["complete"] = index["complete"]
    summary["unreadable_total"] = len(index["unreadable"])
    if index["unreadable"]:
        first = list(index["unreadable"].items())[:5]
        log.warning("targets: %d unreadable image(s) skipped, e.g. %s", len(index["unreadable"]),
                    "; ".join(f"{k}: {v}" for k, v in first))
    if progress:
        print(f"targets: {len(index['entries'])} images cached, {len(index['unreadable'])} unreadable, "
              f"{index['present_shards']}/{num_shards} shards present -> {root / INDEX}", flush=True)
