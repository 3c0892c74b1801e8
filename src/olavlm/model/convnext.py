"""CLIP-ConvNeXt towers as transformers ``ConvNextModel``, converted from open_clip / timm checkpoints.

open_clip stores its ConvNeXt image trunk in timm's layout (``visual.trunk.stem.0.weight`` ...);
OLA-VLM checkpoints store the same tensors under ``model.vision_tower.vision_tower.``. Every tensor
maps one-to-one onto a ``ConvNextModel`` key with the same shape (table in ``docs/architecture.md``).
What transformers cannot express in its config is the LayerNorm eps: it hard-codes 1e-6 in the stem,
block and downsampling norms, while timm's ``convnext_xxlarge`` uses 1e-5 everywhere. The converted
config therefore carries ``norm_eps``, and :func:`apply_norm_eps` sets it on the built modules
(the vision tower does this on every load).

Reusable pieces (no timm / open_clip needed)::

    convnext_config(...)                                  # ConvNextConfig, xxlarge by default
    convnext_config_from_state(state, prefix)             # the same, inferred from a trunk's tensors
    timm_norm_eps(depths, hidden_sizes)                   # the LayerNorm eps timm uses for that shape
    convnext_state_dict_from_open_clip(state, prefix)     # timm/open_clip keys -> ConvNextModel keys
    convnext_state_dict_to_open_clip(state, prefix)       # the inverse
    apply_norm_eps(model, eps)                            # exact LayerNorm eps on a built model
    convnext_stride(config), convnext_width(config)       # output stride and channels
    convert_open_clip(src, dst, ...)                      # `olavlm convert open-clip SRC DST`
    convert_reference_tower(ckpt, keys, prefix, out, ...)  # the trunk inside a sharded OLA-VLM checkpoint
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from olavlm.geometry import convnext_stride, convnext_width  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

XXLARGE_DEPTHS = (3, 4, 30, 3)
XXLARGE_DIMS = (384, 768, 1536, 3072)
XXLARGE_NORM_EPS = 1e-5  # timm convnext_xxlarge (the other ConvNeXt sizes use 1e-6)
TIMM_DEFAULT_NORM_EPS = 1e-6
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# where the trunk lives in the checkpoints we know: open_clip, OLA-VLM
KNOWN_PREFIXES = ("visual.trunk.", "model.vision_tower.vision_tower.")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# (timm/open_clip key, ConvNextModel key); {s} stage, {b} block, {p} weight|bias
_KEY_MAP = (
    ("stem.0.{p}", "embeddings.patch_embeddings.{p}"),
    ("stem.1.{p}", "embeddings.layernorm.{p}"),
    ("stages.{s}.downsample.0.{p}", "encoder.stages.{s}.downsampling_layer.0.{p}"),
    ("stages.{s}.downsample.1.{p}", "encoder.stages.{s}.downsampling_layer.1.{p}"),
    ("stages.{s}.blocks.{b}.gamma", "encoder.stages.{s}.layers.{b}.layer_scale_parameter"),
    ("stages.{s}.blocks.{b}.conv_dw.{p}", "encoder.stages.{s}.layers.{b}.dwconv.{p}"),
    ("stages.{s}.blocks.{b}.norm.{p}", "encoder.stages.{s}.layers.{b}.layernorm.{p}"),
    ("stages.{s}.blocks.{b}.mlp.fc1.{p}", "encoder.stages.{s}.layers.{b}.pwconv1.{p}"),
    ("stages.{s}.blocks.{b}.mlp.fc2.{p}", "encoder.stages.{s}.layers.{b}.pwconv2.{p}"),
    ("head.norm.{p}", "layernorm.{p}"),
)
_GROUPS = {"s": r"(?P<s>\d+)", "b": r"(?P<b>\d+)", "p": r"(?P<p>weight|bias)"}


def _compile(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\{", "{").replace(r"\}", "}").format(**_GROUPS) + "$")


_TIMM_TO_HF = [(_compile(src), dst) for src, dst in _KEY_MAP]
_HF_TO_TIMM = [(_compile(dst), src) for src, dst in _KEY_MAP]


class ConvNextKeyError(ValueError):
    """A trunk's tensors do not match the ConvNeXt layout (one line naming the keys)."""


def _map_key(key: str, table) -> str | None:
    for pattern, target in table:
        m = pattern.match(key)
        if m:
            return target.format(**m.groupdict())
    return None


