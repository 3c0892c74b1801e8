"""VPT/IFT from a saved model (train.init_from): the recipe's runtime model fields are applied, an
architecture field that contradicts the saved folder stops with one line naming both values."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from olavlm.config import ConfigError, load_config
from olavlm.model import io
from olavlm.model.vlm import OlaVLM
from olavlm.preflight import PreflightError, check_command
from olavlm.devkit.smoke import smoke_overrides

PT = Path("configs/llama3_8b_clip336/pt.yaml")
IFT = Path("configs/llama3_8b_clip336/ift.yaml")


@pytest.fixture(scope="module")
def saved_pt(tiny_dir, tmp_path_factory):
    """A PT final folder built from the PT recipe's model section (fp32, sdpa, mlp2x_gelu) + IFT overrides."""
    root = tmp_path_factory.mktemp("init_from")
    pt_cfg = load_config(PT, smoke_overrides(tiny_dir, PT, root))
    assert (pt_cfg.model.dtype, pt_cfg.model.attn_implementation) == ("float32", "sdpa")
    final = root / "pt" / "final"
    OlaVLM.from_config(pt_cfg.model).save_pretrained(final)
    (final / "olavlm_run.json").write_text(json.dumps({"template": pt_cfg.data.template, "image_geometry": "pad"}))
    ift = smoke_overrides(tiny_dir, IFT, root) + [f"--train.init_from={root / 'pt'}", "--train.max_steps=1",
                                                  f"--train.output_dir={root / 'ift'}"]
    return root, ift


def test_ift_applies_dtype_attention_and_checkpointing(saved_pt, caplog):
    from olavlm.train.loop import train

    root, ift = saved_pt
    cfg = load_config(IFT, ift + ["--model.dtype=bfloat16", "--model.attn_implementation=eager",
                                  "--train.gradient_checkpointing=true"])
    with caplog.at_level(logging.INFO, logger="olavlm.train.loop"):
        result = train(cfg, resume="none")
    assert result.summary["finished"] and result.summary["steps"] == 1
    model = result.model
    assert model.cfg.dtype == "bfloat16" and model.cfg.attn_implementation == "eager"
    assert model.vision.dtype == torch.bfloat16  # frozen tower in the requested dtype (the LLM trains in fp32)
    assert model.llm.config._attn_implementation == "eager"
    assert model.vision.model.config._attn_implementation == "eager"
    assert model.llm.is_activation_checkpointing
    saved = json.loads((result.final_dir / "config.json").read_text())
    assert (saved["dtype"], saved["attn_implementation"], saved["projector"]) == ("bfloat16", "eager", "mlp2x_gelu")
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pre-flight:")]
    assert any("model.dtype: 'bfloat16' from the recipe (train.init_from was saved with 'float32')" in n
               for n in notes), notes
    assert any("model.attn_implementation: 'eager' from the recipe" in n for n in notes), notes


@pytest.mark.parametrize("extra, field, want, have", [
    (["--model.projector=linear"], "model.projector", "'linear'", "'mlp2x_gelu'"),
    (["--model.num_task_tokens=4"], "model.num_task_tokens", "4", "8"),
    (["--model.task_order=[depth,seg,gen]"], "model.task_order", "['depth', 'seg', 'gen']", "['gen', 'depth', 'seg']"),
    (["--model.tasks.seg.token_rows=16"], "model.tasks.seg.token_rows", "16", "None"),
    (["--model.vision_feature_layer=-1"], "model.vision_feature_layer", "-1", "-2"),
])
def test_contradicting_architecture_is_one_line_naming_both(saved_pt, extra, field, want, have):
    root, ift = saved_pt
    with pytest.raises(PreflightError) as e:
        check_command(str(IFT), ift + extra)
    (line,) = e.value.problems
    assert line.startswith(f"{field}: the recipe asks for {want} but train.init_from") and f"built with {have}" in line
    assert str(root / "pt" / "final") in line


def test_repeating_the_saved_architecture_is_fine(saved_pt):
    _, ift = saved_pt
    notes = check_command(str(IFT), ift + ["--model.projector=mlp2x_gelu", "--model.num_task_tokens=8"])
    assert any(n.startswith("model.llm, model.vision_tower: not used") for n in notes), notes


def test_reconcile_rules():
    from olavlm.config import ModelConfig

    saved = ModelConfig(projector="linear", dtype="float32", attn_implementation="sdpa", num_task_tokens=2)
    recipe = ModelConfig(llm="org/llm")  # defaults: mlp2x_gelu, bfloat16, 8 task tokens
    # only what the recipe set counts: unset architecture fields are not compared, unset runtime ones stay
    runtime, notes = io.reconcile_init_from(saved, recipe, frozenset({"model.llm"}), "F")
    assert runtime == {} and notes == ["model.llm: not used; the weights and tokenizer come from train.init_from (F)"]
    runtime, _ = io.reconcile_init_from(saved, ModelConfig(projector="linear", num_task_tokens=2),
                                        frozenset({"model.dtype", "model.projector"}), "F")
    assert runtime == {"dtype": "bfloat16"}
    with pytest.raises(ConfigError, match=r"^model\.projector: the recipe asks for 'mlp2x_gelu' but .*'linear'"):
        io.reconcile_init_from(saved, recipe, frozenset({"model.projector"}), "F")
    # a config built in code sets every field
    with pytest.raises(ConfigError, match=r"^model\.projector"):
        io.reconcile_init_from(saved, recipe, None, "F")
    same = ModelConfig(projector="linear", num_task_tokens=2, dtype="float16")
    assert io.reconcile_init_from(saved, same, None, "F")[0] == {"dtype": "float16", "attn_implementation": "sdpa"}
