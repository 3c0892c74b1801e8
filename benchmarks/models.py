"""What the step benchmarks run on: the "small" config (built in code) or a RunConfig YAML, synthetic
batches of the data contract (docs/architecture.md, section 1), and one training step as the trainer runs it.

The small config uses the same transformers classes as a real run, saved as ordinary HF folders and
loaded through ``OlaVLM.from_config`` (the path users hit):

* LLM  ``LlamaForCausalLM``: hidden 256, 4 layers, 4 heads (2 KV heads), MLP 688, vocab 512 (tiny BPE);
* tower ``CLIPVisionModel``: 64 px, patch 8 -> 8 x 8 = 64 image tokens, hidden 128, 4 layers;
* teachers: ``olavlm.devkit.teachers`` at ``scale=2`` (Depth-Anything / OneFormer / unCLIP classes,
  target shapes depth (64, 64), seg (64, 8, 8), gen (1, 24));
* tasks as in the reference (gen / depth / seg, 2 layers each, 8 task tokens per task, weight 0.5,
  SL1 + 0.3 InfoNCE), predictor widths scaled down with the LLM.

A step = forward under the trainer's autocast (bf16 when ``train.bf16``), backward, gradient clipping
at ``train.max_grad_norm``, AdamW step, zero_grad -- the body of ``olavlm.train.loop.train`` without
Accelerate's bookkeeping. Trainable parameters are fp32 master weights, frozen ones stay in
``model.dtype``, exactly as the loop sets them up.

The comparisons put these together through ``benchmarks.steps.StepBench``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

# Sizes of the small config (every field is a knob of the benchmark, not of the method).
SMALL = {
    "llm_hidden": 256,  # LlamaForCausalLM hidden size
    "llm_layers": 4,  # decoder layers
    "llm_heads": 4,  # attention heads (head dim 64)
    "llm_kv_heads": 2,  # grouped-query KV heads (Llama-3 style)
    "llm_intermediate": 688,  # MLP width (~8/3 x hidden, as Llama)
    "vision_hidden": 128,  # CLIPVisionModel hidden size
    "vision_layers": 4,
    "image_size": 64,  # px; patch 8 -> 64 image tokens
    "patch_size": 8,
    "teacher_scale": 2,  # olavlm.devkit.teachers scale
    "text_len": 96,  # text tokens per sample (system prefix + caption), before image expansion
    "micro_batch": 4,  # samples per step
}
# The ShapeWorld demo's base models (olavlm.demo.bootstrap.BootstrapSpec defaults; read from
# there when that module is importable, these values otherwise): the "model consumption" side of goal 5.
DEMO = {**SMALL, "llm_hidden": 128, "llm_layers": 4, "llm_heads": 4, "llm_kv_heads": 4, "llm_intermediate": 256,
        "vision_hidden": 64, "vision_layers": 4, "image_size": 64, "patch_size": 8, "micro_batch": 16}
SYSTEM_TOKENS = 8  # synthetic "system prompt" tokens before the image placeholder
SUPERVISED_FRACTION = 0.5  # share of the text after the image that is supervised (the answer)


@dataclass
class BenchConfig:
    """The model config of a benchmark run plus the batch geometry."""

    run: Any  # olavlm.config.RunConfig (model paths, train.bf16, micro batch, grad clipping ...)
    text_len: int  # text tokens per sample (the image placeholder counts as one)
    micro_batch: int  # samples per step
    source: str  # "small" or the YAML path
    tmp: tempfile.TemporaryDirectory | None = None  # keeps the small config's folders alive
    sizes: dict[str, Any] | None = None  # the built-in preset's sizes (None for a YAML)

    def describe(self) -> dict[str, Any]:
        m, t = self.run.model, self.run.train
        built = self.sizes is not None
        return {"source": self.source, "llm": "LlamaForCausalLM (sizes)" if built else m.llm,
                "vision_tower": "CLIPVisionModel (sizes)" if built else m.vision_tower,
                "sizes": self.sizes, "model_dtype": m.dtype,
                "bf16_autocast": t.bf16, "num_task_tokens": m.num_task_tokens, "task_order": list(m.task_order),
                "layers": {k: list(v.layers) for k, v in m.tasks.items()}, "text_len": self.text_len,
                "micro_batch": self.micro_batch, "max_grad_norm": t.max_grad_norm,
                "gradient_checkpointing": t.gradient_checkpointing, "attn_implementation": m.attn_implementation}


def quiet() -> None:
    """No progress bars or load reports from transformers / hub while benchmarking."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def demo_sizes() -> tuple[dict[str, int], str]:
    """(sizes of the demo's base models, where they were read from)."""
    try:
        from olavlm.demo.bootstrap import BootstrapSpec
    except ImportError:
        return dict(DEMO), "benchmarks.models.DEMO"
    b = BootstrapSpec()
    return ({**DEMO, "llm_hidden": b.llm_hidden, "llm_layers": b.llm_layers, "llm_heads": b.llm_heads,
             "llm_kv_heads": b.llm_heads, "llm_intermediate": 2 * b.llm_hidden, "vision_hidden": b.vision_hidden,
             "vision_layers": b.vision_layers, "patch_size": b.vision_patch},
            "olavlm.demo.bootstrap.BootstrapSpec")


