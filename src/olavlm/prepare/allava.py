"""Assemble ``allava/ALLaVA-Caption.json`` (the VPT data) from the LAION and VFLAN caption subsets.

The hub jsons already store image paths relative to the ALLaVA repo root (``allava_laion/images/…``,
``allava_vflan/images/images_191task_1k/…``) and prepare mirrors that layout under
``<root>/allava``, so the paths stay as they are and ``data.image_folder`` is ``<root>/allava``. Each
path is still checked: absolute or ``..`` paths are dropped (counted), and paths outside the part's
declared image folder are counted (a sign that the hub json changed layout). Records are streamed
(``olavlm.data.records.iter_records``), so memory stays small on the 1 GB LAION part.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from olavlm.prepare.sources import AssembleSpec
from olavlm.data.records import iter_records


def _check_path(image, prefix: str) -> str | None:
    """Reason the image path is unusable, or None."""
    if not isinstance(image, str) or not image:
        return "no_image"
    p = PurePosixPath(image.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts:
        return "unsafe_path"
    if not str(p).startswith(prefix.rstrip("/") + "/"):
        return "outside_expected_folder"
    return None


def assemble(spec: AssembleSpec, root: Path) -> dict:
    """Write ``spec.output``; returns counts per part and the records dropped/flagged by reason."""
    root = Path(root)
    out_path = root / spec.output
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    stats: dict = {"records": 0, "per_part": {}, "dropped": {}, "flagged": {}, "duplicate_ids": 0}
    seen_ids: set[str] = set()
    first = True
    with open(tmp, "w") as out:
        out.write("[\n")
        for rel, prefix in spec.parts:
            kept = 0
            for _, _, rec in iter_records(root / rel):  # streamed; a malformed file raises RecordFileError
                if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
                    stats["dropped"]["bad_record"] = stats["dropped"].get("bad_record", 0) + 1
                    continue
                reason = _check_path(rec.get("image"), prefix)
                if reason in ("no_image", "unsafe_path"):
                    stats["dropped"][reason] = stats["dropped"].get(reason, 0) + 1
                    continue
                if reason:
                    stats["flagged"][reason] = stats["flagged"].get(reason, 0) + 1
                rid = str(rec.get("id"))
                if rid in seen_ids:
                    stats["duplicate_ids"] += 1
                seen_ids.add(rid)
                record = {"id": rec.get("id"), "image": rec["image"], "conversations": rec["conversations"]}
                out.write(("" if first else ",\n") + json.dumps(record, ensure_ascii=False))
                first = False
                kept += 1
            stats["per_part"][rel] = kept
            stats["records"] += kept
        out.write("\n]\n")
    os.replace(tmp, out_path)
    return stats
