"""`olavlm eval cvbench|mmstar|all ...` and `olavlm probe ...`."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a trained model on a benchmark (cvbench, mmstar, all)")
    ev_sub = ev.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    p = ev_sub.add_parser("cvbench", help="CV-Bench protocol (docs/evaluation.md): accuracy per source/task, 2D, 3D, overall",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="trained model folder (RUN_DIR/final)")
    p.add_argument("--data", required=True, help="CV-Bench test.jsonl (real layout) or ShapeWorld cvbench.jsonl")
    p.add_argument("--image-root", default=None, help="folder the records' 'filename' is relative to; "
                                                      "None = the jsonl's folder")
    p.add_argument("--output", default=None, help="write scores + every item's output here (JSON)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy decoding length")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    _processor_args(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...; None = cuda if available")
    p.set_defaults(func=_cvbench)

    m = ev_sub.add_parser("mmstar", help="MMStar: the benchmark's prompt and matching; overall + per category",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--model", required=True, help="trained model folder (RUN_DIR/final)")
    m.add_argument("--data", required=True, help="MMStar.tsv (hub layout) or a jsonl with image paths")
    m.add_argument("--output", default=None, help="write scores + every item's output here (JSON); "
                                                  "also makes a killed run resumable")
    _decoding_args(m)
    m.set_defaults(func=_mmstar)

    a = ev_sub.add_parser("all", help="every benchmark present (CV-Bench, MMStar): the paper's table as markdown + JSON",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--model", required=True, nargs="+", help="one or more trained model folders (one row each)")
    a.add_argument("--names", nargs="+", default=None, help="row labels; None = the run folder names")
    a.add_argument("--data-root", default="datasets", help="where `olavlm data prepare` put cv-bench and mmstar")
    a.add_argument("--cvbench", default=None, help="CV-Bench test.jsonl; None = DATA_ROOT/CV-Bench/test.jsonl")
    a.add_argument("--mmstar", default=None, help="MMStar file; None = DATA_ROOT/MMStar/MMStar.tsv")
    a.add_argument("--output", default="eval_results", help="folder for table.md, table.json and per-model results")
    a.add_argument("--max-new-tokens", type=int, default=8, help="greedy decoding length")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--limit", type=int, default=None, help="only the first N items of each benchmark")
    a.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...; None = cuda if available")
    a.set_defaults(func=_all)

    pr = sub.add_parser("probe", help="probe each LLM layer for a teacher's targets (held-out cosine per layer); "
                                      "`probe eval` scores the probes of `train.stage: probe` runs",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pr.add_argument("action", nargs="?", choices=["eval"], default=None,
                    help="eval: stream --data through the probes of --probes runs (JSON + one PNG per teacher)")
    pr.add_argument("--probes", nargs="+", default=None, help="eval: probe-stage run folders (one curve each)")
    pr.add_argument("--names", nargs="+", default=None, help="eval: curve labels; None = the run folder names")
    pr.add_argument("--image-folder", default=None, help="eval: image root of --data; None = the data file's folder")
    pr.add_argument("--batch-size", type=int, default=8, help="eval: images per forward")
    pr.add_argument("--model", default=None, help="trained model folder (RUN_DIR/final)")
    pr.add_argument("--data", default=None, help="LLaVA-format JSON/JSONL with images (e.g. ShapeWorld probe.json)")
    pr.add_argument("--teacher", default=None, help="a task of the model (depth, seg, gen) or a teacher name")
    pr.add_argument("--teacher-path", default=None, help="teacher weights / ShapeWorld folder; None = the task's")
    pr.add_argument("--teacher-kwargs", default=None, help='JSON, e.g. \'{"dim": 32}\'; None = the task\'s')
    pr.add_argument("--layers", default="all", help="'all' or a comma list of 1-based LLM layers")
    pr.add_argument("--image-root", default=None, help="folder image paths are relative to; None = the data file's folder")
    pr.add_argument("--output", default="probe", help="folder for probe.json and probe.png")
    pr.add_argument("--steps", type=int, default=300, help="probe optimisation steps")
    pr.add_argument("--limit", type=int, default=None, help="only the first N images")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--teacher-image-size", type=int, default=None,
                    help="side of the square the teacher reads; None = what training used (the processor's)")
    _processor_args(pr)
    pr.add_argument("--device", default=None)
    pr.set_defaults(func=_probe)
    _register_visualize(sub)


def _register_visualize(sub) -> None:
    v = sub.add_parser("visualize", help="decode the distilled layers' predictions of a PT model next to the teachers",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("--model", required=True, help="a PT final folder saved with its predictors")
    v.add_argument("--image", required=True, nargs="+", help="one or more images (one PNG each)")
    v.add_argument("--layers", default=None, help="comma list of predictor layers to show; None = all of them")
    v.add_argument("--output", default="visualize", help="folder for the PNGs")
    v.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...; None = cuda if available")
    _processor_args(v)
    v.set_defaults(func=_visualize)


def _visualize(args) -> int:
    from olavlm.errors import UserError
    from olavlm.infer.visualize import visualize

    try:
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    except ValueError:
        raise UserError(f"--layers {args.layers!r}: expected a comma list of layer numbers") from None
    res = visualize(args.model, args.image, layers=layers, output=args.output, device=args.device,
                    **_overrides(args))
    for image, r in res.items():
        print(f"{image} -> {r['png']}")
    for task, why in next(iter(res.values()))["skipped"].items():
        print(f"  {task}: skipped ({why})")
    return 0


def _processor_args(p) -> None:
    """Overrides of what the model folder's processor says (default: the processor's value)."""
    p.add_argument("--template", default=None, help="override the template of the model's processor")
    p.add_argument("--image-geometry", default=None, choices=["pad", "square", "resize"],
                   help="override the image geometry of the model's processor")
    p.add_argument("--add-bos", default=None, choices=["auto", "true", "false"],
                   help="override the BOS policy of the model's processor")


def _overrides(args) -> dict:
    return {"template": args.template, "image_geometry": args.image_geometry, "add_bos": args.add_bos}


def _decoding_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy decoding length")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    _processor_args(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...; None = cuda if available")


def _mmstar(args) -> int:
    from olavlm.evaluation.mmstar import format_table, run_mmstar

    res = run_mmstar(args.model, args.data, output=args.output, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, limit=args.limit, template=args.template,
                     image_geometry=args.image_geometry, add_bos=args.add_bos, device=args.device)
    print(format_table(res))
    return 0


def _all(args) -> int:
    from pathlib import Path

    from olavlm.evaluation.table import markdown, run_all

    table = run_all(args.model, data_root=args.data_root, cvbench=args.cvbench, mmstar=args.mmstar,
                    output=args.output, names=args.names, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, limit=args.limit, device=args.device)
    print(markdown(table["rows"]), end="")
    print(f"wrote {Path(args.output) / 'table.md'} and table.json")
    return 0


def _cvbench(args) -> int:
    from olavlm.evaluation.cvbench import format_table, run_cvbench

    res = run_cvbench(args.model, args.data, args.image_root, output=args.output,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                      template=args.template, image_geometry=args.image_geometry, add_bos=args.add_bos,
                      device=args.device)
    print(format_table(res))
    return 0


def _probe_eval(args) -> int:
    from olavlm.errors import UserError
    from olavlm.evaluation.probe_eval import run_probe_eval

    if not args.probes or not args.data:
        raise UserError("probe eval: --probes RUN [RUN ...] and --data HELD_OUT are required")
    res = run_probe_eval(args.probes, args.data, output=args.output, names=args.names,
                         image_folder=args.image_folder, batch_size=args.batch_size, limit=args.limit,
                         device=args.device)
    for name, by_task in res.items():
        for task, r in by_task.items():
            print(f"{name} / {task} ({r['n_images']} images; mean-target cosine {r['constant_cosine']:.3f})")
            for layer, v in r["layers"].items():
                print(f"  layer {layer:>3}: cosine {v['cosine']:.3f} ± {v['cosine_std']:.3f}   "
                      f"centred cosine {v['centred_cosine']:.3f}")
    print(f"wrote {args.output}/probe_eval.json and probe_<task>.png")
    return 0


def _probe(args) -> int:
    from olavlm.errors import UserError
    from olavlm.evaluation.probe import ProbeSpec, run_probe

    if args.action == "eval":
        return _probe_eval(args)
    missing = [f"--{k}" for k in ("model", "data", "teacher") if getattr(args, k) is None]
    if missing:
        raise UserError(f"probe: {', '.join(missing)} required (or `olavlm probe eval --probes ...`)")

    kwargs = json.loads(args.teacher_kwargs) if args.teacher_kwargs else None
    res = run_probe(args.model, args.data, args.teacher, teacher_path=args.teacher_path, teacher_kwargs=kwargs,
                    layers=args.layers, image_root=args.image_root, output=args.output,
                    spec=ProbeSpec(steps=args.steps, seed=args.seed), limit=args.limit, device=args.device,
                    teacher_image_size=args.teacher_image_size, **_overrides(args))
    print(f"probe {res['teacher']} ({res['n_train']} train / {res['n_test']} held-out images); "
          f"mean-target baseline cosine {res['constant_cosine']:.3f}")
    for layer, r in res["layers"].items():
        print(f"  layer {layer:>3}: cosine {r['cosine']:.3f} ± {r['cosine_std']:.3f}   "
              f"centred cosine {r['centred_cosine']:.3f}")
    print(f"wrote {args.output}/probe.json and probe.png")
    return 0
