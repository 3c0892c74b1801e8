"""ShapeWorld oracle teachers: shapes, layouts, values against an independent computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from olavlm.teachers.base import TEACHERS, build_teacher
from olavlm.world.generate import WorldSpec, generate_world, load_maps


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("w"), WorldSpec(seed=1, n_pretrain=6, n_instruct=2,
                                                                  n_text_only=1, n_cvbench=4, n_probe=2))


KEYS = ["images/pt_00000.png", "images/pt_00001.png", "images/cvb_00002.png"]


def _images(n=3):
    return torch.zeros(n, 3, 64, 64, dtype=torch.uint8)


@pytest.mark.parametrize("name,shape", [("shapeworld_depth", (64, 24)), ("shapeworld_seg", (24, 8, 8)),
                                        ("shapeworld_gen", (1, 24))])
def test_registered_shapes_and_batching(world, name, shape):
    t = build_teacher(name, str(world.root), grid=8, dim=24)
    assert name in TEACHERS and t.target_shape == shape and t.input_size == 64
    out = t.encode(_images(), KEYS)
    assert out.shape == (3, *shape) and out.dtype == torch.float32 and torch.isfinite(out).all()
    one = torch.cat([t.encode(_images(1), [k]) for k in KEYS])
    torch.testing.assert_close(out, one)
    assert not torch.allclose(out[0], out[1])  # different scenes -> different targets
    t.to(dtype=torch.bfloat16)
    assert t.encode(_images(), KEYS).dtype == torch.bfloat16
    again = build_teacher(name, str(world.root), grid=8, dim=24)
    torch.testing.assert_close(again.encode(_images(), KEYS), out)  # fixed seeded maps
    other = build_teacher(name, str(world.root), grid=8, dim=24, seed=5)
    assert not torch.allclose(other.encode(_images(), KEYS), out)


def test_grid_4_also_matches(world):
    t = build_teacher("shapeworld_seg", str(world.root), grid=4, dim=8)
    assert t.encode(_images(1), KEYS[:1]).shape == (1, 8, 4, 4)


def test_depth_values_independent(world):
    t = build_teacher("shapeworld_depth", str(world.root), grid=8, dim=16, sub=2, bandwidth=3.0)
    out = t.encode(_images(1), KEYS[:1])[0]
    depth = load_maps(world.root, KEYS[0])["depth"].astype(np.float64)
    z0, z1 = 1.5, 12.0
    logd = (np.log(np.clip(depth, z0, z1)) - math.log(z0)) / (math.log(z1) - math.log(z0))
    w, b = t.weight.double().numpy(), t.bias.double().numpy()
    for r, c in [(0, 0), (5, 3), (7, 7)]:
        block = logd[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
        sub = np.array([block[:4, :4].mean(), block[:4, 4:].mean(), block[4:, :4].mean(), block[4:, 4:].mean()])
        expected = math.sqrt(2) * np.cos(3.0 * w @ sub + b)
        np.testing.assert_allclose(out[r * 8 + c].numpy(), expected, atol=1e-5)


def test_seg_values_independent(world):
    t = build_teacher("shapeworld_seg", str(world.root), grid=8, dim=12, bandwidth=5.0)
    out = t.encode(_images(1), KEYS[1:2])[0]  # (12, 8, 8)
    seg = load_maps(world.root, KEYS[1])["seg"]
    w, b = t.weight.double().numpy(), t.bias.double().numpy()
    for r, c in [(0, 0), (4, 4), (6, 2)]:
        block = seg[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
        hist = np.bincount(block.ravel(), minlength=5) / 64
        np.testing.assert_allclose(out[:, r, c].numpy(), math.sqrt(2) * np.cos(5.0 * w @ hist + b), atol=1e-5)


@pytest.mark.parametrize("name", ["shapeworld_depth", "shapeworld_seg", "shapeworld_gen"])
def test_centred_targets_are_raw_minus_world_mean_over_spread(world, name):
    raw_t = build_teacher(name, str(world.root), grid=8, dim=16)
    t = build_teacher(name, str(world.root), grid=8, dim=16, centre=True)
    keys = sorted(json.loads((world.root / "scenes.json").read_text()))
    raw = raw_t.encode(_images(len(keys)), keys).double()
    mean = raw.mean(0)
    spread = (raw - mean).pow(2).mean().sqrt()
    torch.testing.assert_close(t.encode(_images(len(keys)), keys).double(), (raw - mean) / spread,
                               atol=1e-5, rtol=1e-4)
    centred = t.encode(_images(len(keys)), keys).double()

    def mean_pair_cos(x):  # mean cosine over every pair of different images
        u = torch.nn.functional.normalize(x.flatten(1), dim=1)
        sim = u @ u.T
        return float((sim.sum() - sim.diagonal().sum()) / (len(x) * (len(x) - 1)))

    assert abs(mean_pair_cos(centred)) < mean_pair_cos(raw)  # centring removes the shared component


def test_bad_use_is_a_clear_error(world):
    t = build_teacher("shapeworld_depth", str(world.root), grid=8)
    with pytest.raises(ValueError, match="keys"):
        t.encode(_images(1))
    with pytest.raises(ValueError, match="1 images but 2 keys"):
        t.encode(_images(1), KEYS[:2])
    with pytest.raises(KeyError, match="no ground-truth maps"):
        t.encode(_images(1), ["images/nope.png"])
    with pytest.raises(ValueError, match="grid 7"):
        build_teacher("shapeworld_seg", str(world.root), grid=7)
    with pytest.raises(TypeError, match="unknown teacher_kwargs"):
        build_teacher("shapeworld_gen", str(world.root), grid=8, size=3)
    with pytest.raises(FileNotFoundError, match="world.json"):
        build_teacher("shapeworld_gen", str(world.root / "images"), grid=8)
