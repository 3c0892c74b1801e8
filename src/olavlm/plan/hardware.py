"""Accelerators `olavlm plan` knows: dense bf16 peak (no structured sparsity) and memory per device,
from the vendors' data sheets. ``--peak-tflops`` / ``--gpu-memory`` override them."""

from __future__ import annotations

from dataclasses import dataclass

from olavlm.config import ConfigError


@dataclass(frozen=True)
class GPU:
    name: str  # what the vendor calls it
    bf16_tflops: float  # dense bf16 tensor-core peak, TFLOP/s
    memory_gib: float  # device memory

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


GPUS: dict[str, GPU] = {
    "a100": GPU("NVIDIA A100 80GB SXM", 312, 80),
    "a100-40gb": GPU("NVIDIA A100 40GB", 312, 40),
    "h100": GPU("NVIDIA H100 SXM 80GB", 989, 80),
    "h100-pcie": GPU("NVIDIA H100 PCIe 80GB", 756, 80),
    "h200": GPU("NVIDIA H200 SXM 141GB", 989, 141),
    "gh200": GPU("NVIDIA GH200 (96GB HBM3)", 989, 96),
    "b200": GPU("NVIDIA B200 180GB", 2250, 180),
    "l40s": GPU("NVIDIA L40S 48GB", 362, 48),
    "l4": GPU("NVIDIA L4 24GB", 121, 24),
    "mi250x": GPU("AMD Instinct MI250X (both dies, 128GB)", 383, 128),
    "mi300x": GPU("AMD Instinct MI300X 192GB", 1307, 192),
    "mi325x": GPU("AMD Instinct MI325X 256GB", 1307, 256),
}


def lookup(name: str, *, peak_tflops: float | None = None, memory_gib: float | None = None) -> GPU:
    """The named GPU, with the optional overrides; an unknown name needs both overrides."""
    key = name.lower()
    if key in GPUS:
        gpu = GPUS[key]
        return GPU(gpu.name, peak_tflops or gpu.bf16_tflops, memory_gib or gpu.memory_gib)
    if peak_tflops and memory_gib:
        return GPU(name, peak_tflops, memory_gib)
    raise ConfigError(f"--gpu: {name!r} is not one of {', '.join(GPUS)}; for another device give "
                      "--peak-tflops and --gpu-memory")
