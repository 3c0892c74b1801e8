"""Parsing helpers of the run configuration: the error type, strict type coercion of YAML values,
and the reference's compact layer/weight strings (docs/method.md, "Layer and weight selection")."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Callable

from olavlm.errors import ConfigError, UserError  # noqa: F401  (ConfigError is re-exported here)


# ----------------------------------------------------------------------------------------------
# Compact reference strings (docs/method.md, "Layer and weight selection"), parsed strictly
# ----------------------------------------------------------------------------------------------

_LAYER_ITEM = re.compile(r"^([a-zA-Z])(\d+(?:-\d+)*)$")
_WEIGHT_ITEM = re.compile(r"^([a-zA-Z])(\d+(?:\.\d+)?)$")


def parse_layer_spec(spec: str, letters: dict[str, str]) -> dict[str, list[int]]:
    """``"d18-20_s10-18_g12-20"`` -> ``{"depth": [18, 20], "seg": [10, 18], "gen": [12, 20]}``.

    Each item is a *list* of 1-based layers joined by ``-`` (not a range), any length. Unknown
    letters, duplicates, zeros and malformed items raise instead of being dropped (the reference silently dropped them).
    """
    out: dict[str, list[int]] = {}
    for item in spec.split("_"):
        m = _LAYER_ITEM.match(item)
        if not m:
            raise ConfigError(f"model.layer_spec: malformed item {item!r} in {spec!r} (expected e.g. d18-20)")
        letter, nums = m.group(1).lower(), [int(n) for n in m.group(2).split("-")]
        if letter not in letters:
            raise ConfigError(f"model.layer_spec: unknown task letter {letter!r} in {spec!r}")
        task = letters[letter]
        if task in out:
            raise ConfigError(f"model.layer_spec: task {task!r} given twice in {spec!r}")
        if any(n < 1 for n in nums) or len(set(nums)) != len(nums):
            raise ConfigError(f"model.layer_spec: layers must be distinct 1-based integers, got {nums}")
        out[task] = nums
    return out


def parse_weight_spec(spec: str, letters: dict[str, str]) -> dict[str, float]:
    """``"d0.5_s0.5_g0.5"`` -> per-task weights; integers (``d1``) are accepted, not ignored."""
    out: dict[str, float] = {}
    for item in spec.split("_"):
        m = _WEIGHT_ITEM.match(item)
        if not m:
            raise ConfigError(f"model.weight_spec: malformed item {item!r} in {spec!r} (expected e.g. d0.5)")
        letter = m.group(1).lower()
        if letter not in letters:
            raise ConfigError(f"model.weight_spec: unknown task letter {letter!r} in {spec!r}")
        if letters[letter] in out:
            raise ConfigError(f"model.weight_spec: task {letters[letter]!r} given twice in {spec!r}")
        out[letters[letter]] = float(m.group(2))
    return out


# ----------------------------------------------------------------------------------------------
# Strict coercion of plain YAML values to the dataclass field types
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str, build: Callable[[type, dict, str], Any]) -> Any:
    """Check/convert ``value`` to type ``tp``; nested dataclasses are built with ``build``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null")
        errors: list[ConfigError] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where, build)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # e.g. `int | None`: the one real type's message names the field
            raise errors[0]
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise ConfigError(f"{where}: {value!r} is not {names}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (arg,) = typing.get_args(tp)
        return [coerce(v, arg, f"{where}[{i}]", build) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = typing.get_args(tp)
        return {coerce(k, kt, where, build): coerce(v, vt, f"{where}.{k}", build) for k, v in value.items()}
    if value is None:
        raise ConfigError(f"{where}: must not be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-3" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")
