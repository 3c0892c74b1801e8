"""IFT on a demo world starting from a given run dir (e.g. a solved grounding_ladder.py model); per-task
CV-Bench accuracy + predicted-letter histogram. A development script.

  python scripts/dev/ift_from.py BASE OUT INIT_RUN_DIR STEPS ['[overrides]'] [instruct.json]
BASE: a scripts/dev/demo_dev.py output folder (boot/, world/)."""
import json, sys, time, collections
from pathlib import Path
import torch
torch.set_num_threads(1)
from olavlm.demo.run import stage_config, run_stage, default_config_dir
from olavlm.methods import shapeworld_stage_overrides
from olavlm.evaluation.cvbench import run_cvbench
R = Path(sys.argv.pop(1)); out = Path(sys.argv[1]); init = Path(sys.argv[2]); steps = int(sys.argv[3])
extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else []
w = R / "world"
_, ex = shapeworld_stage_overrides("baseline", "ift", w)
cfg = stage_config(default_config_dir() / "ift.yaml", data_file=sys.argv[5] if len(sys.argv) > 5 else "instruct.json", run_dir=out / "ift", epochs=10, init_from=init,
                   max_steps=steps, extra=ex + extra, llm=R / "boot/llm", vision=R / "boot/vision", world=w, seed=0, batch=int(__import__("os").environ.get("BATCH", 8)))
t0 = time.perf_counter(); run_stage(cfg); t1 = time.perf_counter()
cvb = run_cvbench(out / "ift" / "final", w / "cvbench.jsonl", w, output=out / "cvbench.json", batch_size=50, progress=False)
per = collections.defaultdict(list); hist = collections.defaultdict(collections.Counter)
for p in cvb["per_item"]:
    per[p["task"]].append(p["correct"]); hist[p["task"]][p["prediction"]] += 1
print("RESULT", sys.argv[1:], {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(per.items())}, {k: dict(v) for k, v in hist.items()}, f"ift {t1-t0:.0f}s")
