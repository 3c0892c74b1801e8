"""Bootstrap: the tiny "pretrained" base models ShapeWorld's PT starts from (a clearly separate step).

The real recipe starts PT from a pretrained LLM and a pretrained CLIP encoder. Here we make both
locally, briefly, from the world itself, and save them as ordinary Hugging Face folders; from then on
they go through exactly the code paths real checkpoints use (``from_pretrained`` by path):

* ``tokenizer/``: byte-level BPE (vocab <= 512) trained on the world's text, with every template's
  special tokens and a Llama-3-style chat template (:func:`olavlm.devkit.tiny.train_tokenizer`);
* ``llm/``: a small ``LlamaForCausalLM`` language-modelled on the world's conversations rendered
  with the chat template (no images);
* ``vision/``: a small ``CLIPVisionModel`` (+ ``CLIPImageProcessor``) trained, at the layer the VLM
  reads (``vision_feature_layer``), to predict the words and word pairs of the image's long caption
  from the mean patch feature (multi-label; the captions carry no depth words,
  ``olavlm.world.text.DEPTH_WORDS``) and, with ``vision_supervised``, the world's per-patch ground
  truth and object counts (:mod:`olavlm.demo.tower_targets`): the stand-in for a well-trained CLIP.

The result is cached: ``bootstrap.json`` records a key of (world, settings); a re-run with the same
key returns the existing folders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from olavlm.demo.tower_targets import global_targets, patch_targets

log = logging.getLogger(__name__)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLAVA_LLAMA3_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                       "gives helpful, detailed, and polite answers to the user's questions.")


@dataclass
class BootstrapSpec:
    """Sizes and training lengths of the bootstrapped base models."""

    seed: int = 0
    vocab_size: int = 512  # BPE vocabulary (special tokens included)
    llm_hidden: int = 128  # LlamaForCausalLM hidden size (64 learns the answer format, not the image)
    llm_layers: int = 4  # decoder layers (the probe reports one value per layer)
    llm_heads: int = 8  # head dim 16; with 4 heads the multi-task IFT sat at the constant-letter optimum
    llm_kv_heads: int | None = None  # key/value heads (None = llm_heads // 2)
    llm_steps: int = 120  # LM optimisation steps on the world's conversations
    llm_batch: int = 12  # packed blocks per step
    llm_block: int = 192  # tokens per packed block
    llm_lr: float = 3e-3
    vision_hidden: int = 64  # CLIPVisionModel hidden size
    vision_layers: int = 4
    vision_patch: int = 16  # 64 px / 16 -> 4 x 4 = 16 image tokens (short sequences: many cheap IFT steps)
    vision_feature_layer: int = -2  # layer whose patch features the VLM (and this objective) reads
    vision_steps: int = 1000  # image-caption optimisation steps (200 left the object facts too coarse to read)
    vision_batch: int = 64
    vision_lr: float = 2e-3
    vision_recon_weight: float = 1.0  # weight of the per-patch colour reconstruction term
    vision_position_targets: bool = True  # the reconstruction also asks for the patch's own row / column
    vision_supervised: bool = True  # + the world's per-patch ground truth and counts (demo/tower_targets.py)
    vision_supervised_weight: float = 2.0  # scale of those targets inside the reconstruction MSE
    vision_global_weight: float = 5.0  # weight of the counts + left-to-right object facts (mean feature) MSE
    bf16: bool = False  # bf16 autocast; off by default: for these tiny matrices it is ~8x slower on CPU

    def approx_params(self) -> int:
        """Parameters of the LLM + vision tower these settings make (before they are built)."""
        h, v = self.llm_hidden, self.vision_hidden
        llm = self.llm_layers * (4 * h * h + 3 * h * 2 * h) + 2 * self.vocab_size * h
        return llm + self.vision_layers * (4 * v * v + 2 * v * 2 * v)


@dataclass
class BootstrapResult:
    tokenizer: Path
    llm: Path
    vision: Path
    info: dict  # losses, timings, sizes (also in bootstrap.json)
    cached: bool


def _read(path: Path):
    return json.loads(path.read_text())


def world_texts(world_dir: Path) -> tuple[list[list[dict]], list[str]]:
    """(conversations as chat messages, plain strings) from pretrain/allava/instruct."""
    from olavlm.world import text

    convs, plain = [], [LLAVA_LLAMA3_SYSTEM, "You are a helpful AI assistant.", text.CVBENCH_SUFFIX.strip(),
                        text.PROBE_PROMPT]
    for name in ("pretrain.json", "allava_caption.json", "instruct.json"):
        for rec in _read(world_dir / name):
            msgs = [{"role": "system", "content": LLAVA_LLAMA3_SYSTEM}]
            for m in rec["conversations"]:
                content = m["value"].replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "")
                msgs.append({"role": "user" if m["from"] == "human" else "assistant", "content": content})
                plain.append(content)
            convs.append(msgs)
    # the system prompt starts every rendered conversation: weigh it as often in the tokenizer corpus
    plain += [LLAVA_LLAMA3_SYSTEM] * len(convs)
    return convs, plain


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _cosine_lr(step: int, total: int, base: float, warmup: int = 10) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_llm(tokenizer, convs: list[list[dict]], spec: BootstrapSpec, out: Path) -> dict:
    """Language-model a small Llama on the chat-rendered conversations; save to ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    ids = [tokenizer.apply_chat_template(c, tokenize=True)["input_ids"] for c in convs]
    # pack the conversations (in a seeded order) into one stream cut into blocks: no padding
    stream = [t for i in rng.permutation(len(ids)) for t in ids[int(i)]]
    n_blocks = len(stream) // spec.llm_block
    if n_blocks < 1:
        raise ValueError(f"bootstrap: the world's text has {len(stream)} tokens, fewer than one block "
                         f"({spec.llm_block}); generate more records")
    blocks = torch.tensor(stream[:n_blocks * spec.llm_block]).view(n_blocks, spec.llm_block)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.llm_hidden, intermediate_size=2 * spec.llm_hidden,
                      num_hidden_layers=spec.llm_layers, num_attention_heads=spec.llm_heads,
                      num_key_value_heads=spec.llm_kv_heads or max(1, spec.llm_heads // 2), max_position_embeddings=2048,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.llm_lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(spec.llm_steps):
        inp = blocks[torch.from_numpy(rng.choice(n_blocks, size=min(spec.llm_batch, n_blocks), replace=False))]
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, spec.llm_steps, spec.llm_lr)
        with _autocast(spec.bf16):
            loss = model(input_ids=inp, labels=inp).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters()), "loss_first": losses[0] if losses else None,
            "loss_last": float(np.mean(losses[-10:])) if losses else None, "steps": spec.llm_steps,
            "losses": losses}


