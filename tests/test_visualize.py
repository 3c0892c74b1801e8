"""`olavlm visualize` with tiny teachers: the PNG is written and each depth / segmentation panel is
exactly the teacher decoder's output for the given features (compared with calling it directly)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from olavlm.cli import main as cli_main
from olavlm.config import load_config
from olavlm.model.vlm import OlaVLM
from olavlm.devkit.smoke import smoke_overrides

PT = Path("configs/llama3_8b_clip336/pt.yaml")


@pytest.fixture(scope="module")
def pt_model(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("visualize")
    cfg = load_config(PT, smoke_overrides(tiny_dir, PT, root))
    torch.manual_seed(0)
    final = root / "pt" / "final"
    OlaVLM.from_config(cfg.model).save_pretrained(final)
    (final / "olavlm_run.json").write_text(json.dumps({"template": cfg.data.template, "image_geometry": "square"}))
    return final, root / "data" / "images" / "003.png"


def _normalise(d):
    return (d - d.amin(dim=(-2, -1), keepdim=True)) / (d.amax(dim=(-2, -1), keepdim=True)
                                                        - d.amin(dim=(-2, -1), keepdim=True)).clamp_min(1e-8)


def test_depth_panels_are_the_decoder_outputs(pt_model, tmp_path):
    from olavlm.data.images import load_image, pixel_values, teacher_image, to_square
    from olavlm.data.tokenize import encode_prompt
    from olavlm.infer.visualize import PROMPT, visualize
    from olavlm.teachers import build_teachers
    from olavlm.teachers.depth_anything import DepthDecoder

    final, image = pt_model
    res = visualize(final, [image], output=tmp_path / "vis", device="cpu")[str(image)]
    assert res["png"].is_file() and res["png"].stat().st_size > 2000
    assert "seg" not in res["skipped"] and set(res["panels"]) >= {"depth", "seg"}
    model = OlaVLM.from_pretrained(final).eval()
    depth_layers = sorted(int(k) for k in model.predictors["depth"])
    assert sorted(k for k in res["panels"]["depth"] if k != "teacher") == depth_layers
    # independent path: the prediction from the model's forward, the decoder called directly
    dec = DepthDecoder.from_pretrained(model.cfg.tasks["depth"].teacher_path)
    teacher = build_teachers(model.cfg, grid=model.geometry.grid, dtype=torch.float32)["depth"]
    img = load_image(image)
    sq = to_square(img, "square", model.image_spec)
    ids = torch.tensor([encode_prompt([{"from": "human", "value": "<image>\n" + PROMPT}], "llava_llama_3",
                                      model.tokenizer)])
    with torch.no_grad():
        pred = model(input_ids=ids, pixel_values=pixel_values(sq, model.image_spec)[None], mode="predict").predictions
    grid = model.geometry.grid
    for layer in depth_layers:
        tokens = pred["depth"][layer]  # (1, grid*grid, C)
        feats = [torch.cat([tokens.new_zeros(1, 1, tokens.shape[2]), tokens], 1)] * 4
        want = dec.model.head(dec.model.neck(feats, grid, grid), grid, grid)
        torch.testing.assert_close(res["panels"]["depth"][layer], _normalise(want)[0])
    timg = teacher_image(img, sq, "square", model.image_spec, teacher.input_size)[None]
    want = dec.model(pixel_values=teacher.preprocess(timg)).predicted_depth
    torch.testing.assert_close(res["panels"]["depth"]["teacher"], _normalise(want)[0])
    assert res["panels"]["depth"][depth_layers[0]].shape == want.shape[1:]
    # segmentation: real earlier stages + the prediction as last stage, all at the token grid
    from transformers import OneFormerForUniversalSegmentation

    import torch.nn.functional as F

    seg_teacher = build_teachers(model.cfg, grid=grid, dtype=torch.float32)["seg"]
    px = seg_teacher.preprocess(teacher_image(img, sq, "square", model.image_spec, seg_teacher.input_size)[None])
    one = OneFormerForUniversalSegmentation.from_pretrained(model.cfg.tasks["seg"].teacher_path).model.eval()

    def semantic(features, scores=False):
        dec = one.pixel_level_module.decoder(features)
        o = one.transformer_module(multi_scale_features=dec.multi_scale_features, mask_features=dec.mask_features,
                                   task_token=one.task_encoder(torch.zeros(1, one.config.task_seq_len)))
        masks = F.interpolate(o.prediction_masks, size=px.shape[-2:], mode="bilinear", align_corners=False).sigmoid()
        per_class = torch.einsum("nqc,nqhw->nchw", o.prediction_class.softmax(-1)[..., :-1], masks)
        return per_class[0] if scores else per_class.argmax(1)[0]

    with torch.no_grad():
        stages = list(one.pixel_level_module.encoder(px).feature_maps)
        assert torch.equal(res["panels"]["seg"]["teacher"], semantic(stages))
        for layer in sorted(int(k) for k in model.predictors["seg"]):
            small = [F.interpolate(f, size=(grid, grid), mode="bilinear", align_corners=False) for f in stages[:-1]]
            assert torch.equal(res["panels"]["seg"][layer], semantic(small + [pred["seg"][layer]]))
        # the class scores behind the argmax, through the decoder's own entry point
        from olavlm.teachers.oneformer import SegDecoder

        dec_seg = SegDecoder.from_pretrained(model.cfg.tasks["seg"].teacher_path)
        layer = sorted(int(k) for k in model.predictors["seg"])[0]
        torch.testing.assert_close(dec_seg.decode(pred["seg"][layer], px, scores=True)[0],
                                   semantic(small[:0] + [F.interpolate(f, size=(grid, grid), mode="bilinear",
                                                                       align_corners=False) for f in stages[:-1]]
                                            + [pred["seg"][layer]], scores=True))


def test_decoder_fed_the_teacher_features_reproduces_the_teacher(pt_model):
    """Sanity of the feeding point: the backbone's own read-outs through decode() = the full model."""
    from olavlm.teachers.depth_anything import DepthDecoder

    final, _ = pt_model
    cfg = OlaVLM.from_pretrained(final).cfg
    dec = DepthDecoder.from_pretrained(cfg.tasks["depth"].teacher_path)
    pixels = torch.randn(2, 3, 64, 64)
    maps = dec.model.backbone(pixels).feature_maps  # (N, 1 + 64, C) each, CLS first
    got = dec.decode([m[:, 1:] for m in maps], 8)
    torch.testing.assert_close(got, dec.teacher_depth(pixels))


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is not None, reason="diffusers installed")
def test_generation_without_diffusers_is_one_clear_message(pt_model, tmp_path, capsys):
    final, image = pt_model
    assert cli_main(["visualize", "--model", str(final), "--image", str(image), "--output", str(tmp_path),
                     "--device", "cpu", "--layers", "1,2,3,4"]) == 0
    out = capsys.readouterr().out
    assert "gen: skipped (generation decoding needs diffusers" in out
    assert (tmp_path / "003.png").is_file()
