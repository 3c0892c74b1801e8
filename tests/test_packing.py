"""Padding-free packing: a packed batch is the unpacked batch of the same samples, numerically.

Loss and gradients equal (sdpa, eager, and the flattened position-ids path that flash-attention's
varlen kernel takes), attention never crosses samples, positions restart per sample, generation
(never packed) is unchanged.
"""

from __future__ import annotations

import pytest
import torch

from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, KIND_PAD
from olavlm.data.collate import Collator
from olavlm.data.packing import expanded_length, pack_balanced, pack_rows, padding_fraction
from olavlm.model.sequence import build_layout
from olavlm.devkit.tiny import tiny_model_config
from olavlm.model.vlm import OlaVLM

PROMPTS = ["<|start_header_id|>user<|end_header_id|>\n\n", "<|system|>\nA chat.<|end|>\n<|user|>\n"]
SPECS = [(0, True, "A red circle on the left."), (1, False, "Text only answer, a bit longer than the others."),
         (0, True, "No."), (1, True, "Two squares."), (0, False, "Yes.")]


def make_samples(tok, specs=SPECS, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, (prompt, image, answer) in enumerate(specs):
        pre = tok(PROMPTS[prompt])["input_ids"] + ([IMAGE_TOKEN_INDEX] if image else [])
        q = tok("\nWhat is shown?", add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(pre + q + a)
        labels = torch.tensor([IGNORE_INDEX] * (len(pre) + len(q)) + a)
        px = torch.randn(int(image), 3, 64, 64, generator=g)
        out.append({"id": f"s{k}", "input_ids": ids, "labels": labels, "pixel_values": px,
                    "image_keys": [f"img{k}"] * int(image), "skipped": {}, "replacements": {}})
    return out


@pytest.fixture(scope="module", params=["llama", "phi3"])
def ift_model(request, tiny_dir):
    torch.manual_seed(0)
    cfg = tiny_model_config(tiny_dir, llm=request.param, vision="siglip")
    return OlaVLM.from_config(cfg, with_predictors=False).train()


def _inputs(batch):
    keys = ("input_ids", "labels", "attention_mask", "pixel_values", "num_images", "segment_ids")
    return {k: batch[k] for k in keys if k in batch}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**_inputs(batch))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def test_pack_rows_first_fit_decreasing():
    # by hand: 7 -> row A (room 3), 5 -> row B (room 5), 4 -> B (room 1), 3 -> A (room 0), 2 -> new row C
    assert pack_rows([5, 3, 7, 2, 4], capacity=10) == [[0, 4], [1, 2], [3]]
    assert pack_rows([3, 3, 3], capacity=9) == [[0, 1, 2]]
    assert padding_fraction([5, 3, 7, 2, 4]) == pytest.approx(1 - 21 / 35)
    assert padding_fraction([5, 3, 7, 2, 4], [[0, 4], [1, 2], [3]]) == pytest.approx(1 - 21 / 30)
    with pytest.raises(ValueError, match="longer than the row capacity"):
        pack_rows([11], 10)
    # balanced: still 3 rows, but at capacity 7 (= 21 / 3) they are even: no padding at all
    assert pack_balanced([5, 3, 7, 2, 4], 10) == [[0, 3], [1, 4], [2]]
    assert padding_fraction([5, 3, 7, 2, 4], pack_balanced([5, 3, 7, 2, 4], 10)) == 0
    assert pack_balanced([4, 4, 4], 100) == [[0, 1, 2]]


def test_layout_positions_restart_and_first_labels_are_ignored():
    ids = torch.tensor([[5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9, 0], [1, IMAGE_TOKEN_INDEX, 2, 0, 0, 0, 0]])
    mask = ids != 0
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, -1], [2, 2, 2, -1, -1, -1, -1]])
    labels = torch.where(mask, ids, torch.full_like(ids, IGNORE_INDEX))
    lay = build_layout(ids, mask, labels, num_image_tokens=3, task_order=("a",), num_task_tokens=1, segment_ids=seg)
    # row 0: [5 6 I I I a 7 8 9] -> sample 0 spans 6 positions, sample 1 three; row 1: [1 I I I a 2 pad pad pad]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2]]
    assert lay.segment_ids.tolist() == [[0] * 6 + [1] * 3, [2] * 6 + [-1] * 3]
    assert lay.image_segment.tolist() == [0, 2]
    assert lay.labels[0].tolist() == [IGNORE_INDEX, 6] + [IGNORE_INDEX] * 4 + [IGNORE_INDEX, 8, 9]
    m = lay.block_attention_mask(torch.float32)[:, 0] == 0
    expected = torch.zeros(2, 9, 9, dtype=torch.bool)
    expected[0, :6, :6] = expected[0, 6:, 6:] = True
    expected[1, :6, :6] = expected[1, 6:, 6:] = True  # padding sees padding only
    assert torch.equal(m, expected.tril())
    assert torch.equal(lay.block_attention_mask(torch.bool)[:, 0], expected.tril())
    with pytest.raises(ValueError, match="contiguous"):
        build_layout(ids, mask, labels, num_image_tokens=3, task_order=("a",), num_task_tokens=1,
                     segment_ids=torch.tensor([[0, 1, 0, 1, 1, 1, -1], [2] * 7]))


