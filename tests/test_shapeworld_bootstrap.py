"""Bootstrap pieces that need no training: caption attributes for the vision objective, world text."""

from __future__ import annotations

import numpy as np

from olavlm.demo.bootstrap import caption_targets, world_texts
from olavlm.world.generate import WorldSpec, generate_world

CAPS = [
    "The image shows two objects standing on a grey ground. From left to right there is a small red circle "
    "and a large blue square. In total there is one circle.",
    "The image shows two objects standing on a grey ground. From left to right there is a large blue square "
    "and a small red circle. In total there is one circle.",
    "The image shows one object standing on a grey ground. It is a small red circle. In total there is one circle.",
]


def test_caption_targets_keep_left_to_right_slots():
    vocab, y = caption_targets(CAPS, min_count=1)
    idx = {g: i for i, g in enumerate(vocab)}
    assert y[0, idx["slot0: small red circle"]] == 1 and y[0, idx["slot1: large blue square"]] == 1
    assert y[1, idx["slot0: large blue square"]] == 1 and y[1, idx["slot1: small red circle"]] == 1
    assert y[2, idx["slot0: small red circle"]] == 1 and "slot1: small red circle" in idx
    assert y[2, idx["slot1: small red circle"]] == 0
    assert "circle" not in idx  # present in every caption: constant attributes are dropped
    assert y.dtype == np.float32 and y.shape == (3, len(vocab))


def test_world_texts_are_chat_messages_without_image_placeholders(tmp_path):
    world = generate_world(tmp_path, WorldSpec(seed=0, n_pretrain=4, n_instruct=4, n_text_only=2, n_cvbench=4,
                                               n_probe=4))
    convs, plain = world_texts(world.root)
    assert len(convs) == 4 + 4 + 4 + 2
    for msgs in convs:
        assert msgs[0]["role"] == "system" and [m["role"] for m in msgs[1:3]] == ["user", "assistant"]
        assert all("<image>" not in m["content"] for m in msgs)
    assert all("<image>" not in t for t in plain)


def test_patch_colours_are_row_major_sub_cell_means():
    import torch

    from olavlm.demo.bootstrap import patch_colours

    x = torch.randn(2, 3, 16, 16)
    out = patch_colours(x, patch=8, sub=2)  # 2x2 patches, each 2x2 cells of 4x4 pixels
    assert out.shape == (2, 4, 12)
    # patch (row 1, col 0) = token 2; its cell (0, 1) covers rows 8..11, cols 4..7
    want = x[1, :, 8:12, 4:8].mean(dim=(1, 2))
    got = out[1, 2].view(3, 2, 2)[:, 0, 1]
    torch.testing.assert_close(got, want)


def test_tower_targets_follow_the_ground_truth(tmp_path):
    """Per-patch targets recomputed pixel by pixel from the instance map and the scene record."""
    import json

    from olavlm.demo.tower_targets import global_targets, patch_targets
    from olavlm.world.generate import COLOURS, SHAPES, load_maps

    world = generate_world(tmp_path, WorldSpec(seed=3, n_pretrain=6, n_instruct=2, n_text_only=0, n_cvbench=2,
                                               n_probe=2))
    scenes = json.loads((world.root / "scenes.json").read_text())
    keys = sorted(scenes)[:4]
    side, patch = 64, 16
    got = patch_targets(world.root, keys, patch)
    g, nc, ns = side // patch, len(COLOURS), len(SHAPES)
    assert got.shape == (4, g * g, nc + ns + 3 * nc + 4 * nc + 2)
    for r, key in enumerate(keys):
        inst, objs = load_maps(world.root, key)["inst"], scenes[key]["objects"]
        for p in range(g * g):
            pr, pc = divmod(p, g)
            cell = inst[pr * patch:(pr + 1) * patch, pc * patch:(pc + 1) * patch]
            for k, o in enumerate(objs):
                c, s = list(COLOURS).index(o["colour"]), SHAPES.index(o["shape"])
                frac = float((cell == k + 1).sum()) / patch ** 2
                assert abs(got[r, p, c] - frac) < 1e-6 and got[r, p, nc + s] >= frac - 1e-6
                where = [min(max((o["Z"] - 1.5) / 3.0, 0), 1), (o["bbox"][0] + o["bbox"][2]) / 2 / side,
                         o["visible_bottom"] / side]
                local = got[r, p, nc + ns + 3 * c:nc + ns + 3 * c + 3]
                np.testing.assert_allclose(local, where if frac > 0 else [0, 0, 0], atol=1e-6)
                np.testing.assert_allclose(got[r, p, nc + ns + 3 * nc + 4 * c:][:4], [1.0, *where], atol=1e-6)
            np.testing.assert_allclose(got[r, p, -2:], [(pr - 1.5) / 1.5, (pc - 1.5) / 1.5], atol=1e-6)
        absent = [c for c, name in enumerate(COLOURS) if name not in {o["colour"] for o in objs}]
        for c in absent:
            assert not got[r, :, nc + ns + 3 * nc + 4 * c:nc + ns + 3 * nc + 4 * c + 4].any()
    counts = global_targets(world.root, keys)
    for r, key in enumerate(keys):
        objs = scenes[key]["objects"]
        want = [len(objs) / 3] + [sum(o["shape"] == s for o in objs) / 3 for s in SHAPES]
        for o in sorted(objs, key=lambda o: (o["bbox"][0] + o["bbox"][2]) / 2):  # slots, left to right
            want += [1.0, list(COLOURS).index(o["colour"]) / 3, min(max((o["Z"] - 1.5) / 3.0, 0), 1),
                     (o["bbox"][0] + o["bbox"][2]) / 2 / side, o["visible_bottom"] / side]
        want += [0.0] * 5 * (3 - len(objs))  # empty slots
        ordered = sorted(objs, key=lambda o: (o["bbox"][0] + o["bbox"][2]) / 2)
        gaps = [((b["bbox"][0] + b["bbox"][2]) - (a["bbox"][0] + a["bbox"][2])) / 2 / side
                for a, b in zip(ordered, ordered[1:])]
        want += gaps + [0.0] * (2 - len(gaps))
        np.testing.assert_allclose(counts[r], want, atol=1e-6)
    assert any(len(scenes[k]["objects"]) > 1 for k in keys)
