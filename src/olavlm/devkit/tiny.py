"""Tiny random checkpoints of the real classes, saved as ordinary Hugging Face folders.

``olavlm make-tiny --output DIR`` writes them so any recipe can be smoke-run on a CPU by pointing
its paths there; the test-suite uses the same function. Nothing here is used by real training.

Layout of DIR::

    tokenizer/          byte-level BPE (vocab <= 512) with every special token the templates need
    llm-llama/          LlamaForCausalLM   (+ tokenizer files)
    llm-phi3/           Phi3ForCausalLM    (+ tokenizer files)
    llm-qwen2/          Qwen2ForCausalLM   (+ tokenizer files)
    vision-clip/        CLIPVisionModel    (+ CLIPImageProcessor config), 64 px, patch 8 -> 8x8 tokens
    vision-siglip/      SiglipVisionModel  (+ SiglipImageProcessor config), 64 px, patch 16 -> 4x4 tokens
    vision-convnext-openclip/  an open_clip-layout checkpoint (``visual.trunk.*`` timm ConvNeXt keys,
                        ``visual.head.proj``, a few text-tower tensors, open_clip_config.json) ...
    vision-convnext/    ... converted by ``olavlm convert open-clip`` into ConvNextModel
                        (+ CLIPImageProcessor config): 4 stages like convnext_xxlarge, 256 px,
                        stride 32 -> 8x8 tokens of width 64, LayerNorm eps 1e-5
    teachers/...        tiny teachers, when the teachers package provides them
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Special tokens of every template we ship (docs/method.md, "Templates and labels") plus the generic ones.
SPECIAL_TOKENS = [
    "<unk>", "<pad>", "<s>", "</s>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>",
    "<|im_start|>", "<|im_end|>",
]

# A Llama-3 style chat template (the `chat_template` data template renders through it).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "You are a helpful AI assistant.",
    "system user assistant USER ASSISTANT",
    "What is in the image? Describe the image in two lines. How many objects are there?",
    "There is a red circle to the left of a blue square. A green triangle is closer to the camera.",
    "Only answer the option as the output. For example, if your answer is the option A, answer (A).",
    "The quick brown fox jumps over the lazy dog. 0123456789 (A) (B) (C) (D) yes no left right.",
]


def train_tokenizer(corpus: list[str], vocab_size: int = 512, *, chat_template: str = CHAT_TEMPLATE):
    """Byte-level BPE with the special tokens above, wrapped as a PreTrainedTokenizerFast.

    Behaves like Llama-3's tokenizer: BOS (``<|begin_of_text|>``) is prepended by the
    post-processor, EOS is ``<|eot_id|>``, and it has ``<pad>``/``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", unk_token="<unk>",
        pad_token="<pad>", padding_side="right", model_max_length=4096)
    fast.chat_template = chat_template
    return fast


def _llm_configs(vocab_size: int, pad_id: int, bos_id: int, eos_id: int, hidden: int, layers: int):
    from transformers import LlamaConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, pad_token_id=pad_id, bos_token_id=bos_id,
                  eos_token_id=eos_id, tie_word_embeddings=False)
    return {
        "llm-llama": LlamaConfig(**common),
        "llm-phi3": Phi3Config(**{**common, "num_key_value_heads": 4}),
        "llm-qwen2": Qwen2Config(**common),
    }


def make_tiny_llms(out: Path, tokenizer, *, hidden: int = 64, layers: int = 4, seed: int = 0) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    paths = {}
    cfgs = _llm_configs(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                        tokenizer.eos_token_id, hidden, layers)
    for name, cfg in cfgs.items():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        path = out / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


def make_tiny_vision(out: Path, *, hidden: int = 64, layers: int = 3, image_size: int = 64,
                     seed: int = 0) -> dict[str, Path]:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, SiglipImageProcessor,
                              SiglipVisionConfig, SiglipVisionModel)

    torch.manual_seed(seed)
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=8, projection_dim=hidden))
    clip.save_pretrained(out / "vision-clip")
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(out / "vision-clip")
    torch.manual_seed(seed)
    siglip = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=16))
    siglip.save_pretrained(out / "vision-siglip")
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out / "vision-siglip")
    return {"vision-clip": out / "vision-clip", "vision-siglip": out / "vision-siglip"}


