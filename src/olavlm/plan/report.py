"""The readable form of a plan (``olavlm plan`` without ``--json``)."""

from __future__ import annotations

from typing import Any

from olavlm.plan.memory import ENGINES

GIB = 2**30


def _n(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def _gib(x: int | None) -> str:
    return "-" if x is None else f"{x / GIB:,.1f}"


def _size(x: int | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if x >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,} B"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  " + "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [line(header), "  " + "  ".join("-" * w for w in widths), *[line(r) for r in rows]]


def render(plan: dict[str, Any]) -> str:
    w, g, b = plan["world"], plan["gpu"], plan["batch"]
    out = [f"olavlm plan: {plan['config'] or 'run config'} -- stage {plan['stage']}, engine {plan['engine']}, "
           f"{w['nodes']} node(s) x {w['gpus_per_node']} GPU(s) = {w['world_size']} x {g['name']}",
           f"  LLM {plan['model']['llm']}; vision {plan['model']['vision_tower']}; "
           f"{plan['model']['image_tokens']} image + {plan['model']['tokens_per_image'] - plan['model']['image_tokens']} "
           f"task tokens per image", ""]
    p = plan["parameters"]
    out.append("Parameters (exact; trainable per stage from olavlm.train.stages)")
    stages = list(p["stages"])
    rows = []
    for group, c in p["groups"].items():
        row = [group, _n(c["params"]), "/".join(c["dtypes"]) or "-"]
        row += [_n(p["stages"][s].get(group, {}).get("trainable")) for s in stages]
        rows.append(row)
    rows.append(["total", _n(p["total"]), "", *[_n(sum(v["trainable"] for v in p["stages"][s].values())) for s in stages]])
    out += _table(["group", "params", "dtype", *[f"trains in {s}" for s in stages]], rows)
    if p["predictors"]:
        out += ["", "Predictors (per task and LLM layer)"]
        rows = [[task, ", ".join(str(layer) for layer in v["per_layer"]), _n(next(iter(v["per_layer"].values()))),
                 f"D={v['dim']} Q={v['queries']} C={v['out_dim']}", "x".join(map(str, v["output_shape"]))]
                for task, v in p["predictors"].items()]
        out += _table(["task", "layers", "params each", "width", "output"], rows)
    if plan["teachers"]:
        out += ["", "Teachers (frozen, outside the model; kept modules only)"]
        rows = [[task, v["class"], _n(v["params"]), v["dtype"], str(v["input_size"]), "x".join(map(str, v["target_shape"])),
                 "online" if v["online"] else "cached"] for task, v in plan["teachers"].items()]
        out += _table(["task", "class", "params", "dtype", "input px", "target", "targets"], rows)
    out += ["", f"Memory per GPU, GiB (micro-batch {b['micro']}, sequence {b['sequence_length']}, "
                f"{'bf16' if b['activation_bytes'] == 2 else 'fp32'} activations; formulas in docs/cluster.md)"]
    mem = plan["memory"]
    keys = [("weights", "weights"), ("grads", "grads"), ("optimizer", "optimizer"), ("buffers", "buffers / working set"),
            ("teachers", "teachers"), ("activations", "activations"), ("activations_ckpt", "activations, ckpt"),
            ("transient", "tower/teacher peak"), ("total", "total"), ("total_ckpt", "total, ckpt")]
    rows = [[label, *[_gib(mem[e][k]) for e in ENGINES]] for k, label in keys]
    rows.append([f"fits {g['memory_gib']:g} GiB", *["yes" if mem[e]["fits"] else "NO" for e in ENGINES]])
    out += _table(["", *ENGINES], rows)
    f, s, t = plan["flops"], plan["steps"], plan["time"]
    out += ["", f"FLOPs per optimizer step (global batch {b['global']}, accumulation {b['accumulation']}; "
                "model FLOPs, forward + backward)"]
    rows = [[k, f"{v / 1e15:,.2f}"] for k, v in f["per_step"].items()]
    rows.append(["total", f"{f['total_per_step'] / 1e15:,.2f}"])
    if f["recompute_per_step"]:
        rows.append(["+ checkpoint recompute", f"{f['recompute_per_step'] / 1e15:,.2f}"])
    out += _table(["component", "PFLOP"], rows)
    out += ["", f"Steps: {_n(s['total'])} ({_n(s['steps_per_epoch'])} per epoch x {s['epochs']}; "
                f"{_n(s['samples'])} samples, {s['samples_source']})"]
    if t["seconds_per_step"]:
        hours = f", {t['hours_total']:,.1f} h for the stage ({t['gpu_hours_total']:,.0f} GPU-hours)" if t["hours_total"] else ""
        out.append(f"Time at {t['mfu']:.0%} MFU of {t['peak_tflops_per_gpu']:g} TFLOP/s per GPU: "
                   f"{t['seconds_per_step']:,.2f} s per step{hours}")
    c, k = plan["target_cache"], plan["checkpoints"]
    if plan["stage"] == "pt":
        out.append(f"Target cache: {_size(c['bytes_per_image'])} per image ({c['dtype']}) -> {_size(c['bytes'])} "
                   f"for {_n(c['images'])} images")
    out.append("Checkpoints: periodic " + ", ".join(f"{e} {_size(v)}" for e, v in k["periodic"].items())
               + f" (x keep_last {k['keep_last']}); final/ " + ", ".join(f"{e} {_size(v)}" for e, v in k["final"].items()))
    if plan["notes"]:
        out += ["", "Notes:", *[f"  - {n}" for n in plan["notes"]]]
    return "\n".join(out)
