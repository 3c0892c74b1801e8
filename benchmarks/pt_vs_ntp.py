"""Goal 1: a PT step with all three embedding losses on cached targets / a plain NTP step (<= 1.10).

Variants, timed side by side in one process (interleaved), same model instance, same batch:

* ``pt_cached``: PT step -- NTP + depth/seg/gen predictors at their layers (hook capture) +
  smooth-L1 + InfoNCE, targets = precomputed tensors in the batch (what a TargetCache delivers);
* ``ntp``: the same model and trainable set (projector, task tokens, predictors, logit scales),
  forward without targets: NTP only (predictors not run) -- the "plain NTP step of the same model";
* ``ntp_plain``: a LLaVA-1.5 model of the same LLM/tower (no task tokens, no predictors), NTP only
  (information: what the 24 task tokens per image cost on their own).

Each is a full training step: forward under the trainer's autocast, backward, clipping, AdamW.
Result: benchmarks/results/pt_vs_ntp.json.

    python -m benchmarks.pt_vs_ntp [--quick] [--config small|RUN.yaml] [--batch B] [--text-len T]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import bench_env, ratio, step_parser  # noqa: E402

bench_env()

GOAL = 1.10  # goal: a PT step with cached targets costs at most 10 % more than NTP


def main(argv: list[str] | None = None) -> int:
    args = step_parser(__doc__.splitlines()[0]).parse_args(argv)
    from benchmarks.flops import forward_split
    from benchmarks.harness import measure, print_summary, record
    from benchmarks.models import autocast
    from benchmarks.steps import StepBench

    sb = StepBench.from_args(args)
    pt, plain = sb.olavlm("pt"), sb.olavlm("pt", plain=True)
    model = pt.model
    batch = sb.batch(model)
    targets = sb.targets(model)
    steps = {"pt_cached": sb.step(pt, {**batch, "targets": targets}), "ntp": sb.step(pt, batch),
             "ntp_plain": sb.step(plain, batch)}
    variants = measure(steps, args=args, dev=sb.dev)
    v = variants
    ratios = {
        "pt_cached_over_ntp": ratio(v["pt_cached"], v["ntp"], goal=GOAL,
                                    what="PT step (3 embedding losses, cached targets) / NTP step, same model"),
        "pt_cached_over_ntp_plain": ratio(v["pt_cached"], v["ntp_plain"],
                                          what="PT step / NTP step of the LLaVA-1.5 model (no task tokens)"),
        "ntp_over_ntp_plain": ratio(v["ntp"], v["ntp_plain"], what="cost of the task tokens in the sequence"),
    }
    t = sb.bc.text_len
    extra = {"trainable": {"olavlm_pt": pt.counts, "plain": plain.counts},
             "sequence": {"tokens_per_image": model.tokens_per_image,
                          "plain_tokens_per_image": plain.model.tokens_per_image,
                          "expanded_length": t - 1 + model.tokens_per_image,
                          "plain_expanded_length": t - 1 + plain.model.tokens_per_image},
             "target_shapes": {k: list(s) for k, s in model.target_shapes.items()}}
    if not args.no_flops:
        # how much of the time ratio is more work (counted FLOPs) and how much per-kernel overhead
        extra["flops_ratio_pt_cached_over_ntp"] = (v["pt_cached"]["throughput"]["step_flops"]
                                                   / v["ntp"]["throughput"]["step_flops"])
        # forward FLOPs per component (module attribution is exact in forward)
        parts = {name: f"OlaVLM.{name}" for name in ("llm", "vision", "projector", "predictors")}
        extra["forward_flops_by_component"] = forward_split(model, {**batch, "targets": targets}, parts,
                                                            autocast=autocast(sb.dev, sb.bf16))
    path = record("pt_vs_ntp", args=args, bc=sb.bc, variants=variants, ratios=ratios, extra=extra)
    print(sb.describe("pt_vs_ntp"))
    print_summary(variants, ratios)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
