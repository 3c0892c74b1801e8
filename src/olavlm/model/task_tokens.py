"""Learnable special task tokens (docs/method.md, "Task tokens").

Each task owns a parameter of ``rows`` x d_llm (init N(0, 1), no scaling). Its K sequence tokens
(K = ``model.num_task_tokens``) are the means of K contiguous groups of rows: depth/seg own one row
per predictor query (default = image tokens, e.g. a 24x24 grid -> 8 groups of 72), gen owns K rows used as is.
For depth/seg the same rows are also the predictor's learnable queries.
"""

from __future__ import annotations

import torch
from torch import nn

from olavlm.config import ModelConfig, task_token_rows


def tasks_with_rows(cfg: ModelConfig, *, with_predictors: bool) -> list[str]:
    """Tasks that own a token parameter: in the sequence, or used as predictor queries."""
    out = []
    for name, task in cfg.tasks.items():
        in_sequence = name in cfg.task_order and cfg.num_task_tokens > 0
        as_queries = (with_predictors and bool(task.layers) and task.kind == "embedding"
                      and task.predictor.query_source == "task_tokens")
        if in_sequence or as_queries:
            out.append(name)
    return out


class LogitScales(nn.Module):
    """Learnable log logit scale theta per task (init ``model.logit_scale_init``); state keys = task names.

    Each theta is stored with shape (1,): DeepSpeed views every parameter as a flat buffer, which a
    0-dim tensor cannot give. Checkpoints written with 0-dim thetas still load (reshaped to (1,)).
    :meth:`forward` hands out 0-dim values, so callers and metrics see scalars."""

    def __init__(self, tasks: list[str] | tuple[str, ...] = (), init: float = 2.0) -> None:
        super().__init__()
        for task in tasks:
            self.register_parameter(task, nn.Parameter(torch.full((1,), float(init))))

    def __getitem__(self, task: str) -> nn.Parameter:
        return self._parameters[task]

    def __len__(self) -> int:
        return len(self._parameters)

    def forward(self) -> dict[str, torch.Tensor]:
        """{task: theta as a 0-dim tensor}, computed here so per-module gathering (ZeRO-3) sees the read."""
        return {task: theta.reshape(()) * 1.0 for task, theta in self._parameters.items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for task in self._parameters:
            value = state_dict.get(prefix + task)
            if isinstance(value, torch.Tensor) and value.ndim == 0:  # saved before thetas had shape (1,)
                state_dict[prefix + task] = value.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def task_tokens_per_image(cfg: ModelConfig) -> int:
    """Task tokens inserted after each image (what :attr:`TaskTokens.tokens_per_image` gives), weight-free."""
    return len(cfg.task_order) * cfg.num_task_tokens if cfg.num_task_tokens else 0


class TaskTokens(nn.Module):
    """ParameterDict of per-task rows plus the K-token pooling used in the sequence."""

    def __init__(self, cfg: ModelConfig, *, hidden_size: int, num_image_tokens: int, with_predictors: bool) -> None:
        super().__init__()
        self.hidden_size = hidden_size  # d_llm
        self.num_sequence_tokens = cfg.num_task_tokens  # K tokens per task in the sequence
        self.order = list(cfg.task_order) if cfg.num_task_tokens else []  # tasks in the sequence
        self.rows = nn.ParameterDict({
            name: nn.Parameter(torch.randn(task_token_rows(cfg, name, num_image_tokens), hidden_size))
            for name in tasks_with_rows(cfg, with_predictors=with_predictors)
        })

    def sequence_tokens(self, task: str) -> torch.Tensor:
        """(K, d): row j of the result is the mean of rows [j*R/K, (j+1)*R/K)."""
        rows = self.rows[task]
        k = self.num_sequence_tokens
        return rows.view(k, rows.shape[0] // k, rows.shape[1]).mean(1)

    def all_sequence_tokens(self) -> torch.Tensor:
        """(T*K, d): the tokens inserted after every image, tasks in ``order``."""
        if not self.order:
            return torch.zeros(0, self.hidden_size)
        return torch.cat([self.sequence_tokens(t) for t in self.order], 0)

    def forward(self, query_tasks: list[str] | tuple[str, ...] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sequence tokens (T*K, d), {task: its rows (R, d)} for predictor queries).

        Everything is computed inside this forward so per-module parameter gathering (DeepSpeed
        ZeRO-3) sees the rows in use; the returned tensors are new graph nodes, not the parameters."""
        return self.all_sequence_tokens(), {t: self.rows[t] * 1.0 for t in query_tasks}

    @property
    def tokens_per_image(self) -> int:
        """Task tokens inserted after each image."""
        return len(self.order) * self.num_sequence_tokens
