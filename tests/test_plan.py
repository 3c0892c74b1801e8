"""`olavlm plan`: parameter counts against an instantiated model and the published table, FLOP
formulas against torch's FLOP counter, activation bytes against autograd's saved tensors, static
memory against a real optimizer step, and the real-size numbers of the Llama-3 / Phi-3 recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from olavlm.config import TrainConfig, load_config
from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from olavlm.devkit.tiny import tiny_model_config
from olavlm.model.vlm import OlaVLM
from olavlm.plan import flops as F
from olavlm.plan import memory as M
from olavlm.plan.build import make_plan
from olavlm.plan.counts import LLMDims, VisionDims, group_counts, predictor_counts, stage_counts
from olavlm.plan.meta import meta_model
from olavlm.train.stages import configure_trainable

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "real_configs"
TOKENIZERS = ROOT.parent / "shared" / "fixtures" / "tokenizers"


def _state(model) -> dict[str, tuple]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("llm", ["llama", "phi3"])
def test_counts_equal_an_instantiated_model(tiny_dir, llm):
    cfg = tiny_model_config(tiny_dir, llm=llm)
    for with_predictors, stages in ((True, ["pt"]), (False, ["vpt", "ift"])):
        meta = meta_model(cfg, with_predictors=with_predictors)
        real = OlaVLM.from_config(cfg, with_predictors=with_predictors)
        assert next(meta.parameters()).is_meta
        assert _state(meta) == _state(real)  # every tensor: name, shape and dtype
        assert {g: vars(c) for g, c in group_counts(meta).items()} == {g: vars(c) for g, c in group_counts(real).items()}
        assert predictor_counts(meta) == predictor_counts(real)
        for stage in stages:
            planned = stage_counts(meta, stage, TrainConfig(stage=stage))
            trained = configure_trainable(real, stage, TrainConfig(stage=stage))
            assert {g: v["trainable"] for g, v in planned.items()} == {g: trained.get(g, 0) for g in planned}


# method table of the embedding predictors (parameters, biases included), per LLM; the depth predictor's
# two unsupervised output MLPs (Linear 1024->1024, ReLU, Linear 1024->1024 each) are not built by olavlm
TABLE = {
    "llama3_8b_clip336": {"gen": 7_874_560, "seg": 14_171_136, "depth": 62_952_448, "tokens": 4_751_360,
                          "aux": 174_747_651, "projector": 20_979_712, "llm": 8_030_269_440, "tokenizer": "llama3"},
    "phi3_mini_clip336": {"gen": 6_825_984, "seg": 12_598_272, "depth": 39_352_320, "tokens": 3_563_520,
                          "aux": 121_116_675, "projector": 12_589_056, "llm": 3_821_079_552, "tokenizer": "phi3"},
}
UNBUILT_MLP = 2 * (1024 * 1024 + 1024)  # one Linear-ReLU-Linear 1024 -> 1024


@pytest.mark.parametrize("recipe", sorted(TABLE))
def test_real_size_counts_match_the_published_table(recipe):
    want = TABLE[recipe]
    tok = TOKENIZERS / want["tokenizer"]
    overrides = [f"--model.tokenizer={tok}"] if tok.is_dir() else []
    cfg = load_config(ROOT / "configs" / recipe / "pt.yaml", overrides)
    from olavlm.plan.meta import resolve_paths

    notes: list[str] = []
    model = meta_model(resolve_paths(cfg.model, REAL), with_predictors=True, notes=notes)
    preds = predictor_counts(model)
    assert set(preds["gen"]["per_layer"].values()) == {want["gen"]}
    assert set(preds["seg"]["per_layer"].values()) == {want["seg"]}
    assert set(preds["depth"]["per_layer"].values()) == {want["depth"] - 2 * UNBUILT_MLP}
    groups = group_counts(model)
    assert groups["task_tokens"].params == want["tokens"]
    assert groups["projector"].params == want["projector"]
    aux = groups["predictors"].params + groups["task_tokens"].params + groups["logit_scales"].params
    assert aux == want["aux"] - 2 * 2 * UNBUILT_MLP  # 2 depth layers x 2 unbuilt MLPs
    assert groups["vision"].params == 303_507_456  # CLIP ViT-L/14-336 vision model
    if tok.is_dir():
        assert groups["llm"].params == want["llm"] and not notes
    else:  # without the tokenizer no pad row is added
        assert notes and groups["llm"].params <= want["llm"]


def _tiny_batch(model, batch: int = 3, text: int = 20):
    ids = torch.randint(10, 200, (batch, text))
    ids[:, 3] = IMAGE_TOKEN_INDEX
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -6:] = ids[:, -6:]
    side = model.image_spec.size
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
            "pixel_values": torch.randn(batch, 3, side, side)}


@pytest.mark.parametrize("llm,stage", [("llama", "pt"), ("llama", "ift"), ("phi3", "pt"), ("qwen2", "ift")])
def test_flop_formulas_equal_the_flop_counter(tiny_dir, llm, stage):
    """Forward and whole training step (forward + backward) of a tiny model, counted by torch."""
    torch.manual_seed(0)
    cfg = tiny_model_config(tiny_dir, llm=llm)
    model = OlaVLM.from_config(cfg, with_predictors=stage == "pt")
    configure_trainable(model, stage, TrainConfig(stage=stage))
    batch = _tiny_batch(model)
    n = batch["input_ids"].shape[0]
    if stage == "pt":
        batch["targets"] = {t: torch.randn(n, *s) for t, s in model.target_shapes.items()}
    length = batch["input_ids"].shape[1] - 1 + model.tokens_per_image
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) // n
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.projector.modules())
    d = LLMDims.of(model.llm)
    est = F.micro_batch_flops(llm=d, vision=VisionDims.of(model.vision, cfg.vision_type),
                              projector=(model.vision.hidden_size, d.hidden, linears),
                              predictors=predictor_counts(model), stage=stage, length=length, supervised=supervised,
                              batch=n, world=1, image_tokens=model.num_image_tokens, teachers=None)
    with sdpa_kernel(SDPBackend.MATH):  # attention as two counted matmuls (the fused CPU kernel is not counted)
        with FlopCounterMode(display=False) as fwd:
            model(**batch)
        with FlopCounterMode(display=False) as step:
            model(**batch).loss.backward()
    assert fwd.get_total_flops() == F.total(est["forward"])
    assert step.get_total_flops() == F.total(est["train"])


@pytest.mark.parametrize("name,folder", [("depth_anything", "teacher-depth"), ("oneformer", "teacher-seg"),
                                         ("unclip", "teacher-gen"), ("dinov2", "teacher-dinov2")])
def test_teacher_flop_formulas_equal_the_flop_counter(tiny_dir, name, folder):
    from olavlm.teachers import build_teacher

    teacher = build_teacher(name, str(tiny_dir / "teachers" / folder), grid=8)
    images = torch.randint(0, 255, (2, 3, teacher.input_size, teacher.input_size), dtype=torch.uint8)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        teacher.encode(images)
    assert fc.get_total_flops() == 2 * F.total(F.teacher_forward(teacher)) > 0


@pytest.mark.parametrize("llm,stage", [("llama", "pt"), ("llama", "ift"), ("phi3", "pt"), ("phi3", "ift")])
def test_layer_activation_bytes_equal_autograd_saved_tensors(tiny_dir, llm, stage):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / f"llm-{llm}", dtype=torch.bfloat16)
    model.requires_grad_(stage != "pt")
    d = LLMDims.of(model)
    batch, length = 2, 48
    x = torch.randn(batch, length, d.hidden, dtype=torch.bfloat16, requires_grad=True)
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[tuple, int] = {}

    def pack(t):
        if t.data_ptr() not in params:  # weights are not activations
            saved[(t.data_ptr(), tuple(t.shape), t.dtype)] = t.numel() * t.element_size()
        return t

    pos = torch.arange(length)[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](x, position_embeddings=model.model.rotary_emb(x, pos), attention_mask=None,
                              position_ids=pos)
    assert sum(saved.values()) == M.llm_layer_bytes(d, stage, batch=batch, length=length, act_bytes=2)


def test_ddp_static_memory_equals_a_real_optimizer_step(tiny_dir):
    """Weights, gradients and AdamW state after one PT step set up as the training loop does."""
    from olavlm.plan.build import _static_inputs
    from olavlm.config import RunConfig

    cfg = tiny_model_config(tiny_dir)
    run = RunConfig(model=cfg, train=TrainConfig(stage="pt", bf16=False))
    model = OlaVLM.from_config(cfg)
    planned = M.static_memory(_static_inputs(meta_model(cfg, with_predictors=True), "pt", run, world=1))["ddp"]
    configure_trainable(model, "pt", run.train)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params)
    batch = _tiny_batch(model)
    batch["targets"] = {t: torch.randn(3, *s) for t, s in model.target_shapes.items()}
    model(**batch).loss.backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert planned["weights"] == nbytes(model.parameters())
    assert planned["grads"] == nbytes(p.grad for p in params)
    moments = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    assert planned["optimizer"] == nbytes(moments)
    assert planned["buffers"] == 0  # one process (no DDP buckets), fp32 (no autocast copies)


@pytest.fixture(scope="module")
def llama_pt_plan():
    tok = TOKENIZERS / "llama3"
    overrides = [f"--model.tokenizer={tok}"] if tok.is_dir() else []
    cfg = load_config(ROOT / "configs/llama3_8b_clip336/pt.yaml", overrides)
    return make_plan(cfg, gpus=8, nodes=1, gpu="h100", seq_len=700, hub_configs=REAL), tok.is_dir()


def test_real_size_plan_of_the_llama3_pt_recipe(llama_pt_plan):
    plan, with_tokenizer = llama_pt_plan
    assert plan["steps"]["samples"] == 558_128 and plan["steps"]["total"] == 2181  # ceil(558,128 / 256)
    assert plan["batch"]["accumulation"] == 1
    # targets per image: depth 576 x 1024 + seg 1536 x 24 x 24 + gen 1024, bf16
    assert plan["target_cache"]["bytes_per_image"] == (576 * 1024 + 1536 * 576 + 1024) * 2
    assert {t: v["target_shape"] for t, v in plan["teachers"].items()} == {
        "depth": [576, 1024], "seg": [1536, 24, 24], "gen": [1, 1024]}
    assert {t: v["params"] for t, v in plan["teachers"].items()} == {
        "depth": 304_368_640, "seg": 195_204_276, "gen": 632_076_800}  # DINOv2-L, Swin-L, ViT-H/14 (+ projection)
    if with_tokenizer:
        # final/ after PT: LLM + tower in bf16, the trained extras in fp32, from the published component counts
        # (LLM, CLIP vision model; projector and the aux total of the table minus the 4 unbuilt depth MLPs)
        extras = 20_979_712 + 174_747_651 - 4 * UNBUILT_MLP
        assert plan["checkpoints"]["final"]["ddp"] == 2 * (8_030_269_440 + 303_507_456) + 4 * extras
    f = plan["flops"]["per_step"]
    assert f["llm"] > f["teachers"] > f["predictors"] > f["vision"] > f["projector"] > 0
    mem = plan["memory"]
    assert mem["zero3"]["weights"] < mem["zero2"]["weights"] and mem["zero2"]["optimizer"] < mem["ddp"]["optimizer"]
    assert all(m["activations_ckpt"] < m["activations"] for m in mem.values())
    t = plan["time"]
    assert t["seconds_per_step"] == pytest.approx(plan["flops"]["total_per_step"] / (8 * 989e12 * 0.4))


def test_ift_plan_steps_and_no_predictors():
    cfg = load_config(ROOT / "configs/phi3_mini_clip336/ift.yaml")
    plan = make_plan(cfg, gpus=8, hub_configs=REAL)
    assert plan["steps"]["total"] == math.ceil(665_298 / 128) == 5198
    assert plan["parameters"]["groups"]["predictors"]["params"] == 0 and not plan["teachers"]
    assert plan["parameters"]["stages"]["ift"]["llm"]["trainable"] == plan["parameters"]["groups"]["llm"]["params"]
    assert plan["flops"]["per_step"]["predictors"] == 0 and plan["flops"]["per_step"]["teachers"] == 0


def test_cli_prints_a_table_and_json(tiny_dir, capsys):
    from olavlm.cli import main
    from olavlm.devkit.smoke import smoke_overrides

    recipe = ROOT / "configs/llama3_8b_clip336/pt.yaml"
    over = smoke_overrides(tiny_dir, recipe, tiny_dir / "plan-smoke")
    assert main(["plan", str(recipe), "--gpus", "2", "--gpu", "a100", *over]) == 0
    text = capsys.readouterr().out
    assert "Memory per GPU" in text and "zero3" in text and "trains in pt" in text
    assert main(["plan", str(recipe), "--json", "--nodes", "2", *over]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["world"]["world_size"] == 16 and plan["gpu"]["key"] == "h100"


@pytest.mark.parametrize("args,message", [(["--gpu", "tpu9"], "--gpu: 'tpu9' is not one of"),
                                          (["--model.no_such=1"], "model.no_such: unknown key"),
                                          (["--mfu", "2"], "--mfu: must be in (0, 1]")])
def test_cli_errors_are_one_line(capsys, args, message):
    from olavlm.cli import main

    assert main(["plan", str(ROOT / "configs/llama3_8b_clip336/pt.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# -- alignment (VIRAL-style) tasks, the DINOv2 teacher and ConvNeXt towers ---------------------------

def _tiny_viral_config(tiny_dir, vision: str = "clip"):
    from olavlm.config import PredictorConfig, TaskConfig

    cfg = tiny_model_config(tiny_dir, vision=vision)
    cfg.tasks["viral"] = TaskConfig(kind="alignment", teacher="dinov2", layers=[2, 4], weight=0.5,
                                    teacher_path=str(tiny_dir / "teachers" / "teacher-dinov2"),
                                    predictor=PredictorConfig(out_dim=32, mlp_dim=16))
    return cfg


def test_alignment_counts_equal_an_instantiated_model(tiny_dir):
    cfg = _tiny_viral_config(tiny_dir)
    meta = meta_model(cfg, with_predictors=True, tasks=["viral"])  # what IFT trains
    real = OlaVLM.from_config(cfg, with_predictors=True, tasks=["viral"])
    assert _state(meta) == _state(real)
    counts = predictor_counts(meta)
    assert counts == predictor_counts(real) and list(counts) == ["viral"]
    d, p = real.llm.config.hidden_size, real.num_image_tokens
    each = d * 16 + 16 + 16 * 16 + 16 + 16 * 32 + 32  # Linear d->16, 16->16, 16->32
    assert counts["viral"]["per_layer"] == {2: each, 4: each} and counts["viral"]["stages"] == ["ift"]
    assert counts["viral"]["output_shape"] == [p, 32]
    planned = stage_counts(meta, "ift", TrainConfig(stage="ift"))
    trained = configure_trainable(real, "ift", TrainConfig(stage="ift"))
    assert {g: v["trainable"] for g, v in planned.items()} == {g: trained.get(g, 0) for g in planned}
    assert planned["predictors"]["trainable"] == 2 * each


def test_alignment_flops_equal_the_flop_counter(tiny_dir):
    """An IFT step with the alignment MLPs (token-wise over the image tokens), counted by torch."""
    torch.manual_seed(0)
    cfg = _tiny_viral_config(tiny_dir)
    model = OlaVLM.from_config(cfg, with_predictors=True, tasks=["viral"])
    configure_trainable(model, "ift", TrainConfig(stage="ift"))
    batch = _tiny_batch(model)
    n = batch["input_ids"].shape[0]
    batch["targets"] = {"viral": torch.randn(n, *model.target_shapes["viral"])}
    length = batch["input_ids"].shape[1] - 1 + model.tokens_per_image
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) // n
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.projector.modules())
    d = LLMDims.of(model.llm)
    est = F.micro_batch_flops(llm=d, vision=VisionDims.of(model.vision, cfg.vision_type),
                              projector=(model.vision.hidden_size, d.hidden, linears),
                              predictors=predictor_counts(model), stage="ift", length=length, supervised=supervised,
                              batch=n, world=1, image_tokens=model.num_image_tokens, teachers=None)
    assert est["forward"]["predictors"] == 2 * 2 * n * model.num_image_tokens * (d.hidden * 16 + 16 * 16 + 16 * 32)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            out = model(**batch)
        assert "loss/viral" in out.metrics
        with FlopCounterMode(display=False) as step:
            model(**batch).loss.backward()
    assert fwd.get_total_flops() == F.total(est["forward"])
    assert step.get_total_flops() == F.total(est["train"])


def test_convnext_tower_flops_equal_the_flop_counter(tiny_dir):
    model = OlaVLM.from_config(tiny_model_config(tiny_dir, vision="convnext"), with_predictors=False)
    v = VisionDims.of(model.vision, "convnext")
    side = model.image_spec.size
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.vision(torch.randn(2, 3, side, side))
    assert fc.get_total_flops() == 2 * F.total(F.vision_forward(v)) > 0


def _dinov2_base_params() -> int:
    """ViT-B/14 at 518 px (37 x 37 + CLS positions), layer scale, qkv bias: from the architecture."""
    h, mlp, layers = 768, 4 * 768, 12
    embed = 3 * h * 14 * 14 + h + h + h + (37 * 37 + 1) * h  # patch conv + bias, CLS, mask token, positions
    block = 2 * 2 * h + 4 * (h * h + h) + 2 * h + (h * mlp + mlp) + (mlp * h + h)  # 2 LN, qkv+out, 2 scales, MLP
    return embed + layers * block + 2 * h


@pytest.fixture(scope="module")
def llama_viral_plan():
    cfg = load_config(ROOT / "configs/llama3_8b_clip336/viral_ift.yaml")
    return make_plan(cfg, gpus=8, hub_configs=REAL)


def test_real_size_plan_of_the_llama3_viral_recipe(llama_viral_plan):
    plan = llama_viral_plan
    mlp = 4096 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 768 + 768
    viral = plan["parameters"]["predictors"]["viral"]
    assert viral["per_layer"] == {16: mlp} and viral["stages"] == ["ift"] and viral["output_shape"] == [576, 768]
    stages = plan["parameters"]["stages"]
    assert stages["ift"]["predictors"]["trainable"] == mlp  # the alignment MLP trains in IFT ...
    ola = sum(v for t in ("gen", "depth", "seg") for v in plan["parameters"]["predictors"][t]["per_layer"].values())
    assert stages["pt"]["predictors"]["trainable"] == ola  # ... and not in PT (the OLA predictors do)
    assert stages["ift"]["llm"]["trainable"] == plan["parameters"]["groups"]["llm"]["params"]
    assert plan["teachers"] == {"viral": {"class": "Dinov2Teacher", "source": str(REAL / "facebook/dinov2-base"),
                                          "params": _dinov2_base_params(), "dtype": "bfloat16", "input_size": 336,
                                          "target_shape": [576, 768], "online": True}}
    assert _dinov2_base_params() == 86_580_480  # the published size of facebook/dinov2-base
    # FLOPs per step (global batch 128): MLP forward + input and weight gradients; DINOv2-B at 336 px forward
    per_step = 128
    assert plan["flops"]["per_step"]["predictors"] == per_step * 3 * 2 * 576 * (4096 * 2048 + 2048 * 2048 + 2048 * 768)
    tokens = 24 * 24 + 1
    dino = 2 * 576 * 768 * 3 * 14 * 14 + 12 * (2 * tokens * (4 * 768 * 768 + 2 * 768 * 3072) + 4 * tokens * tokens * 768)
    assert plan["flops"]["per_step"]["teachers"] == per_step * dino
    assert plan["memory"]["ddp"]["teachers"] == 2 * 86_580_480  # bf16 weights while online
    cache = plan["target_cache"]
    assert cache["shapes"] == {"viral": [576, 768]} and cache["bytes_per_image"] == 576 * 768 * 2
    assert cache["bytes"] == 665_298 * 576 * 768 * 2


def test_plan_of_the_convnext_recipe_offline():
    cfg = load_config(ROOT / "configs/llama3_8b_convnext/pt.yaml")
    plan = make_plan(cfg, gpus=8, hub_configs=REAL)
    # convnext_xxlarge from its architecture: stem, 3 downsamplings, 40 blocks, the final pooled LayerNorm
    depths, widths = (3, 4, 30, 3), (384, 768, 1536, 3072)
    want = 3 * 384 * 16 + 384 + 2 * 384 + 2 * widths[-1]
    for s, (n, c) in enumerate(zip(depths, widths)):
        if s:
            want += 2 * widths[s - 1] + widths[s - 1] * c * 4 + c
        want += n * (49 * c + c + 2 * c + c * 4 * c + 4 * c + 4 * c * c + c + c)
    assert plan["parameters"]["groups"]["vision"]["params"] == want == 843_398_016
    assert plan["model"]["image_tokens"] == 576 and plan["flops"]["per_step"]["vision"] > 0