def convnext_config(depths=XXLARGE_DEPTHS, hidden_sizes=XXLARGE_DIMS, *, image_size: int = 768,
                    norm_eps: float = XXLARGE_NORM_EPS, patch_size: int = 4):
    """``ConvNextConfig`` of a timm ConvNeXt trunk (defaults: ``convnext_xxlarge`` at 768 px).

    Exact erf GELU, no drop path (the tower is frozen and runs in eval mode), layer-scale present;
    ``norm_eps`` is stored in the config (transformers ignores it; :func:`apply_norm_eps` applies it)
    and also used for the final pooled LayerNorm (``head.norm``)."""
    from transformers import ConvNextConfig

    if len(depths) != len(hidden_sizes):
        raise ValueError(f"convnext_config: {len(depths)} depths but {len(hidden_sizes)} hidden_sizes")
    cfg = ConvNextConfig(num_channels=3, patch_size=int(patch_size), num_stages=len(depths),
                         hidden_sizes=[int(c) for c in hidden_sizes], depths=[int(d) for d in depths],
                         hidden_act="gelu", layer_scale_init_value=1e-6, drop_path_rate=0.0,
                         layer_norm_eps=float(norm_eps), image_size=int(image_size), initializer_range=0.02)
    cfg.norm_eps = float(norm_eps)
    cfg.architectures = ["ConvNextModel"]
    return cfg


