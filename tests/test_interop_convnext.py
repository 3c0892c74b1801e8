"""`olavlm convert reference` on checkpoints with a CLIP-ConvNeXt tower (timm trunk keys).

Tiny released-layout checkpoints carry the tiny open_clip ConvNeXt trunk under
``model.vision_tower.vision_tower.{stem,stages,head.norm}.*``. Checked: every tensor lands under the
transformers ``ConvNextModel`` name given by a table written here (not the converter's), with the
same values; the model config the released models need (convnext, last stage, input size from the
``-res<N>`` tower name); chat on the converted IFT model; one-line errors for bad trunk keys.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from olavlm.cli import main
from olavlm.interop.reference import convert_reference
from olavlm.interop.reference_config import ConvertOptions
from olavlm.devkit.reference import make_tiny_reference, read_tensors, write_shards

K, P = 2, 64  # tiny task tokens per task; image tokens (256 px / stride 32 = 8x8 grid)
OPTS = ConvertOptions(dtype="float32")
PREFIX = "model.vision_tower.vision_tower."


@pytest.fixture(scope="module")
def folders(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("interop-convnext")
    out = {}
    for stage in ("pt", "ift"):
        out[f"ref-{stage}"] = make_tiny_reference(tiny_dir, root / f"ref-{stage}", stage=stage, num_task_tokens=K,
                                                  vision="convnext")
        out[stage] = root / f"conv-{stage}"
        convert_reference(str(out[f"ref-{stage}"]), out[stage], OPTS)
    return out


def hf_name(key: str) -> str:
    """timm ConvNeXt key (prefix stripped) -> transformers ConvNextModel key, by the documented table."""
    rules = [(r"stem\.0\.(.+)", r"embeddings.patch_embeddings.\1"), (r"stem\.1\.(.+)", r"embeddings.layernorm.\1"),
             (r"stages\.(\d+)\.downsample\.(\d)\.(.+)", r"encoder.stages.\1.downsampling_layer.\2.\3"),
             (r"stages\.(\d+)\.blocks\.(\d+)\.gamma", r"encoder.stages.\1.layers.\2.layer_scale_parameter"),
             (r"stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(.+)", r"encoder.stages.\1.layers.\2.dwconv.\3"),
             (r"stages\.(\d+)\.blocks\.(\d+)\.norm\.(.+)", r"encoder.stages.\1.layers.\2.layernorm.\3"),
             (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(.+)", r"encoder.stages.\1.layers.\2.pwconv1.\3"),
             (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(.+)", r"encoder.stages.\1.layers.\2.pwconv2.\3"),
             (r"head\.norm\.(.+)", r"layernorm.\1")]
    for pattern, target in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    raise AssertionError(f"no ConvNextModel name for {key}")


@pytest.mark.parametrize("stage", ["pt", "ift"])
def test_every_tower_tensor_lands_under_its_convnext_name(folders, stage):
    ref = read_tensors(folders[f"ref-{stage}"])
    vision = read_tensors(folders[stage] / "vision")
    tower = {k[len(PREFIX):]: v for k, v in ref.items() if k.startswith(PREFIX)}
    assert len(tower) == 4 + 5 * 9 + 3 * 4 + 2  # stem, 5 blocks, 3 downsamples, head.norm
    expected = {hf_name(k): v for k, v in tower.items()}
    assert set(vision) == set(expected)  # nothing missing, nothing extra
    for name, want in expected.items():
        assert vision[name].dtype == want.dtype and torch.equal(vision[name], want), name
    extras = read_tensors(folders[stage])
    for key in ("model.mm_projector.0.weight", "model.mm_projector.2.bias"):
        assert torch.equal(extras["projector." + key[len("model.mm_projector."):]], ref[key].float())
    assert torch.equal(extras["task_tokens.rows.depth"], ref["model.special_depth_tokens"].float())
    assert torch.equal(read_tensors(folders[stage] / "llm")["lm_head.weight"], ref["lm_head.weight"])


def test_converted_config_is_the_released_convnext_geometry(folders, tiny_dir):
    from olavlm.model import io
    from olavlm.model.vision import vision_geometry

    cfg, _ = io.read_config(folders["ift"])
    assert (cfg.vision_type, cfg.vision_feature_layer, cfg.vision_drop_cls) == ("convnext", -1, None)
    assert cfg.num_task_tokens == K and cfg.task_order == ["gen", "depth", "seg"]
    vc = json.loads((folders["ift"] / "vision" / "config.json").read_text())
    made = json.loads((tiny_dir / "vision-convnext" / "config.json").read_text())  # `convert open-clip` of the same trunk
    assert (vc["model_type"], vc["depths"], vc["hidden_sizes"], vc["image_size"]) == (
        "convnext", made["depths"], made["hidden_sizes"], 256)
    assert vc["norm_eps"] == 1e-6  # what timm builds a trunk of this (non-xxlarge) shape with
    cfg.vision_tower = str(folders["ift"] / "vision")
    geo = vision_geometry(cfg)
    assert (geo.num_tokens, geo.spec.size) == (P, 256)
    pre = json.loads((folders["ift"] / "vision" / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": 256, "width": 256} and pre["resample"] == 3  # bicubic, as open_clip


def test_released_size_is_768_px_with_xxlarge_eps():
    """The real trunk's shapes (meta tensors, nothing allocated) give convnext_xxlarge at 768 px."""
    from olavlm.interop.reference_config import _res_suffix
    from olavlm.model.convnext import XXLARGE_DEPTHS, XXLARGE_DIMS, convnext_config_from_state

    size = _res_suffix("laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup-res768")
    state = {f"{PREFIX}stem.0.weight": torch.empty(384, 3, 4, 4, device="meta")}
    for s, (d, c) in enumerate(zip(XXLARGE_DEPTHS, XXLARGE_DIMS)):
        for b in range(d):
            state[f"{PREFIX}stages.{s}.blocks.{b}.conv_dw.weight"] = torch.empty(c, 1, 7, 7, device="meta")
    cfg = convnext_config_from_state(state, PREFIX, image_size=size)
    assert (size, cfg.norm_eps, list(cfg.depths), cfg.image_size // 32) == (768, 1e-5, [3, 4, 30, 3], 24)


def _image(path: Path) -> Path:
    import numpy as np
    from PIL import Image

    Image.fromarray((np.random.RandomState(5).rand(40, 70, 3) * 255).astype("uint8")).save(path)
    return path


def timm_trunk(t: dict, x: torch.Tensor, *, eps: float) -> torch.Tensor:
    """timm's ConvNeXt trunk on the reference tensors (stem, stages, no final norm): (N, C, H, W)."""
    F = torch.nn.functional
    w = lambda name: t[PREFIX + name].float()  # noqa: E731

    def ln2d(v, name):  # LayerNorm over channels of an NCHW map
        return F.layer_norm(v.permute(0, 2, 3, 1), v.shape[1:2], w(name + ".weight"), w(name + ".bias"),
                            eps).permute(0, 3, 1, 2)

    x = ln2d(F.conv2d(x, w("stem.0.weight"), w("stem.0.bias"), stride=4), "stem.1")
    stages = sorted({int(k.split(".")[4]) for k in t if k.startswith(PREFIX + "stages.")})
    for s in stages:
        if PREFIX + f"stages.{s}.downsample.0.weight" in t:
            x = F.conv2d(ln2d(x, f"stages.{s}.downsample.0"), w(f"stages.{s}.downsample.1.weight"),
                         w(f"stages.{s}.downsample.1.bias"), stride=2)
        blocks = sorted({int(k.split(".")[6]) for k in t if k.startswith(PREFIX + f"stages.{s}.blocks.")})
        for b in blocks:
            p = f"stages.{s}.blocks.{b}."
            y = F.conv2d(x, w(p + "conv_dw.weight"), w(p + "conv_dw.bias"), padding=3, groups=x.shape[1])
            y = F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2], w(p + "norm.weight"), w(p + "norm.bias"), eps)
            y = F.linear(F.gelu(F.linear(y, w(p + "mlp.fc1.weight"), w(p + "mlp.fc1.bias"))),
                         w(p + "mlp.fc2.weight"), w(p + "mlp.fc2.bias"))
            x = x + y.permute(0, 3, 1, 2) * w(p + "gamma").view(1, -1, 1, 1)
    return x


