"""Chat with a trained model folder (docs/method.md, "Inference"): image -> shared square -> tower -> projector ->
image tokens + the frozen task tokens, prompt rendered with the template the model was trained with.

The template, BOS policy and image geometry come from the folder's processor
(``olavlm_processor.json``, :class:`olavlm.data.processor.OlaProcessor`), which ``olavlm train``
saves into every ``RUN_DIR/final/``; older folders carry ``olavlm_run.json`` instead, which is read as
a fallback. Template, BOS policy and geometry can be overridden (e.g. for a folder converted from
elsewhere).
Decoding is greedy by default (temperature 0, as in the reference evaluation), KV cache on, and
stops at the template's end-of-turn token.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RUN_INFO = "olavlm_run.json"  # what folders written before the processor carry (read as a fallback)


def read_run_info(model_dir: str | Path) -> dict:
    """Provenance of a model folder (stage, run_dir, init_from, ...): the processor's ``run`` section,
    or an old folder's ``olavlm_run.json``; {} when absent."""
    from olavlm.data.processor import read_run_section

    return read_run_section(model_dir)


class ChatSession:
    """One conversation about (at most) one image; :meth:`ask` returns the assistant's reply."""

    def __init__(self, model_dir: str | Path, *, template: str | None = None, image_geometry: str | None = None,
                 add_bos=None, device: str | None = None, dtype: str | None = None) -> None:
        from olavlm.data.processor import OlaProcessor
        from olavlm.model.vlm import OlaVLM

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = OlaVLM.from_pretrained(model_dir, with_predictors=False, dtype=dtype).to(self.device).eval()
        self.processor = OlaProcessor.from_pretrained(model_dir, model=self.model, template=template,
                                                      image_geometry=image_geometry, add_bos=add_bos)
        self.tokenizer = self.model.tokenizer
        self.stop_ids = self.processor.stop_token_ids()
        self.messages: list[dict] = []
        self.pixel_values: torch.Tensor | None = None

    template = property(lambda self: self.processor.template)
    image_geometry = property(lambda self: self.processor.image_geometry)
    add_bos = property(lambda self: self.processor.add_bos)

    def set_image(self, path: str | Path | None) -> None:
        """Use this image for a new conversation (None = text only); clears the history."""
        self.reset()
        if path is None:
            self.pixel_values = None
            return
        self.pixel_values = self.processor.images([self.processor.load_image(path)],
                                                  teacher=False)["pixel_values"].to(self.device)

    def reset(self) -> None:
        self.messages = []

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of the history + ``text`` as the open user turn (the image goes in the first turn)."""
        messages = [*self.messages, {"from": "human", "value": text}]
        return self.processor.prompt_ids(messages, num_images=0 if self.pixel_values is None else 1)

    @torch.no_grad()
    def ask(self, text: str, *, max_new_tokens: int = 128, temperature: float = 0.0) -> str:
        ids = self.prompt_ids(text)
        input_ids = torch.tensor([ids], device=self.device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        new = self.model.generate(input_ids, self.pixel_values, max_new_tokens=max_new_tokens,
                                  eos_token_id=self.stop_ids, **sampling)[0].tolist()
        reply_ids = new[:next((i for i, t in enumerate(new) if t in self.stop_ids), len(new))]
        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True).strip()
        self.messages += [{"from": "human", "value": text}, {"from": "gpt", "value": reply}]
        self.last_ids = reply_ids
        return reply
