"""Checkpoint integrity: ``manifest.json`` (size + sha256 of every file), fsync, and verification.

A checkpoint folder is complete only when its manifest lists every file it holds with the right
size and digest. Hashing is split over the ranks of a run (each hashes every N-th file) and the
results are gathered, so all ranks reach the same verdict and none reads the whole folder alone.
A manifest detects damage (a truncated, missing, garbled or extra file); it is no defence against
someone who can write the folder, which is why every load is also pickle-free (see checkpoint.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = 1  # manifest layout version


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (directories: the names inside them)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    """Write a small text file and fsync it."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def files_of(folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Relative POSIX paths of the regular files under ``folder`` (sorted), without ``skip`` (top level)."""
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if rel not in skip and (path.is_file() or path.is_symlink()):
            out.append(rel)
    return sorted(out)


def _digest(path: Path, sync: bool) -> list[Any]:
    """[size, sha256 hex] of one file (fsynced when ``sync``), or [None, reason] when unreadable."""
    try:
        if path.is_symlink():
            return [None, "is a symbolic link"]
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            if sync:
                os.fsync(f.fileno())
            return [os.fstat(f.fileno()).st_size, digest]
    except OSError as e:
        return [None, f"cannot be read ({e.strerror or e})"]


def _world(accelerator) -> tuple[int, int]:
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def broadcast(obj: Any, accelerator) -> Any:
    """``obj`` from the main process, on every rank."""
    if _world(accelerator)[1] == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def digests(folder: Path, rels: list[str], accelerator=None, *, sync: bool = False) -> dict[str, list[Any]]:
    """{rel: [size, sha256]} for ``rels`` (the same list on every rank), hashed in shares over ranks."""
    rank, world = _world(accelerator)
    mine = {rel: _digest(folder / rel, sync) for rel in rels[rank::world]}
    if world == 1:
        return mine
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def write_manifest(folder: Path, accelerator=None, *, skip: tuple[str, ...] = ()) -> None:
    """All ranks, after every rank finished writing into ``folder``: hash and fsync every file, then
    the main process writes ``manifest.json`` and fsyncs it and every directory of the folder."""
    rels = broadcast(files_of(folder, skip=(MANIFEST, *skip)) if _world(accelerator)[0] == 0 else None, accelerator)
    found = digests(folder, rels, accelerator, sync=True)
    if _world(accelerator)[0] != 0:
        return
    bad = {rel: v[1] for rel, v in found.items() if v[0] is None}
    if bad:
        rel, why = next(iter(sorted(bad.items())))
        raise OSError(f"{folder / rel}: {why} while writing the checkpoint manifest")
    manifest = {"format": FORMAT, "files": {rel: {"size": found[rel][0], "sha256": found[rel][1]} for rel in rels}}
    write_durable(folder / MANIFEST, json.dumps(manifest, indent=1))
    for d in sorted({(folder / rel).parent for rel in rels} | {folder}, key=lambda p: -len(p.parts)):
        fsync_path(d)


def read_manifest(folder: Path) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """(files, None) from ``folder/manifest.json``, or (None, what is wrong) naming the file."""
    path = folder / MANIFEST
    if not path.is_file():
        return None, f"{MANIFEST} is missing"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{MANIFEST} is not valid JSON ({type(e).__name__})"
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(files, dict):
        return None, f"{MANIFEST} is not a format-{FORMAT} manifest"
    for rel, entry in files.items():
        ok = (isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
              and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64)
        if not ok or rel.startswith("/") or ".." in rel.split("/"):
            return None, f"{MANIFEST}: bad entry for {rel!r}"
    return files, None


def check_listing(folder: Path, *, skip: tuple[str, ...] = ()) -> str | None:
    """Cheap part of the verification (no hashing): the manifest parses, every listed file exists
    with its size and no unlisted file is present. None when fine, else one line naming the file."""
    files, problem = read_manifest(folder)
    if problem:
        return problem
    present = set(files_of(folder, skip=(MANIFEST, *skip)))
    for rel in sorted(files):
        path = folder / rel
        if rel not in present:
            return f"{rel} is missing"
        size = path.lstat().st_size
        if size != files[rel]["size"]:
            return f"{rel} has {size} bytes, {MANIFEST} says {files[rel]['size']}"
    extra = sorted(present - set(files))
    return f"{extra[0]} is not listed in {MANIFEST}" if extra else None


def verify(folder: Path, accelerator=None, *, skip: tuple[str, ...] = ()) -> str | None:
    """Full verification (listing + sha256 of every file, hashed in shares over ranks); the same
    verdict on every rank. None when intact, else one line naming the damaged file."""
    listing = broadcast(check_listing(folder, skip=skip) if _world(accelerator)[0] == 0 else None, accelerator)
    if listing is not None:
        return listing
    files = broadcast(read_manifest(folder)[0] if _world(accelerator)[0] == 0 else None, accelerator)
    found = digests(folder, sorted(files), accelerator)
    for rel in sorted(files):
        size, digest = found[rel]
        if size is None:
            return f"{rel} {digest}"
        if size != files[rel]["size"] or digest != files[rel]["sha256"]:
            return f"{rel} does not match its sha256 in {MANIFEST}"
    return None
