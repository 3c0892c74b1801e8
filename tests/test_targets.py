"""TargetSource: live / cache / cache+live targets, the one-time cache check, gap counting, and a PT
step's loss against the pre-TargetSource path and an independent computation."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from olavlm.config import RunConfig, from_dict
from olavlm.teachers.cache import CacheError, TargetCache
from olavlm.teachers.precompute import precompute
from olavlm.teachers.targets import FILLED, MASKED, TargetSource, target_mode, teacher_dtype
from olavlm.train.loop import build_data, model_inputs

N_IMAGES = 6
CPU = torch.device("cpu")


def _conv(i):
    return [{"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": f"Shape {i}."}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 images of different sizes + one text-only record; ``subset.json`` holds the first 4 images."""
    root = tmp_path_factory.mktemp("targets-data")
    (root / "images").mkdir()
    rng = np.random.default_rng(5)
    records = []
    for i in range(N_IMAGES):
        arr = rng.integers(0, 256, (40 + 8 * i, 80 - 6 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": _conv(i)})
    records.append({"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    (root / "train.json").write_text(json.dumps(records))
    (root / "subset.json").write_text(json.dumps(records[:4]))
    return root


def make_cfg(tiny_dir, data, cache=None, **data_fields) -> RunConfig:
    from olavlm.devkit.tiny import tiny_model_config

    model = tiny_model_config(tiny_dir)
    teachers = tiny_dir / "teachers"
    for task, (name, folder, out_dim) in {"gen": ("unclip", "teacher-gen", 24),
                                          "depth": ("depth_anything", "teacher-depth", 32),
                                          "seg": ("oneformer", "teacher-seg", 32)}.items():
        tc = model.tasks[task]
        tc.teacher, tc.teacher_path, tc.predictor.out_dim = name, str(teachers / folder), out_dim
    fields = {"train_file": str(data / "train.json"), "image_folder": str(data / "images"), "num_workers": 0,
              "target_cache": str(cache) if cache else None, **data_fields}
    cfg = from_dict(RunConfig, {"data": fields, "train": {"bf16": False}})
    return dataclasses.replace(cfg, model=model)


def with_data(cfg, **fields):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **fields))


@pytest.fixture(scope="module")
def model(tiny_dir, data):
    from olavlm.model.vlm import OlaVLM

    torch.manual_seed(0)
    return OlaVLM.from_config(make_cfg(tiny_dir, data).model, with_predictors=True).train()


@pytest.fixture(scope="module")
def caches(tiny_dir, data, model, tmp_path_factory):
    """A full cache of the data file and a partial one (the first 4 images), fp32, from the live teachers."""
    root = tmp_path_factory.mktemp("targets-caches")
    live = TargetSource.for_run(make_cfg(tiny_dir, data), model)
    for name, file in (("full", "train.json"), ("part", "subset.json")):
        cfg = make_cfg(tiny_dir, data, root / name, train_file=str(data / file))
        precompute(cfg, batch_size=3, shard_size=4, dtype="fp32", teachers=live.teachers, progress=False,
                   device="cpu", rank=0, world_size=1, workers=0)
    return root / "full", root / "part"


def batch_of(cfg, model, source, n=N_IMAGES + 1):
    dataset, collator = build_data(cfg, model, source)
    return collator([dataset[i] for i in range(n)])


def test_mode_comes_from_the_data_config(tiny_dir, data):
    cfg = make_cfg(tiny_dir, data)
    assert target_mode(cfg.data) == "live"
    assert target_mode(with_data(cfg, target_cache="c").data) == "cache"
    assert target_mode(with_data(cfg, target_cache="c", cache_miss="online").data) == "cache+live"
    assert teacher_dtype(cfg) == torch.float32
    cfg.train.teacher_dtype = "bf16"  # a short spelling from the one dtype table
    assert teacher_dtype(cfg) == torch.bfloat16
    with pytest.raises(ValueError, match="needs teachers"):
        TargetSource("live", {"depth": (64, 32)})


def test_no_source_without_predictors(tiny_dir, data):
    from olavlm.model.vlm import OlaVLM

    plain = OlaVLM.from_config(make_cfg(tiny_dir, data).model, with_predictors=False)
    assert TargetSource.for_run(make_cfg(tiny_dir, data), plain) is None


def test_live_and_cache_give_identical_targets(tiny_dir, data, model, caches, monkeypatch):
    live_cfg = make_cfg(tiny_dir, data)
    live = TargetSource.for_run(live_cfg, model)
    assert live.mode == "live" and live.teacher_image_size == 64 and live.lookup is None
    a = model_inputs(batch_of(live_cfg, model, live), CPU, live)
    import olavlm.teachers as teachers_pkg

    monkeypatch.setattr(teachers_pkg, "build_teachers", lambda *a, **k: pytest.fail("a cache-only run loads teachers"))
    cache_cfg = make_cfg(tiny_dir, data, caches[0])
    cached = TargetSource.for_run(cache_cfg, model)
    assert cached.mode == "cache" and cached.teachers is None and cached.teacher_image_size is None
    batch = batch_of(cache_cfg, model, cached)
    assert "images" not in batch  # no teacher images carried without live teachers
    b = model_inputs(batch, CPU, cached)
    assert a["target_mask"].tolist() == b["target_mask"].tolist() == [True] * N_IMAGES
    assert set(a["targets"]) == set(b["targets"]) == {"gen", "depth", "seg"}
    for task in a["targets"]:
        assert b["targets"][task].shape == (N_IMAGES, *model.target_shapes[task])
        torch.testing.assert_close(b["targets"][task], a["targets"][task], rtol=1e-5, atol=1e-6)
    assert cached.take_counts() == {MASKED: 0} and cached.take_counts() == {}
    assert live.take_counts() == {}  # live targets have no gaps to count


def test_cache_live_fills_the_gaps_and_counts_them(tiny_dir, data, model, caches, caplog):
    part = caches[1]
    with pytest.raises(CacheError, match="lacks 2 image"):  # cache only: the gap stops the run at construction
        TargetSource.for_run(make_cfg(tiny_dir, data, part), model)
    cfg = make_cfg(tiny_dir, data, part, cache_miss="online")
    with caplog.at_level(logging.WARNING, logger="olavlm.teachers.targets"):
        mixed = TargetSource.for_run(cfg, model)
    assert mixed.mode == "cache+live" and mixed.teacher_image_size == 64
    assert any("lacks 2 of the 6 images" in r.getMessage() for r in caplog.records)
    batch = batch_of(cfg, model, mixed)
    assert batch["target_mask"].tolist() == [True] * 4 + [False] * 2  # the collated cache rows: 2 gaps
    got = model_inputs(batch, CPU, mixed)
    assert got["target_mask"].all()
    cache = TargetCache.open(part)
    live = mixed.teachers.encode(batch["images"][4:], batch["image_keys"][4:])
    for task in got["targets"]:
        for i in range(4):  # cached rows are the cache's values, untouched
            assert torch.equal(got["targets"][task][i], cache.get(f"{i}.png")[task])
        torch.testing.assert_close(got["targets"][task][4:], live[task], rtol=0, atol=0)  # gaps: the live values
    assert mixed.take_counts() == {FILLED: 2}
    mixed.add_logged({FILLED: 2.0, "loss": 1.0})
    assert mixed.summary() == {"mode": "cache+live", "cache": str(part), "filled_live": 2}
    # the mixed batch trains like the all-live batch
    live_src = TargetSource.for_run(make_cfg(tiny_dir, data), model)
    ref = model_inputs(batch_of(make_cfg(tiny_dir, data), model, live_src), CPU, live_src)
    torch.testing.assert_close(model(**got).loss, model(**ref).loss, rtol=1e-5, atol=1e-6)


def _lines(excinfo):
    return str(excinfo.value).splitlines()


def test_mismatched_cache_is_refused_at_construction(tiny_dir, data, model, caches, monkeypatch):
    """One line per mismatch, naming the cache and the field, before any teacher loads."""
    from olavlm.model.vlm import OlaVLM
    import olavlm.teachers as teachers_pkg

    full = caches[0]
    monkeypatch.setattr(teachers_pkg, "build_teachers", lambda *a, **k: pytest.fail("teachers loaded before the check"))
    prefix = f"data.target_cache: {full}: "
    cases = [
        (make_cfg(tiny_dir, data, full, image_geometry="square"), model, ["geometry.image_geometry"]),
        (make_cfg(tiny_dir, data, full, teacher_image_size=96), model,
         ["geometry.square_side", "geometry.teacher_image_size"]),
    ]
    other_teacher = make_cfg(tiny_dir, data, full)
    other_teacher.model.tasks["depth"].teacher_path = str(tiny_dir / "teachers" / "teacher-dinov2")
    cases.append((other_teacher, OlaVLM.from_config(other_teacher.model, with_predictors=True), ["depth.teacher_path"]))
    wrong_shape = make_cfg(tiny_dir, data, full)
    wrong_shape.model.tasks["seg"].predictor.out_dim = 16
    cases.append((wrong_shape, OlaVLM.from_config(wrong_shape.model, with_predictors=True),
                  ["seg: cache targets have shape (32, 8, 8), the predictor outputs (16, 8, 8)"]))
    for cfg, m, fields in cases:
        with pytest.raises(CacheError) as e:
            TargetSource.for_run(cfg, m)
        lines = _lines(e)
        assert len(lines) == len(fields), lines
        for line, field in zip(lines, fields):
            assert line.startswith(prefix + field), (line, field)
    assert "rebuild it with `olavlm targets precompute`" in lines[-1]


def test_foreign_teacher_class_is_refused(tiny_dir, data, model, caches, tmp_path):
    """The cache records the teacher class; a cache written by another class for the same name is refused."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(caches[0], copy)
    index = json.loads((copy / "index.json").read_text())
    index["tasks"]["depth"]["fingerprint"]["class"] = "SomeOtherDepthTeacher"
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheError) as e:
        TargetSource.for_run(make_cfg(tiny_dir, data, copy), model)
    assert _lines(e)[0].startswith(f"data.target_cache: {copy}: depth.class: cache has 'SomeOtherDepthTeacher', "
                                   "run expects 'DepthAnythingTeacher'")


def test_cache_counts_images_without_a_target(tiny_dir, data, model, caches, tmp_path):
    """An image unreadable when the cache was built but readable now has no target: masked and counted."""
    import shutil

    root = tmp_path / "late"
    shutil.copytree(data, root)
    records = json.loads((root / "train.json").read_text())
    records.insert(1, {"id": "late", "image": "late.png", "conversations": _conv(9)})
    (root / "train.json").write_text(json.dumps(records))
    cfg = make_cfg(tiny_dir, root, tmp_path / "cache")
    precompute(cfg, batch_size=3, shard_size=4, dtype="fp32", teachers=TargetSource.for_run(
        make_cfg(tiny_dir, root), model).teachers, progress=False, device="cpu", rank=0, world_size=1, workers=0)
    shutil.copy(root / "images" / "0.png", root / "images" / "late.png")  # the file appears after the precompute
    source = TargetSource.for_run(cfg, model)
    assert source.mode == "cache"
    got = model_inputs(batch_of(cfg, model, source, n=3), CPU, source)
    assert got["target_mask"].tolist() == [True, False, True]
    assert source.take_counts() == {MASKED: 1}
    out = model(**got)  # the masked image adds nothing: the loss equals the one without it
    keep = torch.tensor([0, 2])
    ref = model.auxiliary_loss({t: {k: v[keep] for k, v in by.items()} for t, by in out.predictions.items()},
                               {t: v[keep] for t, v in got["targets"].items()}, None, num_images=2)[0]
    torch.testing.assert_close(out.loss, out.metrics["loss/ntp"] + ref, rtol=1e-5, atol=1e-6)


def test_cache_live_checks_the_loaded_teachers(tiny_dir, data, model, caches):
    """With live teachers the cache must also have been computed in their dtype."""
    cfg = make_cfg(tiny_dir, data, caches[1], cache_miss="online")
    cfg.train.teacher_dtype = "bfloat16"
    with pytest.raises(CacheError) as e:
        TargetSource.for_run(cfg, model)
    assert _lines(e)[0].startswith(f"data.target_cache: {caches[1]}: compute_dtype: cache targets were computed in "
                                   "float32, the live teachers run in bfloat16")


def test_mismatch_stops_train_before_any_step(tiny_dir, data, caches, tmp_path):
    from olavlm.train.loop import train

    cfg = make_cfg(tiny_dir, data, caches[0], image_geometry="square")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, output_dir=str(tmp_path / "run"), global_batch_size=2, micro_batch_size=2, max_steps=1,
        report_to=[], save_every=0))
    with pytest.raises(CacheError, match="geometry.image_geometry"):
        train(cfg, resume="none")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- a PT step's loss ---------------------------------------------------------------------------

def _independent_aux(model, predictions, targets) -> torch.Tensor:
    """sum_task weight * sum_layer (smooth-L1 + contrastive_weight * InfoNCE), written out by hand."""
    cfg, total = model.cfg, 0.0
    for task, by_layer in predictions.items():
        theta = model.logit_scales()[task].float()
        scale = torch.clamp(theta.exp(), max=cfg.logit_scale_max)
        task_sum = 0.0
        for pred in by_layer.values():
            p, t = pred.float(), targets[task].float()
            d = (p - t).abs()
            beta = cfg.smooth_l1_beta
            sl1 = torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).mean()
            pn = p.flatten(1) / p.flatten(1).norm(dim=1, keepdim=True)
            tn = t.flatten(1) / t.flatten(1).norm(dim=1, keepdim=True)
            logits = scale * pn @ tn.T
            nce = (logits.logsumexp(1) - logits.diagonal()).mean()
            task_sum = task_sum + sl1 + cfg.contrastive_weight * nce
        total = total + cfg.tasks[task].weight * task_sum
    return total


def test_pt_step_loss_equals_the_old_path_and_an_independent_computation(tiny_dir, data, model):
    cfg = make_cfg(tiny_dir, data)
    source = TargetSource.for_run(cfg, model)
    batch = batch_of(cfg, model, source)

    def step(inputs):
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    new_out, new_grads = step(model_inputs(batch, CPU, source))
    # the path before TargetSource: the teachers' targets passed straight in, no mask
    old = model_inputs(batch, CPU)
    old["targets"] = source.teachers.encode(batch["images"], batch["image_keys"])
    old_out, old_grads = step(old)
    torch.testing.assert_close(new_out.loss, old_out.loss, rtol=1e-6, atol=1e-7)
    assert new_grads.keys() == old_grads.keys() and any("predictor" in n for n in new_grads)
    for name in new_grads:
        torch.testing.assert_close(new_grads[name], old_grads[name], rtol=1e-5, atol=1e-7)
    # the embedding part against a hand-written computation from the same predictions (values + gradients)
    out = model(**model_inputs(batch, CPU, source))
    aux = _independent_aux(model, out.predictions, old["targets"])
    torch.testing.assert_close(out.loss, out.metrics["loss/ntp"] + aux, rtol=1e-5, atol=1e-6)
    model_aux, _ = model.auxiliary_loss(out.predictions, old["targets"], torch.ones(N_IMAGES, dtype=torch.bool),
                                        num_images=N_IMAGES)
    preds = [p for by_layer in out.predictions.values() for p in by_layer.values()]
    g_model = torch.autograd.grad(model_aux, preds, retain_graph=True)
    g_hand = torch.autograd.grad(aux, preds)
    for a, b in zip(g_model, g_hand):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_one_dtype_table():
    from olavlm import dtypes
    from olavlm.model.vision import torch_dtype as model_dtype
    from olavlm.teachers.base import resolve_dtype
    from olavlm.teachers.cache import dtype_name

    want = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
            "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
    assert set(want) == set(dtypes.SPELLINGS)
    for spelling, dtype in want.items():  # every reader of a dtype string agrees with the table
        assert dtypes.torch_dtype(spelling) is dtype and resolve_dtype(spelling) is dtype and model_dtype(spelling) is dtype
        assert dtype_name(dtype) == dtypes.canonical_dtype(spelling) == str(dtype).removeprefix("torch.")
    assert dtypes.torch_dtype(None) is None and dtypes.torch_dtype(torch.float16) is torch.float16
    with pytest.raises(dtypes.DtypeError, match=r"^model\.dtype: unknown dtype 'int8'; use one of \['bfloat16'"):
        model_dtype("int8")
    with pytest.raises(CacheError, match="target cache dtype: torch.int8 is not one of"):
        dtype_name(torch.int8)
    with pytest.raises(ValueError, match="unknown dtype"):  # a DtypeError is a ValueError and a UserError
        resolve_dtype("fp8")
