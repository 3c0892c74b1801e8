"""`make bench-gpu`: the real-size comparisons on one GPU in bf16, random weights built from the real
configs in tests/data/real_configs (no download), at the largest micro-batch that fits.

    python -m benchmarks.gpu                       # Llama-3-8B + CLIP-ViT-L/336 recipe, sdpa (+ flash-attn if installed)
    python -m benchmarks.gpu --recipe phi3_mini_clip336 --budget 300
    python -m benchmarks.gpu --smoke               # the same code path on CPU with the small models (CI)

Per attention implementation it measures, interleaved, with the step of ``benchmarks.steps``:

* PT step with cached targets (full 32-layer LLM, all predictors, three embedding losses) ÷ NTP step
  of the same model (goal <= 1.05 at real size);
* PT step with the three real-size teachers online (Depth-Anything-V2-L, OneFormer Swin-L, unCLIP
  ViT-H/14) and the teachers alone;
* IFT step (LLM + projector train, fp32 master weights) ÷ ``LlavaForConditionalGeneration`` step on
  the same weights and sequence (goal <= 1.00), with the LLM cut to ``--ift-layers`` at real width so
  that both models and their AdamW states fit one GPU.

Each variant records median / min wall and CPU seconds, peak memory (``torch.cuda.max_memory_allocated``),
tokens/s and MFU = counted step FLOPs (``torch.utils.flop_counter``, forward + backward) / (median
step seconds x the GPU's dense bf16 peak, ``olavlm.plan.hardware``). The micro-batch is the largest
that runs (doubling, then bisection, up to ``--max-batch``). The run stops starting new work after
``--budget`` seconds. Results: ``benchmarks/results/gpu-<recipe>-<attention>.json``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, bench_env, bench_threads, ratio, write_result  # noqa: E402

bench_env()

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "real_configs"
GOALS = {"pt_cached_over_ntp": 1.05, "ift_over_llava": 1.00}


def gpu_key(name: str, memory_gib: float) -> str | None:
    """The ``olavlm.plan.hardware`` entry of a device name (None when unknown)."""
    n = name.lower()
    for key in ("gh200", "h200", "b200", "mi325x", "mi300x", "mi250x", "l40s"):
        if key in n:
            return key
    if "h100" in n:
        return "h100-pcie" if "pcie" in n else "h100"
    if "a100" in n:
        return "a100-40gb" if memory_gib < 50 else "a100"
    return "l4" if " l4" in f" {n}" else None


def attention_kinds(requested: list[str] | None) -> list[str]:
    kinds = requested or ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    return kinds


def real_config(recipe: str, stage: str, attn: str, text_len: int, *, layers: int | None, tmp: Path):
    """BenchConfig of a shipped recipe over the real configs; ``layers`` cuts the LLM (a copy of its
    config.json with fewer layers, at the same width)."""
    from benchmarks.models import BenchConfig
    from olavlm.config import load_config
    from olavlm.plan.meta import resolve_paths

    overrides = ["--train.bf16=true", "--model.dtype=bfloat16", f"--model.attn_implementation={attn}"]
    if stage != "pt":
        overrides += ["--model.layer_spec=d1_s1_g1", "--train.init_from=null"]  # IFT: task tokens only
    run = load_config(ROOT / "configs" / recipe / f"{stage}.yaml", overrides)
    run.model = resolve_paths(run.model, REAL)
    if layers is not None:
        cfg = json.loads((Path(run.model.llm) / "config.json").read_text())
        cfg["num_hidden_layers"] = layers
        folder = tmp / f"llm-{layers}-layers"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(cfg))
        run.model.llm = str(folder)
    return BenchConfig(run, text_len, run.train.micro_batch_size, f"{recipe} ({stage}, random weights)")


def free() -> None:
    """Release a probe's tensors on the GPU (nothing to reclaim on the CPU, where nothing runs out)."""
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(make: Callable[[int], list[Callable[[], Any]]], cap: int, log: list) -> int:
    """Largest micro-batch in [1, cap] for which every step ``make(b)`` returns runs once (doubling,
    then bisection between the last fit and the first out-of-memory). 0 when even 1 does not fit."""
    import torch

    def fits(b: int) -> bool:
        steps = None
        try:
            steps = make(b)
            for step in steps:
                step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ok = True
        except torch.cuda.OutOfMemoryError:
            ok = False
        del steps
        free()
        log.append({"batch": b, "fits": ok})
        return ok

    good, bad, b = 0, None, 1
    while b <= cap:
        if not fits(b):
            bad = b
            break
        good, b = b, b * 2
    if bad is None and good < cap:  # doubling stepped over the cap without a failure
        if fits(cap):
            good = cap
        else:
            bad = cap
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def measure_at(steps: dict, tokens: dict[str, int], args, dev) -> dict:
    """harness.measure (interleaved, FLOPs, peaks) plus tokens/s per variant."""
    from benchmarks.harness import measure

    ns = SimpleNamespace(warmup=args.warmup, repeat=args.repeat, quick=args.smoke, no_flops=False,
                         peak_tflops=args.peak_tflops)
    out = measure(steps, args=ns, dev=dev)
    for name, v in out.items():
        if name in tokens:
            v["tokens_per_step"] = tokens[name]
            v["tokens_per_s"] = tokens[name] / v["median"]
    return out


