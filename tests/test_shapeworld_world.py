"""ShapeWorld generator: determinism, image/map consistency, formats, vocabulary rules."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from olavlm.world import text
from olavlm.world.generate import COLOURS, WorldSpec, generate_world, load_maps, world_fingerprint

SMALL = dict(n_pretrain=24, n_instruct=24, n_text_only=4, n_cvbench=16, n_probe=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), WorldSpec(seed=3, **SMALL))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, world):
    again = generate_world(tmp_path / "again", WorldSpec(seed=3, **SMALL))
    assert world_fingerprint(again.root) == world_fingerprint(world.root)
    other = generate_world(tmp_path / "other", WorldSpec(seed=4, **SMALL))
    assert world_fingerprint(other.root) != world_fingerprint(world.root)


def test_nearest_object_has_smallest_depth_and_its_own_pixels(world):
    scenes = json.loads((world.root / "scenes.json").read_text())
    checked = 0
    for key, scene in scenes.items():
        maps = load_maps(world.root, key)
        depth, seg, inst = maps["depth"], maps["seg"], maps["inst"]
        rgb = np.asarray(Image.open(world.root / key).convert("RGB")).astype(int)
        objs = scene["objects"]
        on_object = inst > 0
        nearest = int(np.argmin([o["Z"] for o in objs]))
        mask = inst == nearest + 1
        assert mask.sum() > 0
        assert np.allclose(depth[mask], objs[nearest]["Z"])
        assert depth[mask].max() <= depth[on_object].min() + 1e-6  # nearest pixels are the closest
        assert depth[~on_object].min() > 0
        for i, o in enumerate(objs):
            m = inst == i + 1
            assert m.sum() == o["visible_px"] > 0
            assert (seg[m] == ["sky", "ground", "circle", "square", "triangle"].index(o["shape"])).all()
            colour = np.array(COLOURS[o["colour"]])
            assert np.abs(rgb[m].mean(0) - colour).max() < 4  # noise sigma 4, averaged
        # farther objects stand higher in the image (ground contact row) and are smaller
        by_z = sorted(objs, key=lambda o: o["Z"])
        assert all(a["bbox"][3] >= b["bbox"][3] for a, b in zip(by_z, by_z[1:]))
        checked += 1
    assert checked == len(scenes) > 0


def test_files_in_real_formats(world):
    pretrain = json.loads((world.root / "pretrain.json").read_text())
    instruct = json.loads((world.root / "instruct.json").read_text())
    assert len(pretrain) == SMALL["n_pretrain"] and len(instruct) == SMALL["n_instruct"] + SMALL["n_text_only"]
    for rec in pretrain + instruct:
        conv = rec["conversations"]
        assert [m["from"] for m in conv] == ["human", "gpt"] * (len(conv) // 2)
        n_img = sum(m["value"].count("<image>") for m in conv)
        assert n_img == (1 if "image" in rec else 0)
        if "image" in rec:
            assert (world.root / rec["image"]).is_file()
    assert sum("image" not in r for r in instruct) == SMALL["n_text_only"]


def test_cvbench_records_and_answers_match_ground_truth(world):
    scenes = json.loads((world.root / "scenes.json").read_text())
    items = [json.loads(line) for line in (world.root / "cvbench.jsonl").read_text().splitlines()]
    assert {i["task"] for i in items} == {"Count", "Relation", "Depth", "Distance"}
    for it in items:
        assert set(it) >= {"idx", "type", "task", "question", "choices", "answer", "prompt", "filename", "source"}
        assert re.fullmatch(r"\([A-D]\)", it["answer"])
        chosen = it["choices"][ord(it["answer"][1]) - 65]
        objs = {text.name(o): o for o in scenes[it["filename"]]["objects"]}
        if it["task"] == "Depth":
            assert objs[chosen]["Z"] == min(objs[c]["Z"] for c in it["choices"])
            assert it["type"] == "3D"
        if it["task"] == "Count" and "objects" in it["question"]:
            assert int(chosen) == len(objs)


def test_captions_carry_no_depth_words(world):
    for name in ("pretrain.json", "allava_caption.json"):
        for rec in json.loads((world.root / name).read_text()):
            words = set(re.findall(r"[a-z]+", rec["conversations"][1]["value"].lower()))
            assert not words & set(text.DEPTH_WORDS), (name, words & set(text.DEPTH_WORDS))


def _lowest_row_of_colour(rgb: np.ndarray, colour: str) -> int:
    """Lowest image row with (at least two) pixels of ``colour``: read from the PNG alone."""
    near = np.abs(rgb - np.array(COLOURS[colour])).max(axis=-1) < 20  # noise sigma 4
    rows = np.nonzero(near.sum(axis=1) >= 2)[0]
    assert rows.size, colour
    return int(rows.max())


def test_depth_answers_follow_from_the_rendered_depth_cue(tmp_path):
    """Every Depth question (held-out and in the instruction data) is answerable from the pixels: the
    correct object's pixels reach at least MIN_DEPTH_ROWS rows lower in the image (it stands nearer
    on the ground plane); colours are unique per scene, so the colour finds the object."""
    w = generate_world(tmp_path / "w", WorldSpec(seed=5, n_pretrain=0, n_instruct=40, n_text_only=0, n_cvbench=80,
                                                 n_probe=0))
    questions = [(json.loads(x)["filename"], json.loads(x)["prompt"], json.loads(x)["answer"])
                 for x in (w.root / "cvbench.jsonl").read_text().splitlines() if json.loads(x)["task"] == "Depth"]
    for rec in json.loads((w.root / "instruct.json").read_text()):
        conv = rec["conversations"]
        questions += [(rec["image"], q["value"], a["value"]) for q, a in zip(conv[::2], conv[1::2])
                      if "closer to the camera" in q["value"] and "(A)" in q["value"]]
    assert len(questions) >= 25
    for key, prompt, answer in questions:
        rgb = np.asarray(Image.open(w.root / key).convert("RGB")).astype(int)
        choices = re.findall(r"^\(([AB])\) (\w+) \w+$", prompt, flags=re.M)
        assert len(choices) == 2, prompt
        bottom = {letter: _lowest_row_of_colour(rgb, colour) for letter, colour in choices}
        lower = max(bottom, key=bottom.get)
        assert f"({lower})" == answer.strip()
        assert abs(bottom["A"] - bottom["B"]) >= text.MIN_DEPTH_ROWS - 1  # (-1: noise can blur one edge row)


def test_instruct_question_mix_is_balanced_across_tasks(tmp_path):
    """Every task gets the same share of first multiple-choice turns, and each answer is the true one."""
    import collections
    import json

    world = generate_world(tmp_path, WorldSpec(seed=1, n_pretrain=2, n_instruct=40, n_text_only=0, n_cvbench=4,
                                               n_probe=2, ift_mc_turns=1, ift_open_turns=1))
    scenes = json.loads((world.root / "scenes.json").read_text())
    kinds = collections.Counter()
    for rec in json.loads((world.root / "instruct.json").read_text()):
        conv = rec["conversations"]
        mc = [(q["value"], a["value"]) for q, a in zip(conv[::2], conv[1::2]) if "Select from" in q["value"]]
        assert len(mc) == 1
        q, a = mc[0][0].replace("<image>\n", ""), mc[0][1]
        kind = ("Count" if q.startswith("How many") else "Relation" if "relative positions" in q
                else "Distance" if "real-world" in q else "Depth")
        kinds[kind] += 1
        objs = {f"{o['colour']} {o['shape']}": o for o in scenes[rec["image"]]["objects"]}
        choices = [line[4:] for line in q.split("\n") if line[:1] == "(" and line[2:4] == ") "]
        picked = choices[ord(a[1]) - 65]
        if kind == "Depth":  # the answer is the nearer of the two named objects
            assert objs[picked]["Z"] == min(objs[c]["Z"] for c in choices)
    assert kinds == {"Count": 10, "Relation": 10, "Depth": 10, "Distance": 10}


def _objects_by_name(scene: dict) -> dict:
    return {text.name(o): o for o in scene["objects"]}


def test_canonical_option_order_makes_the_letter_a_function_of_the_image(tmp_path):
    """Default worlds list every question's options in a fixed order (counts ascending; Relation names
    the objects in the colour order and offers left/right; Depth names them left to right; Distance
    asks about the middle object of three), so the answer letter follows from the scene alone."""
    assert text.COLOUR_ORDER == tuple(COLOURS)
    w = generate_world(tmp_path / "w", WorldSpec(seed=2, n_pretrain=0, n_instruct=0, n_text_only=0, n_cvbench=80,
                                                 n_probe=0))
    assert WorldSpec().option_order == "canonical"
    scenes = json.loads((w.root / "scenes.json").read_text())
    letters = {}
    for line in (w.root / "cvbench.jsonl").read_text().splitlines():
        it = json.loads(line)
        objs = _objects_by_name(scenes[it["filename"]])
        letters.setdefault(it["task"], set()).add(it["answer"])
        if it["task"] == "Count":
            assert it["choices"] == ["0", "1", "2", "3"]
        elif it["task"] == "Relation":
            assert it["choices"] == ["left", "right"]
            first, second = re.findall(r"the (\w+ \w+) and the (\w+ \w+) in the image", it["question"])[0]
            assert text.COLOUR_ORDER.index(objs[first]["colour"]) < text.COLOUR_ORDER.index(objs[second]["colour"])
            left = text.centre_x(objs[first]) < text.centre_x(objs[second])
            assert it["answer"] == ("(A)" if left else "(B)")
        elif it["task"] == "Depth":
            a, b = (objs[c] for c in it["choices"])
            assert text.centre_x(a) < text.centre_x(b)
            assert it["answer"] == ("(A)" if a["Z"] < b["Z"] else "(B)")
        else:
            a, b = (objs[c] for c in it["choices"])
            ref = next(o for n, o in objs.items() if n not in it["choices"])
            assert text.centre_x(a) < text.centre_x(ref) < text.centre_x(b)
            assert f"closer to the {text.name(ref)}," in it["question"]
    # both letters occur on every 2-choice task: the order fixes the roles, not the answer
    assert all(letters[t] == {"(A)", "(B)"} for t in ("Relation", "Depth", "Distance")), letters


def test_shuffled_option_order_keeps_cvbench_random_orders(tmp_path):
    w = generate_world(tmp_path / "w", WorldSpec(seed=2, n_pretrain=0, n_instruct=8, n_text_only=0, n_cvbench=80,
                                                 n_probe=0, option_order="shuffled"))
    items = [json.loads(x) for x in (w.root / "cvbench.jsonl").read_text().splitlines()]
    assert len({tuple(it["choices"]) for it in items if it["task"] == "Relation"}) == 2
    assert len({tuple(it["choices"]) for it in items if it["task"] == "Count"}) > 5
    with pytest.raises(ValueError, match="option_order"):
        generate_world(tmp_path / "bad", WorldSpec(n_pretrain=0, n_instruct=1, n_text_only=0, n_cvbench=0,
                                                   n_probe=0, option_order="sorted"))


def test_several_multiple_choice_turns_ask_distinct_tasks_with_true_answers(tmp_path):
    w = generate_world(tmp_path / "w", WorldSpec(seed=4, n_pretrain=0, n_instruct=40, n_text_only=0, n_cvbench=0,
                                                 n_probe=0, ift_mc_turns=3, ift_open_turns=0))
    scenes = json.loads((w.root / "scenes.json").read_text())
    sizes = set()
    for rec in json.loads((w.root / "instruct.json").read_text()):
        conv = rec["conversations"]
        qs = [(q["value"].replace("<image>\n", ""), a["value"]) for q, a in zip(conv[::2], conv[1::2])]
        kinds = [("Count" if q.startswith("How many") else "Relation" if "relative positions" in q
                  else "Distance" if "real-world" in q else "Depth") for q, _ in qs]
        assert len(set(kinds)) == len(kinds)  # each task at most once per image
        sizes.add(len(kinds))
        objs = _objects_by_name(scenes[rec["image"]])
        for (q, a), kind in zip(qs, kinds):
            choices = [line[4:] for line in q.split("\n") if line[:1] == "(" and line[2:4] == ") "]
            picked = choices[ord(a[1]) - 65]
            if kind == "Count" and "objects" in q:
                assert int(picked) == len(objs)
            if kind == "Depth":
                assert objs[picked]["Z"] == min(objs[c]["Z"] for c in choices)
    assert {2, 3} <= sizes  # e.g. 3-object scenes support Count + Distance, 2-object ones Count + Relation + Depth


def test_distance_answers_follow_from_the_columns_alone(tmp_path):
    """Distance questions are asked only where the image agrees with the 3D answer, down to the
    columns: the answer's column is the nearer one to the reference object's."""
    w = generate_world(tmp_path / "w", WorldSpec(seed=6, n_pretrain=0, n_instruct=0, n_text_only=0, n_cvbench=60,
                                                 n_probe=0))
    scenes = json.loads((w.root / "scenes.json").read_text())
    n = 0
    for it in map(json.loads, (w.root / "cvbench.jsonl").read_text().splitlines()):
        if it["task"] != "Distance":
            continue
        objs = _objects_by_name(scenes[it["filename"]])
        ref = next(o for k, o in objs.items() if k not in it["choices"])
        gap = {c: abs(text.centre_x(objs[c]) - text.centre_x(ref)) for c in it["choices"]}
        assert it["choices"][ord(it["answer"][1]) - 65] == min(gap, key=gap.get)
        assert max(gap.values()) >= text.MIN_COLUMN_RATIO * min(gap.values()) - 1.0  # (-1: integer bbox ends)
        n += 1
    assert n == 15


def test_canonical_count_options_hold_any_count():
    rng = np.random.default_rng(0)
    for n in range(1, 7):
        scene = {"objects": [{"shape": "circle", "colour": c, "bbox": [0, 0, 1, 1]} for c in ["red"] * n]}
        for _ in range(4):
            mc = text.multiple_choice(scene, "Count", rng)
            assert [int(c) for c in mc["choices"]] == sorted(int(c) for c in mc["choices"])
            assert len(mc["choices"]) == 4 and int(mc["choices"][mc["answer_index"]]) in (0, n)