def test_collator_packs_in_order_and_keeps_per_sample_keys(ift_model):
    samples = make_samples(ift_model.tokenizer)
    tpi = ift_model.tokens_per_image
    lengths = [expanded_length(s["input_ids"], tpi) for s in samples]
    cap = max(lengths) + min(lengths) + 1
    batch = Collator(ift_model.tokenizer.pad_token_id, pack_length=cap, tokens_per_image=tpi)(samples)
    rows = pack_balanced(lengths, cap)
    order = [i for r in rows for i in r]
    assert batch["sample_ids"] == [f"s{i}" for i in order]
    assert batch["num_images"].tolist() == [samples[i]["pixel_values"].shape[0] for i in order]
    assert torch.equal(batch["pixel_values"], torch.cat([samples[i]["pixel_values"] for i in order]))
    assert batch["input_ids"].shape[0] == len(rows) < len(samples)
    for r, row in enumerate(rows):
        seg = batch["segment_ids"][r]
        for i in row:
            k = order.index(i)
            assert torch.equal(batch["input_ids"][r][seg == k], samples[i]["input_ids"])
            assert torch.equal(batch["labels"][r][seg == k], samples[i]["labels"])
    assert torch.equal(batch["attention_mask"], batch["segment_ids"] >= 0)


@pytest.mark.parametrize("mode", ["sdpa", "eager", "position_ids"])
def test_packed_loss_and_grads_equal_unpacked(ift_model, mode):
    model = ift_model
    impl = "sdpa" if mode == "position_ids" else mode
    model.llm.config._attn_implementation = impl
    model.llm.set_attn_implementation(impl)
    model.packed_attention = "position_ids" if mode == "position_ids" else "mask"
    try:
        samples = make_samples(model.tokenizer)
        pad = model.tokenizer.pad_token_id
        plain = Collator(pad)(samples)
        packed = Collator(pad, pack_length=160, tokens_per_image=model.tokens_per_image)(samples)
        assert packed["input_ids"].shape[0] < len(samples)
        l0, g0 = _loss_and_grads(model, plain)
        l1, g1 = _loss_and_grads(model, packed)
    finally:
        model.llm.set_attn_implementation("sdpa")
        model.packed_attention = "auto"
    assert torch.allclose(l0, l1, atol=1e-5, rtol=0), (l0, l1)
    assert g0.keys() == g1.keys() and any(".layers." in n for n in g0) and any("projector" in n for n in g0)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5, rtol=1e-4), name


