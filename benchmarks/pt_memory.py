"""PT step: hook capture + supervised-only NTP (olavlm) vs output_hidden_states + full fp32 logits.

Both variants run the SAME model, batch, predictors and embedding losses; they differ only in how
the layer states and the NTP loss are obtained:

* ``olavlm``    -- ``OlaVLM.forward``: forward hooks capture only the predictor layers; the LM head
                  runs only on the supervised positions, fp32 cross-entropy.
* ``reference`` -- the reference's pattern: ``llm(..., output_hidden_states=True)`` keeps every
                  layer's states, ``logits.float()`` materialises (B, L, vocab) in fp32, shifted CE.

Precision: bf16 model + autocast on CUDA; fp32 on CPU by default (``--bf16`` to force; CPUs without
AVX512-BF16/AMX run bf16 matmuls many times slower than fp32).

Step time: both variants in ONE process, interleaved (A B, B A, ...) after warm-up; medians.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during one step. On CPU every variant runs
in its OWN subprocess with glibc's mmap threshold fixed at 64 KiB (so every tensor allocation is
mmapped and returned to the OS when freed, and RSS follows live tensors); after model build and
warm-up the kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``) and the step's
peak = VmHWM - VmRSS before the step. That is peak resident memory of the step, allocator included.

    python benchmarks/pt_memory.py [--quick] [--vocab V] [--batch B] [--text-len T]
writes benchmarks/results/pt_memory.json (machine, versions, config, raw timings, medians, ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (bench_env, bench_threads, load_average, ratio, summarize, timeit_interleaved,  # noqa: E402
                               write_result)

SIZES = {  # the small config (knobs of the benchmark, not of the method)
    "llm_hidden": 256, "llm_layers": 8, "llm_heads": 4, "llm_kv_heads": 2, "llm_intermediate": 688,
    "vision_hidden": 128, "vision_layers": 2, "image_size": 64, "patch_size": 8,  # 64 image tokens
    "system_tokens": 8,  # text tokens before the image placeholder
    "supervised_fraction": 0.5,  # share of the text after the image that is supervised
}


def write_checkpoints(out: Path, vocab: int) -> dict[str, str]:
    """Llama LLM with ``vocab`` rows (tokenizer: the tiny BPE; ids above it are valid model ids) + CLIP."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from olavlm.devkit.tiny import CORPUS, train_tokenizer

    s = SIZES
    tok = train_tokenizer(CORPUS)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=max(vocab, len(tok)), hidden_size=s["llm_hidden"], intermediate_size=s["llm_intermediate"],
        num_hidden_layers=s["llm_layers"], num_attention_heads=s["llm_heads"], num_key_value_heads=s["llm_kv_heads"],
        max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False)).save_pretrained(out / "llm")
    tok.save_pretrained(out / "llm")
    CLIPVisionModel(CLIPVisionConfig(
        hidden_size=s["vision_hidden"], intermediate_size=4 * s["vision_hidden"], num_hidden_layers=s["vision_layers"],
        num_attention_heads=4, image_size=s["image_size"], patch_size=s["patch_size"])).save_pretrained(out / "vision")
    CLIPImageProcessor(size={"shortest_edge": s["image_size"]},
                       crop_size={"height": s["image_size"], "width": s["image_size"]}).save_pretrained(out / "vision")
    return {"llm": str(out / "llm"), "vision": str(out / "vision")}


def model_config(paths: dict[str, str], dtype: str):
    from olavlm.config import ModelConfig, PredictorConfig, default_tasks

    tasks = default_tasks()
    tasks["gen"].layers, tasks["depth"].layers, tasks["seg"].layers = [4, 8], [3, 7], [4, 6]
    tasks["gen"].predictor = PredictorConfig(dim=64, num_queries=1, query_source="hidden", out_dim=32,
                                             output_layout="vector")
    tasks["depth"].predictor = PredictorConfig(dim=None, out_dim=64, output_layout="tokens", output_mlp=True)
    tasks["seg"].predictor = PredictorConfig(dim=96, out_dim=64, output_layout="grid")
    return ModelConfig(llm=paths["llm"], vision_tower=paths["vision"], vision_type="clip", dtype=dtype,
                       num_task_tokens=8, tasks=tasks)


def build(paths: dict[str, str], batch: int, text_len: int, dev, bf16: bool):
    """PT-frozen model (LLM and tower frozen), batch, random targets and the two step functions."""
    import torch
    import torch.nn.functional as F

    from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from olavlm.model.vlm import OlaVLM

    torch.manual_seed(0)
    model = OlaVLM.from_config(model_config(paths, "bfloat16" if bf16 else "float32"))
    model.llm.requires_grad_(False)
    model.to(dev).train()
    g = torch.Generator().manual_seed(0)
    vocab = model.llm.config.vocab_size
    ids = torch.randint(8, vocab, (batch, text_len), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    sup = max(1, int((text_len - SIZES["system_tokens"] - 1) * SIZES["supervised_fraction"]))
    labels[:, -sup:] = ids[:, -sup:]
    ids[:, SIZES["system_tokens"]] = IMAGE_TOKEN_INDEX
    size = model.image_spec.size
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
              "pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    targets = {t: torch.randn(batch, *s, generator=g).to(dev) for t, s in model.target_shapes.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def olavlm_loss():
        return model(**inputs, targets=targets).loss

    def reference_loss():
        layout = model.build_layout(inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        out = model.llm(inputs_embeds=model.embed(layout, inputs["pixel_values"]),
                        attention_mask=layout.attention_mask.long(), position_ids=layout.position_ids,
                        output_hidden_states=True, use_cache=False)
        logits = out.logits.float()  # (B, L, vocab) in fp32, as the reference
        ntp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), layout.labels[:, 1:].reshape(-1),
                              ignore_index=IGNORE_INDEX)
        states = {layer: out.hidden_states[layer] for layer in model.predictor_layers()}
        return ntp + model._embedding_losses(model.predict(states, layout), targets, None, layout.num_images, {})

    def stepper(loss_fn):
        def step() -> float:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())
        return step

    return model, {"olavlm": stepper(olavlm_loss), "reference": stepper(reference_loss)}, (olavlm_loss, reference_loss)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_cpu_peak(paths: dict[str, str], variant: str, batch: int, text_len: int, bf16: bool) -> dict:
    """(in a fresh subprocess) peak RSS growth of one step of ``variant`` after build + warm-up."""
    import gc

    import torch

    _, steps, _ = build(paths, batch, text_len, torch.device("cpu"), bf16)
    steps[variant]()
    steps[variant]()  # warm-up: optimizer state exists, lazy inits done
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    steps[variant]()
    peak = _status("VmHWM")
    return {"rss_before": before, "vm_hwm": peak, "step_peak_bytes": peak - before}