def test_chat_answers_from_the_converted_ift_convnext_model(folders, tmp_path, capsys):
    from olavlm.data.images import load_image, pixel_values, to_square
    from olavlm.data.tokenize import encode_prompt, stop_token_ids
    from olavlm.model.vlm import OlaVLM

    img = _image(tmp_path / "c.png")
    assert main(["chat", "--model", str(folders["ift"]), "--image", str(img), "--prompt", "What is it?",
                 "--max-new-tokens", "6", "--device", "cpu"]) == 0
    answer = capsys.readouterr().out.strip()
    model = OlaVLM.from_pretrained(folders["ift"], with_predictors=False).eval()
    assert model.tokens_per_image == P + 3 * K
    spec = model.image_spec
    pv = pixel_values(to_square(load_image(img), "pad", spec), spec)[None]
    with torch.no_grad():  # the tower's features are the raw last stage of the reference trunk, flattened
        feats = model.vision(pv)
        want = timm_trunk(read_tensors(folders["ref-ift"]), pv, eps=1e-6)
    assert feats.shape == (1, P, 64)
    torch.testing.assert_close(feats, want.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-5)
    ids = torch.tensor([encode_prompt([{"from": "human", "value": "<image>\nWhat is it?"}], "llava_llama_3",
                                      model.tokenizer)])
    stops = stop_token_ids("llava_llama_3", model.tokenizer)
    new = model.generate(ids, pv, max_new_tokens=6, eos_token_id=stops)[0].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
    assert answer == model.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert answer


