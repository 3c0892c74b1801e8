"""OlaVLM on tiny real checkpoints: shapes, spans, gradients, training signal, invariances, NTP, save/load."""

from __future__ import annotations

import pytest
import torch

from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from olavlm.model.sequence import SequenceTooLong
from olavlm.devkit.tiny import tiny_model_config
from olavlm.model.vlm import OlaVLM

PREFIXES = ["<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful AI assistant.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n", "<|system|>\nA chat.<|end|>\n<|user|>\n"]
EXTRA = ("loss/ntp", "loss")


def make_batch(tok, specs, pad_to: int = 0):
    """specs: list of (prefix index, has image, answer). Right-padded ids/labels/mask."""
    rows = []
    for prefix, image, answer in specs:
        pre = tok(PREFIXES[prefix])["input_ids"] + ([IMAGE_TOKEN_INDEX] if image else [])
        q = tok("\nWhat is in the image?<|eot_id|>", add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        rows.append((pre + q + a, [IGNORE_INDEX] * (len(pre) + len(q)) + a))
    width = max(pad_to, max(len(r[0]) for r in rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (r_ids, r_labels) in enumerate(rows):
        ids[i, :len(r_ids)], labels[i, :len(r_ids)], mask[i, :len(r_ids)] = torch.tensor(r_ids), torch.tensor(r_labels), True
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pt_mode(model: OlaVLM) -> OlaVLM:
    """PT trainability: LLM and tower frozen; projector, task tokens, predictors, scales train."""
    model.llm.requires_grad_(False)
    model.train()
    return model


def targets_for(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {task: torch.randn(n, *shape, generator=g) for task, shape in model.target_shapes.items()}


@pytest.fixture(scope="module")
def model(tiny_dir):
    torch.manual_seed(0)
    return pt_mode(OlaVLM.from_config(tiny_model_config(tiny_dir)))


@pytest.fixture(scope="module")
def batch(model):
    b = make_batch(model.tokenizer, [(0, True, "A red circle."), (1, True, "Two squares on the left."),
                                     (0, True, "Nothing.")])
    b["pixel_values"] = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return b


@pytest.fixture(scope="module")
def small(tiny_dir):
    """SigLIP (16 image tokens) keeps the multi-step tests cheap."""
    torch.manual_seed(0)
    return pt_mode(OlaVLM.from_config(tiny_model_config(tiny_dir, vision="siglip")))


@pytest.mark.parametrize("vision, tokens", [("clip", 64), ("siglip", 16)])
def test_shapes_and_embeddings_follow_the_spans(tiny_dir, vision, tokens):
    torch.manual_seed(0)
    m = OlaVLM.from_config(tiny_model_config(tiny_dir, vision=vision)).eval()
    side = int(tokens ** 0.5)
    assert m.num_image_tokens == tokens and m.tokens_per_image == tokens + 3 * 2
    assert m.target_shapes == {"gen": (1, 16), "depth": (tokens, 24), "seg": (16, side, side)}
    assert m.image_spec.size == 64
    b = make_batch(m.tokenizer, [(0, True, "A circle."), (1, True, "A square."), (1, False, "Text only.")])
    px = torch.randn(2, 3, 64, 64)
    out = m(**b, pixel_values=px, mode="predict")
    assert {t: {l: tuple(p.shape) for l, p in d.items()} for t, d in out.predictions.items()} == {
        "gen": {2: (2, 1, 16), 4: (2, 1, 16)}, "depth": {1: (2, tokens, 24), 3: (2, tokens, 24)},
        "seg": {2: (2, 16, side, side), 4: (2, 16, side, side)}}
    lay = m.build_layout(b["input_ids"], b["attention_mask"])
    assert lay.image_start.tolist() == [len(m.tokenizer(PREFIXES[0])["input_ids"]),
                                        len(m.tokenizer(PREFIXES[1])["input_ids"])]
    with torch.no_grad():
        embeds = m.embed(lay, px)
        image = m.projector(m.vision(px))
        tasks = torch.cat([m.task_tokens.rows["gen"],  # gen: K rows as is
                           m.task_tokens.rows["depth"].view(2, tokens // 2, -1).mean(1),  # K contiguous groups
                           m.task_tokens.rows["seg"].view(2, tokens // 2, -1).mean(1)])
    for n in range(2):
        s = int(lay.image_start[n])
        torch.testing.assert_close(embeds[n, s:s + tokens], image[n])
        torch.testing.assert_close(embeds[n, s + tokens:s + tokens + 6], tasks)
    text = m.llm.get_input_embeddings().weight[b["input_ids"][2][b["attention_mask"][2]]]
    torch.testing.assert_close(embeds[2, :text.shape[0]], text)


def test_pt_step_gradients_reach_only_the_trainable_parts(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, targets=targets_for(model, 3))
    out.loss.backward()
    groups = model.param_groups()
    for name in ("llm", "vision"):
        assert all(p.grad is None for p in groups[name]), name
    for name in ("projector", "task_tokens", "logit_scales"):
        for p in groups[name]:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for task, by_layer in model.predictors.items():
        for layer, pred in by_layer.items():
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pred.parameters()), (task, layer)
    keys = set(out.metrics)
    for task in ("gen", "depth", "seg"):
        assert f"loss/{task}" in keys and f"logit_scale/{task}" in keys
        for layer in model.cfg.tasks[task].layers:
            assert {f"loss/{task}/layer{layer}/sl1", f"loss/{task}/layer{layer}/contrastive"} <= keys
    total = out.metrics["loss/ntp"] + sum(out.metrics[f"loss/{t}"] for t in ("gen", "depth", "seg"))
    torch.testing.assert_close(out.metrics["loss"], total)
    model.zero_grad(set_to_none=True)


def test_each_task_loss_is_positive_and_falls(small, batch):
    m = small
    targets = targets_for(m, 3)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    history = []
    for _ in range(30):
        out = m(**batch, targets=targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in out.metrics.items()})
    for task in ("gen", "depth", "seg"):
        first, last = history[0][f"loss/{task}"], history[-1][f"loss/{task}"]
        assert first > 0 and last < 0.8 * first, (task, first, last)
        for layer in m.cfg.tasks[task].layers:
            assert history[0][f"loss/{task}/layer{layer}/contrastive"] > 0


def test_text_only_and_masked_samples_leave_embedding_losses_unchanged(model, batch):
    model.eval()
    targets = targets_for(model, 3)
    with torch.no_grad():
        base = model(**batch, targets=targets).metrics
        tok = model.tokenizer
        extra = make_batch(tok, [(0, True, "A red circle."), (1, True, "Two squares on the left."),
                                 (0, True, "Nothing."), (1, False, "A text-only answer that is longer."),
                                 (0, True, "Masked.")])
        px = torch.cat([batch["pixel_values"], torch.randn(1, 3, 64, 64)])
        tgt = {k: torch.cat([v, torch.full_like(v[:1], 7.0)]) for k, v in targets.items()}
        mask = torch.tensor([True, True, True, False])
        more = model(**extra, pixel_values=px, targets=tgt, target_mask=mask).metrics
    model.train()
    emb_keys = [k for k in base if k not in EXTRA]
    assert len(emb_keys) == 3 * 2 * 2 + 3 + 3
    for k in emb_keys:
        assert abs(base[k].item() - more[k].item()) < 1e-5, k


def test_extra_right_padding_does_not_change_predictions(model, batch):
    model.eval()
    wide = make_batch(model.tokenizer, [(0, True, "A red circle."), (1, True, "Two squares on the left."),
                                        (0, True, "Nothing.")], pad_to=batch["input_ids"].shape[1] + 9)
    with torch.no_grad():
        a = model(**batch, mode="predict").predictions
        b = model(**wide, pixel_values=batch["pixel_values"], mode="predict").predictions
    model.train()
    for task in a:
        for layer in a[task]:
            torch.testing.assert_close(a[task][layer], b[task][layer], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("llm", ["llama", "phi3", "qwen2"])
def test_ntp_equals_hf_labels_loss(tiny_dir, llm):
    m = OlaVLM.from_config(tiny_model_config(tiny_dir, llm=llm), with_predictors=False).eval()
    b = make_batch(m.tokenizer, [(0, True, "A red circle."), (1, False, "Just text here.")])
    px = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = m(**b, pixel_values=px).metrics["loss/ntp"]
        lay = m.build_layout(b["input_ids"], b["attention_mask"], b["labels"])
        hf = m.llm(inputs_embeds=m.embed(lay, px), attention_mask=lay.attention_mask.long(),
                   position_ids=lay.position_ids, labels=lay.labels).loss
    assert abs(ours.item() - hf.item()) < 1e-5


def test_layer_states_match_hf_hidden_states(model, batch):
    model.eval()
    states, lay = model.layer_states(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], [1, 3, 4])
    with torch.no_grad():
        hf = model.llm(inputs_embeds=model.embed(lay, batch["pixel_values"]), attention_mask=lay.attention_mask.long(),
                       position_ids=lay.position_ids, output_hidden_states=True).hidden_states
    model.train()
    for layer in (1, 3, 4):
        torch.testing.assert_close(states[layer], hf[layer])
    with pytest.raises(ValueError, match="outside"):
        model.layer_states(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], [5])


def test_save_load_gives_identical_outputs(model, batch, tmp_path):
    model.eval()
    model.save_pretrained(tmp_path / "pt")
    names = {p.name for p in (tmp_path / "pt").iterdir()}
    assert {"config.json", "llm", "vision", "olavlm.safetensors", "tokenizer_config.json"} <= names
    assert (tmp_path / "pt" / "vision" / "preprocessor_config.json").is_file()
    loaded = OlaVLM.from_pretrained(tmp_path / "pt").eval()
    with torch.no_grad():
        a = model(**batch, mode="predict", return_logits=True)
        b = loaded(**batch, mode="predict", return_logits=True)
    assert torch.equal(a.logits, b.logits)
    for task in a.predictions:
        for layer in a.predictions[task]:
            assert torch.equal(a.predictions[task][layer], b.predictions[task][layer])
    # VPT/IFT/export: no predictors; the sequence (task tokens) and logits stay identical
    model.save_pretrained(tmp_path / "ift", with_predictors=False)
    bare = OlaVLM.from_pretrained(tmp_path / "ift").eval()
    assert not bare.predictors and not bare.logit_scales and bare.tokens_per_image == model.tokens_per_image
    dropped = OlaVLM.from_pretrained(tmp_path / "pt", with_predictors=False)
    assert not dropped.predictors
    with torch.no_grad():
        assert torch.equal(bare(**batch, return_logits=True).logits, a.logits)
    with pytest.raises(ValueError, match="without predictors"):
        OlaVLM.from_pretrained(tmp_path / "ift", with_predictors=True)
    with pytest.raises(FileNotFoundError, match="not an olavlm model folder"):
        OlaVLM.from_pretrained(tmp_path / "missing" / "final")  # never mistaken for a hub id
    model.train()


def test_pad_token_policy(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from olavlm.model.io import load_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    tok.pad_token, tok.unk_token = None, None
    tok.save_pretrained(tmp_path / "nopad")
    cfg = tiny_model_config(tiny_dir, tokenizer=str(tmp_path / "nopad"), pad_token="<extra_pad>")
    m = OlaVLM.from_config(cfg, with_predictors=False)
    assert m.tokenizer.pad_token == "<extra_pad>" and m.tokenizer.pad_token_id == len(tok)
    for emb in (m.llm.get_input_embeddings().weight, m.llm.get_output_embeddings().weight):
        assert emb.shape[0] == len(tok) + 1
        torch.testing.assert_close(emb[-1], emb[:-1].mean(0))
    tok.unk_token = "<unk>"
    tok.save_pretrained(tmp_path / "unk")
    assert load_tokenizer(tiny_model_config(tiny_dir, tokenizer=str(tmp_path / "unk"))).pad_token == "<unk>"


def test_generate_greedy_matches_a_recomputed_argmax(model):
    model.eval()
    b = make_batch(model.tokenizer, [(0, True, ""), (1, True, "Longer prompt here")])
    px = torch.randn(2, 3, 64, 64)
    out = model.generate(b["input_ids"], px, b["attention_mask"], max_new_tokens=4)
    for i in range(2):
        ids = b["input_ids"][i][b["attention_mask"][i]][None]
        for step in range(out.shape[1]):
            with torch.no_grad():
                logits = model(ids, pixel_values=px[i:i + 1], return_logits=True).logits
            nxt = int(logits[0, -1].argmax())
            if out[i, step] == model.tokenizer.pad_token_id and step > 0:
                break  # this row finished (eos) before the other
            assert nxt == int(out[i, step]), (i, step)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    model.train()


def test_gradient_checkpointing_and_autocast(tiny_dir, small, batch):
    m = small
    targets = targets_for(m, 3)
    grads = []
    for ckpt in (False, True):
        if ckpt:
            m.gradient_checkpointing_enable()
        m.zero_grad()
        out = m(**batch, targets=targets)
        out.loss.backward()
        grads.append((out.loss.item(), [p.grad.clone() for p in m.parameters() if p.requires_grad]))
    assert abs(grads[0][0] - grads[1][0]) < 1e-5
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    m.gradient_checkpointing_disable()
    bf16 = pt_mode(OlaVLM.from_config(tiny_model_config(tiny_dir, vision="siglip", dtype="bfloat16")))
    assert bf16.llm.dtype == torch.bfloat16 and bf16.projector_weight.dtype == torch.float32
    for autocast in (False, True):
        bf16.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = bf16(**batch, targets=targets)
        out.loss.backward()
        assert torch.isfinite(out.loss) and all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
                                                for p in bf16.parameters() if p.requires_grad)


def test_bad_inputs_raise_clear_errors(model, batch):
    with pytest.raises(ValueError, match="3 image placeholder"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:2]})
    with pytest.raises(ValueError, match="missing task 'seg'"):
        model(**batch, targets={k: v for k, v in targets_for(model, 3).items() if k != "seg"})
    with pytest.raises(ValueError, match=r"targets\['gen'\]: shape"):
        model(**batch, targets={**targets_for(model, 3), "gen": torch.zeros(3, 2, 16)})
    with pytest.raises(SequenceTooLong, match="too_long"):
        model(**batch, max_length=20)


def test_no_task_tokens_no_text_no_contrastive_variant(tiny_dir):
    """Ablation knobs: num_task_tokens=0 (depth/seg rows stay as predictor queries only),
    pass_text_to_predictors=False, use_contrastive=False (no logit scales)."""
    base = tiny_model_config(tiny_dir, vision="siglip")
    tasks = {k: v for k, v in base.tasks.items() if k != "gen"}
    cfg = tiny_model_config(tiny_dir, vision="siglip", num_task_tokens=0, task_order=[], tasks=tasks,
                            pass_text_to_predictors=False, use_contrastive=False)
    m = pt_mode(OlaVLM.from_config(cfg))
    assert m.tokens_per_image == 16 and len(m.logit_scales) == 0
    assert set(m.task_tokens.rows) == {"depth", "seg"}
    b = make_batch(m.tokenizer, [(0, True, "A circle."), (1, True, "A square.")])
    out = m(**b, pixel_values=torch.randn(2, 3, 64, 64), targets=targets_for(m, 2))
    out.loss.backward()
    assert all(out.metrics[f"loss/{t}/layer{l}/contrastive"].item() == 0 for t in ("depth", "seg")
               for l in cfg.tasks[t].layers)
    assert m.task_tokens.rows["depth"].grad.abs().sum() > 0  # reached only as predictor queries
    lay = out.layout
    km = lay.predictor_key_mask("depth", include_text=False)
    assert torch.equal(km.sum(1), torch.tensor([16, 16]))  # only the image's own tokens
