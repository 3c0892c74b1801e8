"""The exported chat template: olavlm's conversation template as Jinja, with the task tokens after every image.

Placement (the one choice made for the export): the chat template writes each image as
``<image>`` immediately followed by the task-token strings (tasks in ``model.task_order``, K per
task) and ``"\\n"``, at the start of its user turn -- where olavlm's sequence builder puts them.
``LlavaProcessor`` then expands only ``<image>`` into one id per image feature, so the ids are
``[..., image x P, task tokens x T*K, "\\n", question ...]``, exactly olavlm's sequence. A raw prompt
that bypasses the chat template must carry the task strings itself (:func:`image_text` gives them).

The ids are the same, not just the text: olavlm tokenizes the whole rendered prompt once with each
``<image>`` as one atomic token, and the exported tokenizer tokenizes the whole rendered string once
with ``<image>`` and the task strings as added tokens. Text after an image follows an atomic token in
both, so it splits the same way (SentencePiece tokenizers such as Phi-3's included, multi-turn too).

The template pieces are not hard-coded: they are read back from olavlm's own renderer
(:func:`olavlm.data.templates.render_text`) with sentinel messages, so the export renders
``llava_llama_3``, ``llava_phi_3`` and ``vicuna_v1`` byte-identically to training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from olavlm.constants import IMAGE_PLACEHOLDER
from olavlm.interop import InteropError

EXPORTABLE = ("llava_llama_3", "llava_phi_3", "vicuna_v1")


@dataclass(frozen=True)
class TemplateParts:
    system: str  # rendered once at the start (system text + separator)
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str  # the open assistant turn


def _split(text: str, start: str, what: str) -> str:
    if not text.startswith(start):
        raise InteropError(f"--template: {what} cannot be read back from the template's rendering")
    return text[len(start):]


def template_parts(template: str) -> TemplateParts:
    """The pieces of an olavlm template, recovered from renders with sentinel messages."""
    from olavlm.data.templates import render_text

    if template not in EXPORTABLE:
        raise InteropError(f"--template: {template!r} cannot be exported as a chat template (supported: "
                           f"{', '.join(EXPORTABLE)})")
    h1, g1, h2 = "\x01", "\x02", "\x03"
    one = render_text([{"from": "human", "value": h1}], template)
    two = render_text([{"from": "human", "value": h1}, {"from": "gpt", "value": g1}], template)
    three = render_text([{"from": "human", "value": h1}, {"from": "gpt", "value": g1},
                         {"from": "human", "value": h2}], template, open_turn=True)
    head, user_suffix = one.split(h1)
    assistant_prefix = _split(two.split(h1)[1].split(g1)[0], user_suffix, "the assistant prefix")
    assistant_suffix = two.split(g1)[1]
    user_prefix = _split(three.split(g1)[1].split(h2)[0], assistant_suffix, "the user prefix")
    generation = _split(three.split(h2)[1], user_suffix, "the generation prompt")
    if not head.endswith(user_prefix):
        raise InteropError("--template: the system text cannot be read back from the template's rendering")
    return TemplateParts(head[: len(head) - len(user_prefix)], user_prefix, user_suffix, assistant_prefix,
                         assistant_suffix, generation)


def image_text(task_tokens: list[str]) -> str:
    """What one image becomes in the prompt text: ``<image>`` + the task strings + ``"\\n"``."""
    return IMAGE_PLACEHOLDER + "".join(task_tokens) + "\n"


def _lit(text: str) -> str:
    return json.dumps(text)  # a Jinja string literal (same escapes)


def chat_template(template: str, task_tokens: list[str], *, add_bos: bool) -> str:
    """Jinja chat template rendering ``template`` like olavlm (images moved to the start of their user
    turn, each followed by the task strings and a newline; the text then stripped, as in training).
    ``add_bos``: the template writes the BOS token first (the policy the model was trained with)."""
    p = template_parts(template)
    return "".join([
        "{%- set image = " + _lit(image_text(task_tokens)) + " -%}",
        "{{- bos_token -}}" if add_bos else "",
        "{{- " + _lit(p.system) + " -}}",
        "{%- for message in messages -%}",
        "{%- if message['content'] is string -%}",
        "{%- set n = message['content'].count('<image>') -%}{%- set text = message['content'] -%}",
        "{%- else -%}",
        "{%- set n = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}",
        "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}",
        "{%- endif -%}",
        "{%- if message['role'] == 'user' -%}",
        "{%- if n > 0 -%}{%- set text = image * n + (text.replace('<image>', '') | trim) -%}{%- endif -%}",
        "{{- " + _lit(p.user_prefix) + " + text + " + _lit(p.user_suffix) + " -}}",
        "{%- elif message['role'] == 'assistant' -%}",
        "{{- " + _lit(p.assistant_prefix) + " + text + " + _lit(p.assistant_suffix) + " -}}",
        "{%- else -%}",
        "{{- raise_exception('this model was trained with a fixed system prompt and user/assistant turns only; "
        "got role ' + message['role']) -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + _lit(p.generation_prompt) + " -}}{%- endif -%}",
    ])


# Conversations the export checks token by token against olavlm (image, text-only, two turns).
PROBES = [
    [{"from": "human", "value": "<image>\nWhat is in the image?"}],
    [{"from": "human", "value": "Describe the image in two lines."}],
    [{"from": "human", "value": "How many objects are there?\n<image>"}, {"from": "gpt", "value": "There are 3."},
     {"from": "human", "value": "Only answer the option (A) or (B)."}],
]


def to_hf_messages(conversation: list[dict]) -> list[dict]:
    """olavlm/LLaVA turns -> transformers chat messages (images as content items, text stripped of <image>)."""
    out = []
    for turn in conversation:
        role = "user" if turn["from"] == "human" else "assistant"
        value = turn["value"]
        items = [{"type": "image"}] * value.count(IMAGE_PLACEHOLDER)
        out.append({"role": role, "content": [*items, {"type": "text", "text": value.replace(IMAGE_PLACEHOLDER, "")}]})
    return out