_OBJECT = re.compile(r"(small|large) (red|green|blue|yellow) (circle|square|triangle)")


def caption_targets(captions: list[str], min_count: int = 5) -> tuple[list[str], np.ndarray]:
    """Multi-hot caption attributes -> (vocabulary, (n, V)).

    Attributes read from the caption text only: its words, its adjacent word pairs, and "slot k: the
    k-th object named in the caption" (captions name objects left to right), so the tower has to
    keep where things are, not only what they are.
    """
    grams = []
    for cap in captions:
        words = re.findall(r"[a-z]+", cap.lower())
        slots = {f"slot{k}: {m.group(0)}" for k, m in enumerate(_OBJECT.finditer(cap.lower().split(". ")[1]
                                                                              if ". " in cap else cap))}
        grams.append(set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])} | slots)
    counts = Counter(g for gs in grams for g in gs)
    vocab = sorted(g for g, c in counts.items() if min_count <= c < len(captions))  # drop constant ones
    index = {g: i for i, g in enumerate(vocab)}
    y = np.zeros((len(captions), len(vocab)), np.float32)
    for r, gs in enumerate(grams):
        for g in gs:
            if g in index:
                y[r, index[g]] = 1.0
    return vocab, y


def _pixels(paths: list[Path]) -> torch.Tensor:
    from PIL import Image

    arr = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths])
    x = (arr - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def patch_colours(x: torch.Tensor, patch: int, sub: int = 2) -> torch.Tensor:
    """Normalised pixels (N, 3, S, S) -> per patch the mean colour of its sub x sub cells:
    (N, (S/patch)^2, 3*sub*sub), patches row-major like the tower's tokens."""
    n, c, side, _ = x.shape
    cells = torch.nn.functional.avg_pool2d(x, patch // sub)  # (N, 3, g*sub, g*sub)
    g = side // patch
    cells = cells.view(n, c, g, sub, g, sub).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(n, g * g, c * sub * sub)


def train_vision(world_dir: Path, spec: BootstrapSpec, size: int, out: Path) -> dict:
    """Train a small CLIPVisionModel on the world's images; save to ``out``.

    Objective, all read at the layer the VLM reads: from the mean patch feature, the image's caption
    attributes (BCE, caption images only); from every patch feature, its own patch's coarse colours
    and its own row / column (MSE), a generic reconstruction term that keeps the layout in the tokens.
    With ``vision_supervised`` (the default), also the world's ground truth per patch and the object
    counts from the mean (MSE; :mod:`olavlm.demo.tower_targets`), on the caption and instruction images:
    the stand-in for a CLIP whose features linearly carry what the questions need.
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(spec.seed)
    records = _read(world_dir / "allava_caption.json")
    vocab, y = caption_targets([r["conversations"][1]["value"] for r in records])
    keys = [r["image"] for r in records]
    if spec.vision_supervised:  # + the instruction images (their QA stays unseen: only the ground truth)
        keys += sorted({r["image"] for r in _read(world_dir / "instruct.json") if "image" in r} - set(keys))
    y_t = torch.zeros(len(keys), len(vocab))
    y_t[:len(records)] = torch.from_numpy(y)
    has_caption = torch.arange(len(keys)) < len(records)
    x = _pixels([world_dir / k for k in keys])
    cfg = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
                           num_hidden_layers=spec.vision_layers, num_attention_heads=4, image_size=size,
                           patch_size=spec.vision_patch, projection_dim=spec.vision_hidden)
    tower = CLIPVisionModel(cfg)
    head = torch.nn.Sequential(torch.nn.LayerNorm(spec.vision_hidden), torch.nn.Linear(spec.vision_hidden, len(vocab)))
    recon_t = _recon_targets(x, spec, world_dir, keys)
    glob_t = torch.from_numpy(global_targets(world_dir, keys)) if spec.vision_supervised else torch.zeros(len(keys), 0)
    pix_head = torch.nn.Sequential(torch.nn.LayerNorm(spec.vision_hidden),
                                   torch.nn.Linear(spec.vision_hidden, recon_t.shape[-1]))
    glob_head = torch.nn.Linear(spec.vision_hidden, glob_t.shape[-1])
    params = [*tower.parameters(), *head.parameters(), *pix_head.parameters(), *glob_head.parameters()]
    opt = torch.optim.AdamW(params, lr=spec.vision_lr, weight_decay=0.0)
    rng = np.random.default_rng(spec.seed + 1)
    losses, mse = [], torch.nn.functional.mse_loss
    for step in range(spec.vision_steps):
        idx = torch.from_numpy(rng.choice(len(keys), size=min(spec.vision_batch, len(keys)), replace=False))
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, spec.vision_steps, spec.vision_lr)
        with _autocast(spec.bf16):
            hs = tower(pixel_values=x[idx], output_hidden_states=True).hidden_states[spec.vision_feature_layer]
            pooled = hs[:, 1:].mean(dim=1)  # patch tokens only: what the VLM's projector reads
            logits, recon, glob = head(pooled), pix_head(hs[:, 1:]), glob_head(pooled)
        cap = has_caption[idx]
        bce = (torch.nn.functional.binary_cross_entropy_with_logits(logits.float()[cap], y_t[idx][cap])
               if cap.any() else logits.sum() * 0)
        loss = bce + spec.vision_recon_weight * mse(recon.float(), recon_t[idx])
        if glob_t.shape[-1]:
            loss = loss + spec.vision_global_weight * mse(glob.float(), glob_t[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    tower.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(out)
    return {"params": sum(p.numel() for p in tower.parameters()), "targets": len(vocab), "images": len(keys),
            "loss_first": losses[0] if losses else None,
            "loss_last": float(np.mean(losses[-10:])) if losses else None, "steps": spec.vision_steps,
            "losses": losses}


def _recon_targets(x: torch.Tensor, spec: BootstrapSpec, world_dir: Path, keys: list[str]) -> torch.Tensor:
    """Per patch: coarse colours, + own (row, column) if ``vision_position_targets``, + the world's
    ground truth (:func:`patch_targets`) if ``vision_supervised``."""
    parts = [patch_colours(x, spec.vision_patch)]
    g = int(round(parts[0].shape[1] ** 0.5))
    if spec.vision_position_targets:  # each patch's own (row, column), centred: where it is in the image
        rc = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).reshape(g * g, 2)
        pos = (rc.float() - (g - 1) / 2) / max((g - 1) / 2, 1)
        parts.append(pos.expand(len(x), -1, -1))
    if spec.vision_supervised:
        parts.append(spec.vision_supervised_weight * torch.from_numpy(patch_targets(world_dir, keys, spec.vision_patch)))
    return torch.cat(parts, dim=-1)


def cache_key(world_dir: Path, spec: BootstrapSpec) -> str:
    from olavlm.world.generate import read_meta

    payload = json.dumps({"world": read_meta(world_dir), "spec": dataclasses.asdict(spec)}, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()


def bootstrap(world_dir: str | Path, out_dir: str | Path, spec: BootstrapSpec | None = None) -> BootstrapResult:
    """Make (or reuse) tokenizer/, llm/, vision/ under ``out_dir`` for the world in ``world_dir``."""
    from olavlm.devkit.tiny import train_tokenizer
    from olavlm.world.generate import read_meta

    spec = spec or BootstrapSpec()
    world_dir, out = Path(world_dir), Path(out_dir)
    key = cache_key(world_dir, spec)
    marker = out / "bootstrap.json"
    paths = {"tokenizer": out / "tokenizer", "llm": out / "llm", "vision": out / "vision"}
    if marker.is_file():
        info = _read(marker)
        if info.get("key") == key and all(p.is_dir() for p in paths.values()):
            log.info("bootstrap: reusing %s (same world and settings)", out)
            return BootstrapResult(**paths, info=info, cached=True)
        log.info("bootstrap: %s is stale (world or settings changed); rebuilding", out)
        marker.unlink()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    convs, plain = world_texts(world_dir)
    tokenizer = train_tokenizer(plain, vocab_size=spec.vocab_size)
    tokenizer.save_pretrained(paths["tokenizer"])
    log.info("bootstrap: tokenizer trained (%d tokens) on %d strings", len(tokenizer), len(plain))
    t1 = time.perf_counter()
    llm = train_llm(tokenizer, convs, spec, paths["llm"])
    log.info("bootstrap: LLM %.2fM params, LM loss %.3f -> %.3f in %d steps (%.0f s)", llm["params"] / 1e6,
             llm["loss_first"], llm["loss_last"], spec.llm_steps, time.perf_counter() - t1)
    t2 = time.perf_counter()
    vision = train_vision(world_dir, spec, int(read_meta(world_dir)["spec"]["size"]), paths["vision"])
    log.info("bootstrap: vision tower %.2fM params, caption BCE %.3f -> %.3f in %d steps (%.0f s)",
             vision["params"] / 1e6, vision["loss_first"], vision["loss_last"], spec.vision_steps,
             time.perf_counter() - t2)
    info = {"key": key, "spec": dataclasses.asdict(spec), "llm": llm, "vision": vision,
            "vocab": len(tokenizer), "seconds": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(info, indent=1))
    return BootstrapResult(**paths, info=info, cached=False)