def _trunk(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    trunk = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not trunk:
        heads = sorted({k.split(".")[0] + "." for k in state})[:6]
        raise ConvNextKeyError(f"no tensor starts with {prefix!r} (top-level prefixes: {heads})")
    return trunk


def timm_norm_eps(depths, hidden_sizes) -> float:
    """LayerNorm eps timm builds a ConvNeXt of this shape with: 1e-5 for ``convnext_xxlarge``
    (the only entry point that sets it), else timm's default 1e-6."""
    xxlarge = tuple(depths) == XXLARGE_DEPTHS and tuple(hidden_sizes) == XXLARGE_DIMS
    return XXLARGE_NORM_EPS if xxlarge else TIMM_DEFAULT_NORM_EPS


def convnext_config_from_state(state: dict[str, Tensor], prefix: str = "visual.trunk.", *,
                               image_size: int = 768, norm_eps: float | None = None):
    """The :func:`convnext_config` whose depths / widths / patch size the trunk's tensors show
    (``norm_eps`` None = :func:`timm_norm_eps` of that shape)."""
    trunk = _trunk(state, prefix)
    if "stem.0.weight" not in trunk:
        raise ConvNextKeyError(f"{prefix}stem.0.weight missing: not a timm ConvNeXt trunk")
    patch = int(trunk["stem.0.weight"].shape[-1])
    blocks: dict[int, set[int]] = {}
    for key in trunk:
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ConvNextKeyError(f"{prefix}stages.*: stage indices {sorted(blocks)} are not 0..n-1")
    depths, widths = [], []
    for s in range(len(blocks)):
        dw = trunk.get(f"stages.{s}.blocks.0.conv_dw.weight")
        if dw is None:
            raise ConvNextKeyError(f"{prefix}stages.{s}.blocks.0.conv_dw.weight missing")
        depths.append(max(blocks[s]) + 1)
        widths.append(int(dw.shape[0]))
    eps = timm_norm_eps(depths, widths) if norm_eps is None else norm_eps
    return convnext_config(depths, widths, image_size=image_size, norm_eps=eps, patch_size=patch)


def _expected_shapes(config) -> dict[str, torch.Size]:
    """Key -> shape of ``ConvNextModel(config)``, built on the meta device (no memory, no init cost)."""
    from transformers import ConvNextModel

    with torch.device("meta"):
        model = ConvNextModel(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def _one_line(what: str, keys: list[str], limit: int = 6) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} {what} key(s): {', '.join(keys[:limit])}{more}"


def convnext_state_dict_from_open_clip(state: dict[str, Tensor], prefix: str = "visual.trunk.", *,
                                       config=None) -> dict[str, Tensor]:
    """ConvNextModel state dict from the tensors under ``prefix`` (timm / open_clip layout).

    Keys outside ``prefix`` (open_clip's text tower, ``visual.head.proj``) are ignored. Every key
    under ``prefix`` is used exactly once and every ``ConvNextModel(config)`` key is produced with
    its shape, else :class:`ConvNextKeyError` names the unknown / missing / mis-shaped keys in one
    line. ``config`` defaults to :func:`convnext_config_from_state`. Tensors are not copied."""
    trunk = _trunk(state, prefix)
    config = config if config is not None else convnext_config_from_state(state, prefix)
    expected = _expected_shapes(config)
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in trunk.items():
        target = _map_key(key, _TIMM_TO_HF)
        if target is None or target not in expected:
            unknown.append(prefix + key)
        else:
            out[target] = value
    problems = []
    if unknown:
        problems.append(_one_line("unknown", sorted(unknown)))
    missing = sorted(_map_key(k, _HF_TO_TIMM) or k for k in expected if k not in out)
    if missing:
        problems.append(_one_line("missing", [prefix + k for k in missing]))
    shapes = [f"{prefix}{_map_key(k, _HF_TO_TIMM)} {tuple(v.shape)} != {tuple(expected[k])}"
              for k, v in out.items() if v.shape != expected[k]]
    if shapes:
        problems.append(_one_line("mis-shaped", sorted(shapes), limit=3))
    if problems:
        raise ConvNextKeyError(f"ConvNeXt trunk under {prefix!r}: " + "; ".join(problems))
    return out


def convnext_state_dict_to_open_clip(state: dict[str, Tensor], prefix: str = "visual.trunk.") -> dict[str, Tensor]:
    """The inverse of :func:`convnext_state_dict_from_open_clip` (ConvNextModel keys -> timm keys)."""
    out, unknown = {}, []
    for key, value in state.items():
        source = _map_key(key, _HF_TO_TIMM)
        if source is None:
            unknown.append(key)
        else:
            out[prefix + source] = value
    if unknown:
        raise ConvNextKeyError("ConvNextModel state dict: " + _one_line("unknown", sorted(unknown)))
    return out


def apply_norm_eps(model: nn.Module, eps: float) -> int:
    """Set ``eps`` on every LayerNorm of a built ConvNeXt (stem, blocks, downsampling, final).
    Returns how many modules were set."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = float(eps)
            n += 1
    return n


# -- `olavlm convert open-clip` ----------------------------------------------------------------

def _source_files(src: str) -> tuple[list[Path], dict[str, Any] | None]:
    """Weight files of SRC (a file, a folder or a hub id) and its open_clip_config.json, if any."""
    path = Path(src)
    if path.is_file():
        return [path], None
    if path.is_dir():
        cfg_file = path / "open_clip_config.json"
        open_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
        for name in OPEN_CLIP_FILES + ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return [path / name], open_cfg
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / s for s in shards], open_cfg
        raise FileNotFoundError(f"{src}: no {' / '.join(OPEN_CLIP_FILES)}, model.safetensors(.index.json) "
                                "or pytorch_model.bin")
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        raise FileNotFoundError(f"{src}: not a checkpoint file, a folder, or a hub id like org/name")
    return _hub_files(src)


def _hub_files(repo: str) -> tuple[list[Path], dict[str, Any] | None]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def fetch(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo, name))
        except LocalEntryNotFoundError as e:
            raise FileNotFoundError(f"{repo}: {name} is not in the local hub cache and the hub cannot be "
                                    "reached (offline?)") from e
        except EntryNotFoundError:
            return None

    cfg_file = fetch("open_clip_config.json")
    open_cfg = json.loads(cfg_file.read_text()) if cfg_file is not None else None
    for name in OPEN_CLIP_FILES:
        file = fetch(name)
        if file is not None:
            return [file], open_cfg
    raise FileNotFoundError(f"{repo}: the hub repo has none of {', '.join(OPEN_CLIP_FILES)}")


def read_trunk_tensors(files: list[Path], prefix: str | None) -> tuple[dict[str, Tensor], str, int]:
    """Tensors under ``prefix`` (None = the one of :data:`KNOWN_PREFIXES` present) from safetensors or
    torch files, plus the prefix used and how many other tensors were skipped."""
    from safetensors import safe_open

    state: dict[str, Tensor] = {}
    names: list[str] = []
    loaded: dict[str, Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                names += list(f.keys())
        else:
            try:
                part = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) torch file: no mmap
                part = torch.load(str(file), map_location="cpu", weights_only=True)
            if isinstance(part.get("state_dict"), dict):  # a training checkpoint wraps the weights
                part = part["state_dict"]
            loaded.update(part)
            names += list(part)
    if prefix is None:
        found = [p for p in KNOWN_PREFIXES if f"{p}stem.0.weight" in names]
        if len(found) != 1:
            raise ConvNextKeyError(f"{files[0]}: cannot tell where the ConvNeXt trunk is (stem.0.weight under "
                                   f"{found or 'none'} of {list(KNOWN_PREFIXES)}); pass --prefix")
        prefix = found[0]
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
    state.update({k: v for k, v in loaded.items() if k.startswith(prefix)})
    return state, prefix, len(names) - len(state)


def _clip_stats(open_cfg: dict[str, Any] | None) -> tuple[list[float], list[float]]:
    pre = (open_cfg or {}).get("preprocess_cfg", {})
    return list(pre.get("mean", CLIP_MEAN)), list(pre.get("std", CLIP_STD))


def _check_open_clip_config(src: str, open_cfg: dict[str, Any] | None) -> None:
    vision = ((open_cfg or {}).get("model_cfg") or {}).get("vision_cfg") or {}
    name = vision.get("timm_model_name")
    if name is not None and not str(name).startswith("convnext"):
        raise ConvNextKeyError(f"{src}: open_clip_config.json names timm model {name!r}, not a ConvNeXt")


def convert_open_clip(src: str, dst: str | Path, *, prefix: str | None = None, image_size: int = 768,
                      norm_eps: float | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Write an ordinary HF ``ConvNextModel`` folder (config.json with ``norm_eps``, model.safetensors,
    preprocessor_config.json: resize shortest side + centre crop, bicubic, CLIP mean/std) from an
    open_clip / timm / OLA-VLM checkpoint. ``norm_eps`` None = what timm uses for the trunk's shape
    (:func:`timm_norm_eps`). Returns a summary dict."""
    files, open_cfg = _source_files(src)
    _check_open_clip_config(src, open_cfg)
    state, prefix, skipped = read_trunk_tensors(files, prefix)
    config = convnext_config_from_state(state, prefix, image_size=image_size, norm_eps=norm_eps)
    stride = convnext_stride(config)
    if image_size % stride:
        raise ValueError(f"--image-size {image_size} is not a multiple of the trunk's stride {stride}")
    hf = convnext_state_dict_from_open_clip(state, prefix, config=config)
    if dtype is not None:
        from olavlm.model.vision import torch_dtype

        hf = {k: v.to(torch_dtype(dtype)) for k, v in hf.items()}
    out = Path(dst)
    _write_folder(out, config, hf, *_clip_stats(open_cfg))
    return {"source": src, "prefix": prefix, "tensors": len(hf), "skipped": skipped,
            "parameters": sum(v.numel() for v in hf.values()), "depths": list(config.depths),
            "hidden_sizes": list(config.hidden_sizes), "norm_eps": config.norm_eps, "image_size": image_size,
            "grid": image_size // stride,
            "output": str(out)}


def preprocessor_config(image_size: int, mean, std) -> dict[str, Any]:
    """A CLIPImageProcessor config doing open_clip's eval transform: bicubic resize of the shortest
    side, centre crop, CLIP mean/std."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": int(image_size)}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": int(image_size), "width": int(image_size)}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
            "do_convert_rgb": True}


def _write_folder(out: Path, config, hf: dict[str, Tensor], mean, std) -> None:
    """config.json (with ``norm_eps``), model.safetensors and preprocessor_config.json of a ConvNextModel."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(config.image_size, mean, std), indent=2))


def convert_reference_tower(ckpt, keys: list[str], prefix: str, out: str | Path, *, image_size: int,
                            mean=CLIP_MEAN, std=CLIP_STD, norm_eps: float | None = None) -> dict[str, Any]:
    """The ConvNeXt trunk of a sharded checkpoint (OLA-VLM: ``prefix`` = ``model.vision_tower.vision_tower.``)
    -> a ConvNextModel folder ``out``, like :func:`convert_open_clip` writes.

    ``ckpt`` gives ``shape(key)`` and ``get(key)``; ``keys`` are the trunk's keys. Every key and shape is
    checked on meta tensors before any tensor is read (:class:`ConvNextKeyError`, one line naming the
    keys). Tensors are copied unchanged (same dtype). Returns a summary dict."""
    meta = {k: torch.empty(ckpt.shape(k), device="meta") for k in keys}
    config = convnext_config_from_state(meta, prefix, image_size=image_size, norm_eps=norm_eps)
    stride = convnext_stride(config)
    if image_size % stride:
        raise ConvNextKeyError(f"ConvNeXt trunk under {prefix!r}: image size {image_size} is not a multiple of "
                               f"its stride {stride}")
    convnext_state_dict_from_open_clip(meta, prefix, config=config)  # raises on unknown / missing / mis-shaped
    hf = {_map_key(k[len(prefix):], _TIMM_TO_HF): ckpt.get(k) for k in keys}
    _write_folder(Path(out), config, hf, mean, std)
    return {"tensors": len(hf), "parameters": sum(v.numel() for v in hf.values()), "depths": list(config.depths),
            "hidden_sizes": list(config.hidden_sizes), "norm_eps": config.norm_eps, "image_size": int(image_size),
            "grid": image_size // stride}
