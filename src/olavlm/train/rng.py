"""RNG states of one process (python ``random``, numpy, torch CPU and CUDA) as plain JSON data,
so a checkpoint stores them without pickle and reads them back without running anything."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import numpy as np
import torch


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def capture() -> dict[str, Any]:
    """This process's RNG states as JSON-ready data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": list(internal), "gauss_next": gauss},
             "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def parse(text: str) -> dict[str, Any]:
    """JSON text from :func:`capture`, checked and converted to what the libraries' setters take;
    ValueError (with the reason) for anything else."""
    try:
        data = json.loads(text)
        py, npy = data["python"], data["numpy"]
        internal = tuple(py["state"])
        keys = np.asarray(npy["keys"], dtype=np.int64)
        ok = (py["version"] == 3 and len(internal) == 625 and all(type(x) is int for x in internal)
              and (py["gauss_next"] is None or isinstance(py["gauss_next"], float))
              and npy["kind"] == "MT19937" and keys.shape == (624,) and keys.min() >= 0 and keys.max() < 2**32
              and type(npy["pos"]) is int and 0 <= npy["pos"] <= 624)
        if not ok:
            raise ValueError("unexpected values")
        out = {"python": (3, internal, py["gauss_next"]),
               "numpy": ("MT19937", keys.astype(np.uint32), npy["pos"], int(npy["has_gauss"]),
                         float(npy["cached_gaussian"])),
               "torch": _tensor(data["torch"]), "cuda": [_tensor(s) for s in data.get("cuda", [])]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    expected = torch.get_rng_state().numel()
    if out["torch"].numel() != expected:
        raise ValueError(f"torch state has {out['torch'].numel()} bytes, expected {expected}")
    return out


def apply(state: dict[str, Any]) -> None:
    """Set this process's RNGs to a :func:`parse` result."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
