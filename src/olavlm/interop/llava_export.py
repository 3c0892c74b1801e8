"""``olavlm export llava SRC DST``: an olavlm IFT/VPT folder -> a plain transformers LLaVA folder.

The result loads with ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` (no olavlm, no remote code). Weights (read and written shard by
shard, nothing is built but meta-device shape checks):

==================================  ====================================================
olavlm folder                        LLaVA key
==================================  ====================================================
``llm/``: ``model.*``                ``model.language_model.*``
``llm/``: ``lm_head.weight``         ``lm_head.weight``
``vision/``: tower keys              ``model.vision_tower.*``
``projector.0.*`` / ``.2.*``         ``model.multi_modal_projector.linear_1.*`` / ``linear_2.*``
``task_tokens.rows.<task>``          embedding rows of added tokens ``<ola_<task>_<j>>`` (K per task, pooled
                                     exactly as olavlm does), inserted after every image by the chat template
==================================  ====================================================

``<image>`` and the task tokens are added to the tokenizer; their embedding rows are new (or reuse
spare rows past the tokenizer, as Phi-3 has), their ``lm_head`` rows are the mean row, and
``generation_config.json`` suppresses them so they are never generated. Predictors and logit
scales are not part of a LLaVA model and are left out. See :mod:`olavlm.interop.llava_template`
for the placement of the task tokens and ``docs/interop.md`` for serving stacks.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from olavlm.interop import InteropError
from olavlm.interop.shards import Checkpoint, ShardWriter, check_shapes, iter_tensors, meta_state_shapes

log = logging.getLogger(__name__)

EXPORT_INFO = "olavlm_export.json"
EXPORTABLE_TOWERS = ("clip", "siglip")
_PIL_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def task_token_names(cfg) -> list[str]:
    """Added-token strings of the tokens inserted after every image, in sequence order."""
    return [f"<ola_{task}_{j}>" for task in (cfg.task_order if cfg.num_task_tokens else []) for j in range(cfg.num_task_tokens)]


def _read_source(src: Path, template: str | None, geometry: str | None):
    from olavlm.data.processor import PROCESSOR_FILE, read_settings
    from olavlm.model import io

    if not (src / io.CONFIG_NAME).is_file():
        raise InteropError(f"{src}: not an olavlm model folder (no {io.CONFIG_NAME})")
    try:
        cfg, _ = io.read_config(src)
    except ValueError as e:  # ConfigError and friends
        raise InteropError(f"{src / io.CONFIG_NAME}: {e}") from None
    saved = read_settings(src)  # the folder's processor (or an old folder's olavlm_run.json)
    info = {**saved.get("run", {}), "add_bos": saved.get("add_bos", "auto")}
    template, geometry = template or saved.get("template"), geometry or saved.get("image_geometry")
    if not template or not geometry:
        raise InteropError(f"{src}: no {PROCESSOR_FILE} (nor olavlm_run.json) with the template / image geometry; "
                           "pass --template and --image-geometry (the values the model was trained with)")
    if cfg.vision_type not in EXPORTABLE_TOWERS:
        raise InteropError(f"model.vision_type: {cfg.vision_type!r} towers have no plain-LLaVA layout "
                           f"(exportable: {', '.join(EXPORTABLE_TOWERS)})")
    if cfg.projector != "mlp2x_gelu":
        raise InteropError(f"model.projector: {cfg.projector!r}; LLaVA's projector is mlp2x_gelu only")
    if info.get("stage") == "pt":
        log.warning("%s is a PT model (its LLM was not instruction-tuned); exporting it anyway", src)
    return cfg, info, template, geometry


def _add_tokens(tokenizer, names: list[str]) -> tuple[int, list[int]]:
    """Add ``<image>`` (when absent) and the task tokens; (image id, task ids)."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    taken = [n for n in names if n in vocab]
    if taken:
        raise InteropError(f"tokenizer: {taken[0]} already exists; cannot add the task tokens")
    new = ([] if "<image>" in vocab else ["<image>"]) + names
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False) for t in new]},
        replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(["<image>", *names])
    return ids[0], ids[1:]


