"""Padding-free packing: IFT tokens/s packed ÷ padded on a LLaVA-665K-like length distribution.

Sample lengths come from a mixture shaped like LLaVA-665K (the LLaVA-1.5 instruction mix): its ten
sources with their sample counts, each with a log-normal word count per sample, from single-turn
short QA (OK-VQA, TextCaps) over multi-question bundles (VQAv2, GQA, OCR-VQA, Visual Genome,
RefCOCO) and LLaVA-Instruct conversations to long text-only ShareGPT dialogues. The medians and
spreads are estimates (the dataset cannot be downloaded here); ``--from-json FILE`` samples the word
counts of a real LLaVA-format file instead. Words become tokens at 1.35 per word plus 40 template
tokens; an image adds 576 + 24 positions (CLIP-L/336 tokens + the frozen task tokens); samples are
cut to max_length 4096, as ``data.truncate`` does.

Two measurements, both on the same micro-batches (16 samples, as the IFT recipes):

* padding fraction of the full-size lengths, padded (rows padded to the longest sample) vs packed
  (first-fit-decreasing rows of 4096), under the random and the modality-length sampler;
* IFT step time (forward + backward, LLM + projector trainable, the real collator and model, sdpa
  with the block mask) on one CPU thread: the make-tiny CLIP tower and a random Llama of width
  ``--hidden`` (256) and ``--layers`` (2), every length scaled so that an image is the tiny tower's
  64 + 6 positions (factor 70/600; max_length scaled alike). tokens/s counts real (non-pad)
  positions. sdpa computes the masked-out blocks of a packed row too (flash-attention's varlen
  kernel does not), so on CPU the gain is bounded by how much of the step is attention.

Result: benchmarks/results/packing.json.

    python -m benchmarks.packing [--quick] [--batches K] [--repeat R] [--from-json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import bench_env, load_average, ratio, summarize, timeit_interleaved, write_result  # noqa: E402

bench_env()

# source: (samples in thousands, has image, median words per sample, log-normal sigma)
MIXTURE = {
    "llava_instruct": (158, True, 180, 0.6), "sharegpt": (40, False, 700, 0.7), "vqav2": (83, True, 60, 0.5),
    "gqa": (72, True, 70, 0.5), "okvqa": (9, True, 25, 0.4), "ocrvqa": (80, True, 55, 0.4),
    "aokvqa": (66, True, 40, 0.5), "textcaps": (22, True, 25, 0.3), "refcoco": (48, True, 90, 0.5),
    "vg": (86, True, 90, 0.5),
}
TOKENS_PER_WORD, TEMPLATE_TOKENS, IMAGE_POSITIONS, MAX_LENGTH, MICRO_BATCH = 1.35, 40, 600, 4096, 16


def sample_mixture(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(words, has_image) of ``n`` samples drawn from :data:`MIXTURE` in proportion to its counts."""
    rng = np.random.default_rng(seed)
    names = list(MIXTURE)
    weights = np.array([MIXTURE[k][0] for k in names], dtype=float)
    pick = rng.choice(len(names), size=n, p=weights / weights.sum())
    words = np.empty(n)
    image = np.empty(n, dtype=bool)
    for i, name in enumerate(names):
        _, img, median, sigma = MIXTURE[name]
        sel = pick == i
        words[sel] = rng.lognormal(np.log(median), sigma, int(sel.sum()))
        image[sel] = img
    return np.maximum(words.round(), 1).astype(int), image


