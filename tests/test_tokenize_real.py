"""Token ids and label masks with the real Llama-3 and Phi-3 tokenizers (byte-level BPE and SentencePiece).

References are computed independently of olavlm's tokenization: the tokenizer's own ids of the whole
rendered prompt through the transformers API, on a copy of the tokenizer where ``<image>`` is an
added token (the placeholder must be one atomic position, as every special token of the prompt is),
and supervised counts from tokenizing prompt prefixes. Skipped when the fixture folder is absent.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from olavlm.data.show import render_sample
from olavlm.data.templates import normalize_conversation, render_text
from olavlm.data.tokenize import (check_template, encode_conversation, encode_prompt, resolve_bos,
                                  stop_token_ids)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tokenizers"
NAMES = ["llama3", "phi3", "phi3_bos"]
TEMPLATES = ["llava_llama_3", "llava_phi_3", "vicuna_v1", "plain", "chat_template"]


def h(v):
    return {"from": "human", "value": v}


def g(v):
    return {"from": "gpt", "value": v}


CONVS = {
    "single": [h("What is in the image?\n<image>"), g("5 apples on a table.")],  # reply starts with a digit
    "multi": [h("<image>\nDescribe it."), g(" A leading space."), h("Where?"), g("\nA leading newline."),
              h("Why?"), g("(B) because, well: punctuation!"), h("Say hi"), g("Grüße, 日本語です 🙂 é")],
    "text": [h("Hi there"), g("Hello.")],
    "text_multi": [h("Count to three."), g("1, 2, 3."), h("In French?"), g("un, deux, trois — voilà.")],
    "space_caption": [h("<image>"), g(" A caption after a space.")],
}
SINGLE_TURN = ["single", "text", "space_caption"]  # the only ones `plain` accepts
# the templates whose end-of-turn text is an added token of the tokenizer (the pairs one trains with)
NATURAL = {"llama3": {"llava_llama_3", "vicuna_v1", "plain", "chat_template"},
           "phi3": {"llava_phi_3", "vicuna_v1", "plain", "chat_template"}}
NATURAL["phi3_bos"] = NATURAL["phi3"]


# (tokenizer, template) pairs where a reply's leading "\n" merges with the header's last "\n"s into
# one token that differs from the prompt's last token: the only exception to prompt == training prefix
MERGES_INTO_HEADER = {("llama3", "llava_llama_3"), ("llama3", "llava_phi_3")}


def load_fixture(name: str):
    from transformers import AutoTokenizer

    path = FIXTURES / name
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"real tokenizer fixture {path} is absent")
    return AutoTokenizer.from_pretrained(path)


_LOADED: dict = {}


def fixture_pair(name: str):
    """(tokenizer, reference copy with ``<image>`` as an added token, its id), loaded once."""
    if name not in _LOADED:
        from tokenizers import AddedToken

        tok = load_fixture(name)
        ref = copy.deepcopy(tok)
        ref.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        _LOADED[name] = (tok, ref, ref.convert_tokens_to_ids("<image>"))
    return _LOADED[name]


@pytest.fixture(scope="module", params=NAMES)
def real(request):
    return (request.param, *fixture_pair(request.param))


def cases(templates=TEMPLATES):
    return [(t, c) for t in templates for c in CONVS if t != "plain" or c in SINGLE_TURN]


def n_images(conv) -> int:
    return sum(t["value"].count("<image>") for t in conv)


def reference_ids(ref, image_id, text: str, bos_token: str) -> list[int]:
    """The tokenizer's ids of the whole text (BOS as the tokenizer adds it unless the text has it)."""
    ids = ref(text, add_special_tokens=not text.startswith(bos_token))["input_ids"]
    return [IMAGE_TOKEN_INDEX if i == image_id else i for i in ids]


def end_of_turn(name: str, template: str, tok) -> str:
    if template == "plain":
        return tok.eos_token
    if template == "chat_template":
        return "<|eot_id|>" if name == "llama3" else "<|end|>"
    return {"llava_llama_3": "<|eot_id|>", "llava_phi_3": "<|end|>", "vicuna_v1": "</s>"}[template]


def rendered_replies(name: str, template: str, conv, tok) -> list[str]:
    """Reply + end-of-turn as each template writes it (Llama-3's chat template trims the content)."""
    lead = " " if template == "vicuna_v1" else ""
    trim = template == "chat_template" and name == "llama3"
    return [lead + (t["value"].strip() if trim else t["value"]) + end_of_turn(name, template, tok)
            for t in conv if t["from"] == "gpt"]


