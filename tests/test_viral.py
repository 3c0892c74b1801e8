"""The alignment (VIRAL-style) task kind beside OLA-VLM's embedding tasks: the loss against an
independent computation (value and gradients), span-based image selection, what trains in IFT,
the DINOv2 and ShapeWorld patch teachers, config rules, recipes, and OLA's unchanged golden outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from olavlm.config import ConfigError, PredictorConfig, RunConfig, TaskConfig, TrainConfig, load_config, validate
from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from olavlm.devkit.tiny import tiny_model_config
from olavlm.model.vlm import OlaVLM
from olavlm.objectives.alignment import alignment_loss, alignment_task_loss
from olavlm.train.stages import active_tasks, configure_trainable
from viral_golden import GOLDEN, ola_pt_fingerprint


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# -- the loss on fixed tensors ------------------------------------------------------------------

def _reference(pred: np.ndarray, target: np.ndarray, valid: np.ndarray):
    """Loss and d loss / d pred written out with numpy: mean over valid images of mean over tokens of -cos."""
    n_valid, tokens = int(valid.sum()), pred.shape[1]
    loss, grad = 0.0, np.zeros_like(pred)
    for i in np.flatnonzero(valid):
        for j in range(tokens):
            p, t = pred[i, j], target[i, j]
            np_, nt = math.sqrt((p * p).sum()), math.sqrt((t * t).sum())
            cos = (p * t).sum() / (np_ * nt)
            loss -= cos / (n_valid * tokens)
            grad[i, j] = -(t / (np_ * nt) - cos * p / np_ ** 2) / (n_valid * tokens)
    return loss, grad


def test_alignment_loss_equals_independent_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    target = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    target[1] = float("nan")  # a masked image's target is never read
    valid = torch.tensor([True, False, True])
    p = pred.clone().requires_grad_(True)
    loss = alignment_loss(p, target, valid)
    loss.backward()
    ref_loss, ref_grad = _reference(pred.numpy(), target.numpy(), valid.numpy())
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    assert torch.allclose(p.grad.double(), torch.from_numpy(ref_grad), atol=1e-7)
    assert torch.all(p.grad[1] == 0)


def test_alignment_loss_edge_cases():
    pred = torch.randn(2, 4, 3, requires_grad=True)
    zero = alignment_loss(pred, torch.randn(2, 4, 3), torch.tensor([False, False]))
    zero.backward()
    assert zero.item() == 0.0 and pred.grad is not None and torch.all(pred.grad == 0)
    same = alignment_loss(pred.detach() * 3.0, pred.detach())  # scale-free: identical directions -> -1
    assert same.item() == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(ValueError, match="images, tokens, channels"):
        alignment_loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_task_loss_is_weight_times_mean_over_layers():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(2, 4, 3, generator=g)
    preds = {2: torch.randn(2, 4, 3, generator=g), 5: torch.randn(2, 4, 3, generator=g)}
    valid = torch.tensor([True, True])
    metrics = {}
    got = alignment_task_loss("viral", preds, target, valid, 0.5, metrics)
    layer = {l: _reference(p.numpy().astype(np.float64), target.numpy().astype(np.float64), valid.numpy())[0]
             for l, p in preds.items()}
    assert got.item() == pytest.approx(0.5 * (layer[2] + layer[5]) / 2, rel=1e-5)
    assert metrics["loss/viral/layer5/neg_cosine"].item() == pytest.approx(layer[5], rel=1e-5)


# -- the task kind in the model -----------------------------------------------------------------

def _viral_task(tiny_dir, layers=(2, 4)) -> TaskConfig:
    return TaskConfig(kind="alignment", teacher="dinov2", teacher_path=str(tiny_dir / "teachers" / "teacher-dinov2"),
                      layers=list(layers), weight=0.5, predictor=PredictorConfig(out_dim=32, mlp_dim=16))


def _batch(tok, specs):
    """specs: (has image, answer) per sample; right-padded ids / labels / mask."""
    rows = []
    for image, answer in specs:
        ids = tok("User: look", add_special_tokens=False)["input_ids"] + ([IMAGE_TOKEN_INDEX] if image else [])
        ans = tok(" " + answer, add_special_tokens=False)["input_ids"]
        rows.append((ids + ans, [IGNORE_INDEX] * len(ids) + ans))
    width = max(len(r[0]) for r in rows)
    out = {"input_ids": torch.full((len(rows), width), tok.pad_token_id),
           "labels": torch.full((len(rows), width), IGNORE_INDEX),
           "attention_mask": torch.zeros(len(rows), width, dtype=torch.bool)}
    for i, (a, b) in enumerate(rows):
        out["input_ids"][i, :len(a)], out["labels"][i, :len(b)] = torch.tensor(a), torch.tensor(b)
        out["attention_mask"][i, :len(a)] = True
    return out


@pytest.fixture(scope="module")
def ift_model(tiny_dir):
    """An IFT model: built without predictors (as loaded from a PT folder), the alignment task attached."""
    torch.manual_seed(0)
    cfg = tiny_model_config(tiny_dir, vision="siglip")
    model = OlaVLM.from_config(cfg, with_predictors=False)
    model.attach_tasks({"viral": _viral_task(tiny_dir)})
    return model


def test_predictions_read_the_image_spans_and_skip_text_only(ift_model):
    m = ift_model.eval()
    # a long text-only sample first, images at different offsets: positions come from the spans
    b = _batch(m.tokenizer, [(False, "Only text, and a rather long answer of many words here."),
                             (True, "A circle."), (True, "Two red squares and one blue triangle.")])
    px = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out = m(**b, pixel_values=px, mode="predict")
    states, layout = m.layer_states(b["input_ids"], b["attention_mask"], px, [2, 4])
    assert layout.image_sample.tolist() == [1, 2]  # the text-only sample has no image row
    for layer in (2, 4):
        rows = []
        for n in range(2):
            sample, start = int(layout.image_sample[n]), int(layout.image_start[n])
            assert (layout.token_kind[sample, start:start + 16] == 2).all()  # KIND_IMAGE
            rows.append(states[layer][sample, start:start + m.num_image_tokens])
        want = m.predictors["viral"][str(layer)].mlp(torch.stack(rows))
        assert torch.allclose(out.predictions["viral"][layer], want, atol=1e-5)
    # the loss over the 2 images equals the independent computation; changing the text-only sample does not move it
    target = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(4))
    out = m(**b, pixel_values=px, targets={"viral": target})
    ref = np.mean([_reference(out.predictions["viral"][l].double().detach().numpy(), target.double().numpy(),
                              np.array([True, True]))[0] for l in (2, 4)])
    assert out.metrics["loss/viral"].item() == pytest.approx(0.5 * ref, rel=1e-5)
    b2 = _batch(m.tokenizer, [(False, "Short."), (True, "A circle."), (True, "Two red squares and one blue triangle.")])
    out2 = m(**b2, pixel_values=px, targets={"viral": target})
    assert out2.metrics["loss/viral"].item() == pytest.approx(out.metrics["loss/viral"].item(), rel=1e-5)
    text_only = m(**_batch(m.tokenizer, [(False, "No image at all.")]), targets={"viral": torch.zeros(0, 16, 32)})
    assert text_only.metrics["loss/viral"].item() == 0.0


def test_ift_gradients_reach_the_alignment_mlp_and_llm_only(ift_model):
    m = ift_model
    counts = configure_trainable(m, "ift", TrainConfig(stage="ift"))
    assert counts["predictors"] > 0 and counts["llm"] > 0 and counts["task_tokens"] == 0 and counts["vision"] == 0
    m.train()
    m.zero_grad(set_to_none=True)
    b = _batch(m.tokenizer, [(True, "A circle."), (False, "Text.")])
    px = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    out = m(**{k: v for k, v in b.items() if k != "labels"}, pixel_values=px,
            targets={"viral": torch.randn(1, 16, 32)})  # alignment loss alone
    out.loss.backward()
    groups = m.param_groups()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["predictors"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["llm"])
    assert all(p.grad is None for g in ("vision", "task_tokens") for p in groups[g])
    m.zero_grad(set_to_none=True)


def test_alignment_under_bf16_autocast(ift_model):
    """The MLP runs in bf16 under autocast, the cosine in fp32; gradients still reach the fp32 MLP."""
    m = ift_model.train()
    m.zero_grad(set_to_none=True)
    b = _batch(m.tokenizer, [(True, "A circle.")])
    px = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    target = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(**b, pixel_values=px, targets={"viral": target})
    assert out.predictions["viral"][2].dtype == torch.bfloat16 and out.metrics["loss/viral"].dtype == torch.float32
    ref = 0.5 * np.mean([_reference(out.predictions["viral"][l].double().detach().numpy(), target.double().numpy(),
                                    np.array([True]))[0] for l in (2, 4)])
    assert out.metrics["loss/viral"].item() == pytest.approx(ref, rel=1e-4)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.predictors.parameters())
    m.zero_grad(set_to_none=True)


def test_stage_policy_for_task_kinds(tiny_dir, ift_model):
    cfg = tiny_model_config(tiny_dir, vision="siglip")
    cfg.tasks["viral"] = _viral_task(tiny_dir)
    assert sorted(active_tasks(cfg, "pt")) == ["depth", "gen", "seg"]
    assert sorted(active_tasks(cfg, "ift")) == ["viral"] and active_tasks(cfg, "vpt") == {}
    cfg.tasks["viral"].stages = ["pt", "ift"]
    assert "viral" in active_tasks(cfg, "pt")
    torch.manual_seed(0)
    pt = OlaVLM.from_config(cfg, tasks=list(active_tasks(cfg, "pt")))  # PT: OLA + the alignment task
    assert set(pt.predictors) == {"gen", "depth", "seg", "viral"} and "viral" not in pt.logit_scales._parameters
    assert "viral" not in pt.task_tokens.rows and pt.target_shapes["viral"] == (16, 32)
    with pytest.raises(ValueError, match="with_predictors=False"):  # OLA predictors never train in IFT
        configure_trainable(pt, "ift", TrainConfig(stage="ift"))
    with pytest.raises(ValueError, match="only alignment tasks"):
        ift_model.attach_tasks({"depth": cfg.tasks["depth"]})


def test_config_rules(tiny_dir):
    def check(**task):
        cfg = RunConfig()
        cfg.model.tasks["viral"] = TaskConfig(kind="alignment", teacher="dinov2", layers=[16], **task)
        validate(cfg)

    check()
    with pytest.raises(ConfigError, match="model.tasks.viral.predictor: an alignment task"):
        check(predictor=PredictorConfig(output_layout="grid"))
    with pytest.raises(ConfigError, match="model.tasks.viral.stages"):
        check(stages=[])
    cfg = RunConfig()
    cfg.model.tasks["depth"].stages = ["ift"]
    with pytest.raises(ConfigError, match="model.tasks.depth.stages: embedding"):
        validate(cfg)
    cfg = RunConfig()
    cfg.model.tasks["viral"] = TaskConfig(kind="alignment", teacher="dinov2")
    cfg.model.task_order = ["gen", "depth", "seg", "viral"]
    with pytest.raises(ConfigError, match="remove 'viral' from model.task_order"):
        validate(cfg)
    with pytest.raises(ConfigError, match="model.tasks.viral.kind"):
        load_config(None, ["model.tasks.viral.teacher=dinov2", "model.tasks.viral.kind=cosine"])


# -- teachers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [4, 8])
def test_tiny_dinov2_targets_have_the_image_token_grid(tiny_dir, grid):
    from transformers import Dinov2Model

    from olavlm.teachers import build_teacher
    from olavlm.teachers.base import prepare_pixels
    from olavlm.teachers.registry import target_spec

    path = tiny_dir / "teachers" / "teacher-dinov2"
    teacher = build_teacher("dinov2", str(path), grid=grid)
    assert teacher.target_shape == (grid * grid, 32) and teacher.input_size == grid * 8
    spec = target_spec("dinov2", str(path), grid=grid)
    assert spec.shape == teacher.target_shape and spec.input_size == teacher.input_size and spec.layout == "tokens"
    images = torch.randint(0, 256, (2, 3, 72, 72), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = teacher.encode(images)
    # independent: the HF model's last block output, its final LayerNorm applied here, CLS dropped
    ref_model = Dinov2Model.from_pretrained(str(path)).eval()
    x = prepare_pixels(images, size=grid * 8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                       device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        hidden = ref_model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        want = ref_model.layernorm(hidden)[:, 1:]
    assert got.shape == (2, grid * grid, 32) and torch.allclose(got, want, atol=1e-5)
    assert teacher.fingerprint()["preprocessing"]["mean"] == [0.485, 0.456, 0.406]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from olavlm.world.generate import WorldSpec, generate_world

    return generate_world(tmp_path_factory.mktemp("w"), WorldSpec(seed=1, n_pretrain=4, n_instruct=2,
                                                                  n_text_only=1, n_cvbench=2, n_probe=2))


def test_shapeworld_patch_oracle(world):
    from olavlm.teachers import build_teacher
    from olavlm.teachers.registry import target_spec

    root = world.root
    t = build_teacher("shapeworld_patches", str(root), grid=8, dim=16)
    depth = build_teacher("shapeworld_depth", str(root), grid=8, dim=16)
    seg = build_teacher("shapeworld_seg", str(root), grid=8, dim=16)
    key = "images/pt_00000.png"
    x = np.concatenate([depth.patch_depth(key), seg.patch_histogram(key).reshape(64, -1)], axis=1)
    w, b = t.weight.detach().double().numpy(), t.bias.detach().double().numpy()
    want = math.sqrt(2.0) * np.cos(4.0 * x @ w.T + b)
    got = t.encode(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [key])
    assert got.shape == (1, 64, 16) and np.allclose(got[0].double().numpy(), want, atol=1e-5)
    assert target_spec("shapeworld_patches", str(root), grid=8, dim=16).shape == (64, 16)


# -- recipes ------------------------------------------------------------------------------------

def test_methods_plan_and_shapeworld_recipe(tmp_path):
    from olavlm.methods import METHODS, shapeworld_plan, shapeworld_stage_overrides

    assert METHODS == ("baseline", "ola", "viral")
    assert shapeworld_stage_overrides("viral", "pt", tmp_path) == ("pt.yaml", [f"model.tasks.{t}.layers=[]"
                                                                              for t in ("gen", "depth", "seg")])
    assert shapeworld_stage_overrides("viral", "ift", "W") == ("viral_ift.yaml", ["model.tasks.viral.teacher_path=W"])
    assert shapeworld_plan("ola").pt_overrides() == [] and shapeworld_plan("baseline").ift_overrides("W") == []
    with pytest.raises(ValueError, match="not one of"):
        shapeworld_plan("dino")
    cfg = load_config("configs/shapeworld/viral_ift.yaml")
    assert list(active_tasks(cfg.model, "ift")) == ["viral"] and cfg.model.tasks["viral"].layers == [2]
    for variant in ("llama3_8b_clip336", "phi3_mini_clip336"):
        cfg = load_config(f"configs/{variant}/viral_ift.yaml")
        v = cfg.model.tasks["viral"]
        assert (v.kind, v.layers, v.weight, v.teacher, v.predictor.out_dim, v.predictor.mlp_dim) == (
            "alignment", [16], 0.5, "dinov2", 768, 2048)
        assert cfg.train.stage == "ift" and list(active_tasks(cfg.model, "ift")) == ["viral"]


def test_ola_pt_and_viral_ift_steps_from_recipes(tiny_dir, tmp_path):
    """2 OLA PT steps from the PT recipe, then 2 VIRAL IFT steps from it, on the tiny models."""
    from olavlm.cli import main as cli_main
    from olavlm.devkit.smoke import smoke_overrides

    variant = "llama3_8b_clip336"
    for stage in ("pt", "viral_ift"):
        recipe = f"configs/{variant}/{stage}.yaml"
        assert cli_main(["train", recipe, *smoke_overrides(tiny_dir, recipe, tmp_path)]) == 0
    pt = [json.loads(x) for x in (tmp_path / variant / "pt" / "metrics.jsonl").read_text().splitlines()]
    ift = [json.loads(x) for x in (tmp_path / variant / "viral_ift" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/depth", "loss/seg", "loss/gen"} <= set(pt[-1]) and "loss/viral" not in pt[-1]
    assert "loss/viral" in ift[0] and not any(k.startswith(("loss/depth", "loss/seg", "loss/gen")) for k in ift[0])
    summary = json.loads((tmp_path / variant / "viral_ift" / "summary.json").read_text())
    assert summary["finished"] and summary["trainable"]["predictors"] > 0 and summary["trainable"]["vision"] == 0
    final = tmp_path / variant / "viral_ift" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["with_predictors"] is False and config["tasks"]["viral"]["kind"] == "alignment"
    OlaVLM.from_pretrained(final)  # the IFT model loads (alignment MLP dropped, like VIRAL at inference)
    # the probe resolves the alignment task's teacher from the saved config and scores every layer
    from olavlm.evaluation.probe import ProbeSpec, run_probe

    res = run_probe(final, tmp_path / "data" / "train.json", "viral", layers="all", progress=False,
                    image_root=tmp_path / "data" / "images",
                    spec=ProbeSpec(steps=2, dim=8), output=tmp_path / "probe")
    assert res["teacher"] == "dinov2" and sorted(res["layers"]) == ["1", "2", "3", "4"]
    assert (tmp_path / "probe" / "probe.png").is_file()
    # the target cache of the VIRAL recipe holds the alignment task only, and IFT trains from it
    from olavlm.teachers.precompute import precompute

    recipe = f"configs/{variant}/viral_ift.yaml"
    overrides = [o[2:] for o in smoke_overrides(tiny_dir, recipe, tmp_path)]
    cfg = load_config(recipe, overrides + [f"data.target_cache={tmp_path / 'cache'}",
                                           f"train.output_dir={tmp_path / 'cached'}"])
    summary = precompute(cfg, batch_size=4, progress=False, device="cpu", rank=0, world_size=1)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert list(index["tasks"]) == ["viral"] and index["tasks"]["viral"]["shape"] == [64, 32], summary
    from olavlm.train.loop import train

    cached = train(cfg, resume="none")
    assert cached.summary["finished"]


# -- OLA unchanged --------------------------------------------------------------------------------

def test_ola_pt_golden_fingerprint_unchanged(tiny_dir):
    want = json.loads(GOLDEN.read_text())
    got = ola_pt_fingerprint(tiny_dir)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_shapeworld_viral_chain_runs_from_the_plan(tiny_dir, world, tmp_path):
    """baseline PT then VIRAL IFT on a small world, with the overrides shapeworld_plan gives the demo."""
    from olavlm.methods import shapeworld_stage_overrides
    from olavlm.train.loop import train

    root = world.root
    common = [f"model.llm={tiny_dir / 'llm-llama'}", f"model.vision_tower={tiny_dir / 'vision-clip'}",
              f"data.image_folder={root}", "train.global_batch_size=2", "train.micro_batch_size=2",
              "train.max_steps=2", *[f"model.tasks.{t}.teacher_path={root}" for t in ("gen", "depth", "seg")]]
    recipe, extra = shapeworld_stage_overrides("viral", "pt", root)
    pt = train(load_config(f"configs/shapeworld/{recipe}", common + extra + [
        f"data.train_file={root / 'pretrain.json'}", f"train.output_dir={tmp_path / 'pt'}"]), resume="none")
    assert pt.summary["trainable"]["predictors"] == 0  # the baseline PT: no OLA losses
    recipe, extra = shapeworld_stage_overrides("viral", "ift", root)
    ift = train(load_config(f"configs/shapeworld/{recipe}", common + extra + [
        f"data.train_file={root / 'instruct.json'}", f"train.init_from={tmp_path / 'pt'}",
        f"train.output_dir={tmp_path / 'ift'}"]), resume="none")
    metrics = [json.loads(x) for x in (tmp_path / "ift" / "metrics.jsonl").read_text().splitlines()]
    assert ift.summary["finished"] and ift.summary["trainable"]["predictors"] > 0
    assert any(m.get("loss/viral", 0.0) != 0.0 for m in metrics)
