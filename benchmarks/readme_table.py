"""Regenerate the performance tables of README.md and benchmarks/README.md from
``benchmarks/results/*.json`` (the text between ``<!-- bench:start -->`` and ``<!-- bench:end -->``).

    python -m benchmarks.readme_table            # rewrite both READMEs
    python -m benchmarks.readme_table --print    # only print the table

README.md gets a ``## Performance`` section with the markers at its end when it has none. Each goal
of the performance goals (benchmarks/README.md) is one row (value, goal, verdict, how it was measured); a missing result shows as
"not run". Nothing else in either README is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import stability  # noqa: E402
from benchmarks.common import results_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


@dataclass(frozen=True)
class Row:
    goal_no: str  # number of the goal in benchmarks/README.md
    label: str  # what is compared
    result: str  # results/<result>.json
    path: tuple[str, ...]  # keys to the ratio inside that JSON: a ratio record (common.ratio) or a number
    op: str | None  # "<=" or ">=" (None: reported without a goal)
    goal: float | None


ROWS = [
    Row("1", "PT step, 3 embedding losses + cached targets ÷ NTP step (same model)", "pt_vs_ntp",
        ("ratios", "pt_cached_over_ntp"), "<=", 1.10),
    Row("2", "IFT step ÷ `LlavaForConditionalGeneration` step (same sequence, no task tokens)", "ift_vs_llava",
        ("ratios", "olavlm_ift_no_task_tokens_over_llava"), "<=", 1.00),
    Row("2", "IFT step with the frozen task tokens (+24 positions/image) ÷ Llava step", "ift_vs_llava",
        ("ratios", "olavlm_ift_over_llava"), "<=", 1.00),
    Row("3", "per-image loop ÷ batched encode: depth teacher (Depth-Anything)", "teacher_batching",
        ("results", "depth", "ratio"), ">=", 4.0),
    Row("3", "per-image loop ÷ batched encode: seg teacher (OneFormer)", "teacher_batching",
        ("results", "seg", "ratio"), ">=", 4.0),
    Row("3", "per-image loop ÷ batched encode: gen teacher (unCLIP image encoder)", "teacher_batching",
        ("results", "gen", "ratio"), ">=", 4.0),
    Row("4", "PT peak memory: hooks + supervised-only NTP ÷ `output_hidden_states` + fp32 logits", "pt_memory",
        ("ratios", "peak_memory_olavlm_over_reference"), "<=", 0.5),
    Row("4", "PT step time of the same two routes", "pt_memory",
        ("ratios", "step_time_olavlm_over_reference"), None, None),
    Row("5", "data loading samples/s (2 workers) ÷ model consumption (demo-sized model)", "data_vs_model",
        ("ratios", "loader_over_model"), ">=", 3.0),
    Row("6", "PT step with online teachers ÷ with cached targets", "online_vs_cached",
        ("ratios", "pt_online_over_pt_cached"), None, None),
    Row("P", "packing: IFT positions padded ÷ packed (LLaVA-665K-like lengths, full size, modality-length "
        "sampler)", "packing", ("padding_full_size", "modality_length", "positions_padded_over_packed"), None, None),
    Row("P", "packing: IFT tokens/s packed ÷ padded, modality-length sampler (sdpa block mask, 1 thread)",
        "packing", ("cpu_step", "modality_length", "ratio"), None, None),
    Row("P", "packing: IFT tokens/s packed ÷ padded, random sampler (sdpa block mask, 1 thread)",
        "packing", ("cpu_step", "random", "ratio"), None, None),
]
STATISTIC = {"value": "wall median", "value_min": "wall min", "value_cpu": "CPU median", "value_cpu_min": "CPU min",
             None: "exact"}


def load(folder: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and "name" in data:
            out[data["name"]] = data
    return out


def dig(data: Any, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if not isinstance(data, dict) or k not in data:
            return None
        data = data[k]
    return data


def setup_of(data: dict) -> str:
    """How a result was measured, in a few words: config, precision, batch/sequence, device."""
    cfg, m = data.get("config", {}), data.get("machine", {})
    parts = []
    source = cfg.get("source")
    if source:
        parts.append(source if len(source) < 24 else Path(source).name)
    bf16 = data.get("bf16_autocast", cfg.get("bf16_autocast"))
    if bf16 is not None:
        parts.append("bf16 autocast" if bf16 else "fp32")
    elif cfg.get("dtype"):
        parts.append(str(cfg["dtype"]))
    batch = cfg.get("micro_batch", cfg.get("batch", cfg.get("images_per_batch")))
    if batch:
        parts.append(f"B{batch}")
    if cfg.get("text_len"):
        parts.append(f"T{cfg['text_len']}")
    device = m.get("cuda") or f"CPU x{m.get('cpu_count', '?')}"
    parts.append(device)
    if cfg.get("quick"):
        parts.append("quick")
    return ", ".join(parts)


def headline(data: dict | None, row: Row) -> tuple[float | None, str | None, float | None]:
    """(headline value, its statistic -- a key of the ratio record, None for an exact number --, the
    wall-median ratio shown beside a CPU headline) of one row in one result."""
    found = dig(data, row.path) if data else None
    if isinstance(found, (int, float)) and not isinstance(found, bool):
        return float(found), None, None
    if isinstance(found, dict) and "value_min" not in found and isinstance(found.get("value"), (int, float)):
        return float(found["value"]), None, None  # a measured amount (memory), not a ratio of timings
    if isinstance(found, dict):
        key = found.get("headline", "value")
        if isinstance(found.get(key), (int, float)):
            return float(found[key]), key, (found.get("value") if key != "value" else None)
    return None, None, None


def compare(folder: Path, other: Path | None) -> list[dict[str, Any]]:
    """Each row's headline in ``folder`` and, where comparable, in ``other``: ``status`` is ``agree``,
    ``unstable`` or ``not checked`` (``why``)."""
    results = load(folder)
    others = load(other) if other is not None and other.is_dir() else {}
    out = []
    for row in ROWS:
        data, second = results.get(row.result), others.get(row.result)
        value, stat, wall = headline(data, row)
        rec = {"goal": row.goal_no, "label": row.label, "result": row.result, "value": value, "statistic": stat,
               "wall_median": wall, "other": None, "status": "not checked", "why": "no second run"}
        if value is not None and second is not None:
            why = stability.not_comparable(data, second)
            b, b_stat, _ = headline(second, row)
            why = why or (None if b is not None and b_stat == stat else "no such value in the second run")
            if why:
                rec["why"] = why
            else:
                rec.update(other=b, why=None, status="agree" if stability.agree(value, b) else "unstable")
        out.append(rec)
    return out


def met(value: float, row: Row) -> bool:
    return value <= row.goal if row.op == "<=" else value >= row.goal


def verdict(rec: dict[str, Any], row: Row) -> str:
    """pass / miss judged on the worse of two agreeing runs; "unstable (a vs b)" when they disagree."""
    a, b = rec["value"], rec["other"]
    if a is None:
        return "not run"
    if rec["status"] == "unstable":
        return f"**unstable** ({a:.2f} vs {b:.2f})"
    if row.goal is None:
        return "stable" if rec["status"] == "agree" else f"stability not checked ({rec['why']})"
    ok = met(a, row) and (b is None or met(b, row))
    shown = "pass" if ok else "**miss**"
    return shown if rec["status"] == "agree" else f"{shown}; stability not checked ({rec['why']})"


def render(folder: Path | None = None, other: Path | None = None) -> str:
    """The tables; ``other`` is the second run to check stability against (default: ``folder/busy``)."""
    folder = folder or results_dir()
    other = other if other is not None else folder / "busy"
    results = load(folder)
    lines = ["| # | comparison | headline (statistic; wall median) | second run | goal | verdict | setup |",
             "|---|---|---|---|---|---|---|"]
    for row, rec in zip(ROWS, compare(folder, other)):
        data = results.get(row.result)
        shown = "not run"
        if rec["value"] is not None:
            wall = f"; wall {rec['wall_median']:.2f}" if rec["wall_median"] is not None else ""
            shown = f"{rec['value']:.2f} ({STATISTIC[rec['statistic']]}{wall})"
        second = f"{rec['other']:.2f}" if rec["other"] is not None else "–"
        goal = f"{row.op} {row.goal:g}" if row.goal is not None else "-"
        lines.append(f"| {row.goal_no} | {row.label} | {shown} | {second} | {goal} | {verdict(rec, row)} | "
                     f"{setup_of(data) if data else ''} |")
    lines += ["", stability_note(folder, other)]
    notes = []
    pt = results.get("pt_vs_ntp") or {}
    if pt.get("flops_ratio_pt_cached_over_ntp") and pt.get("forward_flops_by_component"):
        fwd = pt["forward_flops_by_component"]
        notes.append(f"Goal 1: the PT step executes {pt['flops_ratio_pt_cached_over_ntp']:.2f}x the counted FLOPs of "
                     f"the NTP step here, because in this config the predictors' forward is "
                     f"{fwd['predictors'] / max(1, fwd['llm']):.0%} of the LLM's; the rest of the time ratio is "
                     "the per-kernel cost of many small predictor/loss ops on a CPU. See benchmarks/README.md.")
    if notes:
        lines += [""] + notes
    scaling = results.get("scaling")
    if scaling and scaling.get("table"):
        lines += ["", f"Goal 7, step time vs sequence and batch (PT step, cached targets; {setup_of(scaling)}; "
                      f"ratios against {scaling.get('base')}):", "",
                  f"| text len | batch | sequence | ms/step ({scaling['table'][0].get('statistic', 'wall median')}) "
                  "| µs/token | time × | FLOPs × | time × ÷ FLOPs × |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in scaling["table"]:
            ms = r.get("ms", r["median_ms"])
            lines.append(f"| {r['text_len']} | {r['batch']} | {r['sequence_len']} | {ms:.0f} | "
                         f"{r['us_per_token']:.0f} | {r['time_ratio']:.2f} | {r['flops_ratio']:.2f} | "
                         f"{r['time_over_flops_ratio']:.2f} |")
    lines += ["", *gpu_table(results)]
    results = {k: v for k, v in results.items() if not k.startswith("gpu-")}
    dates = sorted(d.get("written", "") for d in results.values() if d.get("written"))
    machine = next((d.get("machine") for d in results.values() if d.get("machine")), {})
    if dates:
        gpu = f", {machine['cuda']}" if machine.get("cuda") else ""
        lines += ["", f"Measured {dates[0][:10]} – {dates[-1][:10]}, {machine.get('processor', '?')} "
                      f"({machine.get('cpu_count', '?')} cores{gpu}), "
                      f"torch {machine.get('torch', '?')}, transformers {machine.get('transformers', '?')}. "
                      "Ratios come from one process each, variants interleaved; raw timings in "
                      "`benchmarks/results/*.json`. Regenerate with `make bench-stability` (two runs, "
                      "idle and busy) or `make bench` (one run)."]
    return "\n".join(lines)


def _run_info(folder: Path) -> dict:
    try:
        return json.loads((folder / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _loads(info: dict) -> str:
    a, b = info.get("load_average_before"), info.get("load_average_after")
    return f"load average {a[0]:.1f} → {b[0]:.1f}" if a and b else "load average not recorded"


def stability_note(folder: Path, other: Path) -> str:
    """One paragraph: what the second run was, the loads of both runs, how many rows agree."""
    recs = compare(folder, other)
    checked = [r for r in recs if r["status"] != "not checked"]
    if not checked:
        return (f"Stability not checked: no comparable second run in `{_short(other)}` (same code, settings and "
                "machine); `make bench-stability` makes one.")
    first, second = _run_info(folder), _run_info(other)
    made = {(d.get("code") or {}).get("fingerprint") for d in load(folder).values()} - {None}
    now = stability.code_identity()["fingerprint"]
    older = "" if made <= {now} else (f" Measured with code {', '.join(sorted(made))}; the tree is now {now}: "
                                      "rerun to check the current code.")
    beside = second.get("neighbour") or "no neighbour of its own"
    agreeing = sum(r["status"] == "agree" for r in checked)
    return (f"Stability: each headline is compared with a second run of the same code and settings "
            f"(`{_short(other)}`, beside {beside}); a verdict needs both within ±{stability.TOLERANCE:.0%} and is "
            f"judged on the worse of the two. This run: {_loads(first)}; second run: {_loads(second)}. "
            f"{agreeing} of {len(checked)} compared rows agree.{older}")


def _short(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT)) + "/"
    except ValueError:
        return str(path) + "/"


GPU_ROWS = [  # (stage, path to the ratio, path to the variants, variant shown, label)
    ("pt", ("ratios", "pt_cached_over_ntp"), ("variants",), "pt_cached", "PT step, cached targets ÷ NTP step"),
    ("pt", ("online", "ratios", "pt_online_over_pt_cached"), ("online", "variants"), "pt_online",
     "PT step, online teachers ÷ cached targets"),
    ("ift", ("ratios", "ift_over_llava"), ("variants",), "olavlm_ift", "IFT step ÷ `LlavaForConditionalGeneration` step"),
]


def gpu_table(results: dict[str, dict]) -> list[str]:
    """Rows of ``benchmarks/results/gpu-*.json`` (``make bench-gpu``), or a line saying there are none."""
    runs = {k: v for k, v in sorted(results.items()) if k.startswith("gpu-") and not v.get("config", {}).get("smoke")}
    if not runs:
        return ["GPU (real size, `make bench-gpu`): not run yet -- no GPU was available where this table was made."]
    lines = ["GPU, real-size models with random weights (`make bench-gpu`; MFU = counted step FLOPs ÷ (median step "
             "time × dense bf16 peak)):", "",
             "| run | comparison | median (min) | goal | verdict | micro-batch | tokens/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, data in runs.items():
        label = f"{data.get('gpu', {}).get('name', '?')}, {name[4:]}"
        for stage, ratio_path, variants_path, variant, what in GPU_ROWS:
            block = data.get(stage) or {}
            r = dig(block, ratio_path)
            if not r:
                reason = block.get("error") or block.get("skipped") or dig(block, (ratio_path[0], "error")) \
                    or dig(block, (ratio_path[0], "skipped")) or "not measured"
                lines.append(f"| {label} | {what} | {reason} | | | | | | |")
                continue
            v = dig(block, (*variants_path, variant)) or {}
            goal = f"<= {r['goal']:g}" if r.get("goal") is not None else "-"
            ok = "-" if r.get("pass") is None else ("pass" if r["pass"] else "**miss**")
            tp = v.get("throughput") or {}
            mfu = f"{tp['mfu']:.1%}" if tp.get("mfu") else "-"
            mem = f"{v['peak_memory_bytes'] / 2**30:.1f}" if v.get("peak_memory_bytes") else "-"
            tok = f"{v['tokens_per_s']:,.0f}" if v.get("tokens_per_s") else "-"
            lines.append(f"| {label} | {what} | {r['value']:.3f} ({r['value_min']:.3f}) | {goal} | {ok} | "
                         f"{block.get('micro_batch', '-')} | {tok} | {mfu} | {mem} |")
    return lines


def replace_between(text: str, table: str, *, heading: str | None = None) -> str:
    """Put ``table`` between the markers; without markers, append them (under ``heading``)."""
    block = f"{START}\n{table}\n{END}"
    lines = text.split("\n")  # markers count only on a line of their own (prose may quote them)
    starts = [i for i, line in enumerate(lines) if line.strip() == START]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(starts) == len(ends) == 1 and starts[0] < ends[0]:
        return "\n".join([*lines[:starts[0]], block, *lines[ends[0] + 1:]])
    if starts or ends:
        raise ValueError(f"unbalanced {START} / {END} markers")
    prefix = text.rstrip("\n") + "\n\n" + (f"{heading}\n\n" if heading else "")
    return prefix + block + "\n"


def update_all(folder: Path | None = None) -> list[Path]:
    table = render(folder)
    written = []
    for path, heading in ((ROOT / "README.md", "## Performance"), (ROOT / "benchmarks" / "README.md", None)):
        if not path.exists():
            continue
        old = path.read_text()
        new = replace_between(old, table, heading=heading)
        if new != old:
            path.write_text(new)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print the table, write nothing")
    args = ap.parse_args(argv)
    if args.print:
        print(render())
        return 0
    for path in update_all():
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
