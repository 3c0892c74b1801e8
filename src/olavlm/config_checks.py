"""Validation of a run configuration: choices, ranges and cross-field rules (no file is read here).

:func:`validate` runs on every :func:`olavlm.config.load_config` and again in the pre-flight; it
needs nothing but the config. :func:`validate_against_model` adds the rules that need two numbers
of the model (the LLM's depth and the tower's image-token count), which the pre-flight reads from
the checkpoints' ``config.json`` before any weights load and the model re-checks when it is built.
Every error is a :class:`~olavlm.config_parsing.ConfigError` whose message starts with the field.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Callable

from olavlm.config_parsing import ConfigError

_PROJECTOR = re.compile(r"^(linear|mlp(\d+)x_gelu)$")


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low:g}"


def _above(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > low), f"> {low:g}"


def _optional(rule: tuple[Callable[[Any], bool], str], what: str = "null") -> tuple[Callable[[Any], bool], str]:
    ok, text = rule
    return (lambda v: v is None or ok(v)), f"{text} or {what}"


# (dotted field, (predicate, rule text)): ranges of the scalar fields
_RANGES: list[tuple[str, tuple[Callable[[Any], bool], str]]] = [
    ("model.num_task_tokens", _at_least(0)),
    ("model.contrastive_weight", _at_least(0)),
    ("model.logit_scale_max", _above(0)),
    ("model.smooth_l1_beta", _at_least(0)),
    ("data.max_length", _at_least(16)),
    ("data.num_workers", _at_least(0)),
    ("data.teacher_image_size", _optional(_at_least(1), "null (largest teacher input)")),
    ("train.micro_batch_size", _at_least(1)),
    ("train.global_batch_size", _at_least(1)),
    ("train.learning_rate", _above(0)),
    ("train.weight_decay", _at_least(0)),
    ("train.adam_eps", _above(0)),
    ("train.adam_betas", ((lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)), "two numbers in [0, 1)")),
    ("train.warmup_ratio", ((lambda v: 0 <= v < 1), "in [0, 1)")),
    ("train.epochs", _at_least(1)),
    ("train.max_steps", _optional(_at_least(1))),
    ("train.max_grad_norm", _optional(_above(0), "null (no clipping)")),
    ("train.save_every", ((lambda v: v >= 0), ">= 0 (0 = only the final model)")),
    ("train.keep_last", _at_least(1)),
    ("train.log_every", _at_least(1)),
]
# ranges of every task's fields, relative to model.tasks.<name>
_TASK_RANGES: list[tuple[str, tuple[Callable[[Any], bool], str]]] = [
    ("weight", _at_least(0)),
    ("token_rows", _optional(_at_least(1), "null (from the predictor)")),
    ("predictor.dim", _optional(_at_least(1), "null (the LLM hidden size)")),
    ("predictor.num_queries", _optional(_at_least(1), "null (from the image tokens)")),
    *((f"predictor.{key}", _at_least(1)) for key in ("out_dim", "depth", "heads", "dim_head", "ff_mult", "mlp_dim")),
]


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_choices(obj: Any, where: str) -> None:
    """Every ``Literal`` field of dataclass ``obj`` (recursively, also inside lists and dicts) holds
    one of its values; configs built in code get the same check as loaded ones."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        name = f"{where}.{f.name}" if where else f.name
        _check_value(value, tp, name)


def _check_value(value: Any, tp: Any, where: str) -> None:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
    elif origin in (typing.Union, types.UnionType):
        if value is not None:
            literals = [a for a in typing.get_args(tp) if typing.get_origin(a) is typing.Literal]
            for arg in literals:
                _check_value(value, arg, where)
    elif origin is list and isinstance(value, list):
        (arg,) = typing.get_args(tp)
        for i, item in enumerate(value):
            _check_value(item, arg, f"{where}[{i}]")
    elif origin is dict and isinstance(value, dict):
        _, arg = typing.get_args(tp)
        for key, item in value.items():
            _check_value(item, arg, f"{where}.{key}")
    elif dataclasses.is_dataclass(value):
        check_choices(value, where)


def _check_ranges(obj: Any, rules, prefix: str) -> None:
    for name, (ok, rule) in rules:
        value = _get(obj, name)
        if not ok(value):
            raise ConfigError(f"{prefix}{name}: must be {rule}, got {value!r}")


