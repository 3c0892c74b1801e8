"""Reading and writing safetensors checkpoints tensor by tensor (no model is built).

A checkpoint folder holds ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
:class:`Checkpoint` reads only the headers up front (keys, shapes, dtypes) and loads one tensor on
request; :class:`ShardWriter` writes HF-style shards (``model-0000i-of-0000N.safetensors`` + index)
so an 8B model is converted with about one shard in memory.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from olavlm.interop import InteropError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F32, BF16, F16, ...
    file: Path


def _read_header(file: Path) -> dict[str, TensorInfo]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = TensorInfo(tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype()), file)
            return out
    except (SafetensorError, OSError, ValueError) as e:
        raise InteropError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


class Checkpoint:
    """The tensors of one folder, from the safetensors headers; :meth:`get` loads one tensor."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index, single = self.folder / INDEX_NAME, self.folder / SINGLE_NAME
        self.tensors: dict[str, TensorInfo] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise InteropError(f"{index}: not a safetensors index (no weight_map: {e})") from None
            by_file: dict[str, list[str]] = {}
            for key, name in weight_map.items():
                by_file.setdefault(name, []).append(key)
            for name, keys in by_file.items():
                shard = self.folder / name
                if not shard.is_file():
                    raise InteropError(f"{shard}: missing shard (the index puts {len(keys)} tensor(s) there, "
                                       f"e.g. {keys[0]})")
                header = _read_header(shard)
                absent = [k for k in keys if k not in header]
                if absent:
                    raise InteropError(f"{absent[0]}: listed in {index.name} for {name} but not in that shard")
                self.tensors.update(header)
        elif single.is_file():
            self.tensors = _read_header(single)
        else:
            raise InteropError(f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints are read)")

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self.tensors.get(key)
        if info is None:
            raise InteropError(f"{key}: missing from the checkpoint in {self.folder}")
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(key)

    def files(self) -> dict[Path, list[str]]:
        """{shard file: its keys}, in file order (read shard by shard to bound memory)."""
        out: dict[Path, list[str]] = {}
        for key, info in self.tensors.items():
            out.setdefault(info.file, []).append(key)
        return dict(sorted(out.items()))


class ShardWriter:
    """Collects tensors and writes shards of at most ``max_shard_bytes`` (HF naming and index)."""

    def __init__(self, folder: str | Path, *, max_shard_bytes: int = 4 << 30) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._pending or any(key in keys for _, keys in self._written):
            raise InteropError(f"{key}: written twice (two source tensors map onto it)")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[key] = tensor.detach().contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        tmp = self.folder / f"tmp-{len(self._written):05d}.safetensors"
        save_file(self._pending, str(tmp), metadata={"format": "pt"})
        self._written.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is left, name the shards, write the index (when sharded); returns all keys."""
        self._flush()
        n = len(self._written)
        if n == 0:
            raise InteropError(f"{self.folder}: nothing to write")
        keys: list[str] = []
        weight_map: dict[str, str] = {}
        for i, (tmp, shard_keys) in enumerate(self._written):
            name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.rename(self.folder / name)
            weight_map.update({k: name for k in shard_keys})
            keys += shard_keys
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return keys


def check_shapes(actual: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], what: str,
                 source_name=lambda k: k) -> None:
    """``actual`` (mapped keys -> shapes) must equal ``expected`` (a model's state_dict shapes)."""
    missing = [k for k in expected if k not in actual]
    if missing:
        raise InteropError(f"{source_name(missing[0])}: missing from the checkpoint ({what} needs it"
                           f"{f'; {len(missing) - 1} more missing' if len(missing) > 1 else ''})")
    extra = [k for k in actual if k not in expected]
    if extra:
        raise InteropError(f"{source_name(extra[0])}: unknown key for the {what} (no such parameter)")
    for key, shape in actual.items():
        if tuple(shape) != tuple(expected[key]):
            raise InteropError(f"{source_name(key)}: shape {tuple(shape)} but the {what} expects "
                               f"{tuple(expected[key])}")


def meta_state_shapes(build) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of ``build()`` constructed on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def iter_tensors(ckpt: Checkpoint, keys) -> typing.Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for ``keys``, opening each shard once, in shard order."""
    from safetensors import safe_open

    wanted = set(keys)
    for file, file_keys in ckpt.files().items():
        selected = [k for k in file_keys if k in wanted]
        if not selected:
            continue
        with safe_open(str(file), framework="pt") as f:
            for key in selected:
                yield key, f.get_tensor(key)
