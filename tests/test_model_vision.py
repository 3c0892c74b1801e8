"""olavlm.model.vision: weight-free geometry and the frozen towers (tiny CLIP / SigLIP / ConvNeXt)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from olavlm.config import ConfigError, ModelConfig
from olavlm.model.vision import VisionTower, vision_geometry


def _cfg(tiny_dir, kind, **kw):
    return ModelConfig(llm=str(tiny_dir / "llm-llama"), vision_tower=str(tiny_dir / f"vision-{kind}"),
                       vision_type=kind, **{"dtype": "float32", **kw})


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


def test_convnext_geometry_and_errors(tiny_dir):
    cfg = _cfg(tiny_dir, "convnext", vision_feature_layer=-1)
    g = vision_geometry(cfg)
    assert (g.num_tokens, g.grid, g.hidden_size) == (64, 8, 64)  # 256 px / stride 32, last stage width
    assert g.spec.size == 256 and g.spec.resample == "bicubic"
    assert g.spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert vision_geometry(_cfg(tiny_dir, "convnext", vision_feature_layer=4)).num_tokens == 64
    with pytest.raises(ConfigError, match="model.vision_feature_layer: -2 is not available"):
        vision_geometry(_cfg(tiny_dir, "convnext"))  # the ViT default does not apply
    with pytest.raises(ConfigError, match="model.vision_drop_cls"):
        vision_geometry(_cfg(tiny_dir, "convnext", vision_feature_layer=-1, vision_drop_cls=True))
    with pytest.raises(ConfigError, match="model.vision_type.*'convnext'"):
        vision_geometry(ModelConfig(vision_tower=str(tiny_dir / "vision-clip"), vision_type="convnext",
                                    vision_feature_layer=-1))
    raw = ModelConfig(vision_tower=str(tiny_dir / "vision-convnext-openclip"), vision_type="convnext",
                      vision_feature_layer=-1)
    with pytest.raises(FileNotFoundError, match="olavlm convert open-clip"):
        vision_geometry(raw)  # an unconverted open_clip folder: told how to convert it


def test_convnext_tower_flattens_the_last_stage_row_major(tiny_dir):
    tower = VisionTower.from_config(_cfg(tiny_dir, "convnext", vision_feature_layer=-1))
    assert not any(p.requires_grad for p in tower.parameters()) and tower.hidden_size == 64
    x = torch.randn(2, 3, 256, 256)
    feats = tower(x)
    last = tower.model(pixel_values=x).last_hidden_state  # (2, 64, 8, 8), no final norm
    assert feats.shape == (2, 64, 64) and not feats.requires_grad
    torch.testing.assert_close(feats[:, 8 * 3 + 5], last[:, :, 3, 5])  # token n = row n // 8, column n % 8
    torch.testing.assert_close(feats, last.permute(0, 2, 3, 1).reshape(2, 64, 64))
    tower.train()
    assert not tower.model.training


def test_convnext_tower_in_training_dtype_and_refuses_partial_weights(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    tower = VisionTower.from_config(_cfg(tiny_dir, "convnext", vision_feature_layer=-1, dtype="bfloat16"))
    assert {p.dtype for p in tower.parameters()} == {torch.bfloat16}
    assert tower(torch.randn(1, 3, 256, 256)).dtype == torch.bfloat16
    partial = tmp_path / "partial"
    shutil.copytree(tiny_dir / "vision-convnext", partial)
    state = load_file(str(partial / "model.safetensors"))
    del state["encoder.stages.2.layers.1.pwconv1.weight"]
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model.vision_tower: .* lacks 1 ConvNextModel weight.*pwconv1"):
        VisionTower.from_config(ModelConfig(vision_tower=str(partial), vision_type="convnext",
                                            vision_feature_layer=-1, dtype="float32"))
