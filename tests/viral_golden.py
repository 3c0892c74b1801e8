"""OLA PT fingerprint on the tiny model: loss, every metric and the gradient norm of every
trainable group after one backward. Recorded once (``python tests/viral_golden.py TINY_DIR``)
before the alignment task kind was added; tests/test_viral.py asserts it is unchanged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "data" / "ola_pt_fingerprint.json"


def ola_pt_fingerprint(tiny_dir) -> dict[str, float]:
    from olavlm.devkit.tiny import tiny_model_config
    from olavlm.model.vlm import OlaVLM
    from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    torch.manual_seed(0)
    model = OlaVLM.from_config(tiny_model_config(tiny_dir, vision="siglip"))
    model.llm.requires_grad_(False)
    model.vision.requires_grad_(False)
    model.train()
    tok = model.tokenizer
    rows = []
    for text, image in (("A red circle.", True), ("Just text here.", False), ("Two squares.", True)):
        ids = tok("User: look", add_special_tokens=False)["input_ids"] + ([IMAGE_TOKEN_INDEX] if image else [])
        ans = tok(" " + text, add_special_tokens=False)["input_ids"]
        rows.append((ids + ans, [IGNORE_INDEX] * len(ids) + ans))
    width = max(len(r[0]) for r in rows)
    input_ids = torch.full((3, width), tok.pad_token_id)
    labels = torch.full((3, width), IGNORE_INDEX)
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, (a, b) in enumerate(rows):
        input_ids[i, :len(a)], labels[i, :len(b)], mask[i, :len(a)] = torch.tensor(a), torch.tensor(b), True
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    targets = {t: torch.randn(2, *s, generator=g) for t, s in model.target_shapes.items()}
    out = model(input_ids, mask, labels, pixels, targets=targets)
    out.loss.backward()
    fp = {k: float(v) for k, v in sorted(out.metrics.items())}
    for group, params in model.param_groups().items():
        if not params:  # a group this model does not have (e.g. LoRA adapters)
            continue
        grads = [p.grad.double().pow(2).sum() for p in params if p.grad is not None]
        fp[f"grad_norm/{group}"] = float(torch.stack(grads).sum().sqrt()) if grads else 0.0
    return fp


if __name__ == "__main__":
    torch.set_num_threads(1)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(ola_pt_fingerprint(sys.argv[1]), indent=1) + "\n")
    print(GOLDEN.read_text())