def sample_json(path: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(words, has_image) of ``n`` records drawn from a LLaVA-format JSON list."""
    records = json.loads(Path(path).read_text())
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(records), size=min(n, len(records)), replace=False)
    words = [sum(len(str(t.get("value", "")).split()) for t in records[i].get("conversations", [])) for i in idx]
    image = [bool(records[i].get("image")) for i in idx]
    return np.maximum(np.array(words), 1), np.array(image)


def lengths_of(words: np.ndarray, image: np.ndarray, *, scale: float = 1.0) -> np.ndarray:
    """Expanded lengths (text tokens + image positions), scaled, cut to the scaled max_length."""
    text = np.round((words * TOKENS_PER_WORD + TEMPLATE_TOKENS) * scale).astype(int)
    full = text + image * int(round(IMAGE_POSITIONS * scale))
    return np.minimum(full, int(MAX_LENGTH * scale))


def micro_batches(lengths: np.ndarray, image: np.ndarray, kind: str, seed: int) -> list[list[int]]:
    from olavlm.data.sampler import build_batch_sampler

    signed = np.where(image, lengths, -lengths)  # the sampler reads the modality from the sign
    sampler = build_batch_sampler(kind, signed, global_batch_size=MICRO_BATCH * 8, micro_batch_size=MICRO_BATCH,
                                  world_size=1, rank=0, seed=seed)
    return [list(b) for b in sampler]


def padding_report(lengths: np.ndarray, batches: list[list[int]], capacity: int) -> dict:
    from olavlm.data.packing import pack_balanced

    real = padded = packed = rows = 0
    for b in batches:
        ls = [int(lengths[i]) for i in b]
        real += sum(ls)
        padded += len(ls) * max(ls)
        r = pack_balanced(ls, capacity)
        rows += len(r)
        packed += len(r) * max(sum(ls[i] for i in row) for row in r)
    return {"padding_fraction_padded": 1 - real / padded, "padding_fraction_packed": 1 - real / packed,
            "positions_padded_over_packed": padded / packed, "rows_per_micro_batch": rows / len(batches),
            "micro_batches": len(batches)}


def build_samples(lengths: np.ndarray, image: np.ndarray, tokens_per_image: int, vocab: int, seed: int) -> list[dict]:
    """Sample dicts as LlavaDataset yields them: random ids, the second half supervised."""
    import torch

    from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    g = torch.Generator().manual_seed(seed)
    out = []
    for k, (n, img) in enumerate(zip(lengths.tolist(), image.tolist())):
        text = n - (tokens_per_image if img else 0)
        ids = torch.randint(10, vocab, (max(text, 2),), generator=g)
        labels = ids.clone()
        labels[: len(ids) // 2] = IGNORE_INDEX
        if img:
            ids = torch.cat([ids[:1], torch.tensor([IMAGE_TOKEN_INDEX]), ids[1:]])
            labels = torch.cat([labels[:1], torch.tensor([IGNORE_INDEX]), labels[1:]])
        out.append({"id": str(k), "input_ids": ids, "labels": labels, "pixel_values": torch.randn(int(img), 3, 64, 64,
                    generator=g), "image_keys": [str(k)] * int(img), "skipped": {}, "replacements": {}})
    return out


def time_steps(args, words, image) -> dict:
    import torch

    from olavlm.data.collate import Collator
    from olavlm.devkit.tiny import make_tiny, tiny_model_config
    from olavlm.model.vlm import OlaVLM
    from olavlm.config import TrainConfig
    from olavlm.train.stages import configure_trainable

    from transformers import AutoTokenizer

    from olavlm.devkit.tiny import make_tiny_llms

    tmp = Path(tempfile.mkdtemp(prefix="olavlm-bench-packing-"))
    make_tiny(tmp, seed=0)
    wide = make_tiny_llms(tmp / "wide", AutoTokenizer.from_pretrained(tmp / "llm-llama"), hidden=args.hidden,
                          layers=args.layers)["llm-llama"]
    torch.manual_seed(0)
    cfg = tiny_model_config(tmp, vision="clip")
    cfg.llm = str(wide)
    for task in cfg.tasks.values():  # IFT: task tokens only, no predictors
        task.layers = []
    model = OlaVLM.from_config(cfg, with_predictors=False)
    configure_trainable(model, "ift", TrainConfig(stage="ift"))
    model.train()
    tpi = model.tokens_per_image
    scale = tpi / IMAGE_POSITIONS
    lengths = lengths_of(words, image, scale=scale)
    capacity = int(MAX_LENGTH * scale)
    samples = build_samples(lengths, image, tpi, len(model.tokenizer), args.seed)
    pad = model.tokenizer.pad_token_id
    collate = {"padded": Collator(pad), "packed": Collator(pad, pack_length=capacity, tokens_per_image=tpi)}
    keys = ("input_ids", "labels", "attention_mask", "pixel_values", "num_images", "segment_ids")
    out = {"scale": scale, "max_length": capacity, "tokens_per_image": tpi, "llm_hidden": args.hidden,
           "llm_layers": args.layers}
    for kind in ("random", "modality_length"):
        chosen = micro_batches(lengths, image, kind, args.seed)[: args.batches]
        batches = {v: [c([samples[i] for i in b]) for b in chosen] for v, c in collate.items()}

        def run(variant):
            def step():
                for b in batches[variant]:
                    model.zero_grad(set_to_none=True)
                    model(**{k: b[k] for k in keys if k in b}).loss.backward()
            return step

        cpu: dict[str, list[float]] = {}
        times, _ = timeit_interleaved({v: run(v) for v in batches}, warmup=1, repeat=args.repeat, cpu=cpu)
        real = int(sum(lengths[i] for b in chosen for i in b))
        variants = {v: {**summarize(t, cpu[v]), "raw": t, "tokens_per_s": real / summarize(t)["median"],
                        "rows": sum(int(b["input_ids"].shape[0]) for b in batches[v])} for v, t in times.items()}
        pad_t, pack_t = variants["padded"], variants["packed"]
        out[kind] = {"variants": variants, "real_tokens": real, "micro_batches": len(chosen),
                     "tokens_per_s_packed_over_padded": pad_t["median"] / pack_t["median"],
                     "ratio": ratio(pad_t, pack_t, what="tokens/s packed / padded (= step time padded / packed)"),
                     "range": [pad_t["min"] / pack_t["max"], pad_t["max"] / pack_t["min"]],
                     "padding": padding_report(lengths, chosen, capacity)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 micro-batches, 1 repeat")
    p.add_argument("--batches", type=int, default=4, help="micro-batches per timed round")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--samples", type=int, default=20000, help="samples drawn for the padding statistics")
    p.add_argument("--from-json", default=None, help="a LLaVA-format JSON to draw word counts from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=256, help="LLM width of the timed model (4 heads)")
    p.add_argument("--layers", type=int, default=2, help="LLM layers of the timed model")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.repeat, args.samples = 2, 1, 2000
    from olavlm.threads import configure_threads

    threads = configure_threads(1, quiet=True)
    words, image = (sample_json(args.from_json, args.samples, args.seed) if args.from_json
                    else sample_mixture(args.samples, args.seed))
    full = lengths_of(words, image)
    padding = {kind: padding_report(full, micro_batches(full, image, kind, args.seed), MAX_LENGTH)
               for kind in ("random", "modality_length")}
    timing = time_steps(args, words, image)
    payload = {"config": {"quick": args.quick, "threads": threads, "micro_batch": MICRO_BATCH, "dtype": "float32",
                          "max_length": MAX_LENGTH, "source": args.from_json or "mixture", "samples": int(len(words)),
                          "load_average_after": load_average()},
               "lengths": {"median": float(np.median(full)), "p90": float(np.percentile(full, 90)),
                           "text_only_fraction": float(1 - image.mean())},
               "padding_full_size": padding, "cpu_step": timing}
    path = write_result("packing", payload)
    for kind in ("random", "modality_length"):
        pf, t = padding[kind], timing[kind]
        print(f"{kind:16s} padding {pf['padding_fraction_padded']:.1%} -> {pf['padding_fraction_packed']:.1%} "
              f"(full size); CPU tokens/s packed / padded {t['tokens_per_s_packed_over_padded']:.2f} (wall median), "
              f"{t['ratio'][t['ratio']['headline']]:.2f} ({t['ratio']['headline']})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
