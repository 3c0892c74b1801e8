"""Tiny random teachers of the SAME transformers classes as the real ones, as ordinary HF folders.

Written by ``olavlm make-tiny`` (under ``DIR/teachers``) and by the tests; each loads through the
teachers' normal ``from_pretrained`` path in well under a second. With the tiny 64-px CLIP tower
(patch 8 -> 8 x 8 image tokens) every tiny teacher produces targets on the same 8 x 8 grid:

    teacher-depth/  DepthAnythingForDepthEstimation, Dinov2 backbone patch 8 (64 px -> 8 x 8 x hidden)
                    + DPT preprocessor config (ImageNet mean/std, like Depth-Anything-V2-*-hf)
    teacher-seg/    OneFormerForUniversalSegmentation, 3-stage Swin with patch 2 (stride 8: 64 px ->
                    8 x 8 x 32) + OneFormer preprocessor config (mean/std on the 0..255 scale, like
                    shi-labs/oneformer_*)
    teacher-gen/    image_encoder/ CLIPVisionModelWithProjection (32 px) + feature_extractor/
                    CLIPImageProcessor (shortest side 32, centre crop 32), the unCLIP repo layout
    teacher-dinov2/ Dinov2Model patch 8 (64 px -> 8 x 8 x 32 patch tokens; trained at 32 px, so its
                    position embeddings are interpolated, as for DINOv2 at 336 px) + BitImageProcessor
                    (ImageNet mean/std, like facebook/dinov2-*)

``scale`` > 1 widens/deepens them (the batching benchmark uses that; the tests use 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# registry name of the teacher class each tiny folder is meant for
TINY_TEACHERS = {"teacher-depth": "depth_anything", "teacher-seg": "oneformer", "teacher-gen": "unclip",
                 "teacher-dinov2": "dinov2"}


def make_tiny_depth(path: Path, *, seed: int = 0, scale: int = 1, image_size: int = 64) -> Path:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    hidden = 32 * scale
    backbone = Dinov2Config(hidden_size=hidden, num_hidden_layers=4 * scale, num_attention_heads=2 * scale,
                            mlp_ratio=2, patch_size=8, image_size=image_size, reshape_hidden_states=False,
                            out_indices=[scale * i for i in (1, 2, 3, 4)])
    cfg = DepthAnythingConfig(backbone_config=backbone, patch_size=8, reassemble_hidden_size=hidden,
                              neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8)
    torch.manual_seed(seed)
    DepthAnythingForDepthEstimation(cfg).save_pretrained(path)
    DPTImageProcessor(size={"height": image_size, "width": image_size}, keep_aspect_ratio=True,
                      ensure_multiple_of=8, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(path)
    return path


def make_tiny_seg(path: Path, *, seed: int = 0, scale: int = 1, image_size: int = 64) -> Path:
    from transformers import OneFormerConfig, OneFormerForUniversalSegmentation, OneFormerImageProcessor, SwinConfig

    embed = 8 * scale
    swin = SwinConfig(image_size=image_size, patch_size=2, embed_dim=embed, depths=[1 * scale] * 3,
                      num_heads=[1, 2, 4], window_size=4, out_features=["stage1", "stage2", "stage3"])
    cfg = OneFormerConfig(backbone_config=swin, num_queries=4, conv_dim=32, mask_dim=32, hidden_dim=32,
                          encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2,
                          num_attention_heads=2, text_encoder_width=16, text_encoder_num_layers=1,
                          text_encoder_vocab_size=100, task_seq_len=8, text_encoder_context_length=8,
                          query_dec_layers=1, strides=[2, 4, 8], common_stride=2)
    torch.manual_seed(seed)
    OneFormerForUniversalSegmentation(cfg).save_pretrained(path)
    OneFormerImageProcessor(image_mean=[255 * m for m in IMAGENET_MEAN], image_std=[255 * s for s in IMAGENET_STD],
                            size={"shortest_edge": image_size}, do_rescale=False, class_info_file=None,
                            num_text=1).save_pretrained(path)
    return path


def make_tiny_gen(path: Path, *, seed: int = 0, scale: int = 1, image_size: int = 32) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32 * scale, intermediate_size=64 * scale, num_hidden_layers=2 * scale,
                           num_attention_heads=2 * scale, image_size=image_size, patch_size=8, projection_dim=24)
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(cfg).save_pretrained(path / "image_encoder")
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    processor.save_pretrained(path / "feature_extractor")
    return path


def make_tiny_dinov2(path: Path, *, seed: int = 0, scale: int = 1, image_size: int = 32) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=32 * scale, num_hidden_layers=2 * scale, num_attention_heads=2 * scale,
                       mlp_ratio=2, patch_size=8, image_size=image_size)
    torch.manual_seed(seed)
    Dinov2Model(cfg).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(path)
    return path


def make_tiny_teachers(out_dir: str | Path, seed: int = 0, *, scale: int = 1) -> dict[str, Path]:
    """Write the four tiny teachers under ``out_dir``; returns {"teacher-depth": folder, ...}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = {"teacher-depth": make_tiny_depth, "teacher-seg": make_tiny_seg, "teacher-gen": make_tiny_gen,
              "teacher-dinov2": make_tiny_dinov2}
    return {name: make(out / name, seed=seed, scale=scale) for name, make in makers.items()}
