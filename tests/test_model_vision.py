"""olavlm.model.vision: weight-free geometry and the frozen towers (tiny CLIP / SigLIP)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from olavlm.config import ConfigError, ModelConfig
from olavlm.model.vision import VisionTower, vision_geometry


def _cfg(tiny_dir, kind, **kw):
    return ModelConfig(llm=str(tiny_dir / "llm-llama"), vision_tower=str(tiny_dir / f"vision-{kind}"),
                       vision_type=kind, dtype="float32", **kw)


def test_geometry_clip_and_siglip(tiny_dir):
    g = vision_geometry(_cfg(tiny_dir, "clip"))
    assert (g.num_tokens, g.grid, g.hidden_size) == (64, 8, 64)
    assert g.spec.size == 64 and g.spec.resample == "bicubic"
    assert g.spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    g = vision_geometry(_cfg(tiny_dir, "siglip"))
    assert (g.num_tokens, g.grid) == (16, 4)
    assert g.spec.mean == (0.5, 0.5, 0.5) and g.spec.resample == "bicubic"
    assert vision_geometry(_cfg(tiny_dir, "clip", vision_drop_cls=False)).num_tokens == 65


def test_geometry_errors_name_the_field(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.vision_type"):
        vision_geometry(ModelConfig(vision_tower=str(tiny_dir / "vision-clip"), vision_type="siglip"))
    with pytest.raises(ConfigError, match="model.vision_drop_cls"):
        vision_geometry(_cfg(tiny_dir, "siglip", vision_drop_cls=True))
    bad = tmp_path / "v"
    shutil.copytree(tiny_dir / "vision-clip", bad)
    (bad / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        vision_geometry(ModelConfig(vision_tower=str(bad), vision_type="clip"))


def test_geometry_reads_full_clip_checkpoint_config(tiny_dir, tmp_path):
    """A full CLIPModel checkpoint (openai/clip-vit-*) nests the tower under vision_config."""
    folder = tmp_path / "full"
    shutil.copytree(tiny_dir / "vision-clip", folder)
    vc = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": vc}))
    assert vision_geometry(ModelConfig(vision_tower=str(folder), vision_type="clip")).num_tokens == 64


@pytest.mark.parametrize("kind, tokens", [("clip", 64), ("siglip", 16)])
def test_tower_features_match_hf_hidden_states(tiny_dir, kind, tokens):
    cfg = _cfg(tiny_dir, kind)
    tower = VisionTower.from_config(cfg)
    assert not any(p.requires_grad for p in tower.parameters())
    x = torch.randn(2, 3, 64, 64)
    feats = tower(x)
    assert feats.shape == (2, tokens, 64) and not feats.requires_grad
    ref = tower.model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(feats, ref[:, 1:] if kind == "clip" else ref)
    tower.train()
    assert not tower.model.training  # frozen tower stays in eval mode
    with pytest.raises(ConfigError, match="model.vision_feature_layer"):
        VisionTower(tower.model, feature_layer=9, drop_cls=False)
