"""Templates render byte-identical to the reference strings; whole-prompt tokenization gives exact label
masks (tiny byte-level BPE here; the real Llama-3 / Phi-3 tokenizers in test_tokenize_real.py)."""

from __future__ import annotations

import pytest

from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from olavlm.data import BadSample
from olavlm.data.templates import normalize_conversation, render, render_text
from olavlm.data.tokenize import encode_conversation, encode_prompt, stop_token_ids, truncate

SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
       "detailed, and polite answers to the user's questions.")
L3_SYS = "<|start_header_id|>system<|end_header_id|>\n\n" + SYS
L3_U = "<|start_header_id|>user<|end_header_id|>\n\n"
L3_A = "<|start_header_id|>assistant<|end_header_id|>\n\n"
ONE = [{"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A red circle."}]
TWO = ONE + [{"from": "human", "value": "Where?"}, {"from": "gpt", "value": "On the left."}]
TEXT = [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello."}]
TEMPLATES = ["llava_llama_3", "llava_phi_3", "vicuna_v1", "plain", "chat_template"]


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")


GOLDEN = {
    # (template, conversation, n_images): exact string (rendered by the reference conversation.py)
    ("llava_llama_3", "one", 1): f"{L3_SYS}<|eot_id|>{L3_U}<image>\nWhat is this?<|eot_id|>{L3_A}A red circle.<|eot_id|>",
    ("llava_llama_3", "two", 1): (f"{L3_SYS}<|eot_id|>{L3_U}<image>\nWhat is this?<|eot_id|>{L3_A}A red circle.<|eot_id|>"
                                  f"{L3_U}Where?<|eot_id|>{L3_A}On the left.<|eot_id|>"),
    ("llava_llama_3", "text", 0): f"{L3_SYS}<|eot_id|>{L3_U}Hi there<|eot_id|>{L3_A}Hello.<|eot_id|>",
    ("llava_phi_3", "one", 1): ("<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>\nWhat is this?"
                                "<|end|>\n<|assistant|>\nA red circle.<|end|>"),
    ("llava_phi_3", "two", 1): ("<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>\nWhat is this?"
                                "<|end|>\n<|assistant|>\nA red circle.<|end|>\n<|user|>\nWhere?<|end|>\n<|assistant|>\n"
                                "On the left.<|end|>"),
    ("llava_phi_3", "text", 0): ("<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\nHi there<|end|>"
                                 "\n<|assistant|>\nHello.<|end|>"),
    ("vicuna_v1", "one", 1): f"{SYS} USER: <image>\nWhat is this? ASSISTANT: A red circle.</s>",
    ("vicuna_v1", "two", 1): (f"{SYS} USER: <image>\nWhat is this? ASSISTANT: A red circle.</s>"
                              "USER: Where? ASSISTANT: On the left.</s>"),
    ("vicuna_v1", "text", 0): f"{SYS} USER: Hi there ASSISTANT: Hello.</s>",
    ("plain", "one", 1): "<image>A red circle.<|eot_id|>",
    ("plain", "text", 0): "Hello.<|eot_id|>",
    ("chat_template", "one", 1): f"<|begin_of_text|>{L3_U}<image>\nWhat is this?<|eot_id|>{L3_A}A red circle.<|eot_id|>",
    ("chat_template", "two", 1): (f"<|begin_of_text|>{L3_U}<image>\nWhat is this?<|eot_id|>{L3_A}A red circle.<|eot_id|>"
                                  f"{L3_U}Where?<|eot_id|>{L3_A}On the left.<|eot_id|>"),
    ("chat_template", "text", 0): f"<|begin_of_text|>{L3_U}Hi there<|eot_id|>{L3_A}Hello.<|eot_id|>",
}
CONVS = {"one": ONE, "two": TWO, "text": TEXT}


@pytest.mark.parametrize("key", list(GOLDEN), ids=lambda k: f"{k[0]}-{k[1]}")
def test_golden_strings(tok, key):
    template, conv, n = key
    assert render_text(normalize_conversation(CONVS[conv], n), template, tok) == GOLDEN[key]


def test_open_turn_matches_spec(tok):
    """Reference examples: image turn, answer, open second turn."""
    conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q2"}]
    m = normalize_conversation(conv, 1, open_turn=True)
    assert render_text(m, "llava_llama_3", open_turn=True) == (
        f"{L3_SYS}<|eot_id|>{L3_U}<image>\nQ<|eot_id|>{L3_A}A<|eot_id|>{L3_U}Q2<|eot_id|>{L3_A}")
    assert render_text(m, "llava_phi_3", open_turn=True) == (
        "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>\nQ<|end|>\n<|assistant|>\nA<|end|>"
        "\n<|user|>\nQ2<|end|>\n<|assistant|>\n")
    assert render_text(m, "vicuna_v1", open_turn=True) == f"{SYS} USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:"


def test_placeholder_moved_to_turn_start():
    m = normalize_conversation([{"from": "human", "value": "  look <image> here "}, {"from": "gpt", "value": "ok"}], 1)
    assert m[0]["value"] == "<image>\nlook  here"
    m = normalize_conversation([{"from": "human", "value": "<image> a <image>"}, {"from": "gpt", "value": "ok"}], 2)
    assert m[0]["value"] == "<image>\n<image>\na"


@pytest.mark.parametrize("bad,reason", [
    ("nope", "bad_conversation"),
    ([], "bad_conversation"),
    ([{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}], "bad_conversation"),
    ([{"from": "human", "value": "Q"}, {"from": "human", "value": "Q"}], "bad_conversation"),
    ([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "  "}], "bad_conversation"),
    ([{"from": "human", "value": "Q"}], "bad_conversation"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "A"}], "bad_conversation"),
    ([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "A"}], "image_token_mismatch"),
    ([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "image_token_mismatch"),
])
def test_bad_conversations(bad, reason):
    with pytest.raises(BadSample) as e:
        normalize_conversation(bad, 1)
    assert e.value.reason == reason


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("conv", ["one", "two", "text"])
def test_label_round_trip(tok, template, conv):
    """Decoding the supervised positions gives exactly the replies + terminators; every other
    position is IGNORE; the image is one IMAGE_TOKEN_INDEX; the ids decode back to the prompt."""
    if template == "plain" and conv == "two":
        with pytest.raises(BadSample):
            encode_conversation(CONVS[conv], template, tok, num_images=1)
        return
    n = 0 if conv == "text" else 1
    enc = encode_conversation(CONVS[conv], template, tok, num_images=n)
    assert len(enc.input_ids) == len(enc.labels)
    assert enc.input_ids.count(IMAGE_TOKEN_INDEX) == n
    rendered = render(normalize_conversation(CONVS[conv], n), template, tok)
    replies = rendered.replies()
    # independent expectation: one reply per gpt turn, ending with the template's terminator
    term = {"llava_llama_3": "<|eot_id|>", "llava_phi_3": "<|end|>", "vicuna_v1": "</s>", "plain": "<|eot_id|>",
            "chat_template": "<|eot_id|>"}[template]
    lead = " " if template == "vicuna_v1" else ""
    gpt = [t["value"] for t in CONVS[conv] if t["from"] == "gpt"]
    assert replies == [lead + v + term for v in gpt]
    # supervised spans, decoded one by one
    spans, cur = [], []
    for i, lab in zip(enc.input_ids, enc.labels):
        if lab == IGNORE_INDEX:
            if cur:
                spans.append(cur)
                cur = []
        else:
            assert lab == i
            cur.append(i)
    spans += [cur] if cur else []
    assert [tok.decode(s) for s in spans] == replies
    # the full id sequence decodes back to BOS + the rendered text (image placeholder as text)
    text = rendered.text
    decoded = "".join("<image>" if i == IMAGE_TOKEN_INDEX else tok.decode([i]) for i in enc.input_ids)
    assert decoded == (text if text.startswith("<|begin_of_text|>") else "<|begin_of_text|>" + text)
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id


