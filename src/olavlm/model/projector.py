"""Vision -> LLM projector: ``linear`` or ``mlp<N>x_gelu`` (LLaVA builder; default mlp2x_gelu)."""

from __future__ import annotations

import re

from torch import nn

from olavlm.config import ConfigError

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``linear``: Linear(in, out). ``mlpNx_gelu``: Linear(in, out) then (N-1) x [GELU, Linear(out, out)]."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    m = _MLP.match(kind)
    if not m or int(m.group(1)) < 1:
        raise ConfigError(f"model.projector: {kind!r} is not 'linear' or 'mlp<N>x_gelu' with N >= 1")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(m.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
