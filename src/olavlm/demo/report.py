"""The demo's report: report.md, report.json, loss.png, probe.png (numbers as they came out)."""

from __future__ import annotations

import json
import math
from collections import Counter
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
        probe: dict = {}  # a variant's own tasks (viral) are probed on its model only
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


def _read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(runs: list[dict], out: Path, path: Path) -> None:
    """PT NTP, PT embedding losses (OLA) and IFT NTP per variant: raw (faint) and smoothed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=120)
    colours = {"ola": "tab:blue", "baseline": "tab:orange", "viral": "tab:green"}
    seen = set()
    for r in runs:
        if r["variant"] in seen:  # first seed of each variant
            continue
        seen.add(r["variant"])
        colour = colours.get(r["variant"], "tab:grey")
        for ax, stage, keys in ((axes[0], "pt", ("loss/ntp",)), (axes[1], "pt", ("loss/depth", "loss/seg", "loss/gen")),
                                (axes[2], "ift", ("loss/ntp", "loss/viral"))):
            rows = _read_metrics(out / r["metrics"][stage])
            for k, key in enumerate(keys):
                pts = [(m["step"], m[key]) for m in rows if m.get(key) is not None]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                c = colour if k == 0 and stage == "ift" or len(keys) == 1 else f"C{k + 2}"
                ax.plot(xs, ys, color=c, alpha=0.25, lw=0.7)
                ax.plot(xs, _smooth(list(ys), max(1, len(ys) // 15)), color=c, lw=1.6,
                        label=f"{r['variant']} {key.split('/')[1]}")
    for ax, title in zip(axes, ("PT: next-token loss", "PT: embedding losses (OLA only)", "IFT: next-token (+ alignment, VIRAL)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        if ax.lines:
            ax.legend(fontsize=7)
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
                            ls={"ola": "-", "viral": ":"}.get(variant, "--"), label=f"{variant} after {stage.upper()}")
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_title(f"{task} probe", fontsize=8)
        ax.set_xlabel("LLM layer")
        ax.set_ylabel("held-out centred cosine")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


DIFFS = (("ola", "diff", "OLA - baseline"), ("viral", "viral_diff", "VIRAL - baseline"))  # (variant, key, column)


def _diffs(variants) -> list[tuple[str, str, str]]:
    """The (variant, key, column) of each "<method> - baseline" column the variants allow."""
    return [d for d in DIFFS if "baseline" in variants and d[0] in variants]


def task_table(runs: list[dict]) -> dict:
    """Per CV-Bench task: accuracy per variant (stats over seeds), OLA - baseline and VIRAL - baseline
    (stats of the per-seed differences), chance, the best constant-letter answer and the
    predicted-letter counts."""
    tasks = sorted({i["task"] for r in runs for i in r["cvbench_items"]},
                   key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    first = runs[0]["cvbench_items"]  # the held-out items are the same for every run
    out = {}
    for t in tasks:
        items = [i for i in first if i["task"] == t]
        letters = Counter(i["answer"] for i in items)
        n_choices = max(1, max(int(i.get("n_choices") or 0) for i in items))
        row = {"n": len(items), "chance": 1.0 / n_choices,
               "best_constant": max(letters.values()) / len(items), "best_constant_letter": letters.most_common(1)[0][0]}
        acc = {v: {r["seed"]: r["cvbench"]["by_task"].get(t) for r in runs if r["variant"] == v} for v in variants}
        for v in variants:
            row[v] = _stats(list(acc[v].values()))
            row[f"{v}_letters"] = dict(sorted(Counter(i["prediction"] or "none" for r in runs if r["variant"] == v
                                                      for i in r["cvbench_items"] if i["task"] == t).items()))
        for v, key, _ in _diffs(variants):
            seeds = sorted(set(acc[v]) & set(acc["baseline"]))
            row[key] = _stats([acc[v][s] - acc["baseline"][s] for s in seeds])
        out[t] = row
    return out


def _pp(s: dict | None, signed: bool = False) -> str:
    if not s or s["mean"] is None:
        return "-"
    text = f"{100 * s['mean']:+.1f}" if signed else f"{100 * s['mean']:.1f}"
    return text + (f" ± {100 * s['std']:.1f}" if s["n"] > 1 else "")


def summary_lines(info: dict, agg: dict, table: dict) -> list[str]:
    """The five lines the report opens with."""
    sec, seeds = info["seconds"], info["seeds"]
    diffs = _diffs(agg)
    both = bool(diffs)
    over = {v: _pp(agg[v]["cvbench"]["overall"]) for v in agg}
    over_diff = {key: _stats([a - b for a, b in zip(agg[v]["cvbench"]["overall"]["values"],
                                                     agg["baseline"]["cvbench"]["overall"]["values"])])
                 for v, key, _ in diffs}
    n_items = sum(row["n"] for row in table.values())
    lines = [
        f"1. **What ran**: ShapeWorld (world seed {info['seed']}) -> bootstrap -> PT -> IFT -> held-out CV-Bench-format "
        f"eval + probes, for {', '.join(agg)} ({_what_differs(agg)}), "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}{' (quick smoke size)' if info['quick'] else ''}.",
        f"2. **Time**: {sec['total']:.0f} s in all (generate {sec['generate']:.0f} s, bootstrap {sec['bootstrap']:.0f} s"
        f"{' cached' if info['bootstrap'].get('cached') else ''}, {sec['per_model']:.0f} s per trained model on average, "
        f"{info.get('jobs', 1)} training process(es)); {info['threads']} torch thread(s) each; load average {info['load_start']} at start, {info['load_end']} at the end.",
        f"3. **CV-Bench format, overall** ({n_items} held-out items): " + ", ".join(f"{v} {over[v]} %" for v in agg)
        + "".join(f"; {col} {_pp(over_diff[key], signed=True)} points" for _, key, col in diffs) + ".",
    ]
    if both:
        lines.append("4. **" + " and ".join(col for *_, col in diffs) + " per task** (points"
                     + (", mean ± std over seeds" if len(seeds) > 1 else "") + "): "
                     + "; ".join(", ".join(f"{t} {_pp(row[key], signed=True)}" for t, row in table.items())
                                 + (f" ({col.split()[0]})" if len(diffs) > 1 else "") for _, key, col in diffs) + ".")
    else:
        lines.append("4. **Per task**: " + ", ".join(f"{t} {_pp(row[next(iter(agg))])} %" for t, row in table.items()) + ".")
    grounded = []
    for v in agg:
        ok = [t for t, row in table.items() if row[v]["mean"] is not None and row[v]["mean"] >= _target(row)
              and row[v]["mean"] > row["best_constant"]]
        grounded.append(f"{v} {len(ok)}/{len(table)}")
    lines.append("5. **Answers from the image** (tasks at target: 2-choice >= 75 %, 4-choice >= 50 %, and above "
                 "the best constant letter): " + ", ".join(grounded) + ".")
    return lines


def _what_differs(agg: dict) -> str:
    if len(agg) == 1:
        return "one variant"
    parts = [{"ola": "ola adds the embedding losses in PT", "viral": "viral adds the alignment loss in IFT"}[v]
             for v in agg if v in ("ola", "viral")]
    return "same data, models and steps; " + "; ".join(parts) if parts else "same data, models and steps"


def _target(row: dict) -> float:
    return 0.75 if row["chance"] >= 0.5 else 0.5


def markdown(info: dict, agg: dict, runs: list[dict]) -> str:
    variants = list(agg)
    boot = info["bootstrap"]
    table = task_table(runs)
    multi = len(info["seeds"]) > 1
    diffs = _diffs(variants)
    lines = ["# ShapeWorld demo report", "", *summary_lines(info, agg, table), "",
             "## CV-Bench-format accuracy per task (%, held-out items" + (", mean ± std over seeds" if multi else "") + ")",
             "", "| task | items | chance | best constant letter | " + " | ".join(variants + [c for *_, c in diffs]) + " |",
             "|---|---|---|---|" + "---|" * (len(variants) + len(diffs))]
    for t, row in table.items():
        cells = [_pp(row[v]) for v in variants] + [_pp(row[key], signed=True) for _, key, _ in diffs]
        lines.append(f"| {t} | {row['n']} | {100 * row['chance']:.0f} | {100 * row['best_constant']:.0f} "
                     f"{row['best_constant_letter']} | " + " | ".join(cells) + " |")
    for m in ("overall", "2D", "3D"):
        lines.append(f"| {m} | | | | " + " | ".join(_pp(agg[v]["cvbench"][m]) for v in variants)
                     + " |" * len(diffs) + " |")
    lines += ["", "Predicted letters per task (all seeds together; one letter for every item = the model ignores "
              "the image for that task):", "", "| task | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for t, row in table.items():
        lines.append(f"| {t} | " + " | ".join(" ".join(f"{k}:{n}" for k, n in row[f"{v}_letters"].items())
                                                for v in variants) + " |")
    lines += ["", "## What ran", "",
              "1. `generate`: ShapeWorld images with ground-truth depth / class maps, written as pretrain.json, "
              "allava_caption.json, instruct.json, cvbench.jsonl (held out), probe.json (held out). Depth is readable "
              "from the pixels: the nearer object stands lower in the image (and looks larger, and occludes).",
              f"2. `bootstrap`: BPE tokenizer ({boot.get('vocab')} tokens); Llama LM loss "
              f"{boot['llm']['loss_first']:.3f} -> {boot['llm']['loss_last']:.3f} in {boot['llm']['steps']} steps; "
              f"CLIP vision tower caption-attribute loss {boot['vision']['loss_first']:.3f} -> "
              f"{boot['vision']['loss_last']:.3f} in {boot['vision']['steps']} steps.",
              f"3. PT with `{info['config_dir']}/pt.yaml` through `olavlm train` (ola: NTP + depth/seg/gen embedding "
              "losses vs the oracle teachers; baseline: the same with every task's `layers: []`).",
              f"4. IFT with `{info['config_dir']}/ift.yaml` through `olavlm train` (NTP only; task tokens frozen)"
              + (f"; viral: `{info['config_dir']}/viral_ift.yaml` from the baseline's PT run (NTP + 0.5 x "
                 "alignment of layer-2 image tokens to the patch oracle, token-wise MLP, -cosine)" if "viral" in variants
                 else "") + ".",
              "5. `eval cvbench` on the held-out cvbench.jsonl (greedy); `probe` of every LLM layer for each "
              "teacher's targets on held-out probe images.", "",
              "## Training", "",
              "| variant | seed | PT steps | PT final loss (NTP + embedding) | IFT steps | IFT final loss | PT s | IFT s | eval + probe s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ptl, iftl = _read_metrics(info["root"] / r["metrics"]["pt"]), _read_metrics(info["root"] / r["metrics"]["ift"])
        fin = (lambda rows: f"{rows[-1]['loss']:.3f}" if rows else "-")
        lines.append(f"| {r['variant']} | {r['seed']} | {r['pt'].get('steps')} | {fin(ptl)} | {r['ift'].get('steps')} | "
                     f"{fin(iftl)} | {r['seconds']['pt']:.0f} | {r['seconds']['ift']:.0f} | {r['seconds']['eval']:.0f} |")
    lines += _probe_lines(agg, variants)
    lines += ["Reported as measured. Files (relative to this folder): report.json (all numbers), loss.png, probe.png, "
              "runs/seed*/<variant>/{pt,ift}/ (configs, metrics, final models), runs/seed*/<variant>/cvbench.json.", ""]
    return "\n".join(lines)


def _probe_lines(agg: dict, variants: list[str]) -> list[str]:
    lines = ["", "## Probes per LLM layer (held-out images)", "",
             "Centred cosine = cosine after subtracting the training-set mean target from prediction and "
             "target: how much of the image-specific part of the teacher's target the layer carries (0 = no "
             "better than a constant). The raw cosine (the paper's metric) is shown too; with ShapeWorld's "
             "near-identical backgrounds the constant mean target already scores close to 1 on it.", ""]
    order: dict = {}  # stage -> tasks, over every variant (viral's own task is probed on its model only)
    for v in variants:
        for stage, per_task in agg[v]["probe"].items():
            order.setdefault(stage, dict.fromkeys(())).update(dict.fromkeys(per_task))
    for stage, tasks in order.items():
        for task in tasks:
            have = [v for v in variants if task in agg[v]["probe"].get(stage, {})]
            layers = list(agg[have[0]]["probe"][stage][task]["centred"])
            lines += [f"**{task}** (model after {stage.upper()})", "",
                      "| layer | " + " | ".join(f"{v} centred | {v} raw" for v in have) + " |",
                      "|---|" + "---|---|" * len(have)]
            for lay in layers:
                cells = [f"{_fmt(agg[v]['probe'][stage][task]['centred'][lay])} | "
                         f"{_fmt(agg[v]['probe'][stage][task]['cosine'][lay])}" for v in have]
                lines.append(f"| {lay} | " + " | ".join(cells) + " |")
            lines.append("| constant (mean target) | " + " | ".join(
                f"0 | {_fmt(agg[v]['probe'][stage][task]['constant'])}" for v in have) + " |")
            lines.append("")
    return lines


def write_report(out: Path, info: dict, runs: list[dict]) -> dict:
    """report.json, report.md, loss.png, probe.png in ``out``; every path in them is relative to ``out``."""
    agg = aggregate(runs)
    report = {**info, "summary": agg, "tasks": task_table(runs), "runs": runs}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "report.md").write_text(markdown({**info, "root": out}, agg, runs))
    plot_losses(runs, out, out / "loss.png")
    plot_probes(agg, out / "probe.png")
    return report
