#!/usr/bin/env bash
# visual pre-training (VPT, optional): NTP on ALLaVA-Caption, from the PT run.
#   bash scripts/train/vpt.sh [--section.key=value ...]      # all GPUs of this node
#   LLM=phi3_mini bash scripts/train/vpt.sh                   # the Phi-3 recipe
#   TINY=runs/tiny bash scripts/train/vpt.sh                  # CPU smoke run (olavlm make-tiny --output runs/tiny)
# Recipe: configs/${LLM}_${ENCODER}/vpt.yaml; launcher options in scripts/train/common.sh.
LLM=${LLM:-llama3_8b}        # base LLM: llama3_8b (Meta-Llama-3-8B-Instruct) | phi3_mini (Phi-3-mini-4k-instruct)
ENCODER=${ENCODER:-clip336}  # base vision encoder: clip336 (openai/clip-vit-large-patch14-336) | convnext (CLIP-ConvNeXt-XXL @ 768)
STAGE=vpt
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
