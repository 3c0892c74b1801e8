"""Goal 5: data loading samples/s (2 workers) / the model's consumption rate on the demo config (>= 3).

The loader side is ``benchmarks/data_loading.py``'s result (``loader.samples_per_s``: dataset +
collate, 2 workers, 336-px COCO-like JPEGs -- heavier images than the demo's 64-px ShapeWorld ones,
so the ratio is conservative); run that first (``benchmarks.run`` orders it so). The model side is
measured here: PT steps with cached targets of a model with the ShapeWorld demo's sizes
(``--config demo``, read from ``olavlm.shapeworld.bootstrap.BootstrapSpec``) at the loader's micro
batch; consumption = samples per second of training steps. Both sides use the whole machine, one
after the other. Result: benchmarks/results/data_vs_model.json.

    python -m benchmarks.data_vs_model [--quick] [--config demo|small|RUN.yaml]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import bench_env, results_dir, step_parser  # noqa: E402

bench_env()

GOAL = 3.0  # issue 8: the loader delivers at least 3x what the model consumes


def main(argv: list[str] | None = None) -> int:
    ap = step_parser(__doc__.splitlines()[0])
    ap.set_defaults(config="demo")
    args = ap.parse_args(argv)
    source = results_dir() / "data_loading.json"
    if not source.is_file():
        print(f"error: {source} not found; run `python benchmarks/data_loading.py` first", file=sys.stderr)
        return 2
    import torch

    from benchmarks import models as M
    from benchmarks.common import ratio
    from benchmarks.harness import measure, print_summary, record
    loading = json.loads(source.read_text())
    micro = args.batch or int(loading["loader"]["micro_batch"])
    M.quiet()
    bc = M.load_bench_config(args.config, quick=args.quick, text_len=args.text_len, micro_batch=micro,
                             overrides=args.override, bf16=args.bf16)
    dev, bf16 = M.device(), bc.run.train.bf16
    model, opt, counts = M.build_olavlm(bc, "pt")
    batch = M.to_device(M.synthetic_batch(model, micro, bc.text_len), dev)
    target_dtype = torch.bfloat16 if bf16 else torch.float32
    batch["targets"] = M.to_device(M.random_targets(model.target_shapes, micro, target_dtype), dev)
    step = M.make_step(model, opt, batch, bf16=bf16, max_grad_norm=bc.run.train.max_grad_norm)
    variants = measure({"model_pt_step": step}, args=args, dev=dev)
    step_s = variants["model_pt_step"]
    consume = {"median": micro / step_s["median"], "min": micro / step_s["max"], "max": micro / step_s["min"]}
    ratios = {}
    for key, label in (("loader", "loader_over_model"),
                       ("loader_with_teacher_images", "loader_teacher_images_over_model")):
        if key in loading:
            rate = float(loading[key]["samples_per_s"])
            r = ratio({"median": rate, "min": rate, "max": rate}, consume, goal=GOAL if key == "loader" else None,
                      better="higher", what=f"data_loading.{key}.samples_per_s / model samples/s")
            ratios[label] = r
    extra = {"model_samples_per_s": consume, "loader": {k: loading[k] for k in ("loader", "loader_with_teacher_images")
                                                        if k in loading},
             "data_loading_written": loading.get("written"), "trainable": counts,
             "note": "loader and model measured one after the other, each with the whole machine"}
    path = record("data_vs_model", args=args, bc=bc, variants=variants, ratios=ratios, extra=extra)
    print(f"data_vs_model ({'bf16 autocast' if bf16 else 'fp32'}, micro batch {micro}, config {args.config}): "
          f"model consumes {consume['median']:.1f} samples/s")
    print_summary(variants, ratios)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
