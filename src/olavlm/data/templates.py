"""Conversation templates (spec §6) rendered as SEGMENTS: alternating prompt / reply pieces.

A conversation is the LLaVA list ``[{"from": "human"|"gpt", "value": str}, ...]``. It is first
validated and normalised (:func:`normalize_conversation`: roles alternate human/gpt starting with
human, replies non-empty, ``<image>`` placeholders moved to the start of their human turn followed
by ``\\n`` (spec §2.2) and counted against the record's images). :func:`render_segments` then
renders it with a template into :class:`Segment` pieces whose concatenation is the exact prompt
string; ``supervised`` pieces are the assistant replies followed by their end-of-turn text.

Templates (strings byte-identical to the reference ``conversation.py``):

* ``llava_llama_3`` MPT style, sep ``<|eot_id|>``, Llama-3 header roles and the LLaVA system line.
* ``llava_phi_3``   MPT style, sep ``<|end|>``, roles ``\\n<|user|>\\n`` / ``\\n<|assistant|>\\n``.
* ``vicuna_v1``     TWO style: ``SYS USER: Q ASSISTANT: A</s>USER: ...``; the reply segment starts
                    with the space after ``ASSISTANT:`` so the open turn ends with ``ASSISTANT:``.
* ``plain``         LLaVA pre-training format: the image placeholders, then the caption (first gpt
                    turn) followed by the tokenizer's EOS token (LLaVA uses ``\\n``; EOS gives a
                    single stop id). The human text is dropped; exactly one human + one gpt turn.
* ``chat_template`` the tokenizer's own Jinja chat template (human -> user, gpt -> assistant);
                    segments are cut at the differences between successive renders, which must be
                    prefixes of one another (checked).
"""

from __future__ import annotations

from dataclasses import dataclass

from olavlm.constants import IMAGE_PLACEHOLDER
from olavlm.data.errors import BadSample

LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class Segment:
    """One rendered piece of a conversation."""

    text: str  # exact text, may contain <image> placeholders
    supervised: bool  # True for an assistant reply + its end-of-turn text


@dataclass(frozen=True)
class MPTTemplate:
    """``system + sep``, then ``role + message + sep`` per message; an open turn is the bare role."""

    system: str  # system text without the separator
    user: str  # user role prefix
    assistant: str  # assistant role prefix
    sep: str  # end-of-turn text after every message (and after the system text)

    def segments(self, messages: list[dict], open_turn: bool) -> list[tuple[str, bool]]:
        out = [(self.system + self.sep, False)]
        for m in messages:
            if m["from"] == "human":
                out.append((self.user + m["value"] + self.sep, False))
            else:
                out += [(self.assistant, False), (m["value"] + self.sep, True)]
        if open_turn:
            out.append((self.assistant, False))
        return out

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

    def segments(self, messages: list[dict], open_turn: bool) -> list[tuple[str, bool]]:
        out = [(self.system + self.sep, False)]
        for m in messages:
            if m["from"] == "human":
                out.append((f"{self.user}: {m['value']}{self.sep}", False))
            else:
                out += [(f"{self.assistant}:", False), (f" {m['value']}{self.sep2}", True)]
        if open_turn:
            out.append((f"{self.assistant}:", False))
        return out

    def terminator(self, tokenizer) -> str:
        return self.sep2


class PlainTemplate:
    """LLaVA ``plain``: image placeholders + caption + EOS (one human and one gpt turn)."""

    def segments(self, messages: list[dict], open_turn: bool, tokenizer) -> list[tuple[str, bool]]:
        n_expected = 1 if open_turn else 2
        if len(messages) != n_expected:
            raise BadSample("bad_conversation",
                            f"template 'plain' takes one human turn and one gpt reply, got {len(messages)} turns")
        images = IMAGE_PLACEHOLDER * messages[0]["value"].count(IMAGE_PLACEHOLDER)
        out = [(images, False)]
        if not open_turn:
            out.append((messages[1]["value"] + self.terminator(tokenizer), True))
        return out

    def terminator(self, tokenizer) -> str:
        if tokenizer is None:
            raise ValueError("template 'plain' needs the tokenizer (its EOS token ends the caption)")
        if tokenizer.eos_token is None:
            raise ValueError("template 'plain': the tokenizer has no EOS token to end the caption")
        return tokenizer.eos_token


class ChatTemplate:
    """The tokenizer's Jinja ``chat_template``; segments come from successive renders."""

    roles = {"human": "user", "gpt": "assistant"}

    def _render(self, tokenizer, messages: list[dict], generation_prompt: bool) -> str:
        chat = [{"role": self.roles[m["from"]], "content": m["value"]} for m in messages]
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)

    def segments(self, messages: list[dict], open_turn: bool, tokenizer) -> list[tuple[str, bool]]:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat_template' needs a tokenizer that has a chat_template")
        out, done = [], ""
        for i, m in enumerate(messages):
            if m["from"] != "gpt":
                continue
            prompt = self._render(tokenizer, messages[:i], True)
            full = self._render(tokenizer, messages[: i + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError("template 'chat_template': the tokenizer's chat template does not render a "
                                 "conversation as a prefix of its continuation; it cannot be segmented")
            out += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        if open_turn:
            prompt = self._render(tokenizer, messages, True)
            if not prompt.startswith(done):
                raise ValueError("template 'chat_template': the generation prompt does not extend the rendered history")
            out.append((prompt[len(done):], False))
        return out

    def terminator(self, tokenizer) -> str:
        """Text the template puts after a reply (e.g. ``<|eot_id|>``), from a probe render."""
        probe = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "\x00"}]
        reply = self.segments(probe, False, tokenizer)[-1][0]
        if "\x00" not in reply:
            raise ValueError("template 'chat_template': the chat template does not render the reply text")
        return reply.split("\x00", 1)[1]


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


def render_segments(messages: list[dict], template: str, tokenizer=None, *, open_turn: bool = False) -> list[Segment]:
    """Render normalised ``messages`` into alternating prompt/reply segments (neighbours merged)."""
    tpl = get_template(template)
    if isinstance(tpl, (PlainTemplate, ChatTemplate)):
        raw = tpl.segments(messages, open_turn, tokenizer)
    else:
        raw = tpl.segments(messages, open_turn)
    merged: list[Segment] = []
    for text, supervised in raw:
        if not text:
            continue
        if merged and merged[-1].supervised == supervised:
            merged[-1] = Segment(merged[-1].text + text, supervised)
        else:
            merged.append(Segment(text, supervised))
    return merged


def render_text(messages: list[dict], template: str, tokenizer=None, *, open_turn: bool = False) -> str:
    """The full prompt string (what the reference ``get_prompt`` returns)."""
    return "".join(s.text for s in render_segments(messages, template, tokenizer, open_turn=open_turn))


def terminator(template: str, tokenizer=None) -> str:
    """End-of-turn text the template puts after every assistant reply."""
    return get_template(template).terminator(tokenizer)
