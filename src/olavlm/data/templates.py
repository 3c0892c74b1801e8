"""Conversation templates rendered as ONE prompt string plus the character spans that are supervised.

A conversation is the LLaVA list ``[{"from": "human"|"gpt", "value": str}, ...]``. It is first
validated and normalised (:func:`normalize_conversation`: roles alternate human/gpt starting with
human, replies non-empty, ``<image>`` placeholders moved to the start of their human turn followed
by ``\\n`` and counted against the record's images). :func:`render` then renders it with a template
into a :class:`Rendered`: the exact prompt text and the ``(start, end)`` character spans of every
assistant reply followed by its end-of-turn text, the only text the model learns to produce (role
headers, and the ``\\n\\n`` after a header, are prompt). :mod:`olavlm.data.tokenize` tokenizes the
whole text once and maps the spans onto tokens.

Templates (strings byte-identical to the reference ``conversation.py``):

* ``llava_llama_3`` MPT style, sep ``<|eot_id|>``, Llama-3 header roles and the LLaVA system line.
* ``llava_phi_3``   MPT style, sep ``<|end|>``, roles ``\\n<|user|>\\n`` / ``\\n<|assistant|>\\n``.
* ``vicuna_v1``     TWO style: ``SYS USER: Q ASSISTANT: A</s>USER: ...``; the reply span starts
                    with the space after ``ASSISTANT:`` so the open turn ends with ``ASSISTANT:``.
* ``plain``         LLaVA pre-training format: the image placeholders, then the caption (first gpt
                    turn) followed by the tokenizer's EOS token (LLaVA uses ``\\n``; EOS gives a
                    single stop id). The human text is dropped; exactly one human + one gpt turn.
* ``chat_template`` the tokenizer's own Jinja chat template (human -> user, gpt -> assistant). The
                    whole conversation is rendered once; each reply starts where the render of the
                    history with the generation prompt ends. The end-of-turn text is what the
                    template writes after a reply up to and including its first added token
                    (``<|eot_id|>``, ``<|end|>``, ``<|im_end|>``); what follows (a ``\\n``, the EOS
                    that Phi-3's template writes only at the end of a conversation) is prompt.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from olavlm.constants import IMAGE_PLACEHOLDER
from olavlm.data.errors import BadSample

LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: the prompt text and its supervised character spans (sorted)."""

    text: str  # exact prompt, may contain <image> placeholders
    spans: tuple[tuple[int, int], ...]  # [start, end) of each reply + its end-of-turn text

    @classmethod
    def from_pieces(cls, pieces: list[tuple[str, bool]]) -> "Rendered":
        """Concatenate ``(text, supervised)`` pieces; adjacent supervised pieces form one span."""
        text, spans, pos = [], [], 0
        for piece, supervised in pieces:
            if not piece:
                continue
            if supervised:
                if spans and spans[-1][1] == pos:
                    spans[-1] = (spans[-1][0], pos + len(piece))
                else:
                    spans.append((pos, pos + len(piece)))
            text.append(piece)
            pos += len(piece)
        return cls("".join(text), tuple(spans))

    def replies(self) -> list[str]:
        """Text of each supervised span."""
        return [self.text[a:b] for a, b in self.spans]


@dataclass(frozen=True)
class MPTTemplate:
    """``system + sep``, then ``role + message + sep`` per message; an open turn is the bare role."""

    system: str  # system text without the separator
    user: str  # user role prefix
    assistant: str  # assistant role prefix
    sep: str  # end-of-turn text after every message (and after the system text)

    def render(self, messages: list[dict], open_turn: bool, tokenizer) -> Rendered:
        out = [(self.system + self.sep, False)]
        for m in messages:
            if m["from"] == "human":
                out.append((self.user + m["value"] + self.sep, False))
            else:
                out += [(self.assistant, False), (m["value"] + self.sep, True)]
        if open_turn:
            out.append((self.assistant, False))
        return Rendered.from_pieces(out)

    def terminator(self, tokenizer) -> str:
        return self.sep