def write_small_checkpoints(out: Path, seed: int = 0, sizes: dict[str, int] = SMALL) -> dict[str, str]:
    """Save the small LLM (+ tokenizer) and CLIP tower under ``out``; returns the folders, including
    where :func:`write_small_teachers` puts the teachers (written only when a benchmark needs them)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from olavlm.devkit.tiny import CORPUS, train_tokenizer
    from olavlm.devkit.teachers import TINY_TEACHERS

    s = sizes
    tok = train_tokenizer(CORPUS)
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=s["llm_hidden"], intermediate_size=s["llm_intermediate"],
        num_hidden_layers=s["llm_layers"], num_attention_heads=s["llm_heads"], num_key_value_heads=s["llm_kv_heads"],
        max_position_embeddings=4096, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False))
    llm.save_pretrained(out / "llm")
    tok.save_pretrained(out / "llm")
    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(
        hidden_size=s["vision_hidden"], intermediate_size=4 * s["vision_hidden"], num_hidden_layers=s["vision_layers"],
        num_attention_heads=4, image_size=s["image_size"], patch_size=s["patch_size"],
        projection_dim=s["vision_hidden"])).save_pretrained(out / "vision")
    CLIPImageProcessor(size={"shortest_edge": s["image_size"]},
                       crop_size={"height": s["image_size"], "width": s["image_size"]}).save_pretrained(out / "vision")
    return {"llm": str(out / "llm"), "vision": str(out / "vision"),
            **{name: str(out / "teachers" / name) for name in TINY_TEACHERS}}


def write_small_teachers(bc: "BenchConfig", seed: int = 0) -> None:
    """Write the small config's teachers (tiny teacher classes at ``teacher_scale``) where its
    ModelConfig points; a YAML config's teachers are whatever its teacher paths name."""
    from olavlm.devkit.teachers import make_tiny_teachers

    if bc.tmp is not None and not (Path(bc.tmp.name) / "teachers").is_dir():
        make_tiny_teachers(Path(bc.tmp.name) / "teachers", seed=seed, scale=bc.sizes["teacher_scale"])


def small_model_config(paths: dict[str, str], dtype: str = "float32", sizes: dict[str, int] = SMALL):
    """ModelConfig over :func:`write_small_checkpoints` output; predictor outputs match the teachers."""
    from olavlm.config import ModelConfig, PredictorConfig, default_tasks

    sc = sizes["teacher_scale"]
    tasks = default_tasks()
    tasks["gen"].layers, tasks["depth"].layers, tasks["seg"].layers = [2, 4], [1, 3], [2, 4]
    tasks["gen"].teacher_path, tasks["depth"].teacher_path = paths["teacher-gen"], paths["teacher-depth"]
    tasks["seg"].teacher_path = paths["teacher-seg"]
    tasks["gen"].predictor = PredictorConfig(dim=64, num_queries=1, query_source="hidden", out_dim=24,
                                             output_layout="vector")
    tasks["depth"].predictor = PredictorConfig(dim=None, out_dim=32 * sc, output_layout="tokens", output_mlp=True)
    tasks["seg"].predictor = PredictorConfig(dim=96, out_dim=32 * sc, output_layout="grid")
    return ModelConfig(llm=paths["llm"], vision_tower=paths["vision"], vision_type="clip", dtype=dtype,
                       num_task_tokens=8, tasks=tasks)