def test_bos_policy(tok):
    enc = encode_conversation(TEXT, "llava_llama_3", tok, num_images=0, add_bos=False)
    assert enc.input_ids[0] != tok.bos_token_id
    assert encode_conversation(TEXT, "llava_llama_3", tok, num_images=0, add_bos=True).input_ids[1:] == enc.input_ids


@pytest.mark.parametrize("template", ["llava_llama_3", "llava_phi_3", "vicuna_v1", "chat_template"])
def test_encode_prompt_is_training_prefix(tok, template):
    """Inference sees the training sequence: the prompt equals the training ids up to the last reply."""
    enc = encode_conversation(TWO, template, tok, num_images=1)
    prompt = encode_prompt(TWO[:3], template, tok)
    last_reply_start = max(i for i, lab in enumerate(enc.labels) if lab == IGNORE_INDEX) + 1
    assert prompt == enc.input_ids[:last_reply_start]
    # num_images given without placeholder text: inserted at the start of the first human turn
    assert encode_prompt([{"from": "human", "value": "What is this?"}], template, tok, num_images=1) == \
        encode_prompt([ONE[0]], template, tok)
    stops = stop_token_ids(template, tok)
    assert enc.input_ids[-1] == stops[0] and tok.eos_token_id in stops
    with pytest.raises(ValueError):
        encode_prompt(ONE, template, tok)  # ends with a gpt turn: nothing to generate


