"""Done-markers: small json files under ``<root>/.olavlm-prepare/`` that make prepare idempotent.

A marker is written only after a step fully succeeded (download verified, archive unpacked), so an
interrupted run redoes exactly the unfinished steps and a finished run only re-verifies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from olavlm.prepare.sources import STATE


def marker_path(root: Path, kind: str, rel: str) -> Path:
    """Marker of step `kind` ("download" | "unpack" | "assemble") for the root-relative path `rel`."""
    return Path(root) / STATE / kind / (rel.replace("/", "__") + ".json")


def read_marker(root: Path, kind: str, rel: str) -> dict | None:
    path = marker_path(root, kind, rel)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # a torn marker counts as absent: the step is redone
        return None


def write_marker(root: Path, kind: str, rel: str, info: dict) -> None:
    path = marker_path(root, kind, rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    os.replace(tmp, path)