def _embedding_rows(state: dict[str, torch.Tensor], name: str, rows: int, fill: dict[int, torch.Tensor]) -> torch.Tensor:
    """``name`` grown to ``rows`` rows (new rows = the mean row) with ``fill`` {row: vector} written in."""
    w = state[name]
    if rows > w.shape[0]:
        w = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(rows - w.shape[0], -1)])
    else:
        w = w.clone()
    for row, vec in fill.items():
        w[row] = vec.to(w.dtype)
    return w


def _sequence_tokens(src: Path, cfg, hidden: int, num_image_tokens: int) -> torch.Tensor:
    """(T*K, d) fp32: the tokens olavlm inserts after every image, from the saved rows."""
    from safetensors.torch import load_file

    from olavlm.model import io
    from olavlm.model.task_tokens import TaskTokens

    tokens = TaskTokens(cfg, hidden_size=hidden, num_image_tokens=num_image_tokens, with_predictors=False)
    saved = load_file(str(src / io.WEIGHTS_NAME))
    rows = {k[len("task_tokens.rows."):]: v for k, v in saved.items() if k.startswith("task_tokens.rows.")}
    missing = [t for t in tokens.rows if t not in rows]
    if missing:
        raise InteropError(f"{src / io.WEIGHTS_NAME}: task_tokens.rows.{missing[0]} is missing")
    tokens.rows.load_state_dict({t: rows[t] for t in tokens.rows})
    with torch.no_grad():
        return tokens.all_sequence_tokens().float()


def _llava_config(cfg, llm_dir: Path, vision_dir: Path, *, vocab: int, image_id: int, num_image_tokens: int,
                  drop_cls: bool):
    from transformers import AutoConfig, LlavaConfig

    text = AutoConfig.from_pretrained(llm_dir)
    text.vocab_size = vocab
    vision = AutoConfig.from_pretrained(vision_dir)
    out = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_id,
                      image_seq_length=num_image_tokens, vision_feature_layer=cfg.vision_feature_layer,
                      vision_feature_select_strategy="default" if drop_cls else "full",
                      projector_hidden_act="gelu", multimodal_projector_bias=True,
                      tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)))
    out.architectures = ["LlavaForConditionalGeneration"]
    out.dtype = cfg.dtype
    return out


def _names(llm: Checkpoint, vision: Checkpoint, extras: list[str], expected: dict) -> dict[tuple[str, str], str]:
    """{(part, source key): LLaVA key} for every tensor that goes into the export."""
    out = {}
    for key in llm.keys():
        if key.startswith("model."):
            out[("llm", key)] = "model.language_model." + key[len("model."):]
        elif key.startswith("lm_head."):
            out[("llm", key)] = key
        else:
            raise InteropError(f"{llm.folder}/{key}: unknown LLM key (expected model.* or lm_head.*)")
    for key in vision.keys():
        name = "model.vision_tower." + key
        inner = "model.vision_tower." + key[len("vision_model."):] if key.startswith("vision_model.") else name
        out[("vision", key)] = name if name in expected or inner not in expected else inner
    layers = {"projector.0.": "model.multi_modal_projector.linear_1.", "projector.2.": "model.multi_modal_projector.linear_2."}
    for key in extras:
        prefix = next((p for p in layers if key.startswith(p)), None)
        if prefix is None:
            raise InteropError(f"{key}: unknown projector key for LLaVA's linear_1 / linear_2")
        out[("extras", key)] = layers[prefix] + key[len(prefix):]
    return out


def _write_weights(out: Path, src: Path, llava_cfg, *, image_id: int, task_ids: list[int],
                   sequence: torch.Tensor) -> dict[str, Any]:
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from olavlm.model import io

    llm, vision = Checkpoint(src / "llm"), Checkpoint(src / "vision")
    extras = {k: v for k, v in load_file(str(src / io.WEIGHTS_NAME)).items() if k.startswith("projector.")}
    expected = meta_state_shapes(lambda: LlavaForConditionalGeneration(llava_cfg))
    names = _names(llm, vision, list(extras), expected)
    vocab = llava_cfg.text_config.vocab_size
    shapes = {}
    for (part, key), name in names.items():
        shape = tuple(extras[key].shape) if part == "extras" else (llm if part == "llm" else vision).shape(key)
        if key in ("model.embed_tokens.weight", "lm_head.weight") and part == "llm":
            shape = (vocab, *shape[1:])
        shapes[name] = shape
    if llava_cfg.tie_word_embeddings and "lm_head.weight" not in shapes:
        expected.pop("lm_head.weight", None)
    source = {name: f"{src / part}:{key}" for (part, key), name in names.items()}
    check_shapes(shapes, expected, "LlavaForConditionalGeneration", lambda k: source.get(k, k))
    writer = ShardWriter(out)
    for key, tensor in iter_tensors(llm, llm.keys()):
        if key == "model.embed_tokens.weight":
            fill = {image_id: tensor.float().mean(0), **dict(zip(task_ids, sequence))}
            tensor = _embedding_rows({key: tensor}, key, vocab, fill)
        elif key == "lm_head.weight":
            tensor = _embedding_rows({key: tensor}, key, vocab, {})
        writer.add(names[("llm", key)], tensor)
    for key, tensor in iter_tensors(vision, vision.keys()):
        writer.add(names[("vision", key)], tensor)
    for key, tensor in extras.items():
        writer.add(names[("extras", key)], tensor)
    return {"tensors": len(writer.close()), "bytes": writer.total_bytes}


