"""Embedding predictors: Perceiver-Resampler blocks over one LLM layer's states (docs/method.md, "Embedding predictors").

``proj_in`` (one Linear, shared by states and queries) -> ``depth`` x [PerceiverAttention (separate
LayerNorms for states and queries; K/V over concat(states, queries); keys masked by the spans, never
padding) + FeedForward] -> ``proj_out`` -> LayerNorm -> optional supervised output MLP (depth; the
reference's unsupervised ``linear_2``/``linear_3`` are not built) -> output layout.

:class:`TokenMLP` is the alignment (VIRAL-style) kind: a token-wise MLP at the image-token positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from olavlm.config import PredictorConfig


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm_x = nn.LayerNorm(dim)  # LayerNorm of the LLM states
        self.norm_q = nn.LayerNorm(dim)  # LayerNorm of the queries
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, q: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x (N, Lx, D), q (N, Q, D), key_mask bool (N, Lx) -> (N, Q, D)."""
        x, q = self.norm_x(x), self.norm_q(q)
        kv = torch.cat([x, q], 1)
        mask = torch.cat([key_mask, key_mask.new_ones(q.shape[:2])], 1)  # queries are always valid keys
        n = q.shape[0]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, t.shape[1], self.heads, self.dim_head).transpose(1, 2)

        k, v = self.to_kv(kv).chunk(2, dim=-1)
        qh, kh, vh = heads(self.to_q(q)), heads(k), heads(v)
        with torch.autocast(q.device.type, enabled=False):  # softmax in fp32 as in the reference
            out = F.scaled_dot_product_attention(qh.float(), kh.float(), vh.float(), attn_mask=mask[:, None, None, :],
                                                 scale=1.0 / math.sqrt(self.dim_head))
        out = out.transpose(1, 2).reshape(n, q.shape[1], self.heads * self.dim_head).to(q.dtype)
        return self.to_out(out)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.attn = PerceiverAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x: torch.Tensor, q: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(x, q, key_mask)
        return q + self.ff(q)


