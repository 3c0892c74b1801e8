"""The demo's report: report.md, report.json, loss.png, probe.png (numbers as they came out)."""

from __future__ import annotations

import json
import math
from pathlib import Path

TASK_ORDER = ("Count", "Relation", "Depth", "Distance")


def _stats(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": values}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals), "values": values}


def aggregate(runs: list[dict]) -> dict:
    """{variant: {"cvbench": {metric: stats}, "probe": {stage: {task: {"cosine" | "centred": {layer: stats},
    "constant": stats}}}}}."""
    out: dict = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        cvb = {key: _stats([r["cvbench"].get(key) for r in rs]) for key in ("overall", "2D", "3D")}
        tasks = sorted({t for r in rs for t in r["cvbench"]["by_task"]}, key=lambda t: (t not in TASK_ORDER, TASK_ORDER.index(t) if t in TASK_ORDER else 0, t))
        for t in tasks:
            cvb[t] = _stats([r["cvbench"]["by_task"].get(t) for r in rs])
        probe: dict = {}
        for stage in rs[0]["probe"]:
            probe[stage] = {}
            for task in rs[0]["probe"][stage]:
                layers = rs[0]["probe"][stage][task]["layers"]
                probe[stage][task] = {
                    metric: {lay: _stats([r["probe"][stage][task]["layers"][lay][key] for r in rs]) for lay in layers}
                    for metric, key in (("cosine", "cosine"), ("centred", "centred_cosine"))}
                probe[stage][task]["constant"] = _stats([r["probe"][stage][task]["constant_cosine"] for r in rs])
        out[variant] = {"cvbench": cvb, "probe": probe, "seeds": [r["seed"] for r in rs]}
    return out


def _fmt(s: dict, pct: bool = False) -> str:
    if s["mean"] is None:
        return "-"
    scale = 100 if pct else 1
    text = f"{scale * s['mean']:.1f}" if pct else f"{s['mean']:.3f}"
    if s["n"] > 1:
        text += f" ± {scale * s['std']:.1f}" if pct else f" ± {s['std']:.3f}"
    return text


def _read_metrics(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def plot_losses(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=120)
    seen = set()
    for r in runs:
        if r["variant"] in seen:  # first seed of each variant
            continue
        seen.add(r["variant"])
        style = "-" if r["variant"] == "ola" else "--"
        pt = _read_metrics(r["metrics"]["pt"])
        for key in ("loss/ntp", "loss/depth", "loss/seg", "loss/gen"):
            pts = [(m["step"], m[key]) for m in pt if m.get(key) is not None]
            if pts:
                axes[0].plot(*zip(*pts), style, label=f"{r['variant']} {key}")
        ift = _read_metrics(r["metrics"]["ift"])
        pts = [(m["step"], m["loss"]) for m in ift if m.get("loss") is not None]
        if pts:
            axes[1].plot(*zip(*pts), style, label=f"{r['variant']} loss (NTP)")
    axes[0].set_title("PT", fontsize=9)
    axes[1].set_title("IFT", fontsize=9)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_probes(agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for v in agg.values() for st in v["probe"].values() for t in st})
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(3.3 * max(1, len(tasks)), 3.0), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for variant, v in agg.items():
            for stage, per_task in v["probe"].items():
                if task not in per_task:
                    continue
                entry = per_task[task]["centred"]
                xs = [int(k) for k in entry]
                ys = [entry[k]["mean"] for k in entry]
                es = [entry[k]["std"] or 0.0 for k in entry]
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2,
                            ls="-" if variant == "ola" else "--", label=f"{variant} after {stage.upper()}")
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_title(f"{task} probe", fontsize=8)
        ax.set_xlabel("LLM layer")
        ax.set_ylabel("held-out centred cosine")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(info: dict, agg: dict, runs: list[dict]) -> str:
    variants = list(agg)
    boot = info["bootstrap"]
    lines = [
        "# ShapeWorld demo report",
        "",
        f"Seed(s): {info['seeds']} · quick: {info['quick']} · compare: {info['compare']} · "
        f"total {info['seconds']['total']:.0f} s (generate {info['seconds']['generate']:.0f} s, "
        f"bootstrap {info['seconds']['bootstrap']:.0f} s{' cached' if boot.get('cached') else ''}).",
        "",
        "## What ran",
        "",
        "1. `generate`: ShapeWorld images with ground-truth depth / class maps, written as pretrain.json, "
        "allava_caption.json, instruct.json, cvbench.jsonl (held out), probe.json (held out).",
        f"2. `bootstrap`: BPE tokenizer ({boot.get('vocab')} tokens); Llama LM loss "
        f"{boot['llm']['loss_first']:.3f} -> {boot['llm']['loss_last']:.3f} in {boot['llm']['steps']} steps; "
        f"CLIP vision tower caption-attribute BCE {boot['vision']['loss_first']:.3f} -> "
        f"{boot['vision']['loss_last']:.3f} in {boot['vision']['steps']} steps.",
        f"3. PT with `{info['config_dir']}/pt.yaml` through `olavlm train` (ola: NTP + depth/seg/gen embedding "
        "losses vs the oracle teachers; baseline: the same with every task's `layers: []`).",
        f"4. IFT with `{info['config_dir']}/ift.yaml` through `olavlm train` (NTP only; task tokens frozen).",
        "5. `eval cvbench` on the held-out cvbench.jsonl (greedy); `probe` of every LLM layer for each "
        "teacher's targets on held-out probe images (one-block resampler probe, smooth-L1, held-out cosine).",
        "",
        "## Training",
        "",
        "| variant | seed | PT steps | PT final loss | IFT steps | IFT final loss | PT s | IFT s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        ptl = _read_metrics(r["metrics"]["pt"])
        iftl = _read_metrics(r["metrics"]["ift"])
        lines.append(f"| {r['variant']} | {r['seed']} | {r['pt'].get('steps')} | "
                     f"{ptl[-1]['loss']:.3f} | {r['ift'].get('steps')} | {iftl[-1]['loss']:.3f} | "
                     f"{r['pt'].get('wall_time_s', 0):.0f} | {r['ift'].get('wall_time_s', 0):.0f} |" if ptl and iftl else
                     f"| {r['variant']} | {r['seed']} | {r['pt'].get('steps')} | - | {r['ift'].get('steps')} | - | - | - |")
    n_cvb = runs[0]["cvbench"]["n"]
    lines += ["", f"## CV-Bench format accuracy (%; {n_cvb} held-out items"
              f"{', mean ± std over seeds' if len(info['seeds']) > 1 else ''})", "",
              "| metric | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    metrics = list(next(iter(agg.values()))["cvbench"])
    for m in metrics:
        lines.append(f"| {m} | " + " | ".join(_fmt(agg[v]["cvbench"][m], pct=True) for v in variants) + " |")
    lines += ["", "Predicted options per task (a constant letter means the model ignores the image for that task):", ""]
    for r in runs:
        hist: dict = {}
        for item in r.get("cvbench_items", []):
            hist.setdefault(item["task"], {}).setdefault(item["prediction"] or "none", 0)
            hist[item["task"]][item["prediction"] or "none"] += 1
        cells = "; ".join(f"{task} " + " ".join(f"{k}:{v}" for k, v in sorted(h.items()))
                          for task, h in hist.items())
        lines.append(f"- {r['variant']} seed {r['seed']}: {cells}")
    lines += ["", "## Probes per LLM layer (held-out images)", "",
              "Centred cosine = cosine after subtracting the training-set mean target from prediction and "
              "target: how much of the image-specific part of the teacher's target the layer carries (0 = no "
              "better than a constant). The raw cosine (the paper's metric) is shown too; with ShapeWorld's "
              "near-identical backgrounds the constant mean target already scores close to 1 on it.", ""]
    for stage in next(iter(agg.values()))["probe"]:
        for task in next(iter(agg.values()))["probe"][stage]:
            layers = list(agg[variants[0]]["probe"][stage][task]["centred"])
            lines += [f"**{task}** (model after {stage.upper()})", "",
                      "| layer | " + " | ".join(f"{v} centred | {v} raw" for v in variants) + " |",
                      "|---|" + "---|---|" * len(variants)]
            for lay in layers:
                cells = [f"{_fmt(agg[v]['probe'][stage][task]['centred'][lay])} | "
                         f"{_fmt(agg[v]['probe'][stage][task]['cosine'][lay])}" for v in variants]
                lines.append(f"| {lay} | " + " | ".join(cells) + " |")
            lines.append("| constant (mean target) | " + " | ".join(
                f"0 | {_fmt(agg[v]['probe'][stage][task]['constant'])}" for v in variants) + " |")
            lines.append("")
    lines += ["Reported as measured, with the seed(s) above; a single small run is noisy, so compare "
              "variants with `--compare --seeds 3`. Files: report.json (all numbers), loss.png, probe.png, "
              "runs/seed*/<variant>/{pt,ift}/ (configs, metrics, final models), runs/seed*/<variant>/cvbench.json.", ""]
    return "\n".join(lines)


def write_report(out: Path, info: dict, runs: list[dict]) -> dict:
    agg = aggregate(runs)
    report = {**info, "summary": agg, "runs": runs}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "report.md").write_text(markdown(info, agg, runs))
    plot_losses(runs, out / "loss.png")
    plot_probes(agg, out / "probe.png")
    return report
