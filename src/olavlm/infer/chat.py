"""Chat with a trained model folder (docs/method.md, "Inference"): image -> shared square -> tower -> projector ->
image tokens + the frozen task tokens, prompt rendered with the template the model was trained with.

The template, BOS policy and image geometry come from ``olavlm_run.json``, which ``olavlm train``
writes into every ``RUN_DIR/final/``; template and geometry can be overridden (e.g. for a folder
converted from elsewhere; without a recorded BOS policy the tokenizer's own behaviour is used).
Decoding is greedy by default (temperature 0, as in the reference evaluation), KV cache on, and
stops at the template's end-of-turn token.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RUN_INFO = "olavlm_run.json"  # written by olavlm.train.loop.save_final into every final/ folder


def read_run_info(model_dir: str | Path) -> dict:
    """``olavlm_run.json`` of a final folder ({} when absent)."""
    file = Path(model_dir) / RUN_INFO
    return json.loads(file.read_text()) if file.is_file() else {}


class ChatSession:
    """One conversation about (at most) one image; :meth:`ask` returns the assistant's reply."""

    def __init__(self, model_dir: str | Path, *, template: str | None = None, image_geometry: str | None = None,
                 device: str | None = None, dtype: str | None = None) -> None:
        from olavlm.data.tokenize import stop_token_ids
        from olavlm.model.vlm import OlaVLM

        info = read_run_info(model_dir)
        self.template = template or info.get("template")
        self.image_geometry = image_geometry or info.get("image_geometry")
        self.add_bos = info.get("add_bos", "auto")  # the BOS policy the model was trained with
        if not self.template or not self.image_geometry:
            raise ValueError(f"{model_dir}: no {RUN_INFO} with the data template / image geometry; pass "
                             "--template and --image-geometry (the values the model was trained with)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = OlaVLM.from_pretrained(model_dir, with_predictors=False, dtype=dtype).to(self.device).eval()
        self.tokenizer = self.model.tokenizer
        self.stop_ids = stop_token_ids(self.template, self.tokenizer)
        self.messages: list[dict] = []
        self.pixel_values: torch.Tensor | None = None

    def set_image(self, path: str | Path | None) -> None:
        """Use this image for a new conversation (None = text only); clears the history."""
        from olavlm.data.images import load_image, pixel_values, to_square

        self.reset()
        if path is None:
            self.pixel_values = None
            return
        spec = self.model.image_spec  # the size guard runs on the header, before anything is decoded
        square = to_square(load_image(path, geometry=self.image_geometry, side=spec.size), self.image_geometry,
                           spec, spec.size)
        self.pixel_values = pixel_values(square, spec)[None].to(self.device)

    def reset(self) -> None:
        self.messages = []

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of the history + ``text`` as the open user turn (the image goes in the first turn)."""
        from olavlm.data.tokenize import encode_prompt

        messages = [*self.messages, {"from": "human", "value": text}]
        return encode_prompt(messages, self.template, self.tokenizer,
                             num_images=0 if self.pixel_values is None else 1, add_bos=self.add_bos)

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
