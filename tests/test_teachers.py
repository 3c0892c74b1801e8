"""Real teacher classes (tiny random configs of the same transformers classes, loaded from folders)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from olavlm.config import ModelConfig, PredictorConfig, TaskConfig
from olavlm.teachers import TeacherSet, TeacherShapeError, build_teacher, build_teachers
from olavlm.teachers.base import prepare_pixels

GRID = 8  # tiny CLIP tower: 64 px, patch 8


@pytest.fixture(scope="module")
def paths(tiny_dir):
    root = tiny_dir / "teachers"
    return {"depth": root / "teacher-depth", "seg": root / "teacher-seg", "gen": root / "teacher-gen"}


@pytest.fixture(scope="module")
def teachers(paths):
    return {"depth": build_teacher("depth_anything", str(paths["depth"]), grid=GRID),
            "seg": build_teacher("oneformer", str(paths["seg"]), grid=GRID),
            "gen": build_teacher("unclip", str(paths["gen"]), grid=GRID)}


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size) images with structure at several scales and R != B."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g) * 255
    img = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    img = img + torch.rand(n, 3, size, size, generator=g) * 40 - 20
    img[:, 0] = img[:, 0] * 0.5 + 100  # make the channels clearly different
    return img.round().clamp(0, 255).to(torch.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]


def test_shapes_dtypes_and_sizes(teachers):
    expect = {"depth": ((64, 32), 64, "tokens"), "seg": ((32, 8, 8), 64, "grid"), "gen": ((1, 24), 32, "vector")}
    images = smooth_images(3, 64)
    for task, (shape, size, layout) in expect.items():
        t = teachers[task]
        assert t.target_shape == shape and t.input_size == size and t.layout == layout
        out = t.encode(images)
        assert out.shape == (3, *shape) and out.dtype == torch.float32
        assert torch.isfinite(out).all() and out.std() > 0
        assert not out.requires_grad and not any(p.requires_grad for p in t.parameters())
        empty = t.encode(images[:0])
        assert empty.shape == (0, *shape)
    bf = build_teacher("unclip", str(teachers["gen"].source), grid=GRID).to(dtype=torch.bfloat16)
    assert bf.encode(images).dtype == torch.bfloat16


def test_encode_rejects_bad_input(teachers):
    with pytest.raises(ValueError, match="uint8"):
        teachers["depth"].encode(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="blocks"):
        build_teacher("depth_anything", teachers["depth"].source, grid=GRID, blocks=[0, 9])
    with pytest.raises(KeyError, match="unknown teacher"):
        build_teacher("nope", "x", grid=GRID)


@pytest.mark.parametrize("task", ["depth", "seg", "gen"])
def test_batched_equals_per_image(teachers, task):
    images = smooth_images(4, 80, seed=1)  # 80 px: exercises the resize too
    t = teachers[task]
    batched = t.encode(images)
    single = torch.cat([t.encode(images[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_depth_matches_processor_pipeline_and_full_model(teachers, paths):
    """Ours == DPT image processor (PIL) + the full DepthAnything model's backbone hidden states."""
    from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

    t = teachers["depth"]
    images = smooth_images(2, 96, seed=2)
    proc = AutoImageProcessor.from_pretrained(paths["depth"])  # size 64, multiple of 8, ImageNet mean/std
    ref_pix = proc(to_pil(images), return_tensors="pt")["pixel_values"]
    ours_pix = t.preprocess(images)
    assert ours_pix.shape == ref_pix.shape == (2, 3, 64, 64)
    # PIL's fixed-point resize can differ from ours by rounding: at most 2 of 255 levels
    level = 1 / 255 / min(t.std)
    assert (ours_pix - ref_pix).abs().max() <= 2 * level + 1e-6
    assert (ours_pix - ref_pix).abs().mean() <= 0.05 * level

    model = DepthAnythingForDepthEstimation.from_pretrained(paths["depth"]).eval()
    with torch.no_grad():
        hs = model(pixel_values=ref_pix, output_hidden_states=True).hidden_states
        ln = model.backbone.layernorm
        ref = torch.stack([ln(hs[b + 1])[:, 1:] for b in t.blocks]).mean(0)
    torch.testing.assert_close(t.encode(images), ref, rtol=0, atol=0.05)
    torch.testing.assert_close(t.forward_features(ref_pix), ref, rtol=1e-4, atol=1e-4)


