"""LoRA / QLoRA adapters on the LLM for VPT and IFT (``train.lora``), with peft.

The LLM's base weights stay frozen; peft adds low-rank adapters to the decoder layers' linear
projections (default: every attention and MLP projection) and optionally trains whole LLM modules
(``modules_to_save``, e.g. ``embed_tokens``). The projector trains fully and the task tokens stay
frozen, as the stage policy says for VPT/IFT (olavlm.train.stages: the ``lora`` group replaces
``llm``). Checkpoints hold only trainable tensors, i.e. adapters + extras.

A LoRA run's ``final/`` is an *adapter folder*::

    config.json  olavlm.safetensors  tokenizer files   as a model folder (extras only; config names the base's LLM)
    adapter/                                            peft adapter (adapter_config.json + weights)
    lora.json                                           {"base": base model folder or null, "model": ...}

:func:`load_adapter_folder` rebuilds base + adapter (``OlaVLM.from_pretrained`` does so and merges),
and ``olavlm merge-lora RUN DST`` (:func:`olavlm.train.cli.merge_lora`) writes the merged plain
model folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from olavlm.config import ConfigError, LoraConfig, RunConfig, model_config_from_dict, model_config_to_dict
from olavlm.errors import UserError

log = logging.getLogger(__name__)

MARKER = "lora.json"  # marks an adapter folder
ADAPTER_DIR = "adapter"


class QLoraUnavailable(UserError):
    """4-bit QLoRA asked for where it cannot run (no CUDA GPU, or bitsandbytes not installed)."""


class LoraFolderError(UserError):
    """An adapter folder that cannot be loaded (missing base model, damaged files)."""


# -- config checks ---------------------------------------------------------------------------------


def check_config(cfg: RunConfig) -> None:
    """Refuse what LoRA cannot do, before any weights load (one line naming the field)."""
    lora = cfg.train.lora
    if lora is None:
        return
    if cfg.train.stage == "pt":
        raise ConfigError("train.lora: LoRA adapts the LLM in vpt / ift; PT trains no LLM weights")
    if cfg.train.unfreeze_vision_tower:
        raise ConfigError("train.lora: cannot be combined with train.unfreeze_vision_tower (adapter folders "
                          "keep the base vision tower)")
    if lora.load_in_4bit:
        check_qlora()


def check_qlora() -> None:
    if not torch.cuda.is_available():
        raise QLoraUnavailable("train.lora.load_in_4bit: 4-bit QLoRA needs a CUDA GPU; none is visible "
                               "(set load_in_4bit: false for plain LoRA)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QLoraUnavailable("train.lora.load_in_4bit: 4-bit QLoRA needs bitsandbytes "
                               "(pip install bitsandbytes), which is not installed") from None


# -- applying adapters -----------------------------------------------------------------------------


def default_target_modules(llm: nn.Module) -> list[str]:
    """Names of the linear projections inside the decoder layers (attention + MLP), e.g. q_proj ...
    down_proj (Llama) or qkv_proj, o_proj, gate_up_proj, down_proj (Phi-3). The LM head is not one."""
    from olavlm.model import io

    _, layers = io.decoder_of(llm)
    return sorted({name.rsplit(".", 1)[-1] for name, m in layers.named_modules() if isinstance(m, nn.Linear)})


def peft_config(llm: nn.Module, lora: LoraConfig):
    import peft

    targets = list(lora.target_modules) if lora.target_modules else default_target_modules(llm)
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                           modules_to_save=list(lora.modules_to_save) or None, bias="none")


def is_lora(llm: nn.Module) -> bool:
    """Whether ``llm`` is wrapped in peft adapters (without importing peft for plain models)."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(llm, peft.PeftModel)


def is_adapter_param(name: str) -> bool:
    """Parameter names (inside the LLM) that peft added: adapters and trained module copies."""
    return ".lora_" in name or ".modules_to_save." in name


def apply_lora(model, lora: LoraConfig, *, base: str | Path | None) -> None:
    """Wrap ``model.llm`` in peft adapters (in place). ``base``: the olavlm folder the model was
    loaded from (None: built from ``model.cfg``), recorded so the adapter folder can be rebuilt."""
    import peft

    if lora.load_in_4bit:
        check_qlora()
        model.llm = quantized_llm(model.llm, base, model.cfg)
    cfg = peft_config(model.llm, lora)
    missing = [m for m in lora.modules_to_save if not any(n.split(".")[-1] == m for n, _ in model.llm.named_modules())]
    if missing:
        raise ConfigError(f"train.lora.modules_to_save: {missing} are not modules of the LLM")
    try:
        model.llm = peft.get_peft_model(model.llm, cfg)
    except ValueError as e:  # e.g. target modules not found
        raise ConfigError(f"train.lora.target_modules: {e}") from e
    model.lora_base = str(Path(base).resolve()) if base is not None else None
    model.lora_model_cfg = model_config_to_dict(model.cfg)
    log.info("LoRA r=%d alpha=%g dropout=%g on %s%s", lora.r, lora.alpha, lora.dropout,
             sorted(cfg.target_modules), f", training {lora.modules_to_save} fully" if lora.modules_to_save else "")


