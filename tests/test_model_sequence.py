"""olavlm.model.sequence: spans recorded by construction (two templates x two image-token counts)."""

from __future__ import annotations

import pytest
import torch

from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, KIND_IMAGE, KIND_PAD, KIND_TASK0, KIND_TEXT
from olavlm.model.sequence import SequenceTooLong, assemble_embeddings, build_layout

# Two system prefixes with different token counts (Llama-3 and Phi-3 style headers).
PREFIXES = [
    "<|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an artificial intelligence "
    "assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
    "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n",
]
ORDER = ("gen", "depth", "seg")


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")


def _sample(tok, prefix, question="\nWhat is in the image?", answer="A red circle.", image=True):
    pre = tok(prefix)["input_ids"]  # BOS + prefix
    q = tok(question, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    ids = pre + ([IMAGE_TOKEN_INDEX] if image else []) + q + a
    labels = [IGNORE_INDEX] * (len(ids) - len(a)) + a
    return ids, labels, len(pre), len(q), len(a)


def _batch(rows, pad_id=0):
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (r_ids, r_labels, *_) in enumerate(rows):
        ids[i, :len(r_ids)], labels[i, :len(r_ids)], mask[i, :len(r_ids)] = torch.tensor(r_ids), torch.tensor(r_labels), True
    return ids, labels, mask


@pytest.mark.parametrize("num_image_tokens", [64, 16])
def test_spans_for_two_templates(tok, num_image_tokens):
    k = 2
    rows = [_sample(tok, p) for p in PREFIXES] + [_sample(tok, PREFIXES[0], image=False)]
    ids, labels, mask = _batch(rows)
    lay = build_layout(ids, mask, labels, num_image_tokens=num_image_tokens, task_order=ORDER, num_task_tokens=k)
    assert lay.num_images == 2 and lay.image_sample.tolist() == [0, 1]
    for i, (r_ids, r_labels, n_pre, n_q, n_a) in enumerate(rows[:2]):
        start = n_pre  # the image starts right after whatever the template's prefix tokenised to
        assert int(lay.image_start[i]) == start
        assert lay.task_start[i].tolist() == [start + num_image_tokens + j * k for j in range(3)]
        kinds = lay.token_kind[i]
        assert (kinds[:start] == KIND_TEXT).all()
        assert (kinds[start:start + num_image_tokens] == KIND_IMAGE).all()
        for j in range(3):
            t0 = start + num_image_tokens + j * k
            assert (kinds[t0:t0 + k] == KIND_TASK0 + j).all()
        text_after = start + num_image_tokens + 3 * k
        length = text_after + n_q + n_a
        assert int(lay.lengths[i]) == length and (kinds[text_after:length] == KIND_TEXT).all()
        assert (kinds[length:] == KIND_PAD).all() and not lay.attention_mask[i, length:].any()
        # labels: IGNORE on image/task positions, the answer at the end, nothing else
        assert (lay.labels[i, :text_after] == IGNORE_INDEX).all()
        assert lay.labels[i, length - n_a:length].tolist() == r_labels[-n_a:]
        assert lay.position_ids[i, :length].tolist() == list(range(length))
    # the text-only sample gets no image or task tokens
    assert int(lay.lengths[2]) == len(rows[2][0]) and (lay.token_kind[2, :len(rows[2][0])] == KIND_TEXT).all()
    # the two templates give different image offsets: nothing is a constant
    assert rows[0][2] != rows[1][2]


def test_key_mask_excludes_padding_other_tasks_and_other_images(tok):
    ids, labels, mask = _batch([_sample(tok, PREFIXES[1]), _sample(tok, PREFIXES[0])])
    two = torch.cat([ids[:1, :5], torch.tensor([[IMAGE_TOKEN_INDEX]]), ids[:1, 5:]], 1)  # 2 images in sample 0
    ids2 = torch.cat([two, torch.cat([ids[1:], torch.zeros(1, 1, dtype=torch.long)], 1)])
    mask2 = torch.cat([torch.cat([mask[:1, :5], mask[:1, :1], mask[:1, 5:]], 1),
                       torch.cat([mask[1:], torch.zeros(1, 1, dtype=torch.bool)], 1)])
    lay = build_layout(ids2, mask2, num_image_tokens=4, task_order=ORDER, num_task_tokens=2)
    assert lay.image_sample.tolist() == [0, 0, 1]
    km = lay.predictor_key_mask("depth", include_text=True)
    for n in range(3):
        kinds = lay.token_kind[lay.image_sample[n]]
        pos = torch.arange(kinds.numel())
        own_img = (pos >= lay.image_start[n]) & (pos < lay.image_start[n] + 4)
        own_task = (pos >= lay.task_start[n, 1]) & (pos < lay.task_start[n, 1] + 2)
        assert torch.equal(km[n], (kinds == KIND_TEXT) | own_img | own_task)
        assert not km[n][kinds == KIND_PAD].any()
        assert not km[n][(kinds == KIND_TASK0) | (kinds == KIND_TASK0 + 2)].any()
    assert torch.equal(lay.predictor_key_mask("seg", include_text=False).sum(1), torch.tensor([6, 6, 6]))


def test_too_long_and_left_padding(tok):
    ids, labels, mask = _batch([_sample(tok, PREFIXES[0]), _sample(tok, PREFIXES[1], image=False)])
    lay = build_layout(ids, mask, num_image_tokens=16, task_order=ORDER, num_task_tokens=2)
    with pytest.raises(SequenceTooLong, match="too_long") as e:
        build_layout(ids, mask, num_image_tokens=16, task_order=ORDER, num_task_tokens=2,
                     max_length=int(lay.lengths[0]) - 1)
    assert e.value.samples == [0] and e.value.reason == "too_long"
    left = build_layout(ids, mask, num_image_tokens=16, task_order=ORDER, num_task_tokens=2, padding_side="left")
    length = left.token_kind.shape[1]
    short = int(left.lengths[1])
    assert not left.attention_mask[1, :length - short].any() and left.attention_mask[1, length - short:].all()
    assert left.position_ids[1, length - short:].tolist() == list(range(short))
    assert torch.equal(left.token_kind[0], lay.token_kind[0])  # the longest row is unchanged


def test_assemble_places_every_part_and_is_differentiable():
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 6, 7], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    lay = build_layout(ids, mask, num_image_tokens=3, task_order=("a", "b"), num_task_tokens=1)
    table = torch.randn(10, 4)
    image = torch.randn(1, 3, 4, requires_grad=True)
    tasks = torch.randn(2, 4, requires_grad=True)
    out = assemble_embeddings(lay, table[lay.text_ids], image, tasks, torch.float32)
    expected = torch.stack([
        torch.cat([table[5:6], image[0], tasks, table[6:8]]),
        torch.cat([table[8:10], torch.zeros(6, 4)]),
    ])
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert torch.equal(image.grad, torch.ones_like(image)) and torch.equal(tasks.grad, torch.ones_like(tasks))
