"""Loading the tokenizer and the LLM, and reading/writing the saved OLA-VLM folder.

Saved folder (HF-style)::

    config.json          olavlm model config (model_config_to_dict) with llm/vision paths rewritten
                         to the subfolders, plus "olavlm_format" and "with_predictors"
    llm/                 LLM save_pretrained + tokenizer
    vision/              vision tower save_pretrained + preprocessor_config.json
    olavlm.safetensors   projector, task tokens, predictors, logit scales (trainable extras)
    tokenizer files      also at the top level
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from olavlm.config import ConfigError, ModelConfig, model_config_from_dict, model_config_to_dict

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "olavlm.safetensors"
FORMAT_VERSION = 1
_META_KEYS = ("olavlm_format", "with_predictors")


def load_tokenizer(model_cfg: ModelConfig):
    """Tokenizer of ``model.tokenizer`` (or ``model.llm``), right padding, with a pad token (docs/method.md, "Model"):
    pad := unk when there is no pad token; if there is no unk either, ``model.pad_token`` (default
    ``<pad>``) is added as a special token (the model then grows its embeddings, see
    :func:`resize_for_tokenizer`)."""
    from transformers import AutoTokenizer

    path = model_cfg.tokenizer or model_cfg.llm
    if not path:
        raise ConfigError("model.llm: required (hub id or folder of the LLM / tokenizer)")
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    if tok.pad_token is None:
        if tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": model_cfg.pad_token or "<pad>"})
    return tok


def resize_for_tokenizer(llm: nn.Module, tokenizer) -> int:
    """Grow the input/output embeddings to the tokenizer; new rows = mean of the existing rows.
    Returns the number of rows added. Also records the pad id in the LLM's configs."""
    emb = llm.get_input_embeddings()
    old = emb.weight.shape[0]
    added = max(0, len(tokenizer) - old)
    if added:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for module in {id(m): m for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None}.values():
                w = module.weight
                w[old:] = w[:old].mean(0, keepdim=True).to(w.dtype)
    llm.config.pad_token_id = tokenizer.pad_token_id
    if getattr(llm, "generation_config", None) is not None:
        llm.generation_config.pad_token_id = tokenizer.pad_token_id
    return added


def load_llm(model_cfg: ModelConfig, path: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from olavlm.model.vision import torch_dtype

    if not (path or model_cfg.llm):
        raise ConfigError("model.llm: required (hub id or folder of an AutoModelForCausalLM)")
    llm = AutoModelForCausalLM.from_pretrained(path or model_cfg.llm, dtype=torch_dtype(model_cfg.dtype),
                                               attn_implementation=model_cfg.attn_implementation)
    for key in ("final_logit_softcapping", "logit_scale"):  # applied after lm_head by those classes
        if getattr(llm.config, key, None) not in (None, 1.0):
            raise ConfigError(f"model.llm: {type(llm).__name__} post-processes logits ({key}); "
                              "supervised-only NTP does not support it")
    return llm


def decoder_of(llm: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder stack (returning final-norm states) and its list of layers."""
    decoder = llm.get_decoder()
    layers = getattr(decoder, "layers", None)
    n = llm.config.num_hidden_layers
    if not isinstance(layers, nn.ModuleList) or len(layers) != n:
        raise ConfigError(f"model.llm: cannot find the {n} decoder layers of {type(llm).__name__} "
                          "(expected get_decoder().layers)")
    return decoder, layers


# -- saved folder ----------------------------------------------------------------------------

def resolve_dir(path: str | Path) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (the only network access)."""
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        raise FileNotFoundError(f"{path} is not an olavlm model folder (nor a hub id like org/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path)))


def write_config(folder: Path, cfg: ModelConfig, *, with_predictors: bool) -> None:
    data = model_config_to_dict(cfg)
    data.update(llm="llm", tokenizer=None, vision_tower="vision")
    data.update(olavlm_format=FORMAT_VERSION, with_predictors=with_predictors)
    (folder / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")


def read_config(folder: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The saved ModelConfig (paths made absolute) and the metadata keys."""
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not an olavlm model folder")
    data = json.loads(file.read_text())
    meta = {k: data.pop(k) for k in _META_KEYS if k in data}
    if meta.get("olavlm_format") != FORMAT_VERSION:
        raise ConfigError(f"{file}: olavlm_format {meta.get('olavlm_format')!r} is not {FORMAT_VERSION}")
    cfg = model_config_from_dict(data)
    for key in ("llm", "tokenizer", "vision_tower"):
        value = getattr(cfg, key)
        if value and (folder / value).is_dir():
            setattr(cfg, key, str(folder / value))
    cfg.layer_spec = cfg.weight_spec = None  # already applied to tasks when saved
    return cfg, meta


# -- a later stage loading a saved folder (train.init_from) ----------------------------------

# How the saved weights are loaded and run, not what they are: a VPT/IFT recipe that sets them wins.
RUNTIME_FIELDS = ("dtype", "attn_implementation")
# What the saved weights are (projector, tower read-out, task-token rows): a recipe may repeat them, not change them.
ARCHITECTURE_FIELDS = ("vision_type", "vision_feature_layer", "vision_drop_cls", "projector", "num_task_tokens",
                       "task_order")
TASK_ARCHITECTURE_FIELDS = ("token_rows", "predictor.query_source", "predictor.num_queries")


def _field(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def reconcile_init_from(saved: ModelConfig, recipe: ModelConfig, explicit: frozenset[str] | None,
                        where: str) -> tuple[dict[str, Any], list[str]]:
    """Settle a VPT/IFT recipe's ``model:`` section against the folder ``where`` it starts from.

    Runtime fields (:data:`RUNTIME_FIELDS`) the recipe sets are returned as ``from_pretrained``
    keyword arguments; unset ones keep the saved values. An architecture field the recipe sets to
    something else than the folder holds raises ConfigError naming both values. ``explicit`` are the
    dotted fields the recipe set (:func:`olavlm.config.explicit_fields`; None = every field counts).
    Returns (runtime overrides, one note per applied override and per unused differing source path).
    """
    def given(name: str) -> bool:
        return explicit is None or f"model.{name}" in explicit

    checks = [(name, getattr(recipe, name), getattr(saved, name)) for name in ARCHITECTURE_FIELDS]
    for task, tc in recipe.tasks.items():
        if task in saved.tasks:
            checks += [(f"tasks.{task}.{name}", _field(tc, name), _field(saved.tasks[task], name))
                       for name in TASK_ARCHITECTURE_FIELDS]
    for name, want, have in checks:
        if given(name) and want != have:
            raise ConfigError(f"model.{name}: the recipe asks for {want!r} but train.init_from ({where}) was "
                              f"built with {have!r}; the architecture of a saved model cannot change (remove the "
                              "field or set it to the saved value)")
    runtime, notes = {}, []
    for name in RUNTIME_FIELDS:
        want, have = getattr(recipe, name), getattr(saved, name)
        if given(name):
            runtime[name] = want
            if want != have:
                notes.append(f"model.{name}: {want!r} from the recipe (train.init_from was saved with {have!r})")
    unused = [f"model.{name}" for name in ("llm", "tokenizer", "vision_tower")
              if explicit is not None and f"model.{name}" in explicit and getattr(recipe, name)]
    if unused:
        notes.append(f"{', '.join(unused)}: not used; the weights and tokenizer come from train.init_from ({where})")
    return runtime, notes
