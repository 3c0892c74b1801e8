"""Tiny checkpoints in the released OLA-VLM layout (config fields and key names), for tests and demos.

``make_tiny_reference(tiny_dir, out, stage="pt")`` takes the tiny LLM and CLIP tower (or, with
``vision="convnext"``, the tiny open_clip ConvNeXt trunk) written by ``olavlm make-tiny`` and stores them the way the reference's ``OlaLlavaLlamaForCausalLM`` (PT) or
``LlavaLlamaForCausalLM`` (IFT) checkpoints do: one state dict under the reference key names, split
into several safetensors shards with an index, a ``config.json`` in the transformers-4.41 style with
the multimodal fields, and the tokenizer files. Projector, task tokens, predictors and logit scales
are random. PT checkpoints also carry a (random) DA-v2 decoder, which a converter must drop.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# tiny predictor widths (D, out) per task and the layers they read (the tiny LLMs have 4 layers)
TINY_HEADS = {"gen": {"dim": 32, "out": 16, "layers": "2-4"}, "depth": {"dim": None, "out": 24, "layers": "1-3"},
              "seg": {"dim": 32, "out": 16, "layers": "2-4"}}
TINY_HEAD_ATTN = {"num_heads": 2, "dim_head": 8}
_LAYER_FIELD = {"gen": "img", "depth": "depth", "seg": "seg"}


def _linear(g: torch.Generator, out: int, inp: int, bias: bool = True) -> dict[str, torch.Tensor]:
    w = {"weight": torch.randn(out, inp, generator=g) / inp ** 0.5}
    if bias:
        w["bias"] = 0.1 * torch.randn(out, generator=g)
    return w


def _norm(g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    return {"weight": 1 + 0.1 * torch.randn(n, generator=g), "bias": 0.1 * torch.randn(n, generator=g)}


def _put(state: dict, prefix: str, params: dict[str, torch.Tensor]) -> None:
    state.update({f"{prefix}.{k}": v for k, v in params.items()})


def reference_head(g: torch.Generator, task: str, d_llm: int, *, depth: int = 1) -> dict[str, torch.Tensor]:
    """One ``TaskTokenResampler`` (+ depth's ``linear_1..3``) under the reference's inner names."""
    spec = TINY_HEADS[task]
    dim, out = spec["dim"] or d_llm, spec["out"]
    inner = TINY_HEAD_ATTN["num_heads"] * TINY_HEAD_ATTN["dim_head"]
    s: dict[str, torch.Tensor] = {}
    _put(s, "projector.proj_in", _linear(g, dim, d_llm))
    for i in range(depth):
        _put(s, f"projector.layers.{i}.0.norm1", _norm(g, dim))
        _put(s, f"projector.layers.{i}.0.norm2", _norm(g, dim))
        _put(s, f"projector.layers.{i}.0.to_q", _linear(g, inner, dim, bias=False))
        _put(s, f"projector.layers.{i}.0.to_kv", _linear(g, 2 * inner, dim, bias=False))
        _put(s, f"projector.layers.{i}.0.to_out", _linear(g, dim, inner, bias=False))
        _put(s, f"projector.layers.{i}.1.0", _norm(g, dim))
        _put(s, f"projector.layers.{i}.1.1", _linear(g, dim, dim, bias=False))
        _put(s, f"projector.layers.{i}.1.3", _linear(g, dim, dim, bias=False))
    _put(s, "projector.proj_out", _linear(g, out, dim))
    _put(s, "projector.norm_out", _norm(g, out))
    if task == "depth":
        for j in (1, 2, 3):
            _put(s, f"linear_{j}.0", _linear(g, out, out))
            _put(s, f"linear_{j}.2", _linear(g, out, out))
    return s


def _reference_fields(stage: str, llm: str, k: int, p: int, d_vis: int, task_token_format: str | None,
                      tower: str = "openai/clip-vit-large-patch14-336") -> dict:
    pt = stage == "pt"
    fields = {
        "_name_or_path": f"/authors/checkpoints/tiny_gen-depth-seg_{'pretrain' if pt else 'finetune'}_n{k}",
        "aux_mode": "gen-depth-seg", "num_task_tokens": k, "attn_mask_type": "causal",
        "contrastive_loss_weight": 0.3, "use_contrastive": True, "use_ce": False, "pass_text_to_aux": True,
        "sample_tokens": False, "image_generator": "stabilityai/stable-diffusion-2-1-unclip",
        "image_segmentor": "shi-labs/oneformer_coco_swin_large",
        "depth_estimator": "/authors/ckpts/depth_anything_v2_vitl.pth",
        "mm_vision_tower": tower, "mm_hidden_size": d_vis,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
        "mm_patch_merge_type": "flat", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "use_mm_proj": True, "tune_mm_mlp_adapter": pt, "freeze_mm_mlp_adapter": False, "mm_projector_lr": None,
        "image_aspect_ratio": "square" if pt else "pad", "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right",
    }
    if not pt:
        fields["image_grid_pinpoints"] = None
    for task, spec in TINY_HEADS.items():
        f = _LAYER_FIELD[task]
        fields[f"image_{task}"] = {
            "depth": 1, "ff_mult": 1, "num_tokens": 1 if task == "gen" else p, "output_dim": spec["out"],
            f"{f}_layer_indices": spec["layers"], f"{f}_loss_weight": 0.5, **TINY_HEAD_ATTN}
    fields["image_depth"]["use_intermediate_depth"] = True
    if task_token_format is not None:
        fields["task_token_format"] = task_token_format
    return fields


def _legacy_llm_config(folder: Path) -> dict:
    """The tiny LLM's config.json as transformers 4.41 wrote it (rope_theta, torch_dtype)."""
    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
    cfg["rope_scaling"] = None
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "bfloat16"
    cfg["transformers_version"] = "4.41.2"
    return cfg


def _tower_tensors(tiny: Path, vision: str, state: dict, dtype) -> tuple[str, int, int]:
    """Put the tiny tower's tensors into ``state`` under the reference names; (mm_vision_tower, width, tokens)."""
    from safetensors.torch import load_file

    prefix = "model.vision_tower.vision_tower."
    if vision == "clip":
        folder = tiny / "vision-clip"
        for k, v in load_file(str(folder / "model.safetensors")).items():  # the transformers-4.x CLIP names
            state[prefix + (k if k.startswith("vision_model.") else "vision_model." + k)] = v.to(dtype)
        vis = json.loads((folder / "config.json").read_text())
        return "openai/clip-vit-large-patch14-336", vis["hidden_size"], (vis["image_size"] // vis["patch_size"]) ** 2
    if vision != "convnext":
        raise ValueError(f"vision: {vision!r} is not clip or convnext")
    folder = tiny / "vision-convnext-openclip"  # timm trunk under visual.trunk.; the OLA name replaces the prefix
    trunk = {k[len("visual.trunk."):]: v for k, v in load_file(str(folder / "open_clip_model.safetensors")).items()
             if k.startswith("visual.trunk.")}
    state.update({prefix + k: v.to(dtype) for k, v in trunk.items()})
    vis = json.loads((tiny / "vision-convnext" / "config.json").read_text())
    side = vis["image_size"] // (vis["patch_size"] * 2 ** (vis["num_stages"] - 1))
    # the reference reads the input size from the tower name's "-res<N>" suffix
    return (f"laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup-res{vis['image_size']}",
            vis["hidden_sizes"][-1], side * side)


def write_shards(state: dict[str, torch.Tensor], out: Path, num_shards: int) -> None:
    from safetensors.torch import save_file

    keys = list(state)
    n = max(1, min(num_shards, len(keys)))
    size = -(-len(keys) // n)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i * size:(i + 1) * size]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def make_tiny_reference(tiny_dir: str | Path, out: str | Path, *, stage: str = "pt", llm: str = "llama",
                        num_task_tokens: int = 2, task_token_format: str | None = "expand_emb", seed: int = 0,
                        num_shards: int = 3, spare_rows: int = 0, vision: str = "clip") -> Path:
    """Write a tiny released-layout checkpoint into ``out``; ``stage`` "pt" (with predictors) or "ift".
    ``spare_rows``: embedding rows past the tokenizer (Phi-3 has 53: 32,064 rows, 32,011 entries).
    ``vision``: "clip" (the tiny CLIP ViT) or "convnext" (the tiny open_clip ConvNeXt trunk)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tiny, out = Path(tiny_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    llm_dir = tiny / f"llm-{llm}"
    pt = stage == "pt"
    low = torch.bfloat16 if pt else torch.float32  # PT: LLM + tower in bf16, the trained extras in fp32
    state = {k: v.to(low) for k, v in load_file(str(llm_dir / "model.safetensors")).items()}
    tower, d_vis, p = _tower_tensors(tiny, vision, state, low)
    d = json.loads((llm_dir / "config.json").read_text())["hidden_size"]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = torch.cat([state[key], torch.randn(spare_rows, d, generator=g).to(low) / d ** 0.5])
    _put(state, "model.mm_projector.0", _linear(g, d, d_vis))
    _put(state, "model.mm_projector.2", _linear(g, d, d))
    state["model.special_depth_tokens"] = torch.randn(p, d, generator=g)
    state["model.special_seg_tokens"] = torch.randn(p, d, generator=g)
    state["model.special_gen_tokens"] = torch.randn(num_task_tokens, d, generator=g)
    if pt:
        for task, spec in TINY_HEADS.items():
            for k in range(len(spec["layers"].split("-"))):
                _put(state, f"image_{task}_heads.{k}", reference_head(g, task, d))
            state[f"{task}_logit_scale"] = torch.tensor(2.0) + 0.1 * torch.randn((), generator=g)
        state["da_v2_head.depth_head.projects.0.weight"] = torch.randn(8, 24, 1, 1, generator=g).to(low)
        state["da_v2_head.depth_head.projects.0.bias"] = torch.randn(8, generator=g).to(low)
    write_shards(state, out, num_shards)
    cfg = _legacy_llm_config(llm_dir)
    cfg["vocab_size"] += spare_rows
    family = {"llama": "Llama", "phi3": "Phi3"}[llm]
    cfg.update(model_type=f"{'ola' if pt else 'llava'}_{llm}",
               architectures=[f"{'OlaLlava' if pt else 'Llava'}{family}ForCausalLM"])
    cfg.update(_reference_fields(stage, llm, num_task_tokens, p, d_vis, task_token_format, tower))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    AutoTokenizer.from_pretrained(llm_dir).save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "transformers_version": "4.41.2"}))
    return out


def read_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file directly in ``folder`` (tests compare with these)."""
    from safetensors import safe_open

    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out
