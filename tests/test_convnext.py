"""CLIP-ConvNeXt tower: open_clip/timm keys -> ConvNextModel, features against an independent
implementation of timm's ConvNeXt math, the real-size geometry on the meta device, and a PT + IFT
step of the ConvNeXt recipe on the tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from olavlm.cli import main as cli_main
from olavlm.config import ModelConfig
from olavlm.model.convnext import (CLIP_MEAN, CLIP_STD, ConvNextKeyError, apply_norm_eps, convnext_config,
                                   convnext_config_from_state, convnext_state_dict_from_open_clip,
                                   preprocessor_config)
from olavlm.model.vision import VisionTower, vision_geometry

# -- the trunk in timm / open_clip layout, written out from its published key list ---------------


def timm_trunk_shapes(depths, dims, patch=4) -> dict[str, tuple[int, ...]]:
    """Every tensor of a timm ConvNeXt trunk (conv_mlp False) with its shape, by the published names."""
    shapes = {"stem.0.weight": (dims[0], 3, patch, patch), "stem.0.bias": (dims[0],),
              "stem.1.weight": (dims[0],), "stem.1.bias": (dims[0],)}
    for s, (depth, c) in enumerate(zip(depths, dims)):
        if s > 0:
            prev = dims[s - 1]
            shapes.update({f"stages.{s}.downsample.0.weight": (prev,), f"stages.{s}.downsample.0.bias": (prev,),
                           f"stages.{s}.downsample.1.weight": (c, prev, 2, 2),
                           f"stages.{s}.downsample.1.bias": (c,)})
        for b in range(depth):
            k = f"stages.{s}.blocks.{b}."
            shapes.update({k + "gamma": (c,), k + "conv_dw.weight": (c, 1, 7, 7), k + "conv_dw.bias": (c,),
                           k + "norm.weight": (c,), k + "norm.bias": (c,),
                           k + "mlp.fc1.weight": (4 * c, c), k + "mlp.fc1.bias": (4 * c,),
                           k + "mlp.fc2.weight": (c, 4 * c), k + "mlp.fc2.bias": (c,)})
    shapes.update({"head.norm.weight": (dims[-1],), "head.norm.bias": (dims[-1],)})
    return shapes


def random_trunk(depths, dims, seed=0) -> dict[str, torch.Tensor]:
    """Random weights of a sane scale: norms around 1, convs / linears ~ 1/sqrt(fan_in), gamma ~ 0.5."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in timm_trunk_shapes(depths, dims).items():
        if key.endswith("gamma"):
            t = 0.3 + 0.4 * torch.rand(shape, generator=g)
        elif ("norm" in key or key.startswith("stem.1") or ".downsample.0." in key) and key.endswith("weight"):
            t = 1 + 0.2 * torch.randn(shape, generator=g)
        elif key.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[key] = t
    return out


# -- independent implementation of the timm ConvNeXt forward (float64) ---------------------------


