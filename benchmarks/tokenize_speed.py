"""Tokenization throughput before / after whole-prompt tokenization, side by side in one process.

``before`` is the per-segment tokenizer of git revision ``--before-rev`` (loaded from git into a
private module), ``after`` the current :mod:`olavlm.data.tokenize`. Measured with the real Llama-3
(``llava_llama_3``) and Phi-3 (``llava_phi_3``) fixture tokenizers on synthetic LLaVA-665K-like
records (94% with an image, 2-6 rounds, a few hundred words), rounds interleaved:

* ``tokenize``: conversations/s of ``encode_conversation`` alone;
* ``check``:    records/s of ``run_check`` (every image decoded once per path, as ``data check``);
* ``loader``:   samples/s of ``LlavaDataset.__getitem__`` (tokenization + image to tensor).

Rates are given per second of this process's CPU time (steadier on a shared machine) and of wall time.

    OMP_NUM_THREADS=1 python benchmarks/tokenize_speed.py [--quick]   # -> results/tokenize_speed.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import bench_env, summarize, write_result  # noqa: E402

bench_env()
FIXTURES = ROOT.parent / "shared" / "fixtures" / "tokenizers"
PAIRS = {"llama3": "llava_llama_3", "phi3": "llava_phi_3"}
WORDS = ("the a red blue green small large circle square triangle left right of is on near image shows photo man "
         "woman dog street table there are two three people car building sky tree 12 3.5 (A) yes, no; café naïve "
         "\"quoted\" well-known it's 2024 — x-ray").split()


def make_records(n: int, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    sent = lambda lo, hi: " ".join(rng.choice(WORDS, int(rng.integers(lo, hi)))) + "."  # noqa: E731
    records = []
    for i in range(n):
        has_image = rng.random() < 0.94
        conv = []
        for r in range(int(rng.integers(2, 7))):
            q = sent(5, 18)
            conv += [{"from": "human", "value": ("<image>\n" + q) if r == 0 and has_image else q},
                     {"from": "gpt", "value": " ".join(sent(6, 20) for _ in range(int(rng.integers(2, 6))))}]
        records.append({"id": str(i), **({"image": f"{i % 16}.jpg"} if has_image else {}), "conversations": conv})
    return records


def load_before(rev: str):
    """``encode_conversation`` of ``rev`` (its data/templates.py + data/tokenize.py)."""
    def module(name: str, path: str, replace=("", "")):
        text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.replace(*replace)
        mod = types.ModuleType(name)
        sys.modules[name] = mod
        exec(compile(text, f"{rev}:{path}", "exec"), mod.__dict__)
        return mod

    module("olavlm_before_templates", "src/olavlm/data/templates.py")
    tok = module("olavlm_before_tokenize", "src/olavlm/data/tokenize.py",
                 ("from olavlm.data.templates import", "from olavlm_before_templates import"))
    return lambda conv, template, tokenizer, *, num_images, add_bos=None: tok.encode_conversation(
        conv, template, tokenizer, num_images=num_images)


def interleaved(fns: dict, repeat: int) -> dict:
    """Wall and CPU seconds (this process, all threads) per call; rounds alternate A B, B A, ..."""
    for fn in fns.values():
        fn()  # warm-up
    out = {k: {"wall": [], "cpu": []} for k in fns}
    for r in range(repeat):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            w, c = time.perf_counter(), time.process_time()
            fns[k]()
            out[k]["cpu"].append(time.process_time() - c)
            out[k]["wall"].append(time.perf_counter() - w)
    return {k: {m: summarize(v) for m, v in t.items()} for k, t in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--before-rev", default="ce452f05405a5a236e3da58ca646699f58a0327d")
    ap.add_argument("--records", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args(argv)
    import json

    from PIL import Image
    from transformers import AutoTokenizer

    import olavlm.data.check as check_mod
    import olavlm.data.dataset as dataset_mod
    from olavlm.config import DataConfig
    from olavlm.data.images import ImageSpec
    from olavlm.data.records import record_images
    from olavlm.data.tokenize import encode_conversation

    n, repeat = args.records or (40 if args.quick else 400), args.repeat or (2 if args.quick else 5)
    before, after = load_before(args.before_rev), encode_conversation
    records = make_records(n)
    words = [sum(len(t["value"].split()) for t in r["conversations"]) for r in records]
    tmp = Path(tempfile.mkdtemp(prefix="tokenize_speed_"))
    for k in range(16):
        Image.new("RGB", (320, 240), (k * 15, 100, 200 - k * 10)).save(tmp / f"{k}.jpg", quality=90)
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    spec = ImageSpec(336, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    results = {}
    for name, template in PAIRS.items():
        if not (FIXTURES / name / "tokenizer.json").is_file():
            print(f"skip {name}: {FIXTURES / name} absent")
            continue
        tok = AutoTokenizer.from_pretrained(FIXTURES / name)
        ds = dataset_mod.LlavaDataset(DataConfig(train_file=str(data), image_folder=str(tmp), template=template),
                                      tok, image_spec=spec, tokens_per_image=600)
        loader_n = max(10, n // 4)

        def tokenize(fn):
            return lambda: [fn(r["conversations"], template, tok, num_images=len(record_images(r))) for r in records]

        def check(fn):
            def run():
                check_mod.encode_conversation = fn
                check_mod.run_check(data, tmp, tokenizer=tok, template=template, workers=1, progress=False)
            return run

        def loader(fn):
            def run():
                dataset_mod.encode_conversation = fn
                [ds[i] for i in range(loader_n)]
            return run

        row = {}
        for what, per, make in (("tokenize", n, tokenize), ("check", n, check), ("loader", loader_n, loader)):
            s = interleaved({"before": make(before), "after": make(after)}, repeat)
            rate = {m: {k: per / s[k][m]["median"] for k in s} for m in ("cpu", "wall")}
            ratio = {m: s["after"][m]["median"] / s["before"][m]["median"] for m in ("cpu", "wall")}
            row[what] = {"per_s": rate, "after_over_before_time": ratio, "timings": s}
            print(f"{name:7s} {what:8s} per CPU-s: before {rate['cpu']['before']:7.1f}  after {rate['cpu']['after']:7.1f}"
                  f"  time after/before: CPU {ratio['cpu']:.3f}  wall {ratio['wall']:.3f}")
        check_mod.encode_conversation = dataset_mod.encode_conversation = after
        results[name] = {"template": template, **row}
    write_result("tokenize_speed", {"config": {"records": n, "repeat": repeat, "before_rev": args.before_rev,
                                               "words_per_record": summarize(words), "images": "16 x 320x240 JPEG"},
                                    "results": results, "goal": "time after/before <= 1.10 (check, loader)",
                                    "note": "per_s = items per second of CPU time (cpu) and of wall time (wall)"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