_WRITTEN: dict[tuple[str, str], tuple[tempfile.TemporaryDirectory, dict[str, str]]] = {}


def load_bench_config(config: str, *, quick: bool, text_len: int | None = None, micro_batch: int | None = None,
                      overrides: list[str] | None = None, bf16: str = "auto") -> BenchConfig:
    """``"small"`` (or ``"demo"``: the ShapeWorld demo's model sizes): build the config in a temporary
    folder; otherwise a RunConfig YAML (its
    ``model`` section, ``train.bf16``, ``train.micro_batch_size``, ``train.max_grad_norm`` ...).

    ``bf16``: "on" / "off" force bf16 autocast (and, for the small config, bf16 frozen weights);
    "auto" = the YAML's ``train.bf16``, and for the small config on only on CUDA: CPUs without
    native bf16 matmul (AVX2-only, like the 2-core CI machine: 0.7-2 GFLOP/s in bf16 against
    8-17 in fp32) would otherwise measure emulated bf16 kernels, not the method."""
    import dataclasses

    from olavlm.config import RunConfig, TrainConfig, load_config

    if bf16 not in ("auto", "on", "off"):
        raise ValueError(f"--bf16: {bf16!r} is not auto/on/off")
    if config in ("small", "demo"):
        sizes, origin = (dict(SMALL), "benchmarks.models.SMALL") if config == "small" else demo_sizes()
        use_bf16 = bf16 == "on" or (bf16 == "auto" and torch.cuda.is_available())
        key = (config, json.dumps(sizes, sort_keys=True))
        if key not in _WRITTEN:  # one process (the tests) may build the same preset several times
            tmp = tempfile.TemporaryDirectory(prefix="olavlm-bench-")
            _WRITTEN[key] = (tmp, write_small_checkpoints(Path(tmp.name), sizes=sizes))
        tmp, paths = _WRITTEN[key]
        run = RunConfig(model=small_model_config(paths, "bfloat16" if use_bf16 else "float32", sizes),
                        train=TrainConfig(micro_batch_size=sizes["micro_batch"], bf16=use_bf16))
        default_len = sizes["text_len"] // (2 if quick else 1)
        default_batch = sizes["micro_batch"] // (2 if quick else 1)
        return BenchConfig(run, text_len or default_len, micro_batch or default_batch, config, tmp,
                           {**sizes, "origin": origin})
    run = load_config(config, overrides)
    if bf16 != "auto":
        run.train = dataclasses.replace(run.train, bf16=bf16 == "on")
    return BenchConfig(run, text_len or 128, micro_batch or run.train.micro_batch_size, str(config))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync_fn(dev: torch.device) -> Callable[[], None] | None:
    return torch.cuda.synchronize if dev.type == "cuda" else None


def autocast(dev: torch.device, enabled: bool):
    """The trainer's autocast (Accelerate mixed_precision="bf16" = torch.autocast bf16)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


def synthetic_batch(model, n: int, text_len: int, *, seed: int = 0, image_token_run: int | None = None,
                    vocab_exclude: int | None = None) -> dict[str, torch.Tensor]:
    """A batch of the data contract: per sample ``SYSTEM_TOKENS`` text tokens, ONE image placeholder,
    then text; the last ``SUPERVISED_FRACTION`` of the text after the image is supervised. With
    ``image_token_run=P`` the placeholder is instead a run of P copies of ``vocab_exclude`` (the
    LLaVA-HF layout, where input_ids already hold one token per image feature)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.llm.config.vocab_size
    after = text_len - SYSTEM_TOKENS - 1
    if after < 2:
        raise ValueError(f"text_len {text_len} is too short (needs > {SYSTEM_TOKENS + 2})")
    ids = torch.randint(8, vocab - 1, (n, text_len), generator=g)
    if vocab_exclude is not None:
        ids[ids == vocab_exclude] = vocab_exclude - 1
    labels = torch.full_like(ids, IGNORE_INDEX)
    sup = max(1, int(after * SUPERVISED_FRACTION))
    labels[:, -sup:] = ids[:, -sup:]
    if image_token_run is None:
        ids[:, SYSTEM_TOKENS] = IMAGE_TOKEN_INDEX
    else:
        run = torch.full((n, image_token_run), vocab_exclude)
        ids = torch.cat([ids[:, :SYSTEM_TOKENS], run, ids[:, SYSTEM_TOKENS + 1:]], 1)
        labels = torch.cat([labels[:, :SYSTEM_TOKENS], torch.full_like(run, IGNORE_INDEX),
                            labels[:, SYSTEM_TOKENS + 1:]], 1)
    spec = model.image_spec
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
            "pixel_values": torch.randn(n, 3, spec.size, spec.size, generator=g),
            "num_images": torch.ones(n, dtype=torch.long)}