@dataclass(frozen=True)
class TwoSepTemplate:
    """Vicuna v1: ``system + sep``, ``USER: q + sep``, ``ASSISTANT: a + sep2``; open turn ``ASSISTANT:``."""

    system: str  # system text
    user: str  # user role name
    assistant: str  # assistant role name
    sep: str  # after the system text and after user turns
    sep2: str  # after assistant replies (end of turn)

    def render(self, messages: list[dict], open_turn: bool, tokenizer) -> Rendered:
        out = [(self.system + self.sep, False)]
        for m in messages:
            if m["from"] == "human":
                out.append((f"{self.user}: {m['value']}{self.sep}", False))
            else:
                out += [(f"{self.assistant}:", False), (f" {m['value']}{self.sep2}", True)]
        if open_turn:
            out.append((f"{self.assistant}:", False))
        return Rendered.from_pieces(out)

    def terminator(self, tokenizer) -> str:
        return self.sep2


class PlainTemplate:
    """LLaVA ``plain``: image placeholders + caption + EOS (one human and one gpt turn)."""

    def render(self, messages: list[dict], open_turn: bool, tokenizer) -> Rendered:
        n_expected = 1 if open_turn else 2
        if len(messages) != n_expected:
            raise BadSample("bad_conversation",
                            f"template 'plain' takes one human turn and one gpt reply, got {len(messages)} turns")
        images = IMAGE_PLACEHOLDER * messages[0]["value"].count(IMAGE_PLACEHOLDER)
        out = [(images, False)]
        if not open_turn:
            out.append((messages[1]["value"] + self.terminator(tokenizer), True))
        return Rendered.from_pieces(out)

    def terminator(self, tokenizer) -> str:
        if tokenizer is None:
            raise ValueError("template 'plain' needs the tokenizer (its EOS token ends the caption)")
        if tokenizer.eos_token is None:
            raise ValueError("template 'plain': the tokenizer has no EOS token to end the caption")
        return tokenizer.eos_token


_CHAT_PROBES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (template, eot, tail)


class ChatTemplate:
    """The tokenizer's Jinja ``chat_template``; reply spans from renders of the history."""

    roles = {"human": "user", "gpt": "assistant"}

    def _render(self, tokenizer, messages: list[dict], generation_prompt: bool) -> str:
        chat = [{"role": self.roles[m["from"]], "content": m["value"]} for m in messages]
        try:
            return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja's raise_exception / TemplateError: the template refuses this record
            raise BadSample("bad_conversation", f"the tokenizer's chat template refused it: "
                                                f"{type(e).__name__}: {e}") from None

    def end_of_turn(self, tokenizer) -> tuple[str, str]:
        """``(eot, tail)``: text after a reply up to and including its first added token, and the rest
        (e.g. ``("<|end|>", "\\n<|endoftext|>")`` for Phi-3). Raises ValueError when unusable."""
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat_template' needs a tokenizer that has a chat_template")
        template = tokenizer.chat_template
        try:
            cached = _CHAT_PROBES.get(tokenizer)
        except TypeError:
            cached = None
        if cached is not None and cached[0] == template:
            return cached[1], cached[2]
        try:
            probe = self._render(tokenizer, [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "\x00"}], False)
        except BadSample as e:
            raise ValueError(f"template 'chat_template': {e.msg}") from None
        if probe.count("\x00") != 1:
            raise ValueError("template 'chat_template': the chat template does not render the reply text as given")
        suffix = probe.split("\x00", 1)[1]
        added = [t for t in _added_tokens(tokenizer) if t in suffix]
        cut = min((suffix.index(t) + len(t) for t in added), default=len(suffix))
        eot, tail = suffix[:cut], suffix[cut:]
        if not eot:
            raise ValueError("template 'chat_template': the chat template writes nothing after a reply (no "
                             "end-of-turn text for the model to learn to stop)")
        try:
            _CHAT_PROBES[tokenizer] = (template, eot, tail)
        except TypeError:
            pass
        return eot, tail

    def render(self, messages: list[dict], open_turn: bool, tokenizer) -> Rendered:
        eot, tail = self.end_of_turn(tokenizer)
        whole = self._render(tokenizer, messages, open_turn)
        spans = []
        for i, m in enumerate(messages):
            if m["from"] != "gpt":
                continue
            prompt = self._render(tokenizer, messages[:i], True)
            full = self._render(tokenizer, messages[: i + 1], False)
            end = len(full) - len(tail)
            if not (full.startswith(prompt) and full.endswith(eot + tail) and whole.startswith(full[:end])
                    and end - len(eot) > len(prompt)):
                raise BadSample("bad_conversation", "the tokenizer's chat template does not render this "
                                                    "conversation as a continuation of its history")
            spans.append((len(prompt), end))
        return Rendered(whole, tuple(spans))

    def terminator(self, tokenizer) -> str:
        """End-of-turn text the template puts after a reply (e.g. ``<|eot_id|>``)."""
        return self.end_of_turn(tokenizer)[0]


