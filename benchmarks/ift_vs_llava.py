"""Goal 2: our IFT step / transformers' ``LlavaForConditionalGeneration`` step (<= 1.00).

Both models are built from the SAME LLM and vision-tower checkpoints (Llava gets our LLM's decoder,
LM head and tower weights and our projector's, via its own ``LlavaConfig``: CLIP layer -2, CLS
dropped, 2-layer GELU projector), the same batch (identical text, one image per sample, the same
number of image tokens) and the same training setup: LLM + projector trainable in fp32 master
weights, tower frozen in ``model.dtype``, the trainer's autocast, backward, clipping, AdamW.

* ``olavlm_ift``: our IFT model with its frozen task tokens (8 per task after every image)
  -- 24 more positions per image than Llava sees;
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

GOAL = 1.00  # goal: our IFT step is no slower than the native Llava step


def main(argv: list[str] | None = None) -> int:
    args = step_parser(__doc__.splitlines()[0]).parse_args(argv)
    import torch

    from benchmarks.harness import measure, print_summary, record
    from benchmarks.models import autocast
    from benchmarks.steps import StepBench, build_llava

    sb = StepBench.from_args(args)
    ours, plain = sb.olavlm("ift"), sb.olavlm("ift", plain=True)
    plain.model.load_state_dict(ours.model.state_dict(), strict=False)  # same LLM / tower / projector weights
    llava = build_llava(plain.model, sb.bc)
    image_token = llava.model.config.image_token_index
    batch = sb.batch(ours.model, vocab_exclude=image_token)
    hf_batch = sb.batch(ours.model, image_token_run=plain.model.num_image_tokens, vocab_exclude=image_token)
    hf_inputs = {k: hf_batch[k] for k in ("input_ids", "labels", "attention_mask", "pixel_values")}
    hf_inputs["attention_mask"] = hf_inputs["attention_mask"].long()
    if hf_inputs["input_ids"].shape[1] != batch["input_ids"].shape[1] - 1 + plain.model.num_image_tokens:
        raise AssertionError("Llava and OlaVLM sequences differ in length")

    with torch.no_grad(), autocast(sb.dev, sb.bf16):  # like-for-like check before any step changes weights
        loss_ours = float(plain.model(**batch).loss)
        loss_llava = float(llava.model(**hf_inputs).loss)
    check = {"olavlm_no_task_tokens": loss_ours, "llava_hf": loss_llava, "abs_diff": abs(loss_ours - loss_llava)}

    steps = {"olavlm_ift": sb.step(ours, batch), "olavlm_ift_no_task_tokens": sb.step(plain, batch),
             "llava_hf": sb.step(llava, hf_inputs)}
    variants = measure(steps, args=args, dev=sb.dev)
    v = variants
    ratios = {
        "olavlm_ift_no_task_tokens_over_llava": ratio(v["olavlm_ift_no_task_tokens"], v["llava_hf"], goal=GOAL,
                                                      what="same sequence as Llava (num_task_tokens 0)"),
        "olavlm_ift_over_llava": ratio(v["olavlm_ift"], v["llava_hf"], goal=GOAL,
                                       what=f"with the frozen task tokens (+{ours.model.task_tokens.tokens_per_image} "
                                            "positions per image)"),
    }
    extra = {"loss_check": check,
             "trainable": {"olavlm_ift": ours.counts, "olavlm_ift_no_task_tokens": plain.counts,
                           "llava_hf": llava.counts},
             "sequence": {"olavlm_ift": batch["input_ids"].shape[1] - 1 + ours.model.tokens_per_image,
                          "olavlm_ift_no_task_tokens": batch["input_ids"].shape[1] - 1 + plain.model.tokens_per_image,
                          "llava_hf": hf_inputs["input_ids"].shape[1]}}
    path = record("ift_vs_llava", args=args, bc=sb.bc, variants=variants, ratios=ratios, extra=extra)
    print(f"{sb.describe('ift_vs_llava')}; loss check |ours - llava| = {check['abs_diff']:.2e}")
    print_summary(variants, ratios)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
