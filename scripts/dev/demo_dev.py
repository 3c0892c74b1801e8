"""Fast dev loop: world -> bootstrap -> short baseline PT -> IFT -> cvbench per task (baseline only)."""
import json, sys, time, logging, collections
from pathlib import Path
import torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.WARNING)
from olavlm.world.generate import WorldSpec
from olavlm.demo.bootstrap import BootstrapSpec, bootstrap
from olavlm.demo.run import ensure_world, stage_config, run_stage, default_config_dir
from olavlm.methods import shapeworld_stage_overrides
from olavlm.evaluation.cvbench import run_cvbench

a = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
ws = WorldSpec(**{"n_pretrain": 200, "n_probe": 8, **a.get("world", {})})
world = ensure_world(out / "world", ws)
t1 = time.perf_counter()
boot = bootstrap(world, out / "boot", BootstrapSpec(**a.get("boot", {})))
t2 = time.perf_counter()
cfg_dir = default_config_dir()
common = dict(llm=boot.llm, vision=boot.vision, world=world, seed=0, batch=a.get("batch", 16))
pt_file, pt_extra = shapeworld_stage_overrides("baseline", "pt", world)
pt_cfg = stage_config(cfg_dir / pt_file, data_file="pretrain.json", run_dir=out / "pt", epochs=1, init_from=None,
                      max_steps=a.get("pt_steps", 20), extra=pt_extra + a.get("pt_extra", []) + a.get("extra", []), **common)
pt = run_stage(pt_cfg)
t3 = time.perf_counter()
ift_cfg = stage_config(cfg_dir / "ift.yaml", data_file="instruct.json", run_dir=out / "ift", epochs=a.get("ift_epochs", 2),
                       init_from=out / "pt", max_steps=a.get("ift_steps"), extra=a.get("ift_extra", []) + a.get("extra", []), **common)
ift = run_stage(ift_cfg)
t4 = time.perf_counter()
cvb = run_cvbench(out / "ift" / "final", world / "cvbench.jsonl", world, output=out / "cvbench.json", batch_size=64, progress=False)
t5 = time.perf_counter()
per = collections.defaultdict(list); hist = collections.defaultdict(collections.Counter)
for p in cvb["per_item"]:
    per[p["task"]].append(p["correct"]); hist[p["task"]][p["prediction"]] += 1
res = {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(per.items())}
steps = ift.get("steps") or ift.get("global_step")
print("RESULT", json.dumps(a), json.dumps(res), {k: dict(v) for k, v in hist.items()},
      f"world {t1-t0:.0f}s boot {t2-t1:.0f}s pt {t3-t2:.0f}s ift {t4-t3:.0f}s eval {t5-t4:.0f}s", "ift summary", {k: v for k, v in ift.items() if not isinstance(v, (list, dict))})
