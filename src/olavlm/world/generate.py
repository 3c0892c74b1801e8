"""ShapeWorld: a deterministic synthetic world written in the real dataset formats.

Each image shows 1-``max_objects`` objects (shape x colour x size) standing on a ground plane seen by a pinhole
camera: an object at depth ``z`` touches the ground at ``y = horizon + K / z`` and is ``f * size / z``
pixels tall (the horizon row varies a little per image: camera pitch), so farther objects sit higher
and look smaller. Objects are painted far-to-near, so nearer ones occlude farther ones. The depth
questions are only asked where this cue is readable from the pixels: the nearer object's visible
pixels reach at least ``MIN_DEPTH_ROWS`` rows lower (see ``text.multiple_choice``). Per image the generator also writes the
ground truth the oracle teachers read: a depth map (world units), a class map (sky, ground, one
class per shape) and an instance map.

Output folder (``generate_world``)::

    images/<split>_<i>.png      RGB, ``size`` x ``size``
    maps/<split>_<i>.npz        depth float32, seg uint8, inst uint8 (0 = no object, k = object k-1)
    scenes.json                 {image key: scene dict (objects with shape, colour, size, X, Z, bbox)}
    pretrain.json               LLaVA-558K-like single-turn captions (no depth words)
    allava_caption.json         ALLaVA-Caption-like long captions (no depth words)
    instruct.json               LLaVA-665K-like QA (CV-Bench-format questions, optional open and text-only turns)
    cvbench.jsonl               held-out CV-Bench test format (2D Count/Relation, 3D Depth/Distance)
    probe.json                  held-out images with the probing prompt (docs/method.md, "Probing")
    world.json                  what was generated: seed, counts, classes, camera constants

Every byte is a function of the seed (seeded numpy; PNG and npz written without timestamps).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from olavlm.world import text

GENERATOR_VERSION = 5  # bump when the bytes produced for a given seed change

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB
    "red": (215, 45, 40),
    "green": (45, 170, 70),
    "blue": (45, 85, 215),
    "yellow": (225, 200, 40),
}
SIZES = {"small": 0.6, "large": 1.0}  # intrinsic object height in world units
CLASSES = ("sky", "ground") + SHAPES  # values of the seg map
SKY_DEPTH = 12.0  # depth written for sky pixels (beyond every object and ground pixel)


@dataclass(frozen=True)
class Camera:
    """Pinhole camera over a ground plane, in fractions of the image side so any size works."""

    horizon: float = 0.28  # mean image row of the horizon / side
    horizon_jitter: float = 0.06  # per-image camera pitch: horizon uniform in horizon +- jitter
    ground_k: float = 0.62  # contact row = side * (horizon + ground_k * z_min / z)
    focal: float = 0.56  # focal length / side (object height in px = focal * side * size / z)
    z_min: float = 1.5  # nearest object depth (world units)
    z_max: float = 4.5  # farthest object depth
    x_max: float = 0.9  # |X| of object centres (world units)

    def row_of(self, z: float, side: int, horizon: float | None = None) -> float:
        """Image row where an object at depth z touches the ground (horizon: this image's, / side)."""
        return side * ((self.horizon if horizon is None else horizon) + self.ground_k * self.z_min / z)

    def col_of(self, x: float, z: float, side: int) -> float:
        """Image column of an object centre at ground position (x, z)."""
        return side * (0.5 + self.focal * x / z)

    def height_px(self, size: float, z: float, side: int) -> float:
        return self.focal * side * size / z


@dataclass
class WorldSpec:
    """How much of the world to generate; every count is a number of images (or records)."""

    seed: int = 0  # the one seed every byte depends on
    size: int = 64  # image side in pixels (must match the vision tower input)
    n_pretrain: int = 600  # images with a short caption (pretrain.json) and a long one (allava_caption.json)
    n_instruct: int = 2000  # images with QA (instruct.json); the first question's task cycles Count/Relation/Depth/Distance
    # text-only conversations mixed into instruct.json; 0 for the demo: next to one-letter answers, such a
    # conversation's longer answer dominated the token-mean loss of its batch (5 % of IFT steps above 3x the
    # median with 40 of them, none without; docs/demo.md)
    n_text_only: int = 0
    ift_mc_turns: int = 1  # CV-Bench-format multiple-choice turns per instruct.json image (asked first)
    ift_open_turns: int = 0  # open questions (nearest / leftmost / closest-to first) per instruct.json image
    ift_object_weights: tuple[float, ...] = (1.0, 3.0, 3.0)  # instruct.json scenes with 1, 2, 3 ... objects
    n_cvbench: int = 200  # held-out images, one CV-Bench question each (cvbench.jsonl)
    n_probe: int = 160  # held-out images for probing (probe.json)
    max_objects: int = 3  # at most len(COLOURS); ift_object_weights has one entry per count
    # "canonical": the options of every CV-Bench-format question come in a fixed order, so the answer
    # letter follows from the image alone; "shuffled": random order, as in CV-Bench (text.multiple_choice)
    option_order: str = "canonical"
    camera: Camera = field(default_factory=Camera)


# ------------------------------------------------------------------------------------------------
# Scenes
# ------------------------------------------------------------------------------------------------


def sample_scene(rng: np.random.Generator, spec: WorldSpec, max_tries: int = 200,
                 weights: tuple[float, ...] | None = None, precheck=None) -> dict:
    """Objects with distinct colours (so a colour names an object), distinct depths and columns,
    each mostly visible. ``weights``: relative frequency of 1..max_objects objects (None = uniform).
    ``precheck(scene)``: a cheap test on the placed objects (before the occlusion render); False redraws."""
    cam = spec.camera
    for _ in range(max_tries):
        horizon = round(float(rng.uniform(cam.horizon - cam.horizon_jitter, cam.horizon + cam.horizon_jitter)), 3)
        if weights is not None and len(weights) != spec.max_objects:
            raise ValueError(f"WorldSpec.ift_object_weights: {len(weights)} entries, expected one per object "
                             f"count 1..{spec.max_objects} (max_objects)")
        if weights is None:
            n = int(rng.integers(1, spec.max_objects + 1))
        else:
            n = 1 + int(rng.choice(spec.max_objects, p=np.asarray(weights) / np.sum(weights)))
        colours = [str(c) for c in rng.choice(list(COLOURS), size=n, replace=False)]
        objects = []
        for colour in colours:
            shape = str(rng.choice(SHAPES))
            objects.append({
                "shape": shape, "colour": colour,
                "size": str(rng.choice(list(SIZES))),
                "X": round(float(rng.uniform(-cam.x_max, cam.x_max)), 3),
                "Z": round(float(rng.uniform(cam.z_min, cam.z_max)), 3),
            })
        zs = sorted(o["Z"] for o in objects)
        if any(b - a < 0.3 for a, b in zip(zs, zs[1:])):
            continue
        for o in objects:
            o["bbox"] = _bbox(o, cam, spec.size, horizon)
        cols = sorted((o["bbox"][0] + o["bbox"][2]) / 2 for o in objects)
        if any(b - a < 4 for a, b in zip(cols, cols[1:])):
            continue
        scene = {"horizon": horizon, "objects": objects}
        if precheck is not None and not precheck(scene):
            continue
        _, _, _, inst = render(scene, spec, noise_rng=None)
        ok = True
        for i, o in enumerate(objects):
            full = _object_mask(o, spec.size).sum()
            vis = int((inst == i + 1).sum())
            o["visible_px"] = vis
            o["visible_bottom"] = int(np.nonzero((inst == i + 1).any(axis=1))[0].max()) if vis else -1
            if vis < 8 or vis < 0.5 * full:
                ok = False
        if ok:
            return scene
    raise RuntimeError("sample_scene: could not place objects without heavy occlusion; check WorldSpec")


def scene_for_task(rng: np.random.Generator, spec: WorldSpec, task: str,
                   weights: tuple[float, ...] | None = None) -> tuple[dict, dict]:
    """A scene and one ``task`` question about it (:func:`olavlm.world.text.multiple_choice`)."""
    if spec.option_order not in text.OPTION_ORDERS:
        raise ValueError(f"WorldSpec.option_order: {spec.option_order!r}, expected one of {text.OPTION_ORDERS}")
    need = text.TASK_OBJECTS.get(task)
    if need is not None:  # the task asks about exactly `need` objects: draw that many (same scenes, fewer redraws)
        weights = tuple(float(k + 1 == need) for k in range(spec.max_objects))

    def could_ask(scene: dict) -> bool:  # the geometry alone (own rng: the stream of `rng` stays as it was)
        return text.multiple_choice(scene, task, np.random.default_rng(0), spec.option_order) is not None

    while True:
        scene = (sample_scene(rng, spec, max_tries=20_000, weights=weights, precheck=could_ask) if task == "Distance"
                 else sample_scene(rng, spec, weights=weights))
        mc = text.multiple_choice(scene, task, rng, spec.option_order)
        if mc is not None:
            return scene, mc


def _bbox(obj: dict, cam: Camera, side: int, horizon: float) -> list[int]:
    h = cam.height_px(SIZES[obj["size"]], obj["Z"], side)
    base = cam.row_of(obj["Z"], side, horizon)
    cx = cam.col_of(obj["X"], obj["Z"], side)
    return [int(round(cx - h / 2)), int(round(base - h)), int(round(cx + h / 2)), int(round(base))]


def _object_mask(obj: dict, side: int) -> np.ndarray:
    x0, y0, x1, y1 = obj["bbox"]
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if obj["shape"] == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif obj["shape"] == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif obj["shape"] == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=255)
    else:
        raise ValueError(f"unknown shape {obj['shape']!r}")
    return np.asarray(mask) > 0


