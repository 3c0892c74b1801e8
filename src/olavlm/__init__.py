"""olavlm: training system for OLA-VLM (LLaVA-style MLLMs with auxiliary embedding distillation)."""

__version__ = "0.1.0"
