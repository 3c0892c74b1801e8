"""The set-up every step benchmark shares (pt_vs_ntp, online_vs_cached, ift_vs_llava, scaling,
data_vs_model, the GPU benchmark): thread count fixed first, then the config, device, precision and
batch size; models, teachers, batches and training steps built one way for every comparison.

    sb = StepBench.from_args(args)              # --threads/--config/--batch/--text-len/--bf16 ...
    pt = sb.olavlm("pt")                        # Built(model, optimizer, trainable counts)
    step = sb.step(pt, {**sb.batch(pt.model), "targets": sb.targets(pt.model)})
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from benchmarks.models import (BenchConfig, build_olavlm, device, finish_trainable, load_bench_config, make_step, quiet,
                               random_targets, synthetic_batch, to_device)


class Built(NamedTuple):
    model: Any  # OlaVLM or LlavaForConditionalGeneration, on the benchmark device
    optimizer: torch.optim.Optimizer
    counts: Any  # trainable elements per group (or in total for Llava)



@dataclass
class StepBench:
    """One benchmark process's shared set-up (see the module doc)."""

    bc: BenchConfig
    dev: torch.device
    threads: int

    @classmethod
    def from_args(cls, args, *, micro_batch: int | None = None) -> "StepBench":
        from benchmarks.common import bench_threads

        threads = bench_threads(getattr(args, "threads", None))
        quiet()
        bc = load_bench_config(args.config, quick=args.quick, text_len=args.text_len,
                               micro_batch=args.batch or micro_batch, overrides=args.override, bf16=args.bf16)
        return cls(bc, device(), threads)

    @property
    def bf16(self) -> bool:
        return self.bc.run.train.bf16

    @property
    def n(self) -> int:
        return self.bc.micro_batch

    @property
    def target_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def olavlm(self, stage: str, *, plain: bool = False, random_weights: bool = False) -> Built:
        return Built(*build_olavlm(self.bc, stage, plain=plain, random_weights=random_weights))

    def teachers(self, model, *, random_weights: bool = False):
        """(TeacherSet, dtype): the run's teachers, batched, in the teacher dtype (``train.teacher_dtype``,
        else bf16 under bf16 autocast, else fp32), on the device; shapes checked against the predictors."""
        from olavlm.dtypes import torch_dtype
        from olavlm.plan.meta import meta_loading
        from olavlm.teachers import build_teachers

        t = self.bc.run.train
        dtype = torch_dtype(t.teacher_dtype, "train.teacher_dtype") if t.teacher_dtype else self.target_dtype
        with meta_loading(device=self.dev.type) if random_weights else contextlib.nullcontext():
            teachers = build_teachers(model.cfg, grid=model.geometry.grid, device=self.dev, dtype=dtype,
                                      expected=model.target_shapes)
        return teachers, dtype

    def batch(self, model, n: int | None = None, text_len: int | None = None, **kwargs) -> dict:
        """A synthetic batch of the data contract on the device (``models.synthetic_batch``)."""
        return to_device(synthetic_batch(model, n or self.n, text_len or self.bc.text_len, **kwargs), self.dev)

    def targets(self, model, n: int | None = None) -> dict:
        """Random stand-ins for cached targets, in the training dtype, on the device."""
        return to_device(random_targets(model.target_shapes, n or self.n, self.target_dtype), self.dev)

    def step(self, built: Built, inputs: dict, **kwargs) -> Callable[[], float]:
        return make_step(built.model, built.optimizer, inputs, bf16=self.bf16,
                         max_grad_norm=self.bc.run.train.max_grad_norm, **kwargs)

    def describe(self, name: str) -> str:
        return (f"{name} ({'bf16 autocast' if self.bf16 else 'fp32'}, batch {self.n}, text {self.bc.text_len}, "
                f"device {self.dev.type}, {self.threads} thread(s))")


def build_llava(ours, bc: BenchConfig) -> Built:
    """``LlavaForConditionalGeneration`` with our model's dimensions AND weights (CLIP layer -2, CLS
    dropped, 2-layer GELU projector), the IFT trainables (LLM + projector) as fp32 master weights."""
    from transformers import AutoModelForImageTextToText, LlavaConfig

    llm, tower = ours.llm, ours.vision
    if not isinstance(ours.projector, torch.nn.Sequential) or len(ours.projector) != 3:
        raise ValueError(f"model.projector: {bc.run.model.projector!r}; the Llava comparison needs mlp2x_gelu")
    if ours.vision.drop_cls is not True:
        raise ValueError("model.vision_drop_cls: the Llava comparison needs a CLIP-style tower with CLS dropped")
    cfg = LlavaConfig(vision_config=tower.model.config.to_dict(), text_config=llm.config.to_dict(),
                      image_token_index=llm.config.vocab_size - 1, image_seq_length=ours.num_image_tokens,
                      projector_hidden_act="gelu", vision_feature_select_strategy="default",
                      vision_feature_layer=ours.vision.feature_layer, multimodal_projector_bias=True)
    impl = bc.run.model.attn_implementation
    with torch.device(device()):  # built where it runs: no second host copy of a real-size model
        llava = AutoModelForImageTextToText.from_config(cfg, attn_implementation=impl, dtype=torch.float32)
    inner = llava.model
    inner.language_model.load_state_dict(llm.model.state_dict())
    llava.lm_head.load_state_dict(llm.lm_head.state_dict())
    inner.vision_tower.load_state_dict(tower.model.state_dict())
    inner.multi_modal_projector.linear_1.load_state_dict(ours.projector[0].state_dict())
    inner.multi_modal_projector.linear_2.load_state_dict(ours.projector[2].state_dict())
    llava.requires_grad_(False)
    inner.vision_tower.to(tower.dtype)
    for module in (inner.language_model, llava.lm_head, inner.multi_modal_projector):
        module.requires_grad_(True)
    if bc.run.train.gradient_checkpointing:
        llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = finish_trainable(llava, bc)
    return Built(llava, opt, sum(p.numel() for p in llava.parameters() if p.requires_grad))