def test_truncate_and_empty_target(tok):
    enc = encode_conversation(TWO, "llava_llama_3", tok, num_images=1)
    n = enc.expanded_length(10)
    assert n == len(enc.input_ids) + 9
    cut = truncate(enc, n - 3, 10)
    assert cut.expanded_length(10) == n - 3 and cut.input_ids == enc.input_ids[:-3]
    first_reply = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    with pytest.raises(BadSample) as e:
        truncate(enc, first_reply + 9, 10)  # keeps the image but no reply token
    assert e.value.reason == "empty_target"
    assert truncate(enc, first_reply + 10, 10).labels[-1] == enc.labels[first_reply]
    with pytest.raises(BadSample) as e:
        truncate(enc, 12, 10)  # the image itself would be cut
    assert e.value.reason == "too_long"


def test_unknown_template(tok):
    with pytest.raises(ValueError, match="unknown template"):
        encode_conversation(ONE, "llama2", tok, num_images=1)


@pytest.mark.parametrize("template", TEMPLATES)
def test_ids_are_the_whole_prompt_ids(tok, template):
    """Independent check: the ids equal the tokenizer's own ids of the full rendered string, split only
    at the image placeholder (for byte-level BPE splitting there changes nothing)."""
    for conv in (TEXT, TWO):
        if template == "plain" and conv is TWO:
            continue
        n = 0 if conv is TEXT else 1
        enc = encode_conversation(conv, template, tok, num_images=n)
        text = render_text(normalize_conversation(conv, n), template, tok)
        parts = text.split("<image>")
        ids = tok(parts[0], add_special_tokens=not text.startswith("<|begin_of_text|>"))["input_ids"]
        for part in parts[1:]:
            ids += [IMAGE_TOKEN_INDEX] + tok(part, add_special_tokens=False)["input_ids"]
        assert enc.input_ids == ids


def test_chat_template_matches_apply_chat_template(tok):
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]
    ref = tok.apply_chat_template(msgs, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert encode_conversation(TEXT, "chat_template", tok, num_images=0).input_ids == list(ref)
    gen = tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True)
    gen = gen["input_ids"] if isinstance(gen, dict) or hasattr(gen, "keys") else gen
    assert encode_prompt(TEXT[:1], "chat_template", tok) == list(gen)


