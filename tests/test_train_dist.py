"""Two-process training on CPU through torchrun (gloo): DDP, DeepSpeed ZeRO-2 (PT; IFT with resume)
and ZeRO-3 (PT against ZeRO-2; IFT with resume and the saved model checked)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from olavlm.model.vlm import OlaVLM
from olavlm.train import checkpoint as ckpt
from olavlm.devkit.smoke import smoke_overrides

WORKER = Path(__file__).parent / "dist" / "train_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(recipe: Path, out: Path, overrides: list[str], check: bool = True, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), str(recipe), str(out), *overrides]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "TOKENIZERS_PARALLELISM": "false", **env}
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


class _Payload:
    """Unpickling it runs ``exec``, which writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _plant_payloads(checkpoint: Path, marker: Path) -> dict[Path, bytes]:
    """A pickle payload in every torch file of engine/, the manifest re-signed to match (what an
    attacker who can write the folder would do); returns the original bytes."""
    from olavlm.train import manifest

    originals = {}
    for file in sorted((checkpoint / "engine").rglob("*")):
        if file.suffix in (".pt", ".pkl"):
            originals[file] = file.read_bytes()
            torch.save({"state": _Payload(marker)}, file)
    data = json.loads((checkpoint / manifest.MANIFEST).read_text())
    for file in originals:
        size, digest = manifest._digest(file, sync=False)
        data["files"][file.relative_to(checkpoint).as_posix()] = {"size": size, "sha256": digest}
    (checkpoint / manifest.MANIFEST).write_text(json.dumps(data))
    return originals


def _ranks(out: Path) -> tuple[dict, dict]:
    a, b = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert a["world"] == b["world"] == 2
    return a, b


def _assert_agree(a: dict, b: dict) -> None:
    assert a["trainable"].keys() == b["trainable"].keys() and a["trainable"]
    for name, value in a["trainable"].items():
        assert torch.equal(value, b["trainable"][name]), f"ranks disagree on {name}"


def test_ddp_two_processes_train_and_agree(tiny_dir, tmp_path):
    recipe = Path("configs/llama3_8b_clip336/pt.yaml")  # PT: teachers online, contrastive gathered over ranks
    out = tmp_path / "ddp"
    overrides = smoke_overrides(tiny_dir, recipe, tmp_path) + [
        "--train.global_batch_size=4", "--train.micro_batch_size=1", "--train.max_steps=3"]  # accumulation 2
    _torchrun(recipe, out, overrides)
    a, b = _ranks(out)
    _assert_agree(a, b)
    s = a["summary"]
    assert (s["world_size"], s["accumulation"], s["steps"], s["samples"]) == (2, 2, 3, 12)
    assert (out / "final" / "olavlm.safetensors").is_file() and (out / "summary.json").is_file()
    assert any(k.startswith("predictors.") for k in a["trainable"])  # PT trained the predictors on both ranks


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_with_resume(tiny_dir, tmp_path):
    """ZeRO-2 on CPU (gloo): stop after 2 steps (engine checkpoint), resume, finish; ranks agree."""
    recipe = Path("configs/llama3_8b_clip336/ift.yaml")
    out = tmp_path / "zero2"
    overrides = smoke_overrides(tiny_dir, recipe, tmp_path) + [
        "--train.init_from=null", "--train.global_batch_size=4", "--train.micro_batch_size=1",
        "--train.max_steps=3", "--train.deepspeed=configs/deepspeed/zero2.json"]
    _torchrun(recipe, out, overrides, OLAVLM_TEST_STOP_AFTER="2")
    first = ckpt.list_checkpoints(out)[-1]
    assert first.name == "step-00000002" and (first / "engine").is_dir() and not (out / "final").exists()
    assert ckpt.verify(first) is None
    # DeepSpeed and Accelerate read engine/ with torch.load(weights_only=False): a planted payload is refused
    marker = tmp_path / "PAYLOAD-RAN"
    manifest_text = (first / "manifest.json").read_text()
    originals = _plant_payloads(first, marker)
    assert len(originals) >= 4  # model states, the ranks' optimizer shards, Accelerate's RNG files
    proc = _torchrun(recipe, out, overrides, check=False)
    assert proc.returncode != 0 and not marker.exists(), proc.stderr[-3000:]
    assert "CheckpointError" in proc.stderr and "refused" in proc.stderr, proc.stderr[-3000:]
    for file, data in originals.items():
        file.write_bytes(data)
    (first / "manifest.json").write_text(manifest_text)
    _torchrun(recipe, out, overrides)
    a, b = _ranks(out)
    _assert_agree(a, b)
    s = a["summary"]
    assert (s["world_size"], s["accumulation"], s["steps"], s["samples"], s["finished"]) == (2, 2, 3, 12, True)
    assert (out / "final" / "config.json").is_file()


