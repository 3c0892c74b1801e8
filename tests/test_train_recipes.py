"""Every shipped recipe on tiny models (the README's CPU smoke path), and what each stage trains.

The Llama-3 and Phi-3 chains PT -> VPT -> IFT and PT -> IFT run 2 optimizer steps each through
``olavlm train RECIPE <smoke overrides>``; after every run the final folder is compared with the
weights it started from: the stage's trainable groups changed (every tensor), all others are
bitwise identical, and VPT/IFT carry no predictors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from olavlm.cli import main as cli_main
from olavlm.devkit.smoke import smoke_overrides

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


RECIPES = sorted(Path("configs").glob("*_*/*.yaml"))
CHAIN = ["pt", "vpt", "ift", "vpt_ift"]  # dependency order: vpt/ift start from pt, vpt_ift from vpt


def test_recipes_present():
    names = {(p.parent.name, p.stem) for p in RECIPES}
    for variant in ("llama3_8b_clip336", "phi3_mini_clip336"):
        assert {(variant, s) for s in CHAIN} <= names
    for p in RECIPES:
        assert p.read_text().startswith("# ") and "olavlm.cli train " + str(p) in p.read_text()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_print_config(recipe, capsys):
    assert cli_main(["train", str(recipe), "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "stage:" in text and "global_batch_size:" in text


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a final folder: olavlm.safetensors (extras) + llm/ + vision/ weights."""
    out = {k: v for k, v in load_file(str(folder / "olavlm.safetensors")).items()}
    for sub in ("llm", "vision"):
        for f in sorted((folder / sub).glob("*.safetensors")):
            out.update({f"{sub}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def _group(name: str) -> str:
    if name.startswith("llm:"):
        return "llm"
    if name.startswith("vision:"):
        return "vision"
    return name.split(".")[0]


def _compare(before: dict, after: dict, trained: set[str]) -> None:
    for name, old in before.items():
        g = _group(name)
        if g in ("predictors", "logit_scales") and name not in after:
            continue  # dropped after PT: checked separately
        new = after[name].to(old.dtype) if after[name].dtype != old.dtype and g in trained else after[name]
        if g in trained:
            assert not torch.equal(old.float(), new.float()), f"{name} ({g}) should have changed"
        else:
            assert new.dtype == old.dtype and torch.equal(old, new), f"{name} ({g}) must be bitwise unchanged"


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke")


def _initial_pt_weights(cfg_overrides: list[str], recipe: Path, out: Path) -> dict[str, torch.Tensor]:
    """What PT starts from: the model as train() builds it (same seed), saved the same way."""
    from accelerate.utils import set_seed

    from olavlm.config import load_config
    from olavlm.model.vlm import OlaVLM

    cfg = load_config(recipe, cfg_overrides)
    set_seed(cfg.train.seed)
    model = OlaVLM.from_config(cfg.model, with_predictors=True)
    model.save_pretrained(out, with_predictors=True)
    return _weights(out)


@pytest.mark.parametrize("variant", ["llama3_8b_clip336", "phi3_mini_clip336"])
def test_recipe_chain_smoke_and_stage_policy(variant, tiny_dir, smoke_root):
    """Each recipe runs 2 steps; each stage changes exactly its trainable groups."""
    finals = {}
    for stage in CHAIN:
        recipe = Path("configs") / variant / f"{stage}.yaml"
        overrides = smoke_overrides(tiny_dir, recipe, smoke_root)
        if stage == "pt":
            before = _initial_pt_weights(overrides, recipe, smoke_root / f"{variant}-init")
        else:
            before = _weights(finals["vpt" if stage == "vpt_ift" else "pt"])
        assert cli_main(["train", str(recipe), *overrides]) == 0
        run_dir = smoke_root / variant / stage
        final = run_dir / "final"
        finals[stage] = final
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["finished"] and summary["samples"] == 4
        assert (run_dir / "config.yaml").is_file() and (run_dir / "loss.png").is_file()
        after = _weights(final)
        config = json.loads((final / "config.json").read_text())
        processor = json.loads((final / "olavlm_processor.json").read_text())
        assert not (final / "olavlm_run.json").exists() and processor["run"]["stage"] == stage.replace("vpt_ift", "ift")
        assert processor["template"] == ("llava_llama_3" if variant.startswith("llama") else "llava_phi_3")
        if stage == "pt":
            assert config["with_predictors"] is True
            _compare(before, after, {"projector", "task_tokens", "predictors", "logit_scales"})
            metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            assert {"loss/ntp", "loss/depth", "loss/seg", "loss/gen", "logit_scale/gen", "lr", "grad_norm",
                    "samples_per_s", "tokens_per_s"} <= set(metrics[-1])
            assert any(k.endswith("/sl1") for k in metrics[-1]) and any(k.endswith("/contrastive") for k in metrics[-1])
        else:
            # chained from PT (or VPT): predictors dropped, task tokens/vision kept bitwise, LLM + projector trained
            assert config["with_predictors"] is False
            assert not any(_group(k) in ("predictors", "logit_scales") for k in after)
            assert any(_group(k) in ("predictors", "logit_scales") for k in before) == (stage != "vpt_ift")
            _compare(before, after, {"llm", "projector"})
            assert processor["run"]["init_from"] == str(finals["vpt" if stage == "vpt_ift" else "pt"])