def validate(cfg) -> None:
    """Static checks of a :class:`~olavlm.config.RunConfig` (raises ConfigError naming the field)."""
    m, t = cfg.model, cfg.train
    check_choices(cfg, "")
    if not _PROJECTOR.match(m.projector):
        raise ConfigError(f"model.projector: {m.projector!r} is not 'linear' or 'mlp<N>x_gelu'")
    _check_ranges(cfg, _RANGES, "")
    if cfg.data.add_bos not in (True, False, "auto"):
        raise ConfigError(f"data.add_bos: {cfg.data.add_bos!r} is not auto, true or false")
    if len(set(m.task_order)) != len(m.task_order):
        raise ConfigError(f"model.task_order: duplicate task in {m.task_order}")
    for task in m.task_order:
        if task not in m.tasks:
            raise ConfigError(f"model.task_order: {task!r} has no entry in model.tasks")
    for name, task in m.tasks.items():
        where = f"model.tasks.{name}"
        if not task.teacher:
            raise ConfigError(f"{where}.teacher: required")
        if any(layer < 1 for layer in task.layers) or len(set(task.layers)) != len(task.layers):
            raise ConfigError(f"{where}.layers: must be distinct 1-based integers, got {task.layers}")
        _check_ranges(task, _TASK_RANGES, f"{where}.")
        _check_task_kind(name, task, m)
        if task.predictor.query_source == "hidden" and m.num_task_tokens == 0:
            raise ConfigError(f"{where}.predictor.query_source: 'hidden' needs model.num_task_tokens > 0")
        if task.predictor.query_source == "hidden" and name not in m.task_order:
            raise ConfigError(f"{where}.predictor.query_source: 'hidden' needs {name!r} in model.task_order")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size}")
    if t.deepspeed and t.fsdp:
        raise ConfigError("train.fsdp: cannot be combined with train.deepspeed")


def _check_task_kind(name: str, task, m) -> None:
    """Stages and the alignment kind's fixed read-out (one prediction per image token, no task tokens)."""
    where = f"model.tasks.{name}"
    if task.stages is not None and (not task.stages or len(set(task.stages)) != len(task.stages)):
        raise ConfigError(f"{where}.stages: must be a non-empty list of distinct stages or null, got {task.stages}")
    if task.kind == "embedding" and task.stages is not None and set(task.stages) != {"pt"}:
        raise ConfigError(f"{where}.stages: embedding (OLA) tasks train in pt only, got {task.stages}")
    if task.kind != "alignment":
        return
    p = task.predictor
    if p.output_layout != "tokens" or p.num_queries is not None:
        raise ConfigError(f"{where}.predictor: an alignment task predicts one row per image token; use "
                          f"output_layout: tokens and num_queries: null (got {p.output_layout!r}, {p.num_queries!r})")
    if name in m.task_order and m.num_task_tokens:
        raise ConfigError(f"{where}: an alignment task has no task tokens; remove {name!r} from model.task_order")


def task_token_rows(cfg, task: str, num_image_tokens: int) -> int:
    """Rows of a task's learnable token parameter (see docs/method.md, "Task tokens")."""
    tc = cfg.tasks[task]
    if tc.token_rows is not None:
        return tc.token_rows
    if tc.predictor.query_source == "task_tokens":
        return tc.predictor.num_queries or num_image_tokens
    return cfg.num_task_tokens


def predictor_queries(cfg, task: str, num_image_tokens: int) -> int:
    """Output rows of a task's predictors before the layout (what ``Predictor.num_queries`` is)."""
    tc = cfg.tasks[task]
    if tc.kind == "alignment":  # one prediction per image token
        return num_image_tokens
    p = tc.predictor
    return p.num_queries or (num_image_tokens if p.query_source == "task_tokens" else 1)


def predictor_output_shape(cfg, task: str, num_image_tokens: int) -> tuple[int, ...]:
    """Per-image shape of a task's predictions, i.e. the target shape its teacher must give."""
    p = cfg.tasks[task].predictor
    q = predictor_queries(cfg, task, num_image_tokens)
    if p.output_layout == "grid":
        side = int(round(q ** 0.5))
        return (p.out_dim, side, side)
    return (q, p.out_dim)


def validate_against_model(cfg, *, num_layers: int, num_image_tokens: int) -> None:
    """Checks that need the LLM's depth and the tower's token count: layer range, query and token
    divisibility, layouts (``cfg`` is a ModelConfig)."""
    for name, task in cfg.tasks.items():
        where = f"model.tasks.{name}"
        for layer in task.layers:
            if not 1 <= layer <= num_layers:
                raise ConfigError(f"{where}.layers: layer {layer} is outside the LLM's 1..{num_layers}")
        p = task.predictor
        q = predictor_queries(cfg, name, num_image_tokens)
        if p.query_source == "task_tokens" and task.kind == "embedding":
            rows = task_token_rows(cfg, name, num_image_tokens)
            if rows != q:
                raise ConfigError(f"{where}.token_rows: {rows} rows cannot serve {q} predictor queries")
        if name in cfg.task_order and cfg.num_task_tokens:
            rows = task_token_rows(cfg, name, num_image_tokens)
            if rows % cfg.num_task_tokens:
                raise ConfigError(
                    f"{where}.token_rows: {rows} rows are not divisible by "
                    f"model.num_task_tokens={cfg.num_task_tokens}")
        if p.output_layout == "grid":
            side = int(round(q ** 0.5))
            if side * side != q:
                raise ConfigError(f"{where}.predictor.num_queries: grid layout needs a square count, got {q}")
        if p.output_layout == "vector" and q != 1 and task.layers:
            raise ConfigError(f"{where}.predictor.num_queries: vector layout needs one query, got {q}")