def test_attention_never_crosses_samples_and_logits_match(ift_model):
    model = ift_model.eval()
    try:
        samples = make_samples(model.tokenizer)
        pad = model.tokenizer.pad_token_id
        collate = Collator(pad, pack_length=400, tokens_per_image=model.tokens_per_image)
        with torch.no_grad():
            packed = collate(samples)
            assert packed["input_ids"].shape[0] == 1  # everything in one row
            out = model(**_inputs(packed), return_logits=True)
            seg = out.layout.segment_ids[0]
            names = packed["sample_ids"]
            for k, name in enumerate(names):  # each sample's logits = the sample run alone
                alone = Collator(pad)([samples[int(name[1:])]])
                ref = model(**_inputs(alone), return_logits=True).logits[0]
                assert torch.allclose(out.logits[0][seg == k], ref, atol=1e-5), name
            # perturb one sample (its tokens and its image): every other sample's logits stay put
            changed = [dict(s) for s in samples]
            victim = next(i for i, s in enumerate(samples) if s["pixel_values"].shape[0])
            changed[victim]["input_ids"] = changed[victim]["input_ids"].clone()
            changed[victim]["input_ids"][-1] = 42
            changed[victim]["pixel_values"] = torch.randn_like(changed[victim]["pixel_values"])
            out2 = model(**_inputs(collate(changed)), return_logits=True)
            k_victim = names.index(f"s{victim}")
            others = (seg != k_victim) & (seg >= 0)
            assert torch.equal(out.logits[0][others], out2.logits[0][others])
            assert not torch.allclose(out.logits[0][seg == k_victim], out2.logits[0][seg == k_victim])
    finally:
        model.train()


def test_generation_is_unpacked_and_unchanged(ift_model):
    """Generation never packs: its greedy first token is the argmax of the packed training forward's
    logits at each prompt's last position."""
    model = ift_model.eval()
    try:
        tok = model.tokenizer
        samples = make_samples(tok)[:3]
        pad = tok.pad_token_id
        with torch.no_grad():
            packed = Collator(pad, pack_length=400, tokens_per_image=model.tokens_per_image)(samples)
            out = model(**_inputs(packed), return_logits=True)
            seg = out.layout.segment_ids[0]
            for k, name in enumerate(packed["sample_ids"]):
                s = samples[int(name[1:])]
                last = out.logits[0][seg == k][-1]
                new = model.generate(s["input_ids"][None], s["pixel_values"] if s["pixel_values"].numel() else None,
                                     max_new_tokens=1)
                assert int(new[0, -1]) == int(last.argmax())
    finally:
        model.train()


def test_pad_kind_and_lengths_in_packed_rows(ift_model):
    samples = make_samples(ift_model.tokenizer)
    batch = Collator(ift_model.tokenizer.pad_token_id, pack_length=160,
                     tokens_per_image=ift_model.tokens_per_image)(samples)
    lay = ift_model.build_layout(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                 segment_ids=batch["segment_ids"])
    assert int(lay.lengths.max()) <= 160
    assert torch.equal(lay.segment_ids < 0, lay.token_kind == KIND_PAD)
    total = sum(expanded_length(s["input_ids"], ift_model.tokens_per_image) for s in samples)
    assert int(lay.attention_mask.sum()) == total


def test_pt_packed_losses_equal_unpacked(tiny_dir):
    """PT packs too: the predictors only see their own sample's text and the embedding losses are per image."""
    torch.manual_seed(0)
    model = OlaVLM.from_config(tiny_model_config(tiny_dir, vision="siglip"))
    model.llm.requires_grad_(False)
    model.train()
    samples = make_samples(model.tokenizer)
    g = torch.Generator().manual_seed(5)
    for s in samples:  # per-image targets travel with their sample
        n = s["pixel_values"].shape[0]
        s["targets"] = [{t: torch.randn(shape, generator=g) for t, shape in model.target_shapes.items()}
                        for _ in range(n)]
        s["image_keys"] = s["image_keys"][:n]
    pad = model.tokenizer.pad_token_id
    shapes = model.target_shapes
    results = []
    for collate in (Collator(pad, shapes), Collator(pad, shapes, pack_length=160, tokens_per_image=model.tokens_per_image)):
        batch = collate(samples)
        model.zero_grad(set_to_none=True)
        out = model(**_inputs(batch), targets=batch["targets"], target_mask=batch["target_mask"])
        out.loss.backward()
        results.append((out.metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (m0, g0), (m1, g1) = results
    assert any(k.startswith("loss/depth") for k in m0)
    for key in m0:
        assert torch.allclose(m0[key], m1[key], atol=1e-5), key
    assert g0.keys() == g1.keys() and any(n.startswith("predictors.") for n in g0)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5, rtol=1e-4), name
