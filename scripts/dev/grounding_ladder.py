"""Grounding sanity ladder for the ShapeWorld demo (a development script, not part of the package).

Builds a tiny synthetic task, trains IFT through the real ``olavlm.train.loop.train`` (the demo's
``ift.yaml`` recipe, baseline overrides) from an existing demo-style PT run, and scores held-out and
training images through the real ``run_cvbench`` generation path.

  PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/dev/grounding_ladder.py OUT '{"base": RUN, "steps": 600}'

RUN is a folder holding ``boot/{llm,vision}``, ``pt/final`` and ``world/`` (the layout of
scripts/dev/demo_dev.py's output). Options (JSON): ``steps``, ``epochs``, ``n`` (training images),
``left2`` (two circles, "which object is on the left": else one circle, "what colour is it"),
``fixed`` (options always "(A) red (B) blue": the letter is a function of the image alone),
``fixfrac`` (that fraction of training items fixed), ``open`` (an open colour turn after the
multiple-choice one), ``textmc`` (that fraction of extra text-only items stating the answer),
``cf`` (answer "The red one. (A)": content before the letter), ``extra`` (config overrides).
Prints ``RESULT`` lines (accuracy + predicted-letter histogram) for held-out and training images.
"""
import json, sys, time, collections, random
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from PIL import Image, ImageDraw
from olavlm.demo.run import stage_config, run_stage, default_config_dir
from olavlm.methods import shapeworld_stage_overrides
from olavlm.evaluation.cvbench import run_cvbench

a = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
R = Path(a["base"])
w = out / "world"; (w / "images").mkdir(parents=True, exist_ok=True)
rng = random.Random(0)
TRAIN = [True]
QQ = 'Which object is on the left, the red one or the blue one?' if a.get('left2') else 'What colour is the object?'
COL = {"red": (220, 40, 40), "blue": (40, 60, 220)}
def img(name):
    if a.get("left2"):
        im = Image.new("RGB", (64, 64), (128, 128, 128)); d = ImageDraw.Draw(im)
        xs = sorted(rng.sample(range(10, 54), 2))
        while xs[1] - xs[0] < 12: xs = sorted(rng.sample(range(10, 54), 2))
        cl = rng.choice(list(COL)); cr = [k for k in COL if k != cl][0]
        for x, c in zip(xs, (cl, cr)):
            r = rng.randint(5, 8); y = rng.randint(r, 63 - r); d.ellipse([x - r, y - r, x + r, y + r], fill=COL[c])
        im.save(w / "images" / name); return cl
    c = rng.choice(list(COL)); im = Image.new("RGB", (64, 64), (128, 128, 128)); d = ImageDraw.Draw(im)
    r = rng.randint(6, 14); x, y = rng.randint(r, 63 - r), rng.randint(r, 63 - r)
    d.ellipse([x - r, y - r, x + r, y + r], fill=COL[c]); im.save(w / "images" / name); return c
def q(c):
    opts = ["red", "blue"]
    if not a.get("fixed") and not (TRAIN[0] and rng.random() < a.get("fixfrac", 0)): rng.shuffle(opts)
    letter = "AB"[opts.index(c)]
    return opts, (f"The {c} one. ({letter})" if a.get("cf") else f"({letter})")
recs = []
for i in range(a.get("n", 400)):
    c = img(f"t{i:04d}.png"); opts, ans = q(c)
    p = f"<image>\n{QQ} Select from the following choices.\n(A) {opts[0]}\n(B) {opts[1]}\nOnly answer the option as the output. For example, if your answer is the option A, answer (A)."
    conv = [{"from": "human", "value": p}, {"from": "gpt", "value": ans}]
    if a.get("open"): conv += [{"from": "human", "value": "Which colour is it?"}, {"from": "gpt", "value": f"It is {c}."}]
    if a.get("openfirst"): conv = [{"from": "human", "value": "<image>\nWhich colour is it?"}, {"from": "gpt", "value": f"It is {c}."}]
    recs.append({"id": f"t{i}", "image": f"images/t{i:04d}.png", "conversations": conv})
    if a.get("openfirst"): recs.append({"id": f"u{i}", "image": f"images/t{i:04d}.png", "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": ans}]})
    if a.get("textmc") and rng.random() < a["textmc"]:
        c2 = rng.choice(list(COL)); o2, a2 = q(c2)
        recs.append({"id": f"x{i}", "conversations": [{"from": "human", "value": f"The object is {c2}. What colour is the object? Select from the following choices.\n(A) {o2[0]}\n(B) {o2[1]}\nOnly answer the option as the output. For example, if your answer is the option A, answer (A)."}, {"from": "gpt", "value": a2}]})
(w / "instruct.json").write_text(json.dumps(recs))
TRAIN[0] = False
with open(w / "cvbench.jsonl", "w") as f:
    for i in range(100):
        c = img(f"e{i:04d}.png"); opts, ans = q(c)
        qq = QQ + ""
        f.write(json.dumps({"idx": i, "type": "2D", "task": "Colour", "question": qq, "choices": opts, "answer": ans[-3:],
                            "prompt": qq + " Select from the following choices.\n(A) %s\n(B) %s" % tuple(opts),
                            "filename": f"images/e{i:04d}.png", "source": "triv"}) + "\n")
# train-set eval copy (first 100 train items)
with open(w / "train_cvb.jsonl", "w") as f:
    for i, r in enumerate([r for r in recs if r['id'].startswith('t')][:100]):
        rr = [x for x in recs if x["id"] == "u" + r["id"][1:]]; r = rr[0] if rr else r
        opts = [r["conversations"][0]["value"].split("(A) ")[1].split("\n")[0], r["conversations"][0]["value"].split("(B) ")[1].split("\n")[0]]
        qq = QQ + ""
        f.write(json.dumps({"idx": i, "type": "2D", "task": "Colour", "question": qq, "choices": opts, "answer": r["conversations"][1]["value"][-3:],
                            "prompt": qq + " Select from the following choices.\n(A) %s\n(B) %s" % tuple(opts), "filename": r["image"], "source": "triv"}) + "\n")
common = dict(llm=R / "boot/llm", vision=R / "boot/vision", world=w, seed=0, batch=a.get("batch", 8))
_, extra = shapeworld_stage_overrides("baseline", "ift", R / "world")
extra = [e.replace(str(w), str(R / "world")) for e in extra]
cfg = stage_config(default_config_dir() / "ift.yaml", data_file="instruct.json", run_dir=out / "ift", epochs=a.get("epochs", 4),
                   init_from=Path(a.get("init", R / "pt")), max_steps=a.get("steps", 200), extra=extra + a.get("extra", []), **common)
for t in ("depth", "seg", "gen"):
    cfg.model.tasks[t].teacher_path = str(R / "world") if hasattr(cfg.model.tasks[t], "teacher_path") else None
t0 = time.perf_counter(); s = run_stage(cfg); t1 = time.perf_counter()
for name in ("cvbench.jsonl", "train_cvb.jsonl"):
    cvb = run_cvbench(out / "ift" / "final", w / name, w, output=out / ("o_" + name + ".json"), batch_size=50, progress=False)
    h = collections.Counter(p["prediction"] for p in cvb["per_item"])
    print("RESULT", json.dumps(a), name, cvb["overall"], dict(h))
ms = [json.loads(l) for l in open(out / "ift/metrics.jsonl")]
print("loss first/last", [m.get("loss") for m in ms[:3]], [m.get("loss") for m in ms[-5:]], f"ift {t1-t0:.0f}s")