def char_spans(text: str, replies: list[str]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for r in replies:
        a = text.index(r, pos)
        spans.append((a, a + len(r)))
        pos = a + len(r)
    return spans


def supervised_runs(enc) -> list[list[int]]:
    runs, cur = [], []
    for i, lab in zip(enc.input_ids, enc.labels):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(i)
    return runs + ([cur] if cur else [])


def exact_decode(tok, ids: list[int]) -> str:
    """Decoded text of ``ids`` with its leading space kept (SentencePiece decoders strip one)."""
    a = tok.convert_tokens_to_ids("a")
    return tok.decode([a, *ids], clean_up_tokenization_spaces=False)[1:]


def expected_supervised(name: str, template: str, reply: str, at_start: bool = False) -> str:
    """What the supervised tokens spell: the reply + end token, minus what a token that starts in the
    prompt swallows (first-character rule): Phi-3's ``<|assistant|>`` eats the reply's leading
    whitespace; Llama-3's ``\\n\\n\\n`` token takes a leading ``\\n`` into the header. A reply that
    opens the prompt (``plain`` without image) gets SentencePiece's word-start ``▁`` (a space)."""
    if at_start and name.startswith("phi3"):
        return " " + reply
    if name.startswith("phi3") and template in ("llava_phi_3", "chat_template"):
        return reply.lstrip()
    if (name, template) in MERGES_INTO_HEADER and reply.startswith("\n"):
        return reply.lstrip("\n")
    return reply


@pytest.mark.parametrize("template,conv", cases(), ids=lambda x: str(x))
def test_ids_are_whole_prompt_ids(real, template, conv):
    name, tok, ref, image_id = real
    c = CONVS[conv]
    text = render_text(normalize_conversation(c, n_images(c)), template, tok)
    enc = encode_conversation(c, template, tok, num_images=n_images(c))
    assert enc.input_ids == reference_ids(ref, image_id, text, tok.bos_token)
    assert enc.input_ids.count(IMAGE_TOKEN_INDEX) == n_images(c)
    if not n_images(c):  # no placeholder: the unmodified tokenizer on the whole prompt
        assert enc.input_ids == tok(text, add_special_tokens=not text.startswith(tok.bos_token))["input_ids"]


@pytest.mark.parametrize("template,conv", cases(), ids=lambda x: str(x))
def test_supervised_spans(real, template, conv):
    """Supervised = each reply + its end token: one run per reply, as many tokens as the tokenizer
    gives the reply in context, decoding to the reply (minus swallowed whitespace, see above)."""
    name, tok, ref, image_id = real
    c = CONVS[conv]
    text = render_text(normalize_conversation(c, n_images(c)), template, tok)
    enc = encode_conversation(c, template, tok, num_images=n_images(c))
    runs = supervised_runs(enc)
    replies = rendered_replies(name, template, c, tok)
    assert len(runs) == len(replies)
    count = lambda s: len(ref(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    for run, reply, (a, b) in zip(runs, replies, char_spans(text, replies)):
        assert len(run) == count(text[:b]) - count(text[:a])  # the tokenizer's count for this reply
        decoded, want = exact_decode(tok, run), expected_supervised(name, template, reply, a == 0)
        if template in NATURAL[name]:
            assert decoded == want
        else:  # end text is plain text here: the last supervised token may reach past it (first-character rule)
            assert decoded.startswith(want) and text[b:].startswith(decoded[len(want):])


@pytest.mark.parametrize("template,conv", cases(), ids=lambda x: str(x))
def test_prompt_is_training_prefix(real, template, conv):
    """encode_prompt == whole-prompt ids of the open prompt == training ids up to each reply."""
    name, tok, ref, image_id = real
    c = CONVS[conv]
    train = encode_conversation(c, template, tok, num_images=n_images(c))
    starts = [i for i in range(len(train.labels)) if train.labels[i] != IGNORE_INDEX
              and (i == 0 or train.labels[i - 1] == IGNORE_INDEX)]
    gpt_turns = [i for i, t in enumerate(c) if t["from"] == "gpt"]
    assert len(starts) == len(gpt_turns)
    for k, turn in zip(starts, gpt_turns):
        history = c[:turn]
        prompt = encode_prompt(history, template, tok)
        open_text = render_text(normalize_conversation(history, n_images(history), open_turn=True), template, tok,
                                open_turn=True)
        assert prompt == reference_ids(ref, image_id, open_text, tok.bos_token)
        if (name, template) in MERGES_INTO_HEADER and c[turn]["value"].startswith("\n"):
            assert prompt[:-1] == train.input_ids[:k - 1] and prompt[-1] != train.input_ids[k - 1]
            assert tok.decode(train.input_ids[k - 1]) == tok.decode(prompt[-1]) + "\n"
        else:
            assert prompt == train.input_ids[:k]


def test_tokens_before_the_first_image(real):
    """Llama-3 + llava_llama_3: 38 with BOS; Phi-3 + llava_phi_3: 11 without BOS, 12 with."""
    name, tok, _, _ = real
    template = "llava_phi_3" if name.startswith("phi3") else "llava_llama_3"
    enc = encode_conversation(CONVS["single"], template, tok, num_images=1)
    n = enc.input_ids.index(IMAGE_TOKEN_INDEX)
    text = render_text(normalize_conversation(CONVS["single"], 1), template, tok)
    assert n == len(tok(text[:text.index("<image>")])["input_ids"])
    assert n == {"llama3": 38, "phi3": 11, "phi3_bos": 12}[name]
    assert f"before 1st image: {n} tokens" in render_sample({"id": "x", "image": "a.png", "conversations":
                                                             CONVS["single"]}, template, tok)


def test_bos_policy(real):
    name, tok, _, _ = real
    template = "llava_phi_3" if name.startswith("phi3") else "llava_llama_3"
    adds = name != "phi3"
    assert resolve_bos("auto", template, tok) is adds and resolve_bos("true", template, tok) is True
    assert resolve_bos(False, template, tok) is False
    auto = encode_conversation(CONVS["text"], template, tok, num_images=0).input_ids
    on = encode_conversation(CONVS["text"], template, tok, num_images=0, add_bos=True).input_ids
    off = encode_conversation(CONVS["text"], template, tok, num_images=0, add_bos="false").input_ids
    assert on[0] == tok.bos_token_id and on[1:] == off and (auto == on if adds else auto == off)
    assert encode_prompt(CONVS["text"][:1], template, tok, add_bos=True)[0] == tok.bos_token_id
    assert encode_prompt(CONVS["text"][:1], template, tok, add_bos=False)[0] != tok.bos_token_id
    with pytest.raises(ValueError, match="data.add_bos"):
        resolve_bos("sometimes", template, tok)
    # a chat template that writes the BOS itself: never a second one; "false" is refused up front
    writes = name != "phi3"
    ids = encode_conversation(CONVS["text"], "chat_template", tok, num_images=0, add_bos=True).input_ids
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    if writes:
        with pytest.raises(ValueError, match="data.add_bos: false.*chat template writes"):
            check_template("chat_template", tok, "false")
    else:
        assert check_template("chat_template", tok, "false") is False


def test_chat_template_matches_apply_chat_template(real):
    """Phi-3's template ends a conversation with EOS and is not a prefix of its continuation: it works."""
    name, tok, _, _ = real
    c = CONVS["text_multi"]
    chat = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in c]
    ref = tok.apply_chat_template(chat, tokenize=True)
    ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    assert encode_conversation(c, "chat_template", tok, num_images=0).input_ids == ref
    gen = tok.apply_chat_template(chat[:3], tokenize=True, add_generation_prompt=True)
    assert encode_prompt(c[:3], "chat_template", tok) == list(gen["input_ids"] if hasattr(gen, "keys") else gen)
    if name == "phi3":
        assert tok.apply_chat_template(chat, tokenize=False).endswith("<|end|>\n<|endoftext|>")
        enc = encode_conversation(c, "chat_template", tok, num_images=0)
        assert enc.input_ids[-1] == tok.eos_token_id and enc.labels[-1] == IGNORE_INDEX
    eot = end_of_turn(name, "chat_template", tok)
    assert stop_token_ids("chat_template", tok) == [tok.convert_tokens_to_ids(eot)] + \
        ([tok.eos_token_id] if tok.eos_token != eot else [])


def test_image_as_added_token_equivalence(real, monkeypatch):
    """Both ways of keeping <image> atomic give the same ids: marker-prefixed pieces (default) and a
    backend copy with <image> registered (used when a tokenizer has no suitable marker)."""
    import olavlm.data.tokenize as T

    name, tok, _, _ = real
    marker = T._marker(tok)
    assert marker is not None and marker[1] == tok.convert_tokens_to_ids(marker[0])
    default = {(t, c): encode_conversation(CONVS[c], t, tok, num_images=n_images(CONVS[c])).input_ids
               for t, c in cases(["llava_llama_3", "llava_phi_3", "vicuna_v1", "plain"]) if n_images(CONVS[c])}
    monkeypatch.setattr(T, "_marker", lambda tokenizer: None)
    for (t, c), ids in default.items():
        assert encode_conversation(CONVS[c], t, tok, num_images=n_images(CONVS[c])).input_ids == ids


def test_show_marks_lossy_round_trip(real):
    """Phi-3's role/end tokens swallow the "\\n" after them: decode(encode(prompt)) != prompt, yet the
    view shows every character of the prompt once and marks exactly the supervised tokens."""
    name, tok, _, _ = real
    template = "llava_phi_3" if name.startswith("phi3") else "llava_llama_3"
    record = {"id": "m", "image": "a.png", "conversations": CONVS["multi"]}
    out = render_sample(record, template, tok)
    shown = out.split("---\n", 1)[1].split("\n--- tokens ---")[0]
    text = render_text(normalize_conversation(CONVS["multi"], 1), template, tok)
    bos = tok.bos_token if resolve_bos("auto", template, tok) else ""
    assert shown.replace("[[", "").replace("]]", "") == bos + text
    marked = [s.split("]]")[0] for s in shown.split("[[")[1:]]
    eot = end_of_turn(name, template, tok)
    assert marked == [expected_supervised(name, template, r) for r in rendered_replies(name, template,
                                                                                       CONVS["multi"], tok)]
    if name.startswith("phi3"):
        assert tok.decode(tok(text)["input_ids"]) != text  # the round trip is lossy
        assert f"<|assistant|>\n [[A leading space.{eot}]]\n<|user|>\nWhere?" in shown
    assert f"BOS:              {'yes' if bos else 'no'} (data.add_bos: auto)" in out
