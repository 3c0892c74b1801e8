"""Goal 2: our IFT step / transformers' ``LlavaForConditionalGeneration`` step (<= 1.00).

Both models are built from the SAME LLM and vision-tower checkpoints (Llava gets our LLM's decoder,
LM head and tower weights and our projector's, via its own ``LlavaConfig``: CLIP layer -2, CLS
dropped, 2-layer GELU projector), the same batch (identical text, one image per sample, the same
number of image tokens) and the same training setup: LLM + projector trainable in fp32 master
weights, tower frozen in ``model.dtype``, the trainer's autocast, backward, clipping, AdamW.

* ``olavlm_ift``: our IFT model with its frozen task tokens (8 per task after every image, spec
  §2.3) -- 24 more positions per image than Llava sees;
* ``olavlm_ift_no_task_tokens``: our model with ``num_task_tokens: 0`` -- exactly Llava's sequence;
* ``llava_hf``: ``LlavaForConditionalGeneration`` (input_ids hold one image token per feature;
  full-vocabulary logits, loss by transformers).

Before timing, the NTP losses of ``olavlm_ift_no_task_tokens`` and ``llava_hf`` on the first batch
are recorded: equal weights and inputs must give the same loss (a check that the comparison is
like for like). Result: benchmarks/results/ift_vs_llava.json.

    python -m benchmarks.ift_vs_llava [--quick] [--config small|RUN.yaml] [--batch B] [--text-len T]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import bench_env, ratio, step_parser  # noqa: E402

bench_env()

GOAL = 1.00  # issue 8 / 5(b): our IFT step is no slower than the native Llava step


def build_llava(ours, bc):
    """``LlavaForConditionalGeneration`` with our model's dimensions AND weights; IFT trainables."""
    import torch
    from transformers import AutoModelForImageTextToText, LlavaConfig

    from benchmarks.models import device, finish_trainable

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
    llava = AutoModelForImageTextToText.from_config(cfg, attn_implementation=impl, dtype=torch.float32)
    inner = llava.model
    inner.language_model.load_state_dict(llm.model.state_dict())
    llava.lm_head.load_state_dict(llm.lm_head.state_dict())
    inner.vision_tower.load_state_dict(tower.model.state_dict())
    inner.multi_modal_projector.linear_1.load_state_dict(ours.projector[0].state_dict())
    inner.multi_modal_projector.linear_2.load_state_dict(ours.projector[2].state_dict())
    llava.to(device())
    llava.requires_grad_(False)
    inner.vision_tower.to(tower.dtype)
    for module in (inner.language_model, llava.lm_head, inner.multi_modal_projector):
        module.requires_grad_(True)
    if bc.run.train.gradient_checkpointing:
        llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return llava, finish_trainable(llava, bc)


def main(argv: list[str] | None = None) -> int:
    args = step_parser(__doc__.splitlines()[0]).parse_args(argv)
    import torch

    from benchmarks import models as M
    from benchmarks.harness import measure, print_summary, record

    M.quiet()
    bc = M.load_bench_config(args.config, quick=args.quick, text_len=args.text_len, micro_batch=args.batch,
                             overrides=args.override, bf16=args.bf16)
    dev, bf16, clip = M.device(), bc.run.train.bf16, bc.run.train.max_grad_norm
    n = bc.micro_batch
    ours, ours_opt, counts = M.build_olavlm(bc, "ift")
    plain, plain_opt, plain_counts = M.build_olavlm(bc, "ift", plain=True)
    plain.load_state_dict(ours.state_dict(), strict=False)  # same LLM / tower / projector weights
    llava, llava_opt = build_llava(plain, bc)
    image_token = llava.config.image_token_index
    batch = M.to_device(M.synthetic_batch(ours, n, bc.text_len, vocab_exclude=image_token), dev)
    hf_batch = M.to_device(M.synthetic_batch(ours, n, bc.text_len, image_token_run=plain.num_image_tokens,
                                             vocab_exclude=image_token), dev)
    hf_inputs = {k: hf_batch[k] for k in ("input_ids", "labels", "attention_mask", "pixel_values")}
    hf_inputs["attention_mask"] = hf_inputs["attention_mask"].long()
    if hf_inputs["input_ids"].shape[1] != batch["input_ids"].shape[1] - 1 + plain.num_image_tokens:
        raise AssertionError("Llava and OlaVLM sequences differ in length")

    with torch.no_grad(), M.autocast(dev, bf16):  # like-for-like check before any step changes weights
        loss_ours = float(plain(**batch).loss)
        loss_llava = float(llava(**hf_inputs).loss)
    check = {"olavlm_no_task_tokens": loss_ours, "llava_hf": loss_llava, "abs_diff": abs(loss_ours - loss_llava)}

    steps = {
        "olavlm_ift": M.make_step(ours, ours_opt, batch, bf16=bf16, max_grad_norm=clip),
        "olavlm_ift_no_task_tokens": M.make_step(plain, plain_opt, batch, bf16=bf16, max_grad_norm=clip),
        "llava_hf": M.make_step(llava, llava_opt, hf_inputs, bf16=bf16, max_grad_norm=clip),
    }
    variants = measure(steps, args=args, dev=dev)
    v = variants
    ratios = {
        "olavlm_ift_no_task_tokens_over_llava": ratio(v["olavlm_ift_no_task_tokens"], v["llava_hf"], goal=GOAL,
                                                      what="same sequence as Llava (num_task_tokens 0)"),
        "olavlm_ift_over_llava": ratio(v["olavlm_ift"], v["llava_hf"], goal=GOAL,
                                       what=f"with the frozen task tokens (+{ours.task_tokens.tokens_per_image} "
                                            "positions per image)"),
    }
    trainable_llava = sum(p.numel() for p in llava.parameters() if p.requires_grad)
    extra = {"loss_check": check,
             "trainable": {"olavlm_ift": counts, "olavlm_ift_no_task_tokens": plain_counts,
                           "llava_hf": trainable_llava},
             "sequence": {"olavlm_ift": batch["input_ids"].shape[1] - 1 + ours.tokens_per_image,
                          "olavlm_ift_no_task_tokens": batch["input_ids"].shape[1] - 1 + plain.tokens_per_image,
                          "llava_hf": hf_inputs["input_ids"].shape[1]}}
    path = record("ift_vs_llava", args=args, bc=bc, variants=variants, ratios=ratios, extra=extra)
    print(f"ift_vs_llava ({'bf16 autocast' if bf16 else 'fp32'}, batch {n}, text {bc.text_len}, device {dev.type}); "
          f"loss check |ours - llava| = {check['abs_diff']:.2e}")
    print_summary(variants, ratios)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