def render(scene: dict, spec: WorldSpec, noise_rng: np.random.Generator | None):
    """-> (rgb uint8 (S,S,3), depth float32 (S,S), seg uint8 (S,S), inst uint8 (S,S))."""
    side, cam = spec.size, spec.camera
    rows = np.arange(side, dtype=np.float64) + 0.5
    horizon = scene.get("horizon", cam.horizon) * side
    ground = rows > horizon  # per row
    ground_z = cam.ground_k * side * cam.z_min / np.maximum(rows - horizon, 1e-6)
    row_depth = np.where(ground, np.minimum(ground_z, SKY_DEPTH), SKY_DEPTH)
    depth = np.repeat(row_depth[:, None], side, axis=1).astype(np.float32)
    seg = np.repeat(np.where(ground, 1, 0)[:, None], side, axis=1).astype(np.uint8)
    inst = np.zeros((side, side), np.uint8)
    # sky: light blue; ground: grey, lighter towards the horizon (aerial perspective)
    t = np.clip((rows - horizon) / (side - horizon), 0, 1)[:, None]
    ground_rgb = np.array([150.0, 150.0, 140.0]) * (1 - t) + np.array([95.0, 95.0, 90.0]) * t
    row_rgb = np.where(ground[:, None], ground_rgb, np.array([175.0, 205.0, 235.0]))
    rgb = np.repeat(row_rgb[:, None, :], side, axis=1)
    order = sorted(range(len(scene["objects"])), key=lambda i: -scene["objects"][i]["Z"])  # far -> near
    for i in order:
        obj = scene["objects"][i]
        mask = _object_mask(obj, side)
        rgb[mask] = np.array(COLOURS[obj["colour"]], np.float64)
        depth[mask] = obj["Z"]
        seg[mask] = CLASSES.index(obj["shape"])
        inst[mask] = i + 1
    if noise_rng is not None:
        rgb = rgb + noise_rng.normal(0.0, 4.0, size=rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), depth, seg, inst


