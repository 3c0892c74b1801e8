"""The probe feeds its teachers exactly what training and `targets precompute` feed them, also when
a teacher's input side differs from the vision tower's (the square is cut from the original image
at max(tower, teacher) side, never upsampled from the tower's square)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from olavlm.config import DataConfig
from olavlm.data.dataset import LlavaDataset
from olavlm.data.images import load_image, to_square, uint8_tensor
from olavlm.data.processor import OlaProcessor
from olavlm.evaluation.probe import collect_states, run_probe
from olavlm.evaluation.runner import EvalModel
from olavlm.devkit.tiny import tiny_model_config
from olavlm.model.vlm import OlaVLM
from olavlm.teachers import TeacherSet, build_teacher
from olavlm.teachers.precompute import _ImageReader

TEMPLATE = "llava_llama_3"
SEG_SIDE = 96  # the tiny seg teacher reads 96 px, the tiny CLIP tower 64 px


@pytest.fixture(scope="module")
def world(tiny_dir, tmp_path_factory):
    """Six noisy, non-square images (detail the tower's 64 px square loses) + LLaVA records."""
    root = tmp_path_factory.mktemp("probe_geometry")
    rng = np.random.default_rng(0)
    records = []
    for i, (w, h) in enumerate([(150, 110), (90, 160), (200, 200), (123, 77), (64, 64), (300, 140)]):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Noise."}]})
    (root / "data.json").write_text(json.dumps(records))
    teachers = tiny_dir / "teachers"
    cfg = tiny_model_config(tiny_dir)
    cfg.tasks["depth"].teacher_path = str(teachers / "teacher-depth")
    cfg.tasks["seg"].teacher_path = str(teachers / "teacher-seg")
    cfg.tasks["seg"].teacher_kwargs = {"image_size": SEG_SIDE}
    cfg.tasks["gen"].teacher_path = str(teachers / "teacher-gen")
    model = OlaVLM.from_config(cfg, with_predictors=False).eval()
    return root, records, model


def _processor(model, geometry: str, teacher_side: int | None = None) -> OlaProcessor:
    return OlaProcessor.for_model(model, DataConfig(template=TEMPLATE, image_geometry=geometry),
                                  teacher_image_size=teacher_side)


def _teachers(model, tiny_dir) -> dict:
    grid = model.geometry.grid
    return {"depth": build_teacher("depth_anything", str(tiny_dir / "teachers" / "teacher-depth"), grid=grid).eval(),
            "seg": build_teacher("oneformer", str(tiny_dir / "teachers" / "teacher-seg"), grid=grid,
                                 image_size=SEG_SIDE).eval()}


def _recording(teacher, seen: list):
    encode = teacher.encode

    def wrapped(images, keys=None):
        seen.append(images.clone())
        return encode(images, keys)

    teacher.encode = wrapped
    return teacher


@pytest.mark.parametrize("geometry", ["pad", "square"])
def test_probe_teacher_input_equals_dataset_and_precompute(world, tiny_dir, geometry):
    root, records, model = world
    teachers = _teachers(model, tiny_dir)
    assert teachers["seg"].input_size == SEG_SIDE != model.image_spec.size
    seen = {name: [] for name in teachers}
    for name, t in teachers.items():
        _recording(t, seen[name])
    em = EvalModel(model, _processor(model, geometry), torch.device("cpu"))
    _, _, targets = collect_states(em, records, root, [1, 4], teachers, batch_size=4, progress=False)

    side = TeacherSet(teachers).input_size  # what training carries for this teacher set
    assert side == SEG_SIDE
    data = DataConfig(train_file=str(root / "data.json"), image_folder=str(root), template=TEMPLATE,
                      image_geometry=geometry, num_workers=0)
    dataset = LlavaDataset(data, model.tokenizer, image_spec=model.image_spec,
                           tokens_per_image=model.tokens_per_image, teacher_image_size=side)
    from_dataset = torch.stack([dataset.load(i)["images"][0] for i in range(len(records))])
    reader = _ImageReader([(0, r["image"]) for r in records], str(root), _processor(model, geometry, side))
    from_cache = torch.stack([reader[i][3] for i in range(len(records))])
    for name in teachers:
        probe_input = torch.cat(seen[name])
        assert probe_input.shape == (len(records), 3, side, side)
        assert torch.equal(probe_input, from_dataset), name
        assert torch.equal(probe_input, from_cache), name
    # and the targets are the teachers' answer to that input
    seg = build_teacher("oneformer", str(tiny_dir / "teachers" / "teacher-seg"), grid=model.geometry.grid,
                        image_size=SEG_SIDE).eval()
    torch.testing.assert_close(targets["seg"], seg.encode(from_dataset).float())

    # the old path (the tower's 64 px square upsampled to the teacher side) is measurably different,
    # so this test would catch it coming back
    old = torch.stack([uint8_tensor(to_square(load_image(root / r["image"]), geometry, model.image_spec), side)
                       for r in records])
    assert (old.float() - from_dataset.float()).abs().mean() > 5


def test_explicit_teacher_image_size(world, tiny_dir):
    root, records, model = world
    depth = _teachers(model, tiny_dir)["depth"]
    seen: list = []
    _recording(depth, seen)
    em = EvalModel(model, _processor(model, "pad"), torch.device("cpu"))
    collect_states(em, records[:2], root, [2], {"depth": depth}, progress=False, teacher_image_size=128)
    assert seen[0].shape[-1] == 128


def test_run_probe_sizes_the_square_like_training(world, tiny_dir, tmp_path):
    """Probing depth (64 px) of a model whose PT teachers included the 96 px seg teacher: the depth
    teacher reads the 96 px square training gave it."""
    root, records, model = world
    folder = tmp_path / "model"
    model.save_pretrained(folder, with_predictors=False)
    (folder / "olavlm_run.json").write_text(json.dumps({"template": TEMPLATE, "image_geometry": "pad"}))
    from olavlm.evaluation.probe import ProbeSpec

    res = run_probe(folder, root / "data.json", "depth", layers="1,4", spec=ProbeSpec(steps=2, batch_size=4),
                    progress=False, device="cpu")
    assert res["teacher_image_size"] == SEG_SIDE and res["n_images"] == len(records)
    res = run_probe(folder, root / "data.json", "depth", layers="1", spec=ProbeSpec(steps=1), progress=False,
                    device="cpu", teacher_image_size=80)
    assert res["teacher_image_size"] == 80


def test_run_probe_takes_the_teacher_side_from_the_processor(world, tiny_dir, tmp_path):
    """A folder saved with its processor: the probe's teachers read the square side training recorded
    (80 here, neither the seg teacher's 96 nor the depth teacher's 64), cut as the dataset cuts it."""
    root, records, model = world
    folder = tmp_path / "model"
    model.save_pretrained(folder, with_predictors=False)
    _processor(model, "pad", 80).save_pretrained(folder)
    from olavlm.evaluation.probe import ProbeSpec

    res = run_probe(folder, root / "data.json", "depth", layers="1", spec=ProbeSpec(steps=1), progress=False,
                    device="cpu", limit=4)
    assert res["teacher_image_size"] == 80