def _processor(tokenizer, cfg, vision_dir: Path, geometry: str, chat_template: str):
    from transformers import AutoConfig, LlavaImageProcessorPil, LlavaProcessor

    from olavlm.geometry import drop_cls, tower_type, vision_geometry

    spec = vision_geometry(cfg).spec
    side = int(spec.size)
    size = {"height": side, "width": side} if geometry == "resize" else {"shortest_edge": side}
    images = LlavaImageProcessorPil(
        do_pad=geometry == "pad", do_resize=True, size=size, resample=_PIL_CODES[spec.resample],
        do_center_crop=geometry != "resize", crop_size={"height": side, "width": side}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(spec.mean), image_std=list(spec.std),
        do_convert_rgb=True)
    tokenizer.chat_template = chat_template
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=chat_template,
                          patch_size=int(AutoConfig.from_pretrained(vision_dir).patch_size),
                          vision_feature_select_strategy="default" if drop_cls(cfg) else "full", image_token="<image>",
                          num_additional_image_tokens=1 if tower_type(cfg).has_cls else 0)


def check_token_ids(processor, tokenizer, template: str, image_id: int, task_ids: list[int],
                    num_image_tokens: int, side: int, add_bos=None) -> list[str]:
    """Problems (empty = none) where the exported chat template + processor give other ids than
    olavlm for the probe conversations (an image turn, a text-only turn, two turns); ``add_bos``:
    the BOS policy the model was trained with (``data.add_bos``)."""
    from PIL import Image

    from olavlm.constants import IMAGE_TOKEN_INDEX
    from olavlm.data.tokenize import encode_prompt
    from olavlm.interop.llava_template import PROBES, to_hf_messages

    problems = []
    for i, conv in enumerate(PROBES):
        expected = []
        for t in encode_prompt(conv, template, tokenizer, add_bos=add_bos):
            expected += [image_id] * num_image_tokens + task_ids if t == IMAGE_TOKEN_INDEX else [t]
        messages = to_hf_messages(conv)
        for m in messages:
            for item in m["content"]:
                if item["type"] == "image":
                    item["image"] = Image.new("RGB", (side, side))
        got = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        got = list(got[0] if got and isinstance(got[0], list) else got)
        if got != expected:
            at = next((j for j, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            problems.append(f"probe {i}: position {at}: export {processor.tokenizer.convert_ids_to_tokens(got[at:at + 3])} "
                            f"vs olavlm {processor.tokenizer.convert_ids_to_tokens(expected[at:at + 3])}")
    return problems


def _generation_config(src: Path, tokenizer, template: str, added: list[int]):
    from transformers import GenerationConfig

    from olavlm.data.tokenize import stop_token_ids

    suppress = set(added)
    if (src / "llm" / "generation_config.json").is_file():  # e.g. ids past the tokenizer of a converted model
        suppress |= set(GenerationConfig.from_pretrained(src / "llm").suppress_tokens or [])
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_token_ids(template, tokenizer),
                            pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=128,
                            suppress_tokens=sorted(suppress))


def _model_card(info: dict[str, Any]) -> str:
    tasks = " ".join(info["task_tokens"][:3]) + (" ..." if len(info["task_tokens"]) > 3 else "")
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [llava, ola-vlm, olavlm]
---
# OLA-VLM model exported to transformers LLaVA

Exported by `olavlm export llava` from `{info['source']}` (template `{info['template']}`, image geometry
`{info['image_geometry']}`). Plain transformers, no remote code:

```python
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained(PATH)
processor = AutoProcessor.from_pretrained(PATH)
messages = [{{"role": "user", "content": [{{"type": "image", "path": "image.jpg"}}, {{"type": "text", "text": "What is this?"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
print(processor.decode(model.generate(**inputs)[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Every image is followed by {len(info['task_tokens'])} learned task tokens ({tasks}); the chat template writes
them after each `<image>`. A prompt built without the chat template must write `<image>` followed by
those strings and a newline itself. `generation_config.json` suppresses them (and `<image>`).
"""


def export_llava(src: str | Path, dst: str | Path, *, template: str | None = None, image_geometry: str | None = None,
                 allow_token_mismatch: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Write the LLaVA folder; returns the record saved as ``DST/olavlm_export.json``."""
    from transformers import AutoTokenizer

    from olavlm.data.tokenize import resolve_bos, tokenizer_adds_bos
    from olavlm.interop.llava_template import chat_template
    from olavlm.model import io
    from olavlm.geometry import drop_cls, vision_geometry

    try:
        source = io.resolve_dir(src)
    except FileNotFoundError as e:
        raise InteropError(str(e)) from None
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise InteropError(f"{dst}: exists and is not empty (pass --overwrite)")
    cfg, run_info, template, geometry = _read_source(source, template, image_geometry)
    base_tok, tokenizer = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    geo = vision_geometry(cfg)
    names = task_token_names(cfg)
    image_id, task_ids = _add_tokens(tokenizer, names)
    policy = run_info.get("add_bos", "auto")  # the BOS policy the model was trained with
    try:
        bos = resolve_bos(policy, template, base_tok)
    except ValueError as e:
        raise InteropError(f"{source}: {e}") from None
    if tokenizer_adds_bos(base_tok):  # the chat template decides on BOS; the tokenizer's own would double it
        tokenizer.add_bos_token = False
        if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
            raise InteropError(f"{source}: cannot switch off the tokenizer's automatic BOS (add_bos_token)")
    text_cfg = json.loads((source / "llm" / "config.json").read_text())
    rows = Checkpoint(source / "llm").shape("model.embed_tokens.weight")[0]
    vocab = max(rows, len(tokenizer))
    sequence = _sequence_tokens(source, cfg, int(text_cfg["hidden_size"]), geo.num_tokens)
    llava_cfg = _llava_config(cfg, source / "llm", source / "vision", vocab=vocab, image_id=image_id,
                              num_image_tokens=geo.num_tokens, drop_cls=drop_cls(cfg))
    tpl = chat_template(template, names, add_bos=bos)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        written = _write_weights(tmp, source, llava_cfg, image_id=image_id, task_ids=task_ids, sequence=sequence)
        llava_cfg.save_pretrained(tmp)
        processor = _processor(tokenizer, cfg, source / "vision", geometry, tpl)
        processor.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)  # preprocessor_config.json too, for other loaders
        added = [image_id, *task_ids] if image_id >= len(base_tok) else task_ids
        _generation_config(source, base_tok, template, added).save_pretrained(tmp)
        problems = check_token_ids(processor, base_tok, template, image_id, task_ids, geo.num_tokens,
                                   int(geo.spec.size), add_bos=bos)
        if problems and not allow_token_mismatch:
            raise InteropError(f"--template {template}: the exported chat template tokenizes differently from "
                               f"olavlm ({problems[0]}); pass --allow-token-mismatch to export anyway")
        for p in problems:
            log.warning("token mismatch: %s", p)
        info = {"source": str(src), "stage": run_info.get("stage"), "template": template, "image_geometry": geometry,
                "placement": "chat template: <image> + task tokens + newline at the start of the user turn",
                "image_token": "<image>", "image_token_id": image_id, "num_image_tokens": geo.num_tokens,
                "task_tokens": names, "task_token_ids": task_ids, "vocab_size": vocab, "source_vocab_rows": rows,
                "suppressed_ids": _generation_config(source, base_tok, template, added).suppress_tokens,
                "add_bos": bos, "token_check": {"probes": 3, "problems": problems}, **written}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(info))
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s -> %s (LlavaForConditionalGeneration, %d tensors)", src, dst, written["tensors"])
    return info