# ------------------------------------------------------------------------------------------------
# Writing the world
# ------------------------------------------------------------------------------------------------


def _save_png(rgb: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", optimize=False)
    path.write_bytes(buf.getvalue())


def save_maps(path: Path, **arrays: np.ndarray) -> None:
    """An ``.npz`` readable by ``np.load`` but byte-deterministic (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def map_path(world_dir: str | Path, key: str) -> Path:
    """Ground-truth maps of the image with dataset key ``images/<stem>.png``."""
    return Path(world_dir) / "maps" / (Path(key).stem + ".npz")


def load_maps(world_dir: str | Path, key: str) -> dict[str, np.ndarray]:
    path = map_path(world_dir, key)
    if not path.is_file():
        raise KeyError(f"ShapeWorld: no ground-truth maps for image {key!r} (expected {path})")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _dump_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


@dataclass
class World:
    """A generated world on disk (``generate_world``'s result)."""

    root: Path
    spec: WorldSpec
    counts: dict[str, int]
    files: dict[str, str]  # role -> file name inside root

    def path(self, role: str) -> Path:
        return self.root / self.files[role]


def generate_world(out_dir: str | Path, spec: WorldSpec | None = None, *, progress=None) -> World:
    """Write a whole world (layout in the module docstring). Deterministic in ``spec``."""
    spec = spec or WorldSpec()
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "maps").mkdir(parents=True, exist_ok=True)
    # independent streams per split, so changing one count does not change the other splits
    seeds = np.random.SeedSequence([spec.seed, GENERATOR_VERSION]).spawn(5)
    rngs = dict(zip(("pt", "ift", "cvb", "probe", "text"), (np.random.default_rng(s) for s in seeds)))
    scenes: dict[str, dict] = {}

    def make_image(split: str, i: int, rng: np.random.Generator, scene: dict | None = None) -> tuple[str, dict]:
        scene = scene or sample_scene(rng, spec)
        key = f"images/{split}_{i:05d}.png"
        rgb, depth, seg, inst = render(scene, spec, noise_rng=rng)
        _save_png(rgb, root / key)
        save_maps(map_path(root, key), depth=depth, seg=seg, inst=inst)
        scenes[key] = scene
        if progress:
            progress(1)
        return key, scene

    pretrain, allava = [], []
    for i in range(spec.n_pretrain):
        rng = rngs["pt"]
        key, scene = make_image("pt", i, rng)
        pretrain.append(_record(f"pt_{i:05d}", key, [(text.with_image(str(rng.choice(text.PT_PROMPTS)), rng),
                                                        text.short_caption(scene, rng))]))
        allava.append(_record(f"allava_{i:05d}", key, [(text.with_image(str(rng.choice(text.LONG_PROMPTS)), rng),
                                                          text.long_caption(scene, rng))]))
    instruct, tasks = [], list(text.CVBENCH_TASKS)
    for i in range(spec.n_instruct):
        rng = rngs["ift"]
        # the first multiple-choice turn cycles through the CV-Bench tasks (a balanced question mix);
        # the scene is drawn until it supports that task
        scene, mc = scene_for_task(rng, spec, tasks[i % len(tasks)], weights=spec.ift_object_weights)
        key, _ = make_image("ift", i, rng, scene)
        turns = text.instruction_turns(scene, rng, spec.ift_mc_turns, spec.ift_open_turns, first_mc=mc,
                                       order=spec.option_order)
        turns[0] = ("<image>\n" + turns[0][0], turns[0][1])
        instruct.append(_record(f"ift_{i:05d}", key, turns))
    for i in range(spec.n_text_only):
        instruct.append(_record(f"text_{i:05d}", None, text.text_only_turns(rngs["text"])))
    order = rngs["text"].permutation(len(instruct))
    instruct = [instruct[int(j)] for j in order]

    cvbench = []
    for i in range(spec.n_cvbench):
        rng, task = rngs["cvb"], tasks[i % len(tasks)]
        scene, mc = scene_for_task(rng, spec, task)
        key, _ = make_image("cvb", i, rng, scene)
        kind = text.CVBENCH_TASKS[task]
        cvbench.append({
            "idx": i, "type": kind, "task": task, "question": mc["question"], "choices": mc["choices"],
            "answer": f"({chr(65 + mc['answer_index'])})", "prompt": text.mc_prompt(mc["question"], mc["choices"]),
            "filename": key, "source": f"ShapeWorld-{kind}", "source_dataset": "ShapeWorld held-out",
            "source_filename": Path(key).name,
        })
    probe = []
    for i in range(spec.n_probe):
        key, _ = make_image("probe", i, rngs["probe"])
        probe.append(_record(f"probe_{i:05d}", key, [(f"{text.PROBE_PROMPT}\n<image>", "n")]))

    files = {"pretrain": "pretrain.json", "allava": "allava_caption.json", "instruct": "instruct.json",
             "cvbench": "cvbench.jsonl", "probe": "probe.json", "scenes": "scenes.json", "meta": "world.json"}
    _dump_json(pretrain, root / files["pretrain"])
    _dump_json(allava, root / files["allava"])
    _dump_json(instruct, root / files["instruct"])
    _dump_json(probe, root / files["probe"])
    _dump_json(scenes, root / files["scenes"])
    (root / files["cvbench"]).write_text("".join(json.dumps(r) + "\n" for r in cvbench))
    counts = {"pretrain": len(pretrain), "allava": len(allava), "instruct": len(instruct),
              "cvbench": len(cvbench), "probe": len(probe), "images": len(scenes)}
    meta = {"generator_version": GENERATOR_VERSION, "spec": asdict(spec), "classes": list(CLASSES),
            "shapes": list(SHAPES), "colours": COLOURS, "sizes": SIZES, "sky_depth": SKY_DEPTH,
            "counts": counts, "files": files}
    _dump_json(meta, root / files["meta"])
    return World(root=root, spec=spec, counts=counts, files=files)


def _record(rid: str, image: str | None, turns: list[tuple[str, str]]) -> dict:
    rec: dict = {"id": rid}
    if image is not None:
        rec["image"] = image
    rec["conversations"] = [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    return rec


def world_fingerprint(root: str | Path) -> str:
    """sha1 over every file of a generated world (names and bytes), for caching and tests."""
    h = hashlib.sha1()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def read_meta(root: str | Path) -> dict:
    path = Path(root) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a ShapeWorld folder (no world.json); run `olavlm demo` or "
                                f"olavlm.world.generate.generate_world first")
    return json.loads(path.read_text())