def adapt_queries(q: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Reference rule: keep n == num_queries; tile when num_queries is a multiple of n; otherwise
    mean-pool to one query and repeat it. q: (N, n, d) -> (N, num_queries, d)."""
    n = q.shape[1]
    if n == num_queries:
        return q
    if num_queries % n == 0:
        return q.repeat(1, num_queries // n, 1)
    return q.mean(1, keepdim=True).expand(-1, num_queries, -1)


class Predictor(nn.Module):
    """One (task, layer) predictor. Output per image: tokens (Q, C) | grid (C, s, s) | vector (1, C)."""

    def __init__(self, llm_dim: int, cfg: PredictorConfig, *, num_queries: int) -> None:
        super().__init__()
        dim = cfg.dim or llm_dim
        self.num_queries = num_queries  # Q output rows before the layout
        self.layout = cfg.output_layout  # tokens | grid | vector
        self.out_dim = cfg.out_dim
        self.proj_in = nn.Linear(llm_dim, dim)  # shared by the LLM states and the queries
        self.blocks = nn.ModuleList(PerceiverBlock(dim, cfg.heads, cfg.dim_head, cfg.ff_mult) for _ in range(cfg.depth))
        self.proj_out = nn.Linear(dim, cfg.out_dim)
        self.norm_out = nn.LayerNorm(cfg.out_dim)
        self.output_mlp = (nn.Sequential(nn.Linear(cfg.out_dim, cfg.out_dim), nn.ReLU(),
                                         nn.Linear(cfg.out_dim, cfg.out_dim)) if cfg.output_mlp else None)
        if self.layout == "grid":
            self.side = math.isqrt(num_queries)
            if self.side * self.side != num_queries:
                raise ValueError(f"grid layout needs a square number of queries, got {num_queries}")
        if self.layout == "vector" and num_queries != 1:
            raise ValueError(f"vector layout needs one query, got {num_queries}")

    @property
    def output_shape(self) -> tuple[int, ...]:
        if self.layout == "grid":
            return (self.out_dim, self.side, self.side)
        return (self.num_queries, self.out_dim)

    def forward(self, states: torch.Tensor, image_sample: torch.Tensor, key_mask: torch.Tensor,
                queries: torch.Tensor) -> torch.Tensor:
        """states (B, L, d_llm) of one layer; image_sample long (N,); key_mask bool (N, L);
        queries (N or 1, n, d_llm) -> predictions (N, *output_shape)."""
        dtype = next(self.proj_in.parameters()).dtype  # metadata only (an attribute read would gather under ZeRO-3)
        if not torch.is_autocast_enabled(states.device.type):
            states, queries = states.to(dtype), queries.to(dtype)
        x = self.proj_in(states)[image_sample]  # project once per sample, then one row per image
        q = self.proj_in(adapt_queries(queries, self.num_queries))
        q = q.expand(x.shape[0], -1, -1) if q.shape[0] == 1 else q
        for block in self.blocks:
            q = block(x, q, key_mask)
        out = self.norm_out(self.proj_out(q))
        if self.output_mlp is not None:
            out = self.output_mlp(out)
        if self.layout == "grid":  # token n <-> row n // side, column n % side
            return out.transpose(1, 2).reshape(out.shape[0], self.out_dim, self.side, self.side)
        return out


class TokenMLP(nn.Module):
    """One (alignment task, layer) projector: the same MLP on every image token of one LLM layer
    (Linear d->mlp_dim, SiLU, Linear mlp_dim->mlp_dim, SiLU, Linear mlp_dim->out_dim).

    It reads the layer's states at each image's feature positions as recorded by the span layout
    (``image_positions``), never at a computed offset. Output per image: tokens (P, out_dim)."""

    def __init__(self, llm_dim: int, cfg: PredictorConfig, *, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens  # P image tokens per image
        self.out_dim = cfg.out_dim
        self.mlp = nn.Sequential(nn.Linear(llm_dim, cfg.mlp_dim), nn.SiLU(), nn.Linear(cfg.mlp_dim, cfg.mlp_dim),
                                 nn.SiLU(), nn.Linear(cfg.mlp_dim, cfg.out_dim))

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.num_tokens, self.out_dim)

    def forward(self, states: torch.Tensor, image_sample: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
        """states (B, L, d_llm) of one layer; image_sample long (N,); image_positions long (N, P)
        -> predictions (N, P, out_dim)."""
        dtype = next(self.mlp.parameters()).dtype  # metadata only (see Predictor.forward)
        if not torch.is_autocast_enabled(states.device.type):
            states = states.to(dtype)
        tokens = states[image_sample[:, None], image_positions]  # (N, P, d)
        return self.mlp(tokens)


def task_predictors(task, llm_dim: int, num_image_tokens: int) -> nn.ModuleDict:
    """{str(layer): predictor} of one task (a TaskConfig): a Perceiver :class:`Predictor` for the
    embedding kind, a :class:`TokenMLP` for the alignment kind."""
    p = task.predictor
    if task.kind == "alignment":
        return nn.ModuleDict({str(l): TokenMLP(llm_dim, p, num_tokens=num_image_tokens) for l in task.layers})
    q = p.num_queries or (num_image_tokens if p.query_source == "task_tokens" else 1)
    return nn.ModuleDict({str(l): Predictor(llm_dim, p, num_queries=q) for l in task.layers})


def predictors_keepalive(predictors: nn.ModuleDict, query_rows: dict[str, torch.Tensor], *, hidden_size: int,
                         num_task_tokens: int, device: torch.device) -> torch.Tensor:
    """Sum of every predictor run on zero images (a graph-connected zero through each of them);
    ``query_rows`` {task: (K, d)} for predictors that query with task-token rows."""
    total = torch.zeros((), device=device)
    states = torch.zeros(1, 1, hidden_size, device=device)  # one position of one sample, selected by no image
    no_image = torch.zeros(0, dtype=torch.long, device=device)
    no_keys = torch.zeros(0, 1, dtype=torch.bool, device=device)
    for task, by_layer in predictors.items():
        for predictor in by_layer.values():
            if isinstance(predictor, TokenMLP):
                total = total + predictor(states, no_image, no_image[:, None]).sum()
                continue
            if task in query_rows:
                queries = query_rows[task][None]
            else:  # the image's own task tokens: none without images
                queries = states.new_zeros(0, num_task_tokens, hidden_size)
            total = total + predictor(states, no_image, no_keys, queries).sum()
    return total