def _assert_saved(out: Path, trainable: dict) -> None:
    """final/ loads, and holds exactly the trained values (whole, also after ZeRO-3)."""
    saved = dict(OlaVLM.from_pretrained(out / "final").named_parameters())
    for name, value in trainable.items():
        torch.testing.assert_close(saved[name].detach().float(), value, rtol=0, atol=0, msg=name)


def _zero3_config(tmp_path: Path) -> Path:
    """configs/deepspeed/zero3.json with every parameter partitioned (the tiny models are far below
    its persistence threshold, which would leave them whole) and no prefetching."""
    ds = json.loads(Path("configs/deepspeed/zero3.json").read_text())
    ds["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    path = tmp_path / "zero3_partition_all.json"
    path.write_text(json.dumps(ds))
    return path


PT = Path("configs/llama3_8b_clip336/pt.yaml")  # gradient checkpointing on; smoke data has text-only samples


@pytest.fixture(scope="module")
def zero2_pt(tiny_dir, tmp_path_factory):
    """PT under ZeRO-2: 3 steps, micro-batch 1 x 2 ranks x accumulation 2 (the logit scales were 0-dim)."""
    tmp = tmp_path_factory.mktemp("zero2_pt")
    out = tmp / "run"
    overrides = smoke_overrides(tiny_dir, PT, tmp) + [
        "--train.global_batch_size=4", "--train.micro_batch_size=1", "--train.max_steps=3"]
    _torchrun(PT, out, overrides + ["--train.deepspeed=configs/deepspeed/zero2.json"])
    return out, overrides, tmp


def test_deepspeed_zero2_pt_two_processes(zero2_pt):
    out, _, _ = zero2_pt
    a, b = _ranks(out)
    _assert_agree(a, b)
    s = a["summary"]
    assert (s["world_size"], s["accumulation"], s["steps"], s["samples"], s["finished"]) == (2, 2, 3, 12, True)
    assert {k for k in a["trainable"] if k.startswith("logit_scales.")} == {f"logit_scales.{t}" for t in ("depth", "seg", "gen")}
    _assert_saved(out, a["trainable"])


def test_deepspeed_zero3_pt_matches_zero2(zero2_pt):
    """Every parameter partitioned over the two ranks: same trained extras as ZeRO-2 (same data,
    same seed), ranks agree on the gathered values, final/ holds them."""
    zero2_out, overrides, tmp = zero2_pt
    out = tmp / "zero3"
    _torchrun(PT, out, overrides + [f"--train.deepspeed={_zero3_config(tmp)}"])
    a, b = _ranks(out)
    _assert_agree(a, b)
    assert a["summary"]["finished"] and a["summary"]["samples"] == 12
    ref = torch.load(zero2_out / "rank0.pt", weights_only=False)["trainable"]
    assert a["trainable"].keys() == ref.keys()
    for name, value in a["trainable"].items():
        torch.testing.assert_close(value, ref[name], rtol=1e-4, atol=1e-5, msg=name)
    _assert_saved(out, a["trainable"])


@pytest.mark.slow
def test_deepspeed_zero3_ift_two_processes_with_resume(tiny_dir, tmp_path):
    """IFT (LLM + projector train) with every parameter partitioned: stop after 1 step (engine
    checkpoint of the shards), resume, finish; ranks agree on the gathered values and final/ holds
    them (the save gathers the shards)."""
    recipe = Path("configs/llama3_8b_clip336/ift.yaml")
    out = tmp_path / "zero3_ift"
    overrides = smoke_overrides(tiny_dir, recipe, tmp_path) + [
        "--train.init_from=null", "--train.global_batch_size=4", "--train.micro_batch_size=1",
        "--train.max_steps=2", f"--train.deepspeed={_zero3_config(tmp_path)}"]
    _torchrun(recipe, out, overrides, OLAVLM_TEST_STOP_AFTER="1")
    first = ckpt.list_checkpoints(out)[-1]
    assert first.name == "step-00000001" and (first / "engine").is_dir() and not (out / "final").exists()
    _torchrun(recipe, out, overrides)
    a, b = _ranks(out)
    _assert_agree(a, b)
    s = a["summary"]
    assert (s["steps"], s["samples"], s["finished"]) == (2, 8, True) and s["trainable"]["llm"] > 0
    _assert_saved(out, a["trainable"])