def random_targets(target_shapes: dict[str, tuple[int, ...]], n: int, dtype: torch.dtype,
                   seed: int = 1) -> dict[str, torch.Tensor]:
    """Stand-ins for cached teacher targets (what the collator delivers from a TargetCache)."""
    g = torch.Generator().manual_seed(seed)
    return {task: torch.randn((n, *shape), generator=g).to(dtype) for task, shape in target_shapes.items()}


def to_device(batch: dict, dev: torch.device) -> dict:
    return {k: (v.to(dev) if torch.is_tensor(v) else {t: x.to(dev) for t, x in v.items()} if isinstance(v, dict) else v)
            for k, v in batch.items()}


def build_olavlm(bc: BenchConfig, stage: str, *, plain: bool = False, random_weights: bool = False):
    """OlaVLM for ``stage`` (predictors only in PT), frozen per the stage policy, fp32 master
    weights for what trains, on the benchmark device; returns (model, optimizer, trainable counts).
    ``plain``: no tasks at all (no task tokens, no predictors) -- the LLaVA-1.5 model.
    ``random_weights``: build from the config files alone, random weights on the device (real-size
    configs without a download, ``olavlm.plan.meta``)."""
    import dataclasses

    from olavlm.model.vlm import OlaVLM
    from olavlm.plan.meta import meta_loading
    from olavlm.train.stages import configure_trainable, uses_predictors

    mcfg = bc.run.model
    if plain:
        mcfg = dataclasses.replace(mcfg, num_task_tokens=0, task_order=[], tasks={}, layer_spec=None,
                                   weight_spec=None)
    train_cfg = dataclasses.replace(bc.run.train, stage=stage)
    loading = meta_loading(device=device().type) if random_weights else contextlib.nullcontext()
    with loading:
        model = OlaVLM.from_config(mcfg, with_predictors=uses_predictors(stage) and not plain)
    counts = configure_trainable(model, stage, train_cfg)
    model.to(device())
    if bc.run.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if stage == "pt":
            model.llm.enable_input_require_grads()
    return model, finish_trainable(model, bc), counts


def finish_trainable(model, bc: BenchConfig) -> torch.optim.Optimizer:
    """fp32 master weights for the trainable parameters (as the loop does) + the run's AdamW."""
    t = bc.run.train
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW(params, lr=t.learning_rate, betas=tuple(t.adam_betas), eps=t.adam_eps,
                            weight_decay=t.weight_decay)
    return opt


def make_step(model, optimizer, inputs: dict, *, bf16: bool, max_grad_norm: float | None,
              before: Callable[[dict], dict] | None = None, loss_of: Callable[[Any], torch.Tensor] | None = None
              ) -> Callable[[], float]:
    """One optimizer step on fixed ``inputs``. ``before(inputs)`` runs outside the model each step
    (online teachers); ``loss_of(out)`` picks the loss (default ``out.loss``)."""
    dev = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    loss_of = loss_of or (lambda out: out.loss)

    def step() -> float:
        kwargs = before(inputs) if before else inputs
        with autocast(dev, bf16):
            out = model(**kwargs)
        loss = loss_of(out)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step

