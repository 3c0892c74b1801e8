"""Supervised targets for the bootstrapped vision tower, read from the world's ground truth.

The demo's tower stands in for a well-trained CLIP, whose patch features linearly carry what an
image question needs. A few hundred CPU steps on captions alone do not get there, so the bootstrap
also regresses, from every patch feature, what the world's ground truth says about that patch
(:func:`patch_targets`) and, from the mean patch feature, the object counts and each object's
facts in left-to-right order (:func:`global_targets`).
This is a property of the stand-in base model, not of the method: PT and IFT never see these targets,
and the OLA teachers stay the oracle depth / segmentation / generation maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from olavlm.world.generate import COLOURS, SHAPES, read_meta
from olavlm.world.text import centre_x


def _scenes(world_dir: Path) -> dict:
    import json

    return json.loads((world_dir / "scenes.json").read_text())


def _where(obj: dict, side: int, z_min: float, z_max: float) -> tuple[float, float, float]:
    """(depth, centre column, bottom row) of an object, each scaled to [0, 1]."""
    return (float(np.clip((obj["Z"] - z_min) / (z_max - z_min), 0, 1)), centre_x(obj) / side,
            obj.get("visible_bottom", obj["bbox"][3]) / side)


def patch_targets(world_dir: str | Path, keys: list[str], patch: int) -> np.ndarray:
    """(N, G*G, D) per patch, row-major like the tower's tokens, D = 4 + 3 + 3 * 4 + 4 * 4 + 2:

    * the fraction of the patch covered by the object of each colour (4) and of each shape (3);
    * per colour, where that object is, on the patches it covers: (depth, centre column, bottom
      row), each scaled to [0, 1] (3 x 4);
    * per colour, on every patch (a scene summary, as a CLIP feature carries the gist of the whole
      image): (present, depth, centre column, bottom row) of that object (4 x 4);
    * the patch's own (row, column) in [-1, 1] (2).
    """
    from olavlm.world.generate import load_maps

    world_dir = Path(world_dir)
    meta, scenes = read_meta(world_dir), _scenes(world_dir)
    side, cam = int(meta["spec"]["size"]), meta["spec"]["camera"]
    z_min, z_max = float(cam["z_min"]), float(cam["z_max"])
    g = side // patch
    colours, n_c, n_s = list(COLOURS), len(COLOURS), len(SHAPES)
    rc = np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing="ij"), -1).reshape(g * g, 2)
    pos = (rc - (g - 1) / 2) / max((g - 1) / 2, 1)
    out = np.zeros((len(keys), g * g, n_c + n_s + 3 * n_c + 4 * n_c + 2), np.float32)
    scene_at = n_c + n_s + 3 * n_c
    for r, key in enumerate(keys):
        inst = load_maps(world_dir, key)["inst"]
        cells = inst.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
        for k, obj in enumerate(scenes[key]["objects"]):
            frac = (cells == k + 1).mean(axis=1)
            c, s = colours.index(obj["colour"]), SHAPES.index(obj["shape"])
            out[r, :, c] += frac
            out[r, :, n_c + s] += frac
            where = _where(obj, side, z_min, z_max)
            out[r, frac > 0, n_c + n_s + 3 * c:n_c + n_s + 3 * c + 3] = where
            out[r, :, scene_at + 4 * c:scene_at + 4 * c + 4] = (1.0, *where)
        out[r, :, -2:] = pos
    return out


SLOT_FIELDS = 5  # per object in left-to-right order: present, colour rank, depth, column, bottom row


def global_targets(world_dir: str | Path, keys: list[str]) -> np.ndarray:
    """(N, 1 + 3 + 5 * M + M - 1) for the mean patch feature (M = the world's ``max_objects``):

    * the number of objects and of each shape, divided by ``max_objects`` (1 + 3);
    * per object slot, objects taken left to right: (present, colour rank in the world's colour
      order, depth, centre column, bottom row), each in [0, 1] (5 x M) -- the scene facts of
      :func:`patch_targets` indexed by position in the image, as questions name objects; empty
      slots stay zero;
    * the column distance between each pair of neighbouring slots, divided by the image side
      (M - 1; zero where a slot is empty).
    """
    world_dir = Path(world_dir)
    meta, scenes = read_meta(world_dir), _scenes(world_dir)
    top = int(meta["spec"]["max_objects"])
    side, cam = int(meta["spec"]["size"]), meta["spec"]["camera"]
    z_min, z_max = float(cam["z_min"]), float(cam["z_max"])
    colours = list(COLOURS)
    gaps_at = 1 + len(SHAPES) + SLOT_FIELDS * top
    out = np.zeros((len(keys), gaps_at + top - 1), np.float32)
    for r, key in enumerate(keys):
        objs = scenes[key]["objects"]
        out[r, 0] = len(objs) / top
        for s, shape in enumerate(SHAPES):
            out[r, 1 + s] = sum(o["shape"] == shape for o in objs) / top
        ordered = sorted(objs, key=centre_x)
        for k, (a, b) in enumerate(zip(ordered, ordered[1:])):
            out[r, gaps_at + k] = (centre_x(b) - centre_x(a)) / side
        for k, obj in enumerate(ordered):
            at = 1 + len(SHAPES) + SLOT_FIELDS * k
            out[r, at:at + SLOT_FIELDS] = (1.0, colours.index(obj["colour"]) / max(len(colours) - 1, 1),
                                           *_where(obj, side, z_min, z_max))
    return out