def _ln_last(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _ln_channels_first(x, w, b, eps):
    return _ln_last(x.permute(0, 2, 3, 1), w, b, eps).permute(0, 3, 1, 2)


def _gelu_exact(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def timm_forward(sd, x, depths, eps=1e-5):
    """stem conv(p, stride p) + channels-first LN; per stage: [LN then conv 2x2 s2] + blocks
    (dwconv 7x7 -> NHWC LN -> Linear 4x -> exact GELU -> Linear -> gamma -> residual).
    Returns (last stage map, pooled head.norm output)."""
    sd = {k: v.double() for k, v in sd.items()}
    h = torch.nn.functional.conv2d(x.double(), sd["stem.0.weight"], sd["stem.0.bias"],
                                   stride=sd["stem.0.weight"].shape[-1])
    h = _ln_channels_first(h, sd["stem.1.weight"], sd["stem.1.bias"], eps)
    for s, depth in enumerate(depths):
        if s > 0:
            p = f"stages.{s}.downsample."
            h = _ln_channels_first(h, sd[p + "0.weight"], sd[p + "0.bias"], eps)
            h = torch.nn.functional.conv2d(h, sd[p + "1.weight"], sd[p + "1.bias"], stride=2)
        for b in range(depth):
            p = f"stages.{s}.blocks.{b}."
            t = torch.nn.functional.conv2d(h, sd[p + "conv_dw.weight"], sd[p + "conv_dw.bias"], padding=3,
                                           groups=h.shape[1])
            t = _ln_last(t.permute(0, 2, 3, 1), sd[p + "norm.weight"], sd[p + "norm.bias"], eps)
            t = t @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
            t = _gelu_exact(t)
            t = t @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
            h = h + t.permute(0, 3, 1, 2) * sd[p + "gamma"].view(1, -1, 1, 1)
    pooled = _ln_last(h.mean((2, 3)), sd["head.norm.weight"], sd["head.norm.bias"], eps)
    return h, pooled


DEPTHS, DIMS = (2, 1, 2, 1), (8, 12, 16, 24)


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    """A tiny open_clip checkpoint folder: the trunk under visual.trunk., the projection and a text tower."""
    folder = tmp_path_factory.mktemp("openclip")
    trunk = random_trunk(DEPTHS, DIMS)
    state = {f"visual.trunk.{k}": v for k, v in trunk.items()}
    state.update({"visual.head.proj.weight": torch.randn(16, DIMS[-1]), "token_embedding.weight": torch.randn(50, 16),
                  "text_projection": torch.randn(16, 16), "logit_scale": torch.tensor(4.6)})
    save_file(state, str(folder / "open_clip_model.safetensors"))
    cfg = {"model_cfg": {"vision_cfg": {"timm_model_name": "convnext_xxlarge", "image_size": 256}},
           "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    return folder, trunk


@pytest.fixture(scope="module")
def converted(open_clip_dir, tmp_path_factory):
    src, _ = open_clip_dir
    dst = tmp_path_factory.mktemp("converted") / "tower"
    assert cli_main(["convert", "open-clip", str(src), str(dst), "--image-size", "128", "--norm-eps", "1e-5"]) == 0
    return dst


def _tower(folder) -> VisionTower:
    return VisionTower.from_config(ModelConfig(vision_tower=str(folder), vision_type="convnext",
                                               vision_feature_layer=-1, dtype="float32"))


def test_every_trunk_key_is_used_exactly_once(open_clip_dir, converted):
    from safetensors.torch import load_file

    _, trunk = open_clip_dir
    hf = load_file(str(converted / "model.safetensors"))
    assert len(hf) == len(trunk) == 4 + 9 * sum(DEPTHS) + 4 * 3 + 2
    # the values are a bijection: each source tensor appears under exactly one converted key
    for key, value in trunk.items():
        hits = [k for k, v in hf.items() if v.shape == value.shape and torch.equal(v, value)]
        assert len(hits) == 1, (key, hits)
    cfg = json.loads((converted / "config.json").read_text())
    assert (cfg["model_type"], cfg["depths"], cfg["hidden_sizes"]) == ("convnext", list(DEPTHS), list(DIMS))
    assert cfg["norm_eps"] == 1e-5 and cfg["hidden_act"] == "gelu" and cfg["drop_path_rate"] == 0.0
    pre = json.loads((converted / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": 128, "width": 128} and pre["size"] == {"shortest_edge": 128}


def test_features_equal_independent_timm_math(open_clip_dir, converted):
    _, trunk = open_clip_dir
    tower = _tower(converted)
    lns = [m for m in tower.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(lns) == 1 + sum(DEPTHS) + 3 + 1 and all(m.eps == 1e-5 for m in lns)
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.model.training
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    feats = tower(x)
    ref, pooled = timm_forward(trunk, x, DEPTHS)
    assert feats.shape == (2, 16, DIMS[-1]) and tower.hidden_size == DIMS[-1]
    # row-major flattening: token n is row n // 4, column n % 4 of the 4x4 map
    expected = ref.permute(0, 2, 3, 1).reshape(2, 16, DIMS[-1])
    assert expected.abs().max() > 1  # features of a sane scale, so the tolerance below is meaningful
    torch.testing.assert_close(feats.double(), expected, atol=1e-5, rtol=1e-5)
    # head.norm reaches the final pooled LayerNorm (not part of the features, but converted exactly)
    out = tower.model(pixel_values=x)
    torch.testing.assert_close(out.pooler_output.double(), pooled, atol=1e-5, rtol=1e-5)


def test_layernorm_eps_is_exact_not_transformers_default(open_clip_dir, converted):
    """With a low-variance stem output, eps 1e-5 vs 1e-6 is visible: the tower matches 1e-5 only."""
    trunk = dict(open_clip_dir[1])
    trunk["stem.0.bias"] = torch.zeros_like(trunk["stem.0.bias"])
    tower = _tower(converted)
    tower.model.embeddings.patch_embeddings.bias.data.zero_()
    x = 1e-3 * torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    feats = tower(x).double()
    ref5 = timm_forward(trunk, x, DEPTHS, eps=1e-5)[0].permute(0, 2, 3, 1).reshape(1, 16, -1)
    ref6 = timm_forward(trunk, x, DEPTHS, eps=1e-6)[0].permute(0, 2, 3, 1).reshape(1, 16, -1)
    torch.testing.assert_close(feats, ref5, atol=1e-5, rtol=1e-5)
    assert (ref5 - ref6).abs().max() > 1e-2
    apply_norm_eps(tower.model, 1e-6)  # what transformers builds
    assert (tower(x).double() - ref5).abs().max() > 1e-2


def test_key_errors_are_one_line_and_name_the_keys():
    trunk = {f"visual.trunk.{k}": v for k, v in random_trunk(DEPTHS, DIMS).items()}
    good = convnext_state_dict_from_open_clip(trunk, "visual.trunk.")
    assert len(good) == len(trunk)
    missing = dict(trunk)
    del missing["visual.trunk.stages.2.blocks.1.mlp.fc2.bias"]
    with pytest.raises(ConvNextKeyError, match=r"1 missing key\(s\): visual.trunk.stages.2.blocks.1.mlp.fc2.bias"):
        convnext_state_dict_from_open_clip(missing, "visual.trunk.")
    extra = {**trunk, "visual.trunk.head.fc.weight": torch.zeros(3, DIMS[-1])}
    with pytest.raises(ConvNextKeyError, match=r"1 unknown key\(s\): visual.trunk.head.fc.weight") as e:
        convnext_state_dict_from_open_clip(extra, "visual.trunk.")
    assert "\n" not in str(e.value)
    bad = {**trunk, "visual.trunk.stages.1.blocks.0.gamma": torch.zeros(5)}
    with pytest.raises(ConvNextKeyError, match=r"mis-shaped.*stages.1.blocks.0.gamma \(5,\) != \(12,\)"):
        convnext_state_dict_from_open_clip(bad, "visual.trunk.")
    with pytest.raises(ConvNextKeyError, match="no tensor starts with 'model.vision_tower.vision_tower.'"):
        convnext_state_dict_from_open_clip(trunk, "model.vision_tower.vision_tower.")


def test_ola_checkpoint_prefix_and_cli_errors(open_clip_dir, tmp_path, capsys):
    """The same trunk stored as an OLA-VLM checkpoint converts with the prefix found automatically."""
    _, trunk = open_clip_dir
    ola = tmp_path / "ola"
    ola.mkdir()
    save_file({f"model.vision_tower.vision_tower.{k}": v for k, v in trunk.items()}
              | {"model.embed_tokens.weight": torch.zeros(4, 4)}, str(ola / "model.safetensors"))
    assert cli_main(["convert", "open-clip", str(ola), str(tmp_path / "out"), "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "under 'model.vision_tower.vision_tower.'" in out and "1 other tensor(s) left out" in out
    # no --norm-eps: timm's eps for this (non-xxlarge) shape
    assert "LayerNorm eps 1e-06" in out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["norm_eps"] == 1e-6
    assert vision_geometry(ModelConfig(vision_tower=str(tmp_path / "out"), vision_type="convnext",
                                       vision_feature_layer=-1)).grid == 2
    assert cli_main(["convert", "open-clip", str(ola), str(tmp_path / "o2"), "--image-size", "100"]) == 2
    assert "not a multiple of the trunk's stride 32" in capsys.readouterr().err
    assert cli_main(["convert", "open-clip", str(tmp_path / "nothing"), str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a checkpoint file, a folder, or a hub id" in err


# -- real size, weight-free ----------------------------------------------------------------------


def test_xxlarge_geometry_and_shapes_on_meta(tmp_path):
    from transformers import ConvNextModel

    folder = tmp_path / "xxl"
    convnext_config().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(768, CLIP_MEAN, CLIP_STD)))
    geo = vision_geometry(ModelConfig(vision_tower=str(folder), vision_type="convnext", vision_feature_layer=-1))
    assert (geo.num_tokens, geo.grid, geo.hidden_size) == (576, 24, 3072)
    assert geo.spec.size == 768 and geo.spec.resample == "bicubic" and geo.spec.mean == pytest.approx(CLIP_MEAN)
    assert geo.spec.pad_color == (122, 116, 104)
    # the published 378-tensor key list maps onto ConvNextModel(xxlarge) exactly
    source = {f"visual.trunk.{k}": torch.empty(s, device="meta")
              for k, s in timm_trunk_shapes((3, 4, 30, 3), (384, 768, 1536, 3072)).items()}
    assert len(source) == 378
    assert len(convnext_state_dict_from_open_clip(source, "visual.trunk.")) == 378
    inferred = convnext_config_from_state(source, "visual.trunk.")
    assert (inferred.depths, inferred.hidden_sizes, inferred.patch_size) == ([3, 4, 30, 3], [384, 768, 1536, 3072], 4)
    assert inferred.norm_eps == 1e-5  # timm's convnext_xxlarge, unlike the other sizes
    with torch.device("meta"):
        model = ConvNextModel(convnext_config())
    assert sum(p.numel() for p in model.parameters()) == 843_398_016
    tower = VisionTower(model, feature_layer=-1, drop_cls=False, family="convnext")
    assert sum(isinstance(m, torch.nn.LayerNorm) and m.eps == 1e-5 for m in tower.modules()) == 45
    feats = tower(torch.empty(2, 3, 768, 768, device="meta"))
    assert feats.shape == (2, 576, 3072) and tower.hidden_size == 3072


# -- the recipe on tiny models -------------------------------------------------------------------


def test_convnext_recipe_runs_pt_then_ift(tiny_dir, tmp_path):
    from olavlm.model.vlm import OlaVLM
    from olavlm.devkit.smoke import smoke_overrides

    for stage in ("pt", "ift"):
        recipe = Path("configs/llama3_8b_convnext") / f"{stage}.yaml"
        overrides = smoke_overrides(tiny_dir, recipe, tmp_path, max_steps=1)
        assert f"--model.vision_tower={tiny_dir / 'vision-convnext'}" in overrides
        assert cli_main(["train", str(recipe), *overrides]) == 0
        run_dir = tmp_path / "llama3_8b_convnext" / stage
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 1 and summary["finished"]
        metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        tasks = {"loss/depth", "loss/seg", "loss/gen"}
        assert tasks <= set(metrics) if stage == "pt" else not tasks & set(metrics)  # teachers on the 8x8 grid
    final = tmp_path / "llama3_8b_convnext" / "ift" / "final"
    model = OlaVLM.from_pretrained(final)
    assert model.cfg.vision_type == "convnext" and model.num_image_tokens == 64
    assert all(m.eps == 1e-5 for m in model.vision.modules() if isinstance(m, torch.nn.LayerNorm))
    x = torch.randn(1, 3, 256, 256)
    torch.testing.assert_close(model.vision(x), _tower(tiny_dir / "vision-convnext")(x))  # tower kept as is


@pytest.mark.slow  # two Python start-ups in a subprocess (~10-20 s)
def test_train_script_tiny_mode_picks_the_convnext_recipe(tiny_dir, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    env = {**os.environ, "PYTHON": sys.executable, "TINY": str(tiny_dir), "LLM": "phi3_mini", "ENCODER": "convnext",
           "SMOKE_OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "scripts/train/finetune.sh", "--print-config"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["vision_type"] == "convnext" and cfg["model"]["vision_feature_layer"] == -1
    assert cfg["model"]["vision_tower"] == str(tiny_dir / "vision-convnext")
    assert cfg["train"]["init_from"] == str(tmp_path / "phi3_mini_convnext" / "pt")


def test_parity_script_against_timm_or_a_clear_message(tmp_path):
    """scripts/convnext_parity.py: with timm, olavlm's tower equals timm's; without it, one clear line."""
    import importlib.util
    import subprocess
    import sys

    cmd = [sys.executable, "scripts/convnext_parity.py", "--tiny", "--image-size", "64",
           "--out", str(tmp_path / "p.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if importlib.util.find_spec("timm") is None:
        assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
        assert "timm is not installed" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "p.json").read_text())
    assert all(row["max_abs"] < 1e-4 for row in report["olavlm"].values())


def test_converted_preprocessor_is_what_the_square_geometry_does(tiny_dir):
    """The converted folder's CLIPImageProcessor (open_clip's eval transform: bicubic shortest side,
    centre crop, CLIP mean/std) gives the same pixels as the data layer's ``square`` geometry."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    from olavlm.config import ModelConfig
    from olavlm.data.images import pixel_values, to_square
    from olavlm.model.vision import vision_geometry

    proc = AutoImageProcessor.from_pretrained(tiny_dir / "vision-convnext")
    spec = vision_geometry(ModelConfig(vision_tower=str(tiny_dir / "vision-convnext"),
                                       vision_type="convnext", vision_feature_layer=-1)).spec  # production's reader
    assert spec.size == 256 and spec.resample == "bicubic"
    rng = np.random.default_rng(0)
    for w, h in [(300, 200), (120, 400), (256, 256)]:
        img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        ref = torch.as_tensor(np.asarray(proc(images=img, return_tensors="pt")["pixel_values"][0]))
        torch.testing.assert_close(pixel_values(to_square(img, "square", spec), spec), ref, atol=1e-5, rtol=0)
