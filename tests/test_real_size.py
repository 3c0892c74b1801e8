"""The recipes' real geometry at real size (configs in tests/data/real_configs, random weights):

* the vision tower and each teacher, built one at a time through olavlm's own loaders, take one
  image of the recipe's geometry; every teacher's target has exactly the shape the PT predictors
  produce (576 x 1024, 1536 x 24 x 24, 1 x 1024) and the tower gives 576 tokens of 1024;
* both LLMs on the meta device: the recipes' predictor layers exist, the widths are the real ones;
* one whole PT step (cached targets) at real width with the LLM cut to 2 layers.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from olavlm.config import load_config
from olavlm.plan.meta import meta_loading, meta_model, resolve_paths

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "real_configs"
PT = {"llama3_8b_clip336": (4096, 32, [10, 12, 18, 20]), "phi3_mini_clip336": (3072, 32, [8, 10, 12, 18, 20])}


def _recipe(name: str = "llama3_8b_clip336", overrides: list[str] | None = None):
    cfg = load_config(ROOT / "configs" / name / "pt.yaml", overrides or [])
    cfg.model = resolve_paths(cfg.model, REAL)
    return cfg


@pytest.fixture(scope="module")
def pt_model():
    """The Llama-3 PT model of the recipe on the meta device (its target shapes and geometry)."""
    return meta_model(_recipe().model, with_predictors=True)


@pytest.mark.parametrize("recipe", sorted(PT))
def test_llms_on_the_meta_device_have_the_recipes_layers_and_widths(recipe):
    from olavlm.model.io import decoder_of

    hidden, layers, used = PT[recipe]
    model = meta_model(_recipe(recipe).model, with_predictors=True)  # validates the layers against the LLM
    _, blocks = decoder_of(model.llm)
    assert len(blocks) == layers and model.llm.config.hidden_size == hidden
    assert model.predictor_layers() == used
    for by_layer in model.predictors.values():
        for predictor in by_layer.values():
            assert predictor.proj_in.in_features == hidden
    assert model.projector[0].in_features == 1024 and model.projector[-1].out_features == hidden
    assert model.target_shapes == {"gen": (1, 1024), "depth": (576, 1024), "seg": (1536, 24, 24)}


@pytest.mark.slow
def test_vision_tower_gives_576_tokens_of_1024(pt_model):
    from olavlm.model.vision import VisionTower, vision_geometry

    cfg = _recipe().model
    geo = vision_geometry(cfg)
    assert (geo.num_tokens, geo.grid, geo.spec.size, geo.hidden_size) == (576, 24, 336, 1024)
    with meta_loading(device="cpu"):
        tower = VisionTower.from_config(cfg)
    tower.model.float()
    with torch.no_grad():
        feats = tower(torch.randn(1, 3, geo.spec.size, geo.spec.size))
    assert feats.shape == (1, 576, 1024) and torch.isfinite(feats).all()
    del tower
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["depth", "seg", "gen"])
def test_teacher_targets_have_the_predictor_shapes(pt_model, task):
    """One teacher at a time (DA-v2-L ~335M, OneFormer Swin-L ~220M, ViT-H ~630M parameters in fp32),
    fed the shared square of the recipe's geometry (the largest teacher input)."""
    from olavlm.teachers import build_teacher

    tc = pt_model.cfg.tasks[task]
    with meta_loading(device="cpu"):
        teacher = build_teacher(tc.teacher, tc.teacher_path, grid=pt_model.geometry.grid, **tc.teacher_kwargs)
    assert {"depth": 336, "seg": 768, "gen": 224}[task] == teacher.input_size
    side = 768  # the largest teacher input: the side of the square the data layer carries
    image = torch.randint(0, 256, (1, 3, side, side), dtype=torch.uint8)
    target = teacher.encode(image)
    assert tuple(target.shape[1:]) == pt_model.target_shapes[task] == tuple(teacher.target_shape)
    assert torch.isfinite(target.float()).all()
    del teacher, target
    gc.collect()


def _two_layer_llm(tmp: Path, recipe: str) -> Path:
    """The recipe LLM's config with 2 layers, over the tiny tokenizer (vocabulary size is not width)."""
    from olavlm.devkit.tiny import CORPUS, train_tokenizer

    src = resolve_paths(load_config(ROOT / "configs" / recipe / "pt.yaml").model, REAL).llm
    cfg = json.loads((Path(src) / "config.json").read_text())
    tok = train_tokenizer(CORPUS)
    cfg.update(num_hidden_layers=2, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    cfg.pop("auto_map", None)
    out = tmp / "llm-2-layers"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_pt_step_at_real_width_with_two_llm_layers(tmp_path):
    """Real LLM width (4096, MLP 14336, GQA 8), real tower, real predictors (depth D=4096 with 576
    queries), real target shapes; 2 LLM layers; cached targets; one AdamW step as the training loop
    runs it (trainables fp32; gradient checkpointing is left to the tiny tests, it only adds time here)."""
    from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from olavlm.model.vlm import OlaVLM
    from olavlm.train.stages import configure_trainable

    llm = _two_layer_llm(tmp_path, "llama3_8b_clip336")
    cfg = _recipe(overrides=[f"--model.llm={llm}", "--model.tokenizer=null", "--model.dtype=float32",
                             "--model.layer_spec=d1-2_s1-2_g1-2", "--train.bf16=false"])
    torch.manual_seed(0)
    with meta_loading(device="cpu"):
        model = OlaVLM.from_config(cfg.model, with_predictors=True)
    assert model.llm.config.hidden_size == 4096 and model.llm.config.num_hidden_layers == 2
    configure_trainable(model, "pt", cfg.train)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    n, text = 2, 12
    ids = torch.randint(8, len(model.tokenizer) - 1, (n, text))
    ids[:, 3] = IMAGE_TOKEN_INDEX
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -5:] = ids[:, -5:]
    targets = {t: torch.randn(n, *s) for t, s in model.target_shapes.items()}
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool), labels=labels,
                pixel_values=torch.randn(n, 3, 336, 336), targets=targets)
    assert out.layout.token_kind.shape[1] == text - 1 + 576 + 24
    assert {t: {l: tuple(p.shape[1:]) for l, p in by.items()} for t, by in out.predictions.items()} == {
        t: {1: s, 2: s} for t, s in model.target_shapes.items()}
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None for p in model.llm.parameters()) and all(p.grad is None for p in model.vision.parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    before = model.predictors["depth"]["2"].proj_out.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.predictors["depth"]["2"].proj_out.weight)
