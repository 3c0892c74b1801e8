"""Goal 5: data loading samples/s (2 workers) / the model's consumption rate on the demo config (>= 3).

Both sides are measured in ONE process, in alternating rounds (loader, model, loader, model, ...),
so both see the same machine load:

* loader: ``LlavaDataset`` + batch sampler + ``Collator`` in a ``DataLoader`` with ``--workers``
  workers over COCO-like 640x480 JPEGs, 336-px ``pad`` geometry, llava_llama_3 template -- the
  pipeline of ``benchmarks/data_loading.py`` (its functions are reused), heavier images than the
  demo's 64-px ShapeWorld ones, so the ratio is conservative; worker start-up is excluded;
* model: PT steps with cached targets of a model with the ShapeWorld demo's sizes (``--config
  demo``, read from ``olavlm.demo.bootstrap.BootstrapSpec``) at the same micro batch;
  consumption = samples per second of training steps.

Result: benchmarks/results/data_vs_model.json.

    python -m benchmarks.data_vs_model [--quick] [--config demo|small|RUN.yaml] [--workers 2]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import bench_env, ratio, repeats, step_parser, summarize  # noqa: E402

bench_env()

GOAL = 3.0  # goal: the loader delivers at least 3x what the model consumes


def write_data(folder: Path, n_images: int) -> tuple[Path, Path]:
    """Images and a LLaVA-665K-like record list (data_loading's generators)."""
    import numpy as np

    from benchmarks.data_loading import make_record, write_images

    write_images(folder / "images", n_images)
    rng = np.random.default_rng(0)
    data = folder / "data.json"
    data.write_text(json.dumps([make_record(rng, i, n_images) for i in range(4 * n_images)]))
    return data, folder / "images"


def main(argv: list[str] | None = None) -> int:
    ap = step_parser(__doc__.splitlines()[0])
    ap.set_defaults(config="demo")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--loader-batches", type=int, default=None, help="batches per loader round (default 8, quick 3)")
    args = ap.parse_args(argv)
    from benchmarks.common import timed
    from benchmarks.data_loading import WORDS, bench_loader
    from benchmarks.harness import record
    from benchmarks.models import sync_fn
    from benchmarks.steps import StepBench
    from olavlm.devkit.tiny import CORPUS, train_tokenizer

    sb = StepBench.from_args(args, micro_batch=8 if args.quick else 16)
    bc, micro, bf16 = sb.bc, sb.n, sb.bf16
    pt = sb.olavlm("pt")
    model, counts = pt.model, pt.counts
    step = sb.step(pt, {**sb.batch(model), "targets": sb.targets(model)})
    sync = sync_fn(sb.dev)
    warmup, _ = repeats(args)
    rounds = args.repeat if args.repeat is not None else (3 if args.quick else 5)  # a round is ~10 s
    loader_batches = args.loader_batches or (3 if args.quick else 8)
    tokenizer = train_tokenizer(CORPUS + [" ".join(WORDS)])
    loader_rates, loader_cpu_rates, step_times, step_cpu = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="olavlm-dvm-") as tmp:
        data, images = write_data(Path(tmp), 32 if args.quick else 128)
        for _ in range(warmup):
            step()
        for _ in range(rounds):  # alternate: both sides see the same machine
            r = bench_loader(data, images, tokenizer, workers=args.workers, batches=loader_batches, micro=micro,
                             teacher_size=None)
            loader_rates.append(r["samples_per_s"])
            loader_cpu_rates.append(r["samples_per_s_cpu"])
            wall, used = timed(step, sync)
            step_times.append(wall)
            step_cpu.append(used)
    model_rates = [micro / t for t in step_times]
    loader_s, model_s = summarize(loader_rates), summarize(model_rates)
    # seconds per sample, wall and CPU: the model's (one process) and the loader's (its workers' CPU
    # spread over one core each), so ratio() gives loader rate / model rate for every statistic
    per_sample_model = summarize([t / micro for t in step_times], [c / micro for c in step_cpu])
    per_sample_loader = summarize([1 / r for r in loader_rates], [1 / r for r in loader_cpu_rates])
    ratios = {"loader_over_model": ratio(per_sample_model, per_sample_loader, goal=GOAL, better="higher",
                                         what=f"loader samples/s ({args.workers} workers) / model samples/s; CPU: "
                                              "the workers' CPU time with a core each / the model step's CPU time")}
    variants = {"model_pt_step": {"raw": step_times, **summarize(step_times, step_cpu), "throughput": None}}
    extra = {"loader_samples_per_s": {"raw": loader_rates, **loader_s},
             "loader_samples_per_s_cpu": {"raw": loader_cpu_rates, **summarize(loader_cpu_rates)},
             "seconds_per_sample": {"model": per_sample_model, "loader": per_sample_loader},
             "model_samples_per_s": {"raw": model_rates, **model_s},
             "loader": {"workers": args.workers, "batches_per_round": loader_batches, "micro_batch": micro,
                        "images": "640x480 JPEG q90 -> 336 px pad", "template": "llava_llama_3"},
             "trainable": counts, "note": "loader rounds and model steps alternate in one process"}
    path = record("data_vs_model", args=args, bc=bc, variants=variants, ratios=ratios, extra=extra)
    r = ratios["loader_over_model"]
    print(f"data_vs_model ({'bf16 autocast' if bf16 else 'fp32'}, micro batch {micro}, config {args.config}): "
          f"loader {loader_s['median']:.1f} samples/s, model {model_s['median']:.1f} samples/s, ratio "
          f"{r['value']:.2f} (wall median), {r[r['headline']]:.2f} ({r['headline']}: "
          f"{'PASS' if r['pass'] else 'FAIL'}, goal >= {GOAL})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