def bench_pt(sb, args, deadline: float, random_weights: bool) -> dict:
    """PT cached ÷ NTP (same model), then online teachers, at the largest micro-batch."""
    pt = sb.olavlm("pt", random_weights=random_weights)
    model = pt.model
    length = sb.bc.text_len - 1 + model.tokens_per_image

    def make(b: int):
        batch = sb.batch(model, b)
        return [sb.step(pt, {**batch, "targets": sb.targets(model, b)}), sb.step(pt, batch)]

    search: list = []
    b = largest_batch(make, args.max_batch, search)
    out: dict[str, Any] = {"micro_batch": b, "batch_search": search, "sequence_length": length,
                           "trainable": pt.counts}
    if b == 0:
        return {**out, "error": "a micro-batch of 1 does not fit"}
    batch = sb.batch(model, b)
    steps = {"pt_cached": sb.step(pt, {**batch, "targets": sb.targets(model, b)}), "ntp": sb.step(pt, batch)}
    v = measure_at(steps, {k: b * length for k in steps}, args, sb.dev)
    out["variants"] = v
    out["ratios"] = {"pt_cached_over_ntp": ratio(v["pt_cached"], v["ntp"], goal=GOALS["pt_cached_over_ntp"],
                                                 what="PT step (cached targets) / NTP step, same model",
                                                 headline="value")}
    out["flops_ratio_pt_cached_over_ntp"] = (v["pt_cached"]["throughput"]["step_flops"]
                                             / v["ntp"]["throughput"]["step_flops"])
    if time.monotonic() > deadline:
        out["online"] = {"skipped": "time budget"}
        return out
    import torch

    # online teachers: loaded now (they take memory), timed interleaved with the cached step again
    teachers, dtype = sb.teachers(model, random_weights=random_weights)
    side = teachers.input_size
    images = torch.randint(0, 256, (b, 3, side, side), dtype=torch.uint8, device=sb.dev)
    online = {"pt_cached": steps["pt_cached"],
              "pt_online": sb.step(pt, batch, before=lambda inputs: {**inputs, "targets": teachers.encode(images)}),
              "teachers_only": lambda: teachers.encode(images)}
    try:
        ov = measure_at(online, {"pt_cached": b * length, "pt_online": b * length}, args, sb.dev)
        out["online"] = {"variants": ov, "teacher_dtype": str(dtype).replace("torch.", ""),
                         "teacher_params": {t: sum(p.numel() for p in x.parameters()) for t, x in teachers.teachers.items()},
                         "ratios": {"pt_online_over_pt_cached": ratio(ov["pt_online"], ov["pt_cached"],
                                                                      what="online teachers / cached targets",
                                                                      headline="value")}}
    except torch.cuda.OutOfMemoryError:
        out["online"] = {"error": f"out of memory with the teachers at micro-batch {b}"}
    return out