def quantized_llm(llm: nn.Module, base: str | Path | None, model_cfg):
    """The LLM reloaded with 4-bit NF4 weights on the GPU (QLoRA); the fp weights are dropped."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from olavlm.model.vision import torch_dtype

    source = str(Path(base) / "llm") if base is not None else model_cfg.llm
    compute = torch_dtype(model_cfg.dtype)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    q = AutoModelForCausalLM.from_pretrained(source, quantization_config=quant, dtype=compute,
                                             attn_implementation=model_cfg.attn_implementation,
                                             device_map={"": torch.cuda.current_device()})
    if q.get_input_embeddings().weight.shape != llm.get_input_embeddings().weight.shape:  # pad token added
        q.resize_token_embeddings(llm.get_input_embeddings().weight.shape[0], mean_resizing=False)
        with torch.no_grad():
            q.get_input_embeddings().weight.copy_(llm.get_input_embeddings().weight)
    q.config.pad_token_id = llm.config.pad_token_id
    return prepare_model_for_kbit_training(q, use_gradient_checkpointing=False)


# -- adapter folders ---------------------------------------------------------------------------------


def save_adapter_folder(model, folder: str | Path) -> None:
    """``folder``: config + extras + tokenizer like a model folder, the peft adapter in ``adapter/``
    and ``lora.json`` naming the base; the base LLM weights are not copied."""
    from olavlm.model import io

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.llm.save_pretrained(folder / ADAPTER_DIR)
    model.tokenizer.save_pretrained(folder)
    from safetensors.torch import save_file

    extras = model.extra_state(with_predictors=False)
    save_file(extras, str(folder / io.WEIGHTS_NAME), metadata={"format": "pt"})
    # config.json names the base's LLM and tower (absolute paths or hub ids), so checks that read them
    # (pre-flight of a next stage) find real folders; the adapters are applied on load
    data = model_config_to_dict(model.cfg)
    data.update(olavlm_format=io.FORMAT_VERSION, with_predictors=False)
    (folder / io.CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")
    info = {"base": getattr(model, "lora_base", None), "model": getattr(model, "lora_model_cfg", None),
            "adapter": ADAPTER_DIR}
    (folder / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def load_adapter_folder(folder: str | Path, *, merge: bool, dtype: str | None = None,
                        attn_implementation: str | None = None):
    """The OlaVLM of an adapter folder: base model + adapters (+ saved extras); ``merge`` folds the
    adapters into the base weights (a plain model that saves as a plain folder)."""
    import peft
    from safetensors.torch import load_file

    from olavlm.model import io
    from olavlm.model.vlm import OlaVLM

    folder = Path(folder)
    info = json.loads((folder / MARKER).read_text())
    saved, _ = io.read_config(folder)
    runtime = {"dtype": dtype or saved.dtype, "attn_implementation": attn_implementation or saved.attn_implementation}
    if info.get("base"):
        if not (Path(info["base"]) / io.CONFIG_NAME).is_file():
            raise LoraFolderError(f"{folder / MARKER}: base model folder {info['base']} is missing; "
                                  "restore it (or edit 'base') to load these adapters")
        model = OlaVLM.from_pretrained(info["base"], with_predictors=False, **runtime)
    else:
        cfg = model_config_from_dict(info["model"])
        cfg.dtype, cfg.attn_implementation = runtime["dtype"], runtime["attn_implementation"]
        model = OlaVLM.from_config(cfg, with_predictors=False)
    model.llm = peft.PeftModel.from_pretrained(model.llm, str(folder / info.get("adapter", ADAPTER_DIR)))
    state = load_file(str(folder / io.WEIGHTS_NAME))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k.startswith(("projector.", "task_tokens."))]:
        raise LoraFolderError(f"{folder / io.WEIGHTS_NAME}: does not match the base model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.lora_base, model.lora_model_cfg = info.get("base"), info.get("model")
    if merge:
        model.llm = model.llm.merge_and_unload()
    return model