def test_depth_sees_rgb(teachers):
    """Swapping R and B must change the depth targets (the reference fed BGR)."""
    t = teachers["depth"]
    images = smooth_images(2, 64, seed=3)
    assert (images[:, 0].float() - images[:, 2].float()).abs().mean() > 20
    rgb, bgr = t.encode(images), t.encode(images.flip(1))
    assert (rgb - bgr).abs().mean() > 0.05 * rgb.abs().mean()
    # and the RGB input is what the processor (which reads RGB PIL images) normalises
    mean = torch.tensor(t.mean).view(1, 3, 1, 1)
    std = torch.tensor(t.std).view(1, 3, 1, 1)
    torch.testing.assert_close(t.preprocess(images), (images.float() / 255 - mean) / std)


def test_unclip_matches_clip_processor_and_model(teachers, paths):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    t = teachers["gen"]
    images = smooth_images(3, 64, seed=4)  # 64 -> 32 px: antialiased downscale like PIL
    proc = CLIPImageProcessor.from_pretrained(paths["gen"], subfolder="feature_extractor")
    ref_pix = proc(to_pil(images), return_tensors="pt")["pixel_values"]
    ours_pix = t.preprocess(images)
    level = 1 / 255 / min(t.std)
    assert (ours_pix - ref_pix).abs().max() <= 2 * level + 1e-6
    model = CLIPVisionModelWithProjection.from_pretrained(paths["gen"], subfolder="image_encoder").eval()
    with torch.no_grad():
        ref = model(pixel_values=ref_pix).image_embeds[:, None]
    torch.testing.assert_close(t.encode(images), ref, rtol=0, atol=0.05)


def test_unclip_local_layout_without_subfolders(paths, tmp_path):
    import shutil

    flat = tmp_path / "flat"
    shutil.copytree(paths["gen"] / "image_encoder", flat)
    shutil.copy(paths["gen"] / "feature_extractor" / "preprocessor_config.json", flat)
    t = build_teacher("unclip", str(flat), grid=GRID, subfolder=None, processor_subfolder=None)
    assert t.target_shape == (1, 24) and t.input_size == 32