def bench_ift(sb, args) -> dict:
    """Our IFT step (no task tokens: Llava's sequence) ÷ LlavaForConditionalGeneration, same weights."""
    import torch

    from benchmarks.models import autocast
    from benchmarks.steps import build_llava

    plain = sb.olavlm("ift", plain=True, random_weights=not args.smoke)
    llava = build_llava(plain.model, sb.bc)
    token = llava.model.config.image_token_index
    length = sb.bc.text_len - 1 + plain.model.num_image_tokens

    def pair(b: int):
        ours = sb.batch(plain.model, b, vocab_exclude=token)
        hf = sb.batch(plain.model, b, image_token_run=plain.model.num_image_tokens, vocab_exclude=token)
        hf = {k: hf[k] for k in ("input_ids", "labels", "attention_mask", "pixel_values")}
        hf["attention_mask"] = hf["attention_mask"].long()
        return ours, hf

    def make(b: int):
        ours, hf = pair(b)
        return [sb.step(plain, ours), sb.step(llava, hf)]

    search: list = []
    b = largest_batch(make, args.max_batch, search)
    out: dict[str, Any] = {"micro_batch": b, "batch_search": search, "sequence_length": length,
                           "llm_layers": plain.model.llm.config.num_hidden_layers,
                           "trainable": {"olavlm": plain.counts, "llava_hf": llava.counts}}
    if b == 0:
        return {**out, "error": "a micro-batch of 1 does not fit"}
    ours, hf = pair(b)
    with torch.no_grad(), autocast(sb.dev, sb.bf16):
        out["loss_check"] = {"olavlm": float(plain.model(**ours).loss), "llava_hf": float(llava.model(**hf).loss)}
    steps = {"olavlm_ift": sb.step(plain, ours), "llava_hf": sb.step(llava, hf)}
    v = measure_at(steps, {k: b * length for k in steps}, args, sb.dev)
    out["variants"] = v
    out["ratios"] = {"ift_over_llava": ratio(v["olavlm_ift"], v["llava_hf"], goal=GOALS["ift_over_llava"],
                                             what="IFT step / LlavaForConditionalGeneration step, same sequence",
                                             headline="value")}  # GPU: wall time (CPU time is the host's)
    return out