def cpu_peaks(paths: dict[str, str], batch: int, text_len: int, bf16: bool) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = {}
    for variant in ("olavlm", "reference"):
        cmd = [sys.executable, __file__, "--_measure", variant, "--_paths", json.dumps(paths),
               "--batch", str(batch), "--text-len", str(text_len), "--bf16" if bf16 else "--no-bf16"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"memory probe for {variant} failed:\n{proc.stderr[-3000:]}")
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    bench_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="vocab 32000, batch 4, 3 timed steps (CI smoke)")
    ap.add_argument("--vocab", type=int, default=None, help="LLM vocabulary rows (default 128256 = Llama-3; quick 32000)")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default 8, quick 4)")
    ap.add_argument("--text-len", type=int, default=160, help="text tokens per sample before image expansion")
    ap.add_argument("--repeat", type=int, default=None, help="timed steps per variant (default 5, quick 3)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 model + autocast (default: on CUDA only; CPUs without AVX512-BF16/AMX run "
                         "bf16 matmuls far slower than fp32)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: OMP_NUM_THREADS, else 1; recorded in the result)")
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_paths", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    bench_threads(args.threads)
    batch = args.batch or (4 if args.quick else 8)
    import torch

    bf16 = torch.cuda.is_available() if args.bf16 is None else args.bf16
    if args._measure:
        print(json.dumps(measure_cpu_peak(json.loads(args._paths), args._measure, batch, args.text_len, bf16)))
        return

    from benchmarks.models import quiet

    quiet()
    vocab = args.vocab or (32000 if args.quick else 128256)
    repeat = args.repeat or (3 if args.quick else 5)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="olavlm-ptmem-") as tmp:
        paths = write_checkpoints(Path(tmp), vocab)
        model, steps, (ours, ref) = build(paths, batch, args.text_len, dev, bf16)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):  # same loss, two routes
            same = abs(float(ours()) - float(ref()))
        sync = torch.cuda.synchronize if dev.type == "cuda" else None
        peak_fn = torch.cuda.max_memory_allocated if dev.type == "cuda" else None
        reset = torch.cuda.reset_peak_memory_stats if dev.type == "cuda" else None
        cpu: dict[str, list[float]] = {}
        times, gpu_peaks = timeit_interleaved(steps, warmup=1, repeat=repeat, sync=sync,
                                              peak_memory=peak_fn, reset_peak=reset, cpu=cpu)
        if dev.type == "cuda":
            peaks = {k: {"step_peak_bytes": v, "how": "torch.cuda.max_memory_allocated"} for k, v in gpu_peaks.items()}
        else:
            peaks = cpu_peaks(paths, batch, args.text_len, bf16)
    med = {k: summarize(v, cpu[k]) for k, v in times.items()}
    mem_ratio = peaks["olavlm"]["step_peak_bytes"] / max(1, peaks["reference"]["step_peak_bytes"])
    result = {
        "config": {"sizes": SIZES, "vocab": vocab, "batch": batch, "text_len": args.text_len,
                   "seq_len_after_expansion": args.text_len - 1 + model.tokens_per_image, "bf16_autocast": bf16,
                   "model_dtype": "bfloat16" if bf16 else "float32", "predictor_layers": model.predictor_layers(),
                   "device": str(dev), "quick": args.quick, "load_average": load_average()},
        "loss_abs_difference_between_routes": same,
        "raw_seconds": times, "step_time": med, "peak_memory": peaks,
        "memory_method": ("torch.cuda.max_memory_allocated during one step" if dev.type == "cuda" else
                          "per-variant subprocess, MALLOC_MMAP_THRESHOLD_=65536, VmHWM reset via "
                          "/proc/self/clear_refs after warm-up; peak = VmHWM - VmRSS before the step"),
        "ratios": {
            "step_time_olavlm_over_reference": ratio(med["olavlm"], med["reference"], what="step time"),
            "peak_memory_olavlm_over_reference": {"value": mem_ratio, "what": "peak step memory"},
        },
    }
    path = write_result("pt_memory", result)
    print(f"wrote {path}")
    print(f"step time  olavlm {med['olavlm']['median']:.3f}s  reference {med['reference']['median']:.3f}s  "
          f"ratio {result['ratios']['step_time_olavlm_over_reference']['value']:.2f}")
    print(f"step peak  olavlm {peaks['olavlm']['step_peak_bytes'] / 2**20:.0f} MiB  reference "
          f"{peaks['reference']['step_peak_bytes'] / 2**20:.0f} MiB  ratio {mem_ratio:.2f}")


if __name__ == "__main__":
    main()
