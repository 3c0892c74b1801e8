"""Goal 6: a PT step with online teachers / the same step with cached targets.

Same model, batch and trainable set; timed side by side (interleaved):

* ``pt_cached``: targets are precomputed tensors in the batch (``olavlm targets precompute`` + a
  TargetCache);
* ``pt_online``: every step first runs the three frozen teachers, batched, under no_grad in the
  teacher dtype (bf16 with bf16 autocast, else fp32) on the batch's uint8 squares -- exactly what
  ``olavlm.train.loop.model_inputs`` does when no cache is configured;
* ``teachers_only``: the three batched teacher encodes alone (the difference, measured directly).

With the small config the teachers are ``olavlm.devkit.teachers`` at scale 2 (the real classes with
small random configs), so their share is small here; with ``--config`` a real recipe's teachers
(Depth-Anything-V2-L, OneFormer Swin-L, unCLIP ViT-H) are loaded from its teacher paths.
FLOPs per teacher are recorded separately. Result: benchmarks/results/online_vs_cached.json.

    python -m benchmarks.online_vs_cached [--quick] [--config small|RUN.yaml] [--batch B] [--text-len T]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import bench_env, ratio, step_parser  # noqa: E402

bench_env()


def main(argv: list[str] | None = None) -> int:
    args = step_parser(__doc__.splitlines()[0]).parse_args(argv)
    import torch

    from benchmarks.flops import teacher_forward
    from benchmarks.harness import measure, print_summary, record
    from benchmarks.models import write_small_teachers
    from benchmarks.steps import StepBench

    sb = StepBench.from_args(args)
    write_small_teachers(sb.bc)
    pt = sb.olavlm("pt")
    model, n = pt.model, sb.n
    teachers, teacher_dtype = sb.teachers(model)
    side = teachers.input_size
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g).to(sb.dev)
    batch = sb.batch(model)
    cached = {k: v.to(sb.dev) for k, v in teachers.encode(images).items()}  # what the cache would hold

    def online(inputs: dict) -> dict:
        return {**inputs, "targets": teachers.encode(images)}

    steps = {"pt_cached": sb.step(pt, {**batch, "targets": cached}), "pt_online": sb.step(pt, batch, before=online),
             "teachers_only": lambda: teachers.encode(images)}
    variants = measure(steps, args=args, dev=sb.dev)
    v = variants
    ratios = {"pt_online_over_pt_cached": ratio(v["pt_online"], v["pt_cached"],
                                                what="PT step with online teachers / with cached targets"),
              "teachers_share_of_online": ratio(v["teachers_only"], v["pt_online"],
                                                what="teacher encodes / online PT step")}
    teacher_info = {task: {"class": type(t).__name__, "source": t.source, "input_size": t.input_size,
                           "params": sum(p.numel() for p in t.parameters()),
                           "target_shape": list(t.target_shape)} for task, t in teachers.teachers.items()}
    extra = {"teachers": teacher_info, "teacher_dtype": str(teacher_dtype).replace("torch.", ""),
             "teacher_forward_flops": teacher_forward(teachers, images), "teacher_image_side": side,
             "trainable": pt.counts}
    path = record("online_vs_cached", args=args, bc=sb.bc, variants=variants, ratios=ratios, extra=extra)
    print(sb.describe("online_vs_cached"))
    print_summary(variants, ratios)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