def test_oneformer_last_stage_and_grid_resize(teachers, paths):
    from transformers import OneFormerForUniversalSegmentation

    t = teachers["seg"]
    cfg = json.loads((paths["seg"] / "preprocessor_config.json").read_text())
    assert max(cfg["image_mean"]) > 1  # stored on the 0..255 scale, like shi-labs/oneformer_*
    torch.testing.assert_close(torch.tensor(t.mean), torch.tensor(cfg["image_mean"]) / 255)
    images = smooth_images(2, 64, seed=5)
    full = OneFormerForUniversalSegmentation.from_pretrained(paths["seg"]).eval()
    mean = torch.tensor(cfg["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["image_std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = full.model.pixel_level_module(((images.float() - mean) / std)).encoder_features[-1]
    assert ref.shape == (2, 32, 8, 8)
    torch.testing.assert_close(t.encode(images), ref, rtol=1e-4, atol=1e-4)
    coarse = build_teacher("oneformer", str(paths["seg"]), grid=4, image_size=64)
    assert coarse.target_shape == (32, 4, 4)
    expect = F.interpolate(ref, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(coarse.encode(images), expect, rtol=1e-4, atol=1e-4)
    # default input side = grid x stride (8 for the tiny 3-stage Swin with patch 2)
    assert build_teacher("oneformer", str(paths["seg"]), grid=4).input_size == 32


def _model_cfg(paths, seg_dim: int = 32) -> ModelConfig:
    return ModelConfig(task_order=["gen", "depth", "seg"], tasks={
        "gen": TaskConfig(teacher="unclip", teacher_path=str(paths["gen"]), layers=[2],
                          predictor=PredictorConfig(out_dim=24, output_layout="vector")),
        "depth": TaskConfig(teacher="depth_anything", teacher_path=str(paths["depth"]), layers=[1, 3],
                            predictor=PredictorConfig(out_dim=32)),
        "seg": TaskConfig(teacher="oneformer", teacher_path=str(paths["seg"]), layers=[],
                          predictor=PredictorConfig(out_dim=seg_dim, output_layout="grid")),
    })


def test_build_teachers_only_tasks_with_layers_and_shape_check(paths):
    cfg = _model_cfg(paths)
    ts = build_teachers(cfg, GRID, dtype="bf16", expected={"gen": (1, 24), "depth": (64, 32)})
    assert isinstance(ts, TeacherSet) and ts.tasks == ["gen", "depth"]  # seg has no layers
    assert ts.input_size == 64  # max(depth 64, gen 32)
    assert ts.target_shapes == {"gen": (1, 24), "depth": (64, 32)}
    out = ts.encode(smooth_images(2, 64))
    assert {k: v.dtype for k, v in out.items()} == {"gen": torch.bfloat16, "depth": torch.bfloat16}
    fps = ts.fingerprints()
    assert fps["depth"]["preprocessing"]["channels"] == "RGB" and fps["depth"]["target_shape"] == [64, 32]
    with pytest.raises(TeacherShapeError, match=r"task 'depth'.*\(64, 32\).*\(576, 1024\)"):
        build_teachers(cfg, GRID, expected={"gen": (1, 24), "depth": (576, 1024)})
    cfg.tasks["seg"].layers = [2]
    with pytest.raises(TeacherShapeError, match="task 'seg'"):
        build_teachers(cfg, GRID, tasks=["seg"], expected={"seg": (1536, 8, 8)})


def test_prepare_pixels_matches_pil_resize():
    """The quantised two-pass resize reproduces PIL's uint8 bicubic resize (what HF processors run)."""
    images = smooth_images(2, 50, seed=6)
    for size in (36, 72):
        ours = prepare_pixels(images, size=size, mean=(0, 0, 0), std=(1, 1, 1), device=torch.device("cpu"),
                              dtype=torch.float32) * 255
        ref = torch.stack([torch.from_numpy(np.array(im.resize((size, size), Image.BICUBIC))).permute(2, 0, 1)
                           for im in to_pil(images)]).float()
        diff = (ours - ref).abs()
        assert diff.max() <= 2 and (diff > 0).float().mean() < 0.03


def test_one_table_names_every_teacher_class_and_its_spec():
    """Each row resolves to a Teacher class registered under that name; names outside the table
    join it through the decorator; a second class under a taken name is refused."""
    from olavlm.teachers.base import Teacher
    from olavlm.teachers.registry import TEACHERS, register_teacher, target_spec, teacher_class

    for name, entry in TEACHERS.items():
        cls = teacher_class(name)
        assert issubclass(cls, Teacher) and cls.name == name and cls.__name__ == entry.class_name
    assert all(TEACHERS[n].spec is not None for n in ("depth_anything", "oneformer", "unclip", "dinov2"))
    try:
        @register_teacher("test_extra_teacher")
        class Extra(Teacher):
            pass

        assert teacher_class("test_extra_teacher") is Extra and Extra.name == "test_extra_teacher"
        assert target_spec("test_extra_teacher", None, grid=4) is None  # no weight-free spec: checked when loaded
        with pytest.raises(ValueError, match="registered twice"):
            @register_teacher("depth_anything")
            class Other(Teacher):
                pass
    finally:
        TEACHERS.pop("test_extra_teacher", None)
    with pytest.raises(KeyError, match="unknown teacher 'nope'"):
        teacher_class("nope")
