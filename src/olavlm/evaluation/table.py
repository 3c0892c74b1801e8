"""`olavlm eval all`: every benchmark that is present, one row per model, as markdown + JSON.

Columns follow the paper's table: CV-Bench 2D / 3D / overall and its four tasks, then MMStar.
RealWorldQA and OK-VQA are run with lmms-eval on the LLaVA export (see docs/evaluation.md).
"""

from __future__ import annotations

import json
from pathlib import Path

CVBENCH_FILE = "CV-Bench/test.jsonl"  # where `olavlm data prepare cv-bench` puts it, relative to --data-root
MMSTAR_FILE = "MMStar/MMStar.tsv"  # where `olavlm data prepare mmstar` puts it
CVBENCH_TASKS = ("Count", "Relation", "Depth", "Distance")
COLUMNS = ("CV-Bench 2D", "CV-Bench 3D", "CV-Bench", *(f"CV-Bench {t}" for t in CVBENCH_TASKS), "MMStar")


def model_name(model_dir: str | Path) -> str:
    """A row label: the run folder's name for RUN_DIR/final, else the folder's own name."""
    p = Path(model_dir).resolve()
    return f"{p.parent.name}" if p.name == "final" and p.parent.name else p.name


def row_of(cvbench: dict | None, mmstar: dict | None) -> dict[str, float | None]:
    """Table cells in percent (None where a benchmark or task is absent)."""
    def pct(v):
        return None if v is None else round(100 * v, 2)

    row: dict[str, float | None] = {c: None for c in COLUMNS}
    if cvbench is not None:
        row["CV-Bench 2D"], row["CV-Bench 3D"] = pct(cvbench["2D"]), pct(cvbench["3D"])
        row["CV-Bench"] = pct(cvbench["overall"])
        for t in CVBENCH_TASKS:
            row[f"CV-Bench {t}"] = pct(cvbench["by_task"].get(t))
    if mmstar is not None:
        row["MMStar"] = pct(mmstar["overall"])
    return row


def markdown(rows: dict[str, dict]) -> str:
    head = "| Model | " + " | ".join(COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    body = ["| " + name + " | " + " | ".join("-" if r[c] is None else f"{r[c]:.1f}" for c in COLUMNS) + " |"
            for name, r in rows.items()]
    return "\n".join([head, sep, *body]) + "\n"


def run_all(models: list[str], *, data_root: str | Path = "datasets", cvbench: str | Path | None = None,
            mmstar: str | Path | None = None, output: str | Path = "eval_results", names: list[str] | None = None,
            batch_size: int = 8, max_new_tokens: int = 8, limit: int | None = None, device: str | None = None,
            progress: bool = True) -> dict:
    """Run CV-Bench and MMStar (those present) for each model; write ``table.md`` and ``table.json``.

    Each benchmark's full result goes to ``OUTPUT/<name>/<benchmark>.json`` (resumable).
    """
    from olavlm.errors import UserError
    from olavlm.evaluation.cvbench import run_cvbench
    from olavlm.evaluation.mmstar import run_mmstar
    from olavlm.evaluation.runner import load_eval_model

    root = Path(data_root)
    cv = Path(cvbench) if cvbench else root / CVBENCH_FILE
    ms = Path(mmstar) if mmstar else root / MMSTAR_FILE
    for given, path, what in ((cvbench, cv, "--cvbench"), (mmstar, ms, "--mmstar")):
        if given and not path.is_file():
            raise UserError(f"{what} {path}: no such file")
    present = {"cvbench": cv if cv.is_file() else None, "mmstar": ms if ms.is_file() else None}
    if not any(present.values()):
        raise UserError(f"no benchmark found: neither {cv} nor {ms} exists (run `olavlm data prepare cv-bench` / "
                        "`olavlm data prepare mmstar`, or pass --cvbench / --mmstar)")
    names = names or [model_name(m) for m in models]
    if len(names) != len(models) or len(set(names)) != len(names):
        raise UserError(f"--names: need {len(models)} distinct names, got {names}")
    out = Path(output)
    rows, details = {}, {}
    for model_dir, name in zip(models, names):
        em = load_eval_model(model_dir, device=device)
        kw = dict(output=None, max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit,
                  progress=progress, em=em)
        res_cv = res_ms = None
        if present["cvbench"]:
            res_cv = run_cvbench(model_dir, present["cvbench"], **{**kw, "output": out / name / "cvbench.json"})
        if present["mmstar"]:
            res_ms = run_mmstar(model_dir, present["mmstar"], **{**kw, "output": out / name / "mmstar.json"})
        rows[name] = row_of(res_cv, res_ms)
        details[name] = {"model": str(model_dir),
                         "cvbench": None if res_cv is None else {k: res_cv[k] for k in
                                                                 ("overall", "2D", "3D", "by_task", "by_source", "n")},
                         "mmstar": None if res_ms is None else {k: res_ms[k] for k in
                                                               ("overall", "accuracy", "by_category", "n")}}
        del em
    table = {"columns": list(COLUMNS), "rows": rows, "details": details,
             "data": {k: None if v is None else str(v) for k, v in present.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    (out / "table.md").write_text(markdown(rows))
    return table