def _added_tokens(tokenizer) -> list[str]:
    """Contents of the tokenizer's added (atomic) tokens."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return [str(t) for t in decoder.values()]


TEMPLATES = {
    "llava_llama_3": MPTTemplate(
        system="<|start_header_id|>system<|end_header_id|>\n\n" + LLAVA_SYSTEM,
        user="<|start_header_id|>user<|end_header_id|>\n\n",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
        sep="<|eot_id|>"),
    "llava_phi_3": MPTTemplate(
        system="<|system|>\nYou are a helpful AI assistant.", user="\n<|user|>\n", assistant="\n<|assistant|>\n",
        sep="<|end|>"),
    "vicuna_v1": TwoSepTemplate(system=LLAVA_SYSTEM, user="USER", assistant="ASSISTANT", sep=" ", sep2="</s>"),
    "plain": PlainTemplate(),
    "chat_template": ChatTemplate(),
}


def get_template(name: str):
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def normalize_conversation(conversations, num_images: int, *, open_turn: bool = False) -> list[dict]:
    """Validate a LLaVA conversation and move ``<image>`` to the start of its human turn + ``\\n``.

    ``open_turn=True`` (inference) expects the last turn to be the human's. Raises BadSample
    ``bad_conversation`` or ``image_token_mismatch``.
    """
    if not isinstance(conversations, list):
        raise BadSample("bad_conversation", f"'conversations' is a {type(conversations).__name__}, not a list")
    if not conversations:
        raise BadSample("bad_conversation", "no turns")
    out, placeholders = [], 0
    for i, turn in enumerate(conversations):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSample("bad_conversation", f"turn {i} is not {{'from': ..., 'value': str}}")
        if turn.get("from") != expected:
            raise BadSample("bad_conversation", f"turn {i} is from {turn.get('from')!r}, expected {expected!r}")
        value = turn["value"]
        n = value.count(IMAGE_PLACEHOLDER)
        if expected == "gpt":
            if n:
                raise BadSample("image_token_mismatch", f"turn {i} (gpt) contains {IMAGE_PLACEHOLDER}")
            if not value.strip():
                raise BadSample("bad_conversation", f"turn {i} (gpt) is an empty reply")
        elif n:
            value = (IMAGE_PLACEHOLDER + "\n") * n + value.replace(IMAGE_PLACEHOLDER, "").strip()
        placeholders += n
        out.append({"from": expected, "value": value})
    last = out[-1]["from"]
    if open_turn and last != "human":
        raise BadSample("bad_conversation", "the prompt must end with a human turn")
    if not open_turn and last != "gpt":
        raise BadSample("bad_conversation", "the conversation ends with a human turn (no reply to learn)")
    if placeholders != num_images:
        raise BadSample("image_token_mismatch",
                        f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)")
    return out


def render(messages: list[dict], template: str, tokenizer=None, *, open_turn: bool = False) -> Rendered:
    """Render normalised ``messages`` with ``template`` (text + supervised spans)."""
    return get_template(template).render(messages, open_turn, tokenizer)


def render_text(messages: list[dict], template: str, tokenizer=None, *, open_turn: bool = False) -> str:
    """The full prompt string (what the reference ``get_prompt`` returns)."""
    return render(messages, template, tokenizer, open_turn=open_turn).text


def terminator(template: str, tokenizer=None) -> str:
    """End-of-turn text the template puts after every assistant reply."""
    return get_template(template).terminator(tokenizer)