def _variant(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    state = read_tensors(src)
    edit(state)
    for f in dst.glob("model-*.safetensors"):
        f.unlink()
    write_shards(state, dst, 3)
    return dst


def _cli_error(src: Path, dst: Path, capsys, *extra: str) -> str:
    rc = main(["convert", "reference", str(src), str(dst), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("olavlm: error: "), err
    assert not dst.exists()
    return err


def test_missing_convnext_key_is_one_line(folders, tmp_path, capsys):
    key = PREFIX + "stages.2.downsample.1.weight"
    src = _variant(folders["ref-ift"], tmp_path / "src", lambda s: s.pop(key))
    err = _cli_error(src, tmp_path / "out", capsys)
    assert f"1 missing key(s): {key}" in err


def test_misshaped_convnext_key_is_one_line(folders, tmp_path, capsys):
    key = PREFIX + "stages.1.blocks.0.mlp.fc1.weight"

    def edit(state):
        state[key] = state[key][:-1]

    err = _cli_error(_variant(folders["ref-ift"], tmp_path / "src", edit), tmp_path / "out", capsys)
    assert "mis-shaped" in err and key in err


def test_unknown_key_under_the_trunk_is_one_line(folders, tmp_path, capsys):
    key = PREFIX + "stages.0.blocks.0.extra_scale"
    src = _variant(folders["ref-ift"], tmp_path / "src", lambda s: s.update({key: torch.ones(8)}))
    assert f"unknown key(s): {key}" in _cli_error(src, tmp_path / "out", capsys)


def test_input_size_from_the_option_when_the_tower_name_has_none(folders, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(folders["ref-ift"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["mm_vision_tower"] = "laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup"
    (src / "config.json").write_text(json.dumps(cfg))
    assert "--vision-image-size" in _cli_error(src, tmp_path / "out", capsys)
    assert main(["convert", "reference", str(src), str(tmp_path / "ok"), "--vision-image-size", "256",
                 "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "ok" / "vision" / "config.json").read_text())["image_size"] == 256
    assert json.loads((tmp_path / "ok" / "olavlm_conversion.json").read_text())["vision"]["grid"] == 8
    capsys.readouterr()
    # a size the stored task-token rows do not fit is refused, naming the tensor
    assert "model.special_depth_tokens" in _cli_error(src, tmp_path / "bad", capsys, "--vision-image-size", "128")
