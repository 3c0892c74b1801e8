"""LoRA for VPT/IFT on tiny Llama / Phi-3: what trains, adapter folders, merge, exact resume,
QLoRA's one-line error on CPU; and an IFT run with LoRA + packing through the real loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from olavlm.cli import main as cli_main
from olavlm.config import ConfigError, LoraConfig, TrainConfig, load_config
from olavlm.data.collate import Collator
from olavlm.devkit.tiny import tiny_model_config
from olavlm.model.vlm import OlaVLM
from olavlm.train import checkpoint as ckpt
from olavlm.model import lora
from olavlm.train.loop import train
from olavlm.devkit.smoke import smoke_overrides, write_smoke_dataset
from olavlm.train.stages import configure_trainable

from test_packing import make_samples

IFT = Path("configs/llama3_8b_clip336/ift.yaml")
TARGETS = {"llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
           "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]}


def _ift_model(tiny_dir, llm):
    torch.manual_seed(0)
    return OlaVLM.from_config(tiny_model_config(tiny_dir, llm=llm, vision="siglip"), with_predictors=False)


def _perturb_adapters(model, seed=3):
    """lora_B starts at zero (adapter = identity); give it values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "pixel_values", "num_images")}


@pytest.mark.parametrize("llm", ["llama", "phi3"])
def test_only_adapters_and_projector_get_gradients(tiny_dir, llm):
    model = _ift_model(tiny_dir, llm)
    assert lora.default_target_modules(model.llm) == TARGETS[llm]
    settings = LoraConfig(r=4, alpha=8, dropout=0.0)
    lora.apply_lora(model, settings, base=None)
    counts = configure_trainable(model, "ift", TrainConfig(stage="ift", lora=settings))
    assert counts["llm"] == 0 and counts["lora"] > 0 and counts["task_tokens"] == 0
    assert counts["projector"] == sum(p.numel() for p in model.projector.parameters())
    _perturb_adapters(model)
    model.train()
    batch = Collator(model.tokenizer.pad_token_id)(make_samples(model.tokenizer))
    model(**_inputs(batch)).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    adapters = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    projector = {n for n, _ in model.named_parameters() if n.startswith("projector.")}
    assert with_grad == adapters | projector
    n_layers = model.llm.config.num_hidden_layers
    assert len(adapters) == 2 * n_layers * len(TARGETS[llm])  # A and B per targeted projection per layer
    frozen = [n for n, p in model.named_parameters() if n.startswith("llm.") and not lora.is_adapter_param(n)]
    assert frozen and not any(dict(model.named_parameters())[n].requires_grad for n in frozen)


