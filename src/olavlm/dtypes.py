"""The one dtype table of olavlm: every dtype string a user gives (config fields, CLI flags, a
target cache's index) is parsed here.

Canonical names are torch's (``bfloat16``, ``float16``, ``float32``); ``model.dtype``, saved
configs and cache indexes use them. The short spellings (``bf16``, ``fp16``, ``half``, ``fp32``,
``float``) are accepted where a user types a dtype (``train.teacher_dtype``, ``--dtype``) and mean
the canonical name. Importing this module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

from olavlm.errors import UserError

if TYPE_CHECKING:
    import torch

Dtype = Literal["bfloat16", "float16", "float32"]  # canonical names
DtypeSpelling = Literal["bfloat16", "float16", "float32", "bf16", "fp16", "half", "fp32", "float"]
NAMES: tuple[str, ...] = get_args(Dtype)
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
SPELLINGS: tuple[str, ...] = get_args(DtypeSpelling)
assert set(SPELLINGS) == set(NAMES) | set(ALIASES), "DtypeSpelling must list every name and alias"


class DtypeError(UserError, ValueError):
    """A dtype string that is not in the table; the message starts with the field it came from."""


def canonical_dtype(value: str, field: str = "dtype") -> str:
    """``"bf16"`` -> ``"bfloat16"``; a canonical name stays; anything else is a :class:`DtypeError`."""
    name = ALIASES.get(value, value) if isinstance(value, str) else None
    if name not in NAMES:
        raise DtypeError(f"{field}: unknown dtype {value!r}; use one of {list(SPELLINGS)}")
    return name


def torch_dtype(value: "str | torch.dtype | None", field: str = "dtype") -> "torch.dtype | None":
    """A spelling from the table -> the torch dtype; a torch dtype and None pass through."""
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    return getattr(torch, canonical_dtype(value, field))


def dtype_name(dtype: "torch.dtype", field: str = "dtype") -> str:
    """torch dtype -> its canonical name (what indexes and saved configs record)."""
    import torch

    for name in NAMES:
        if getattr(torch, name) == dtype:
            return name
    raise DtypeError(f"{field}: {dtype} is not one of {list(NAMES)}")
