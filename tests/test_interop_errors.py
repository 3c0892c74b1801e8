"""Hostile inputs to `olavlm convert reference` / `olavlm export llava`: one-line errors naming the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from olavlm.cli import main
from olavlm.errors import UserError
from olavlm.interop import InteropError
from olavlm.interop.reference import convert_reference
from olavlm.interop.reference_config import ConvertOptions
from olavlm.devkit.reference import make_tiny_reference, read_tensors, write_shards

OPTS = ConvertOptions(vision_heads=4, dtype="float32")


@pytest.fixture(scope="module")
def refs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return {stage: make_tiny_reference(tiny_dir, root / stage, stage=stage) for stage in ("pt", "ift")}


def variant(src: Path, dst: Path, edit=None, config=None) -> Path:
    """A copy of ``src`` with the tensors passed through ``edit(state)`` and the config through ``config(cfg)``."""
    shutil.copytree(src, dst)
    if edit is not None:
        state = read_tensors(src)
        edit(state)
        for f in dst.glob("model-*.safetensors"):
            f.unlink()
        write_shards(state, dst, 3)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def cli_error(src: Path, dst: Path, capsys, *extra: str) -> str:
    rc = main(["convert", "reference", str(src), str(dst), "--vision-heads", "4", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("olavlm: error: "), err  # one line, no traceback
    assert not dst.exists()  # nothing half-written
    return err


def test_missing_shard(refs, tmp_path, capsys):
    src = variant(refs["ift"], tmp_path / "src")
    (src / "model-00002-of-00003.safetensors").unlink()
    err = cli_error(src, tmp_path / "out", capsys)
    assert "model-00002-of-00003.safetensors: missing shard" in err
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    first = next(k for k, v in index.items() if v == "model-00002-of-00003.safetensors")
    assert first in err  # names a key the shard holds


def test_index_key_absent_from_its_shard(refs, tmp_path, capsys):
    src = variant(refs["ift"], tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = "model-00001-of-00003.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model.layers.0.self_attn.q_proj.bias: listed in" in cli_error(src, tmp_path / "out", capsys)


def test_corrupt_shard(refs, tmp_path, capsys):
    src = variant(refs["ift"], tmp_path / "src")
    shard = src / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    assert "model-00003-of-00003.safetensors: not a readable safetensors file" in cli_error(src, tmp_path / "out", capsys)


@pytest.mark.parametrize("key", ["model.foo.weight", "model.vision_tower.vision_tower.vision_model.extra.weight",
                                 "image_seg_heads.0.projector.extra.weight", "model.mm_projector.4.weight"])
def test_unknown_key(refs, tmp_path, capsys, key):
    def add(state):
        state[key] = torch.zeros(3)

    err = cli_error(variant(refs["pt"], tmp_path / "src", add), tmp_path / "out", capsys)
    assert f"olavlm: error: {key}:" in err and "unknown" in err


@pytest.mark.parametrize("key", ["model.mm_projector.0.weight", "model.layers.1.mlp.up_proj.weight",
                                 "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc2.weight",
                                 "model.special_depth_tokens", "image_seg_heads.1.projector.norm_out.weight",
                                 "image_depth_heads.0.linear_1.2.weight", "gen_logit_scale"])
def test_shape_mismatch(refs, tmp_path, capsys, key):
    def grow(state):
        state[key] = torch.zeros(*(s + 1 for s in state[key].shape)) if state[key].ndim else torch.zeros(2)

    err = cli_error(variant(refs["pt"], tmp_path / "src", grow), tmp_path / "out", capsys)
    assert f"olavlm: error: {key}: shape" in err


@pytest.mark.parametrize("key", ["model.norm.weight", "model.special_gen_tokens", "image_depth_heads.1.projector.proj_in.weight",
                                 "model.vision_tower.vision_tower.vision_model.post_layernorm.bias"])
def test_missing_key(refs, tmp_path, capsys, key):
    def drop(state):
        del state[key]

    err = cli_error(variant(refs["pt"], tmp_path / "src", drop), tmp_path / "out", capsys)
    assert key in err and "missing" in err


def test_task_token_format_must_be_decidable(refs, tmp_path, capsys):
    src = variant(refs["ift"], tmp_path / "src", config=lambda c: c.pop("task_token_format"))
    assert "task_token_format is absent" in cli_error(src, tmp_path / "out", capsys)
    bad = variant(refs["ift"], tmp_path / "bad", config=lambda c: c.update(task_token_format="mean"))
    assert "task_token_format: 'mean'" in cli_error(bad, tmp_path / "out", capsys)
    assert main(["convert", "reference", str(src), str(tmp_path / "out"), "--vision-heads", "4",
                 "--task-token-format", "expand_emb"]) == 0  # the user decides
    conv = json.loads((tmp_path / "out" / "olavlm_conversion.json").read_text())
    assert conv["reference"]["task_token_format"] == "expand_emb"
    err = cli_error(refs["pt"], tmp_path / "pt-out", capsys, "--task-token-format", "emb")
    assert "a PT checkpoint always pools its task tokens" in err


def test_truncated_convnext_tower_names_its_missing_keys(refs, tmp_path, capsys):
    def convnext(state):
        for k in [k for k in state if k.startswith("model.vision_tower.")]:
            del state[k]
        state["model.vision_tower.vision_tower.stem.0.weight"] = torch.zeros(4, 3, 4, 4)
        state["model.vision_tower.vision_tower.stages.0.blocks.0.conv_dw.weight"] = torch.zeros(4, 1, 7, 7)

    err = cli_error(variant(refs["ift"], tmp_path / "src", convnext), tmp_path / "out", capsys,
                    "--vision-image-size", "64")
    assert "13 missing key(s): model.vision_tower.vision_tower." in err and "(+7 more)" in err


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "llava_mistral", "model_type: 'llava_mistral'"),
    ("aux_mode", "gen-normals", "aux_mode"),
    ("mm_patch_merge_type", "spatial_unpad", "mm_patch_merge_type"),
    ("mm_vision_select_feature", "cls", "mm_vision_select_feature"),
    ("image_depth", {"depth_layer_indices": "8-x"}, "image_depth.depth_layer_indices"),
    ("num_task_tokens", "8", "num_task_tokens"),
])
def test_bad_config_fields(refs, tmp_path, capsys, field, value, match):
    src = variant(refs["pt"], tmp_path / "src", config=lambda c: c.update({field: value}))
    assert match in cli_error(src, tmp_path / "out", capsys)


def test_error_types_and_existing_destination(refs, tmp_path, capsys):
    assert issubclass(InteropError, UserError)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(InteropError, match="exists and is not empty"):
        convert_reference(str(refs["ift"]), tmp_path / "out", OPTS)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    with pytest.raises(InteropError, match="not a folder"):
        convert_reference(str(tmp_path / "nowhere"), tmp_path / "o2", OPTS)
    with pytest.raises(InteropError, match="--vision-heads: 5"):
        convert_reference(str(refs["ift"]), tmp_path / "o3", ConvertOptions(vision_heads=5))


def test_export_rejects_what_llava_cannot_hold(tiny_dir, tmp_path, capsys):
    from olavlm.devkit.tiny import tiny_model_config
    from olavlm.model.vlm import OlaVLM

    def export_error(src, *extra):
        rc = main(["export", "llava", str(src), str(tmp_path / "llava"), *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("olavlm: error: "), err
        return err

    assert "not an olavlm model folder" in export_error(tmp_path)
    model = OlaVLM.from_config(tiny_model_config(tiny_dir, projector="linear"), with_predictors=False)
    model.save_pretrained(tmp_path / "linear", with_predictors=False)
    assert "olavlm_run.json" in export_error(tmp_path / "linear")
    assert "model.projector: 'linear'" in export_error(tmp_path / "linear", "--template", "llava_llama_3",
                                                       "--image-geometry", "pad")
    model = OlaVLM.from_config(tiny_model_config(tiny_dir), with_predictors=False)
    model.save_pretrained(tmp_path / "mlp", with_predictors=False)
    assert "--template: 'plain'" in export_error(tmp_path / "mlp", "--template", "plain", "--image-geometry", "pad")
