"""Every benchmark runs in --quick mode (with the smallest sizes its flags allow) and writes valid
JSON; the README table is generated from results. No timings are asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_STEP = ["--quick", "--batch", "2", "--text-len", "24", "--repeat", "1", "--warmup", "0"]
NO_FLOPS = [*TINY_STEP, "--no-flops"]


@pytest.fixture()
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("OLAVLM_BENCH_RESULTS", str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT))
    return tmp_path


def _read(folder: Path, name: str) -> dict:
    data = json.loads((folder / f"{name}.json").read_text())
    assert data["name"] == name and data["machine"]["torch"]
    assert data["threads"]["count"] == data["threads"]["torch_num_threads"] >= 1  # fixed and recorded
    return data


def _check_variants(data: dict, names: list[str], *, flops: bool = True) -> None:
    assert set(data["variants"]) == set(names)
    for v in data["variants"].values():
        assert len(v["raw"]) == v["n"] >= 1 and v["min"] <= v["median"] <= v["max"]
        assert (v["throughput"]["step_flops"] > 0) if flops else v["throughput"] is None


def _check_ratio(r: dict, num: dict, den: dict) -> None:
    assert r["value"] == pytest.approx(num["median"] / den["median"])
    assert r["headline"] == "value_cpu_min" and r["value_cpu_min"] == pytest.approx(num["cpu_min"] / den["cpu_min"])
    h = r[r["headline"]]
    if r["goal"] is not None:
        assert r["pass"] == (h <= r["goal"] if r["better"] == "lower" else h >= r["goal"])


def test_pt_vs_ntp(results):
    from benchmarks import pt_vs_ntp

    assert pt_vs_ntp.main(NO_FLOPS) == 0
    d = _read(results, "pt_vs_ntp")
    _check_variants(d, ["pt_cached", "ntp", "ntp_plain"], flops=False)
    v = d["variants"]
    _check_ratio(d["ratios"]["pt_cached_over_ntp"], v["pt_cached"], v["ntp"])
    assert d["ratios"]["pt_cached_over_ntp"]["goal"] == 1.10
    assert d["bf16_autocast"] is False and d["config"]["quick"] is True  # small config on CPU: fp32
    assert d["sequence"]["expanded_length"] - d["sequence"]["plain_expanded_length"] == 24


def test_ift_vs_llava_same_loss(results):
    from benchmarks import ift_vs_llava

    assert ift_vs_llava.main(NO_FLOPS) == 0
    d = _read(results, "ift_vs_llava")
    _check_variants(d, ["olavlm_ift", "olavlm_ift_no_task_tokens", "llava_hf"], flops=False)
    # same weights, same sequence -> the same NTP loss (fp32 on CPU)
    assert d["loss_check"]["abs_diff"] < 1e-4
    assert d["sequence"]["olavlm_ift_no_task_tokens"] == d["sequence"]["llava_hf"]
    assert d["trainable"]["llava_hf"] == sum(d["trainable"]["olavlm_ift_no_task_tokens"].values())
    _check_ratio(d["ratios"]["olavlm_ift_over_llava"], d["variants"]["olavlm_ift"], d["variants"]["llava_hf"])


def test_online_vs_cached(results):
    from benchmarks import online_vs_cached

    assert online_vs_cached.main(NO_FLOPS) == 0
    d = _read(results, "online_vs_cached")
    _check_variants(d, ["pt_cached", "pt_online", "teachers_only"], flops=False)
    assert set(d["teachers"]) == {"gen", "depth", "seg"}
    assert all(f > 0 for f in d["teacher_forward_flops"].values())


def test_scaling_table(results):
    from benchmarks import scaling

    assert scaling.main(TINY_STEP) == 0
    d = _read(results, "scaling")
    _check_variants(d, ["T24_B1", "T12_B2", "T24_B2"])
    assert [(r["text_len"], r["batch"]) for r in d["table"]] == [(24, 1), (12, 2), (24, 2)]
    base = next(r for r in d["table"] if r["point"] == d["base"])
    assert base["time_ratio"] == base["flops_ratio"] == base["time_over_flops_ratio"] == 1.0
    for r in d["table"]:  # times are each point's least disturbed CPU seconds (1 thread)
        assert r["statistic"] == "CPU min" and r["ms"] == pytest.approx(d["variants"][r["point"]]["cpu_min"] * 1e3)
        assert r["time_over_flops_ratio"] == pytest.approx(r["time_ratio"] / r["flops_ratio"])
    one = next(r for r in d["table"] if r["batch"] == 1)
    assert one["flops_ratio"] < 1.0 and one["tokens_ratio"] == pytest.approx(0.5)


def test_data_vs_model_ratio(results):
    from benchmarks import data_vs_model

    assert data_vs_model.main([*NO_FLOPS, "--repeat", "2", "--loader-batches", "2"]) == 0
    d = _read(results, "data_vs_model")
    loader, model = d["loader_samples_per_s"], d["model_samples_per_s"]
    assert len(loader["raw"]) == len(model["raw"]) == 2  # alternating rounds
    assert model["raw"] == pytest.approx([2 / t for t in d["variants"]["model_pt_step"]["raw"]])
    r = d["ratios"]["loader_over_model"]
    per = d["seconds_per_sample"]
    assert r["value"] == pytest.approx(per["model"]["median"] / per["loader"]["median"])
    # CPU side: the workers' stamped CPU seconds (a core each) against the model step's CPU seconds
    cpu_rates = d["loader_samples_per_s_cpu"]["raw"]
    assert len(cpu_rates) == 2 and all(x > 0 for x in cpu_rates)
    assert r["value_cpu_min"] == pytest.approx(min(c / 2 for c in d["variants"]["model_pt_step"]["cpu_raw"])
                                               * max(cpu_rates))
    assert r["headline"] == "value_cpu_min" and r["better"] == "higher" and r["pass"] == (r["value_cpu_min"] >= 3.0)


@pytest.mark.slow  # the model/teachers engineers' benchmarks: > 30 s each even with these sizes
@pytest.mark.parametrize("script,args", [
    ("teacher_batching.py", ["--quick", "--batch", "2", "--scale", "1", "--repeat", "1"]),
    ("pt_memory.py", ["--quick", "--vocab", "600", "--batch", "1", "--text-len", "24", "--repeat", "1"]),
])
def test_other_benchmarks_quick(results, script, args):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], check=True, cwd=ROOT,
                   capture_output=True, timeout=300)
    d = _read(results, script[:-3])
    assert d["config"]["quick"] is True


def test_run_and_readme_table(results, tmp_path):
    from benchmarks import readme_table, run

    only = ["--quick", "--only", "data_vs_model", "--no-readme"]
    assert run.main([*only, "--extra=--no-such-option"]) == 1  # the benchmark fails: run reports it, exit 1
    assert not json.loads((results / "run.json").read_text())["runs"][0]["ok"]
    assert run.main([*only, "--extra=" + " ".join([*NO_FLOPS[1:], "--loader-batches", "1"])]) == 0
    summary = json.loads((results / "run.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["data_vs_model"] and summary["runs"][0]["ok"]
    table = readme_table.render(results)
    assert "| 5 | data loading" in table and "not run" in table  # the others have no result here
    assert "stability not checked (no second run)" in table and len(summary["load_average_before"]) == 3
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\ntext\n")
    once = readme_table.replace_between(readme.read_text(), table, heading="## Performance")
    assert once.startswith("# x\n\ntext\n\n## Performance\n\n<!-- bench:start -->")
    twice = readme_table.replace_between(once, "new table", heading="## Performance")
    assert twice.count("## Performance") == 1 and "new table" in twice and "| 1 |" not in twice


def test_subtree_flops_counts_uncalled_containers_once():
    from benchmarks.flops import subtree_flops

    per_module = {"M": 20, "M.llm.model": 5, "M.llm.model.layers.0": 3, "M.llm.lm_head": 1,
                  "M.predictors.gen.2": 2, "M.predictors.gen.2.proj_in": 1, "M.predictors.seg.4": 4, "M.vision": 7,
                  "M.visionx": 100}
    assert subtree_flops(per_module, "M.llm") == 6  # model + lm_head, not layers.0 twice
    assert subtree_flops(per_module, "M.predictors") == 6
    assert subtree_flops(per_module, "M.vision") == 7  # not M.visionx
    assert subtree_flops(per_module, "M.absent") == 0


def test_gpu_benchmark_code_path_on_cpu(results):
    """`benchmarks.gpu --smoke`: the real-size benchmark's code (batch search, interleaved variants,
    online teachers, Llava pair, JSON) on the small models; without --smoke it refuses a GPU-less machine."""
    import torch

    from benchmarks import gpu

    assert gpu.main(["--smoke", "--max-batch", "2"]) == 0
    d = _read(results, "gpu-smoke-sdpa")
    assert d["threads"]["count"] >= 1 and d["config"]["smoke"] is True
    pt, ift = d["pt"], d["ift"]
    assert pt["micro_batch"] == 2 and [s["batch"] for s in pt["batch_search"]] == [1, 2]
    _check_variants(pt, ["pt_cached", "ntp"])
    _check_variants(pt["online"], ["pt_cached", "pt_online", "teachers_only"])
    _check_variants(ift, ["olavlm_ift", "llava_hf"])
    assert abs(ift["loss_check"]["olavlm"] - ift["loss_check"]["llava_hf"]) < 1e-4  # same weights, same sequence
    for v in (pt["variants"]["pt_cached"], ift["variants"]["llava_hf"]):
        assert v["tokens_per_s"] == pytest.approx(v["tokens_per_step"] / v["median"])
        assert v["cpu_median"] > 0 and len(v["cpu_raw"]) == v["n"]
    r = pt["ratios"]["pt_cached_over_ntp"]
    assert r["goal"] == 1.05 and r["value_min"] == pytest.approx(pt["variants"]["pt_cached"]["min"]
                                                                 / pt["variants"]["ntp"]["min"])
    if not torch.cuda.is_available():
        assert gpu.main([]) == 2


def test_largest_batch_search():
    from benchmarks.gpu import largest_batch

    for limit, cap in [(5, 64), (0, 8), (64, 64), (100, 48), (1, 8)]:
        def make(b, limit=limit):
            if b > limit:
                raise __import__("torch").cuda.OutOfMemoryError("too big")
            return []
        log: list = []
        assert largest_batch(make, cap, log) == min(limit, cap)
        assert len(log) <= 2 * cap.bit_length() + 1


@pytest.mark.parametrize("recipe", ["llama3_8b_clip336", "phi3_mini_clip336"])
def test_gpu_benchmark_configs_build_at_real_size_on_meta(recipe, tmp_path):
    """The configs the GPU benchmark builds (random weights) are valid real-size models: full LLM for PT,
    the LLM cut to 4 layers at real width for IFT (checked weight-free on the meta device)."""
    from benchmarks.gpu import real_config
    from olavlm.plan.meta import meta_model

    pt = real_config(recipe, "pt", "sdpa", 64, layers=None, tmp=tmp_path)
    ift = real_config(recipe, "ift", "sdpa", 64, layers=4, tmp=tmp_path)
    assert pt.run.train.bf16 and pt.run.model.dtype == "bfloat16" and ift.run.train.stage == "ift"
    a = meta_model(pt.run.model, with_predictors=True)
    b = meta_model(ift.run.model, with_predictors=False)
    assert a.llm.config.num_hidden_layers == 32 and b.llm.config.num_hidden_layers == 4
    assert a.llm.config.hidden_size == b.llm.config.hidden_size and a.num_image_tokens == 576
    assert a.target_shapes == {"gen": (1, 1024), "depth": (576, 1024), "seg": (1536, 24, 24)}


def test_gpu_key_names_the_hardware_table():
    from benchmarks.gpu import gpu_key

    assert gpu_key("NVIDIA H100 80GB HBM3", 79.6) == "h100"
    assert gpu_key("NVIDIA H100 PCIe", 79.6) == "h100-pcie"
    assert gpu_key("NVIDIA H200", 139.8) == "h200"
    assert gpu_key("NVIDIA A100-SXM4-40GB", 39.4) == "a100-40gb"
    assert gpu_key("AMD Instinct MI300X", 191.5) == "mi300x"
    assert gpu_key("Tesla T4", 15) is None
