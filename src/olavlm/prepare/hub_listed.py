"""Fetch the hub files a downloaded JSON-lines file lists (CV-Bench's images), resumably.

A file already present is not asked for again, so an interrupted run fetches only what is
missing; a listed path that is not a plain relative path is refused and reported; a file the hub
cannot deliver is reported and the others go on.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from olavlm.prepare.download import DownloadError
from olavlm.prepare.hub import download_hub
from olavlm.prepare.sources import HubFile, HubListSpec


def listed_files(spec: HubListSpec, root: Path) -> tuple[list[str], dict[str, str]]:
    """(unique repo-relative paths in listing order, {unsafe path: why})."""
    names: dict[str, None] = {}
    unsafe: dict[str, str] = {}
    path = Path(root) / spec.listing
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line).get(spec.field)
            except (json.JSONDecodeError, AttributeError):
                raise ValueError(f"{path}:{lineno}: not a JSON object") from None
            if not isinstance(value, str) or not value:
                raise ValueError(f"{path}:{lineno}: no {spec.field!r} string")
            p = PurePosixPath(value)
            if p.is_absolute() or ".." in p.parts or "\\" in value:
                unsafe[value] = "not a plain relative path"
            else:
                names[value] = None
    return list(names), unsafe


def fetch_listed(spec: HubListSpec, root: Path, *, workers: int = 8, retries: int = 4, backoff: float = 1.0,
                 endpoint: str | None = None, progress: bool = True) -> dict:
    """Fetch the listed files that are missing; returns counts and what could not be fetched."""
    root = Path(root)
    names, unsafe = listed_files(spec, root)
    local = root / spec.local_dir
    missing = [n for n in names if not (local / n).is_file()]
    failed: dict[str, str] = {}

    def one(name: str) -> None:
        try:
            download_hub(HubFile(spec.repo_id, name, revision=spec.revision), local, endpoint=endpoint,
                         retries=retries, backoff=backoff, progress=False)
        except DownloadError as e:
            failed[name] = str(e)

    with tqdm(total=len(names), initial=len(names) - len(missing), desc=spec.listing, unit="file",
              disable=not progress) as bar, ThreadPoolExecutor(max(1, workers)) as pool:
        for _ in pool.map(one, missing):
            bar.update(1)
    return {"listed": len(names), "already_present": len(names) - len(missing),
            "fetched": len(missing) - len(failed), "failed": dict(sorted(failed.items())),
            "unsafe_names": dict(sorted(unsafe.items()))}