PHI3_CHAT = ("{% for message in messages %}{{'<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n'}}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _with_template(tok, template):
    import copy

    other = copy.deepcopy(tok)
    other.chat_template = template
    return other


@pytest.mark.parametrize("chat,eot,tail", [(PHI3_CHAT, "<|end|>", "\n<|eot_id|>"), (CHATML, "<|im_end|>", "\n")])
def test_chat_template_end_of_turn(tok, chat, eot, tail):
    """A template that writes EOS only at the end of a conversation (Phi-3) or a newline after the end
    token (ChatML): supervised = reply + the end token; the rest is prompt; multi-turn works."""
    from olavlm.data.templates import TEMPLATES

    other = _with_template(tok, chat)
    assert TEMPLATES["chat_template"].end_of_turn(other) == (eot, tail)
    conv = [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "On the left."}]
    rendered = render(normalize_conversation(conv, 0), "chat_template", other)
    assert rendered.replies() == ["Hello." + eot, "On the left." + eot]
    assert rendered.text == other.apply_chat_template(
        [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conv],
        tokenize=False)
    enc = encode_conversation(conv, "chat_template", other, num_images=0)
    spans = [other.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])]
    assert spans == ["Hello." + eot + "On the left." + eot]
    assert stop_token_ids("chat_template", other)[0] == other.convert_tokens_to_ids(eot)
    prompt = encode_prompt(conv[:3], "chat_template", other)
    assert prompt == enc.input_ids[:len(prompt)]  # the open prompt ends exactly where the last reply starts
    assert enc.labels[len(prompt) - 1] == IGNORE_INDEX and enc.labels[len(prompt)] != IGNORE_INDEX


def test_chat_template_refusals(tok):
    """Unusable templates are refused up front in one line; a record the template rejects is a BadSample."""
    from olavlm.data.tokenize import check_template

    silent = _with_template(tok, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="writes nothing after a reply"):
        check_template("chat_template", silent)
    with pytest.raises(ValueError, match="needs a tokenizer that has a chat_template"):
        check_template("chat_template", _with_template(tok, None))
    picky = _with_template(tok, "{% if messages[0]['content'] == 'bad' %}{{ raise_exception('no bad') }}"
                                "{% endif %}" + CHATML)
    assert check_template("chat_template", picky) is True
    with pytest.raises(BadSample) as e:
        encode_conversation([{"from": "human", "value": "bad"}, {"from": "gpt", "value": "A"}], "chat_template",
                            picky, num_images=0)
    assert e.value.reason == "bad_conversation" and "no bad" in e.value.msg


def test_rendered_spans_cover_the_replies(tok):
    for template in TEMPLATES:
        conv = ONE if template == "plain" else TWO
        r = render(normalize_conversation(conv, 1), template, tok)
        assert [r.text[a:b] for a, b in r.spans] == r.replies() and len(r.spans) == (1 if template == "plain" else 2)
        assert all(b <= c for (_, b), (c, _) in zip(r.spans, r.spans[1:]))


@pytest.mark.parametrize("value,ok", [(True, True), (False, True), ("auto", True), ("maybe", False), (1, False)])
def test_data_add_bos_field(value, ok):
    from olavlm.config import ConfigError, RunConfig, from_dict, validate

    if ok:
        cfg = from_dict(RunConfig, {"data": {"add_bos": value}})
        validate(cfg)
        assert cfg.data.add_bos == value
    else:
        with pytest.raises(ConfigError, match="data.add_bos"):
            validate(from_dict(RunConfig, {"data": {"add_bos": value}}))


def test_dataset_uses_data_add_bos(tok, tmp_path):
    import json

    from olavlm.config import DataConfig
    from olavlm.data.dataset import LlavaDataset
    from olavlm.data.images import ImageSpec

    data = tmp_path / "d.jsonl"
    record = {"id": "t", "conversations": TEXT}
    data.write_text(json.dumps(record) + "\n")
    spec = ImageSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    ids = {}
    for policy in ("auto", False):
        cfg = DataConfig(train_file=str(data), template="llava_llama_3", add_bos=policy)
        ids[policy] = LlavaDataset(cfg, tok, image_spec=spec, tokens_per_image=4).encode(record)[0].input_ids
    assert ids["auto"][0] == tok.bos_token_id and ids["auto"][1:] == ids[False]
    with pytest.raises(ValueError, match="data.add_bos: false"):  # refused when the dataset is built
        LlavaDataset(DataConfig(train_file=str(data), template="chat_template", add_bos=False), tok, image_spec=spec,
                     tokens_per_image=4)