def make_tiny_convnext(out: Path, *, dims=(8, 16, 32, 64), depths=(1, 1, 2, 1), image_size: int = 256,
                       seed: int = 0) -> dict[str, Path]:
    """A random open_clip-layout ConvNeXt CLIP checkpoint and its conversion (the real command path)."""
    from safetensors.torch import save_file
    from transformers import ConvNextModel

    from olavlm.model.convnext import (CLIP_MEAN, CLIP_STD, convert_open_clip, convnext_config,
                                       convnext_state_dict_to_open_clip)

    torch.manual_seed(seed)
    trunk = ConvNextModel(convnext_config(depths, dims, image_size=image_size))
    with torch.no_grad():  # layer scale well above its 1e-6 init, so every block shapes the features
        for name, p in trunk.named_parameters():
            if name.endswith("layer_scale_parameter"):
                p.uniform_(0.2, 1.0)
    state = convnext_state_dict_to_open_clip(trunk.state_dict(), "visual.trunk.")
    embed = 16
    state.update({"visual.head.proj.weight": torch.randn(embed, dims[-1]) * 0.02,
                  "token_embedding.weight": torch.randn(64, embed) * 0.02,
                  "positional_embedding": torch.randn(8, embed) * 0.01, "logit_scale": torch.tensor(4.6052)})
    src = out / "vision-convnext-openclip"
    src.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "open_clip_model.safetensors"))
    open_cfg = {"model_cfg": {"embed_dim": embed, "vision_cfg": {"timm_model_name": "convnext_tiny_olavlm",
                                                                 "timm_pool": "", "timm_proj": "linear",
                                                                 "image_size": image_size}},
                "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}
    (src / "open_clip_config.json").write_text(json.dumps(open_cfg, indent=2))
    convert_open_clip(str(src), out / "vision-convnext", image_size=image_size, norm_eps=1e-5)  # as xxlarge
    return {"vision-convnext-openclip": src, "vision-convnext": out / "vision-convnext"}


def make_tiny(output: str | Path, *, seed: int = 0, with_teachers: bool = True) -> dict[str, Path]:
    """Write every tiny checkpoint into ``output``; returns {name: folder}."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(CORPUS)
    tokenizer.save_pretrained(out / "tokenizer")
    written = {"tokenizer": out / "tokenizer"}
    written.update(make_tiny_llms(out, tokenizer, seed=seed))
    written.update(make_tiny_vision(out, seed=seed))
    written.update(make_tiny_convnext(out, seed=seed))
    if with_teachers:
        try:
            from olavlm.devkit.teachers import make_tiny_teachers
        except ImportError:  # teachers package not present
            log.info("teachers package has no tiny makers; skipping tiny teachers")
        else:
            written.update(make_tiny_teachers(out / "teachers", seed=seed))
    return written


def tiny_model_config(tiny_dir: str | Path, *, llm: str = "llama", vision: str = "clip", **overrides):
    """A ModelConfig over the tiny checkpoints in ``tiny_dir`` with small predictors (fp32, sdpa).

    Layers fit the 4-layer tiny LLMs and include the last one (final-norm states): gen [2, 4],
    depth [1, 3], seg [2, 4]; 2 task tokens per task; output dims 16/24/16. ``overrides`` are
    ModelConfig fields. ``vision``: "clip", "siglip" or "convnext".
    """
    from olavlm.config import ModelConfig, PredictorConfig, default_tasks

    tasks = default_tasks()
    tasks["gen"].layers, tasks["depth"].layers, tasks["seg"].layers = [2, 4], [1, 3], [2, 4]
    tasks["gen"].predictor = PredictorConfig(dim=32, num_queries=1, query_source="hidden", out_dim=16,
                                             output_layout="vector")
    tasks["depth"].predictor = PredictorConfig(dim=None, out_dim=24, output_layout="tokens", output_mlp=True)
    tasks["seg"].predictor = PredictorConfig(dim=32, out_dim=16, output_layout="grid")
    fields = dict(llm=str(Path(tiny_dir) / f"llm-{llm}"), vision_tower=str(Path(tiny_dir) / f"vision-{vision}"),
                  vision_type=vision, dtype="float32", num_task_tokens=2, tasks=tasks)
    if vision == "convnext":
        fields["vision_feature_layer"] = -1  # a ConvNeXt tower gives its last stage only
    fields.update(overrides)
    return ModelConfig(**fields)
