"""Linear (logistic) read-out of a bootstrapped demo tower: per CV-Bench task, fit on the instruct.json
questions, score on cvbench.jsonl, from the mean patch feature ("mean") and from all 16 patch features
("concat"). A development script (docs/demo.md, section 4.1).

  python scripts/dev/tower_readout.py RUN     # RUN holds world/ and boot/vision (scripts/dev/demo_dev.py)
"""
import json, sys, numpy as np, torch, collections
torch.set_num_threads(1)
from pathlib import Path
from PIL import Image
from transformers import CLIPVisionModel, CLIPImageProcessor
R = Path(sys.argv[1]); w = R / "world"
m = CLIPVisionModel.from_pretrained(R / "boot/vision").eval(); proc = CLIPImageProcessor.from_pretrained(R / "boot/vision")
def feats(keys):
    out = []
    for i in range(0, len(keys), 128):
        ims = [Image.open(w / k).convert("RGB") for k in keys[i:i+128]]
        px = proc(images=ims, return_tensors="pt")["pixel_values"]
        with torch.no_grad(): h = m(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        out.append(h.reshape(h.shape[0], -1).numpy())
    return np.concatenate(out)
def items_instruct():
    res = []
    for r in json.load(open(w / "instruct.json")):
        if "image" not in r: continue
        q = r["conversations"][0]["value"]; a = r["conversations"][1]["value"]
        kind = ("Count" if "How many" in q else "Relation" if "relative positions" in q else "Distance" if "real-world" in q else "Depth")
        res.append((r["image"], kind, "ABCD".index(a[1])))
    return res
tr = items_instruct()
te = [(j["filename"], j["task"], "ABCD".index(j["answer"][1])) for j in map(json.loads, open(w / "cvbench.jsonl"))]
Ftr, Fte = feats([k for k, _, _ in tr]), feats([k for k, _, _ in te])

class LogisticRegression:
    def __init__(self, **k): pass
    def fit(self, X, y):
        X = torch.tensor(X); y = torch.tensor(y); self.mu, self.sd = X.mean(0), X.std(0) + 1e-6
        X = (X - self.mu) / self.sd; self.W = torch.nn.Linear(X.shape[1], 4)
        opt = torch.optim.LBFGS(self.W.parameters(), max_iter=300)
        def cl():
            opt.zero_grad(); l = torch.nn.functional.cross_entropy(self.W(X), y) + 1e-3 * self.W.weight.pow(2).sum(); l.backward(); return l
        opt.step(cl); return self
    def score(self, X, y):
        X = (torch.tensor(X) - self.mu) / self.sd
        with torch.no_grad(): return (self.W(X).argmax(-1) == torch.tensor(y)).float().mean().item()
for mode in ("mean", "concat"):
    for task in ("Count", "Relation", "Depth", "Distance"):
        itr = [i for i, x in enumerate(tr) if x[1] == task]; ite = [i for i, x in enumerate(te) if x[1] == task]
        def f(F, idx):
            X = F[idx]
            return X.reshape(len(idx), 16, -1).mean(1) if mode == "mean" else X
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(f(Ftr, itr), [tr[i][2] for i in itr])
        print(mode, task, "train", round(clf.score(f(Ftr, itr), [tr[i][2] for i in itr]), 2), "test", round(clf.score(f(Fte, ite), [te[i][2] for i in ite]), 2), flush=True)