@pytest.mark.parametrize("llm, with_base", [("llama", True), ("phi3", False)])
def test_adapter_folder_and_merge_reproduce_the_adapted_logits(tiny_dir, tmp_path, llm, with_base, capsys):
    model = _ift_model(tiny_dir, llm)
    base = None
    if with_base:  # the VPT/IFT case: the base is the previous stage's folder
        base = tmp_path / "base"
        model.save_pretrained(base, with_predictors=False)
    lora.apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=["embed_tokens"]), base=base)
    _perturb_adapters(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name or name.startswith("projector."):
                p.add_(0.01)  # trained extras differ from the base too
    model.eval()
    batch = Collator(model.tokenizer.pad_token_id)(make_samples(model.tokenizer))
    with torch.no_grad():
        ref = model(**_inputs(batch), return_logits=True).logits

    run = tmp_path / "run"
    model.save_pretrained(run / "final")
    final = run / "final"
    assert lora.is_adapter_folder(final) and (final / "adapter" / "adapter_config.json").is_file()
    assert not (final / "llm").exists()  # the base LLM weights are not copied
    saved = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k or "modules_to_save" in k or "embed_tokens" in k for k in saved)

    assert cli_main(["merge-lora", str(run), str(tmp_path / "merged")]) == 0
    merged_dir = tmp_path / "merged"
    assert not lora.is_adapter_folder(merged_dir) and (merged_dir / "llm" / "config.json").is_file()
    assert not (merged_dir / "llm" / "adapter_config.json").exists()
    for folder in (merged_dir, final):  # the plain merged folder, and the adapter folder (merged on load)
        other = OlaVLM.from_pretrained(folder).eval()
        assert not lora.is_lora(other.llm)
        with torch.no_grad():
            got = other(**_inputs(batch), return_logits=True).logits
        assert torch.allclose(got, ref, atol=1e-5, rtol=0), (folder, (got - ref).abs().max())
    capsys.readouterr()
    assert cli_main(["merge-lora", str(tmp_path / "base" if with_base else tmp_path), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("olavlm: error: ")


def test_lora_config_errors_are_one_line(tiny_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"train\.lora\.r"):
        LoraConfig(r=0)
    overrides = smoke_overrides(tiny_dir, IFT, tmp_path) + ["--train.init_from=null",
                                                            f"--train.output_dir={tmp_path / 'r'}"]
    cfg = load_config(IFT, overrides + ["--train.lora={r: 4}", "--train.stage=pt"])
    with pytest.raises(ConfigError, match=r"train\.lora"):
        lora.check_config(cfg)
    if torch.cuda.is_available():
        pytest.skip("QLoRA's CPU error needs a machine without CUDA")
    capsys.readouterr()
    rc = cli_main(["train", str(IFT), *overrides, "--train.lora={load_in_4bit: true}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("olavlm: error: ") and "4-bit QLoRA needs a CUDA GPU" in err
    assert "train.lora.load_in_4bit" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def lora_ift(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_loop")
    data = write_smoke_dataset(root / "data", num_images=6, text_only=2, seed=2)
    return root, smoke_overrides(tiny_dir, IFT, root) + [
        f"--data.train_file={data}", f"--data.image_folder={data.parent / 'images'}", "--train.init_from=null",
        "--train.global_batch_size=4", "--train.micro_batch_size=2", "--train.max_steps=4", "--train.save_every=2",
        "--train.learning_rate=1e-2", "--train.lora={r: 4, alpha: 8, dropout: 0.1}", "--data.packing=true",
        "--data.sampler=modality_length"]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_lora_packed_ift_resume_is_exact_and_merges(lora_ift, tmp_path):
    root, overrides = lora_ift
    straight = train(load_config(IFT, overrides + [f"--train.output_dir={root / 'straight'}"]), resume="none")
    assert straight.summary["steps"] == 4 and straight.summary["samples"] == 16
    assert straight.summary["trainable"]["llm"] == 0 and straight.summary["trainable"]["lora"] > 0
    split_dir = root / "split"
    first = train(load_config(IFT, overrides + [f"--train.output_dir={split_dir}"]), resume="auto", stop_after_steps=3)
    assert first.final_dir is None
    point = ckpt.list_checkpoints(split_dir)[-1]
    keys = load_file(str(point / "trainable.safetensors")).keys()
    assert keys and all(".lora_" in k or k.startswith("projector.") for k in keys)  # adapters + extras only
    second = train(load_config(IFT, overrides + [f"--train.output_dir={split_dir}"]), resume="auto")
    assert second.summary["steps"] == 4
    assert _losses(root / "straight") == _losses(split_dir)
    a = load_file(str(root / "straight" / "final" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(split_dir / "final" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(bool(v.abs().sum()) for k, v in a.items() if "lora_B" in k)  # the adapters trained
    assert cli_main(["merge-lora", str(split_dir), str(tmp_path / "merged")]) == 0
    merged = OlaVLM.from_pretrained(tmp_path / "merged")
    assert not lora.is_lora(merged.llm) and (tmp_path / "merged" / "olavlm_processor.json").is_file()
    # the next stage can start from the LoRA run itself (base + adapters, merged on load)
    chained = [o for o in overrides if not o.startswith(("--train.lora", "--train.init_from"))]
    nxt = train(load_config(IFT, chained + [f"--train.init_from={split_dir}", "--train.max_steps=1",
                                            f"--train.output_dir={tmp_path / 'next'}"]), resume="none")
    assert nxt.summary["steps"] == 1 and not lora.is_adapter_folder(nxt.final_dir)
    assert nxt.summary["trainable"]["llm"] > 0 and "lora" not in nxt.summary["trainable"]  # full IFT now
    start = merged.llm.state_dict()  # it started from the merged weights (lr is 0 in its one warm-up step)
    assert all(torch.equal(v, start[k]) for k, v in nxt.model.llm.state_dict().items())


def test_packed_run_follows_the_padded_run(lora_ift, monkeypatch):
    """Same samples per micro-batch, packed or padded: the logged losses agree (no dropout)."""
    import olavlm.model.vlm as vlm

    root, overrides = lora_ift
    seen = []
    forward = vlm.OlaVLM.forward
    monkeypatch.setattr(vlm.OlaVLM, "forward", lambda self, *a, **k: seen.append(
        (k["input_ids"].shape[0], k.get("segment_ids") is not None)) or forward(self, *a, **k))
    common = overrides + ["--train.lora={r: 4, alpha: 8, dropout: 0.0}", "--train.save_every=0"]
    runs = {}
    for packing in (True, False):
        out = root / f"packing-{packing}"
        res = train(load_config(IFT, common + [f"--data.packing={str(packing).lower()}",
                                               f"--train.output_dir={out}"]), resume="none")
        assert res.summary["samples"] == 16
        runs[packing] = _losses(out)
    assert sorted(runs[True]) == [1, 2, 3, 4]
    assert seen[:8] == [(1, True)] * 8 and seen[8:] == [(2, False)] * 8  # packed: both samples in one row
    for step in runs[True]:
        assert runs[True][step] == pytest.approx(runs[False][step], abs=1e-5), step


@pytest.mark.slow
def test_lora_packed_ift_zero2_two_processes_with_resume(tiny_dir, tmp_path):
    """LoRA + packing under DeepSpeed ZeRO-2 on two CPU processes: stop, resume, ranks agree."""
    from test_train_dist import _assert_agree, _ranks, _torchrun

    out = tmp_path / "zero2_lora"
    overrides = smoke_overrides(tiny_dir, IFT, tmp_path) + [
        "--train.init_from=null", "--train.global_batch_size=4", "--train.micro_batch_size=2", "--train.max_steps=3",
        "--train.deepspeed=configs/deepspeed/zero2.json", "--train.lora={r: 4, alpha: 8}", "--data.packing=true"]
    _torchrun(IFT, out, overrides, OLAVLM_TEST_STOP_AFTER="2")
    assert ckpt.list_checkpoints(out)[-1].name == "step-00000002"
    _torchrun(IFT, out, overrides)
    a, b = _ranks(out)
    _assert_agree(a, b)
    assert a["trainable"] and all(".lora_" in k or k.startswith("projector.") for k in a["trainable"])
    assert a["summary"]["steps"] == 3 and a["summary"]["samples"] == 12
    assert lora.is_adapter_folder(out / "final")