def run_attention(attn: str, args, tmp: Path, deadline: float) -> dict:
    from benchmarks.models import device, load_bench_config, write_small_teachers
    from benchmarks.steps import StepBench
    from olavlm.threads import choose_threads

    threads = choose_threads(args.threads)[0]
    result: dict[str, Any] = {"attention": attn}
    for stage in ("pt", "ift"):
        if time.monotonic() > deadline:
            result[stage] = {"skipped": "time budget"}
            continue
        if args.smoke:
            bc = load_bench_config("small", quick=True, text_len=args.text_len, micro_batch=1)
            bc.run.model.attn_implementation = attn
            write_small_teachers(bc)
        else:
            bc = real_config(args.recipe, stage, attn, args.text_len, tmp=tmp,
                             layers=None if stage == "pt" else args.ift_layers)
        sb = StepBench(bc, device(), threads)
        result[stage] = bench_pt(sb, args, deadline, not args.smoke) if stage == "pt" else bench_ift(sb, args)
        del sb
        free()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="llama3_8b_clip336", help="configs/<recipe>/{pt,ift}.yaml")
    ap.add_argument("--attention", nargs="+", default=None, help="default: sdpa, and flash_attention_2 if installed")
    ap.add_argument("--text-len", type=int, default=64, help="text tokens per sample (+576 image and 24 task tokens)")
    ap.add_argument("--ift-layers", type=int, default=4, help="LLM layers of the IFT comparison (real width)")
    ap.add_argument("--max-batch", type=int, default=32, help="largest micro-batch tried (the recipes use 32 / 16)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--budget", type=float, default=330,
                    help="seconds after which no new measurement starts (the whole run stays under ~8 min)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: plan.hardware table)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS, else 1)")
    ap.add_argument("--smoke", action="store_true", help="small models on the CPU: the code path, not a measurement")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("benchmarks.gpu: no CUDA GPU here (torch.cuda.is_available() is False); run it on a machine with one "
              "GPU, or pass --smoke to check the code path on the CPU", file=sys.stderr)
        return 2
    bench_threads(args.threads)
    from benchmarks.models import quiet
    from olavlm.plan.hardware import GPUS

    quiet()
    gpu: dict[str, Any] = {"name": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        key = gpu_key(props.name, props.total_memory / 2**30)
        gpu = {"name": props.name, "memory_gib": props.total_memory / 2**30, "key": key}
        if args.peak_tflops is None and key:
            args.peak_tflops = GPUS[key].bf16_tflops
    gpu["peak_tflops"] = args.peak_tflops
    if args.smoke:
        args.max_batch, args.warmup, args.repeat, args.text_len = min(args.max_batch, 2), 1, 1, min(args.text_len, 24)
    deadline = time.monotonic() + args.budget
    paths = []
    with tempfile.TemporaryDirectory(prefix="olavlm-gpu-") as tmp:
        for attn in attention_kinds(args.attention):
            t0 = time.monotonic()
            result = run_attention(attn, args, Path(tmp), deadline)
            name = f"gpu-{'smoke' if args.smoke else args.recipe}-{attn}"
            config = {"recipe": args.recipe, "smoke": args.smoke, "text_len": args.text_len,
                      "ift_layers": args.ift_layers, "max_batch": args.max_batch, "warmup": args.warmup,
                      "repeat": args.repeat, "interleaved": True, "bf16_autocast": not args.smoke,
                      "mfu": "counted step FLOPs (FlopCounterMode, fwd+bwd) / (median step s x peak dense bf16)"}
            paths.append(write_result(name, {"config": config, "gpu": gpu, "wall_s": time.monotonic() - t0,
                                             **result}))
            print_result(name, result)
    for p in paths:
        print(f"wrote {p}")
    if not args.smoke and paths and paths[0].parent.resolve() == RESULTS.resolve():
        from benchmarks import readme_table

        for path in readme_table.update_all():
            print(f"updated {path}")
    return 0


def print_result(name: str, result: dict) -> None:
    print(f"== {name}")
    for stage in ("pt", "ift"):
        r = result.get(stage, {})
        if "variants" not in r:
            print(f"  {stage}: {r.get('error') or r.get('skipped')}")
            continue
        print(f"  {stage}: micro-batch {r['micro_batch']}, sequence {r['sequence_length']}")
        for v_name, v in {**r["variants"], **(r.get("online", {}).get("variants") or {})}.items():
            tp = v.get("throughput") or {}
            mfu = f"  MFU {tp['mfu']:.1%}" if tp.get("mfu") else ""
            mem = f"  peak {v['peak_memory_bytes'] / 2**30:.1f} GiB" if v.get("peak_memory_bytes") else ""
            tok = f"  {v['tokens_per_s']:,.0f} tok/s" if v.get("tokens_per_s") else ""
            print(f"    {v_name:14s} {v['median'] * 1e3:9.1f} ms (min {v['min'] * 1e3:9.1f}){tok}{mfu}{mem}")
        for r_name, x in {**r["ratios"], **(r.get("online", {}).get("ratios") or {})}.items():
            print(f"    {r_name:28s} {x['value']:.3f} (min {x['value_min']:.3f})")


if __name__ == "__main__":
    sys.exit(main())
