"""What a released OLA-VLM ``config.json`` says, and the facts it does not store (as options).

The released checkpoints come in two classes: ``ola_llama`` / ``ola_phi3`` (PT: LLM + tower +
projector + task tokens + embedding predictors) and ``llava_llama`` / ``llava_phi3`` (IFT/VPT: no
predictors). Their ``config.json`` is the base LLM's config plus the multimodal fields read here.
Not stored, hence :class:`ConvertOptions` with the reference's defaults: the conversation template
(chosen by a launch flag in the reference), the vision tower's attention heads / activation /
LayerNorm eps and image preprocessing (the reference reads them from the CLIP hub config), the
dtype to load in, and -- when the field is absent -- the task-token format and the ConvNeXt
input size (the reference parses it from the tower name, ``...-res768``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from olavlm.interop import InteropError

log = logging.getLogger(__name__)

# model_type -> (LLM family, has predictors)
REFERENCE_TYPES = {"ola_llama": ("llama", True), "ola_phi3": ("phi3", True),
                   "llava_llama": ("llama", False), "llava_phi3": ("phi3", False)}
FAMILY_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM")}
DEFAULT_TEMPLATES = {"llama": "llava_llama_3", "phi3": "llava_phi_3"}
# task -> (config dict, layer-string field, loss-weight field)
TASK_FIELDS = {"gen": ("image_gen", "img_layer_indices", "img_loss_weight"),
               "depth": ("image_depth", "depth_layer_indices", "depth_loss_weight"),
               "seg": ("image_seg", "seg_layer_indices", "seg_loss_weight")}
TOKEN_FORMATS = ("expand_emb", "emb")  # K mean-pooled rows per task | every raw row inserted
_GEOMETRY = {"pad": "pad", "square": "square"}  # image_aspect_ratio -> olavlm data.image_geometry
_SELECT_FEATURE = {"patch": True, "cls_patch": False}  # mm_vision_select_feature -> drop CLS
_LEGACY_LLM_KEYS = {"rope_theta", "rope_scaling", "torch_dtype"}  # transformers 4.x names v5 still reads


@dataclass
class ConvertOptions:
    """Facts the reference checkpoint does not store; defaults are the reference's."""

    template: str | None = None  # conversation template; None = llava_llama_3 (Llama) / llava_phi_3 (Phi-3)
    image_geometry: str | None = None  # pad | square | resize; None = from image_aspect_ratio
    task_token_format: str | None = None  # expand_emb | emb; None = config.json's (required when absent, IFT)
    dtype: str = "bfloat16"  # model.dtype the converted folder loads the LLM and tower in
    vision_heads: int | None = None  # CLIP ViT attention heads; None = hidden_size // 64 (ViT-L/14: 16)
    vision_act: str = "quick_gelu"  # CLIP ViT activation (OpenAI CLIP)
    vision_eps: float = 1e-5  # CLIP ViT LayerNorm eps
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    tokenizer: str | None = None  # folder or hub id of the tokenizer; None = the checkpoint's own files
    vision_image_size: int | None = None  # ConvNeXt input side; None = mm_vision_tower's "-res<N>" suffix


@dataclass
class ReferenceConfig:
    """The fields of a reference ``config.json`` the converter uses, validated."""

    raw: dict[str, Any]
    model_type: str
    family: str  # llama | phi3
    pt: bool  # the checkpoint class has embedding predictors
    task_order: list[str]  # aux_mode split on "-"
    num_task_tokens: int  # K (0 = no task tokens)
    task_token_format: str  # expand_emb | emb
    vision_tower: str  # mm_vision_tower (informational)
    vision_image_size: int | None  # the "-res<N>" suffix of mm_vision_tower (the ConvNeXt input side), if any
    vision_feature_layer: int
    vision_drop_cls: bool
    projector: str
    image_geometry: str
    template: str
    use_contrastive: bool
    contrastive_weight: float
    pass_text_to_predictors: bool
    task_dicts: dict[str, dict[str, Any]] = field(default_factory=dict)  # image_gen / image_depth / image_seg

    def facts(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("raw")
        return out


def _get(raw: dict, key: str, types, default=None, *, required: bool = False):
    if key not in raw or raw[key] is None:
        if required:
            raise InteropError(f"config.json: {key}: required field is missing")
        return default
    value = raw[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise InteropError(f"config.json: {key}: {value!r} has the wrong type")
    return value


def parse_layers(value: Any, where: str) -> list[int]:
    """``"8-20"`` -> [8, 20] (1-based layers, the k-th number is head k); strict."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise InteropError(f"config.json: {where}: expected a layer string like '8-20', got {value!r}")
    try:
        layers = [int(p) for p in value.split("-")]
    except ValueError:
        raise InteropError(f"config.json: {where}: {value!r} is not '-'-joined layer numbers") from None
    if any(l < 1 for l in layers) or len(set(layers)) != len(layers):
        raise InteropError(f"config.json: {where}: {value!r} must list distinct layers >= 1")
    return layers


def _res_suffix(tower: str) -> int | None:
    """``...-res768`` -> 768: the reference reads the ConvNeXt input size from the tower name."""
    import re

    m = re.search(r"-res(\d+)$", tower)
    return int(m.group(1)) if m else None


def _task_token_format(raw: dict, pt: bool, opts: ConvertOptions) -> str:
    stored = raw.get("task_token_format")
    if pt:  # the PT class always mean-pools to K tokens per task, whatever the field says
        if opts.task_token_format not in (None, "expand_emb"):
            raise InteropError("--task-token-format: a PT checkpoint always pools its task tokens (expand_emb)")
        return "expand_emb"
    if opts.task_token_format is not None:
        if opts.task_token_format not in TOKEN_FORMATS:
            raise InteropError(f"--task-token-format: {opts.task_token_format!r} is not one of {TOKEN_FORMATS}")
        if stored is not None and stored != opts.task_token_format:
            log.warning("--task-token-format %s overrides config.json's %r", opts.task_token_format, stored)
        return opts.task_token_format
    if stored is None:
        raise InteropError("config.json: task_token_format is absent, so the insertion cannot be decided (the "
                           "reference's LLaVA class would insert every raw row, its PT class pools them); pass "
                           "--task-token-format emb (raw rows) or expand_emb (pooled)")
    if stored not in TOKEN_FORMATS:
        raise InteropError(f"config.json: task_token_format: {stored!r} is not one of {TOKEN_FORMATS}")
    return stored


def read_reference_config(folder: Path, opts: ConvertOptions, *, has_task_tokens: bool) -> ReferenceConfig:
    """Validate ``folder/config.json`` of a released checkpoint; ``has_task_tokens``: the weights hold them."""
    file = folder / "config.json"
    if not file.is_file():
        raise InteropError(f"{file}: not found (a released OLA-VLM checkpoint has config.json)")
    try:
        raw = json.loads(file.read_text())
    except ValueError as e:
        raise InteropError(f"{file}: invalid JSON ({e})") from None
    model_type = raw.get("model_type")
    if model_type not in REFERENCE_TYPES:
        raise InteropError(f"config.json: model_type: {model_type!r} is not a released OLA-VLM class "
                           f"({', '.join(REFERENCE_TYPES)})")
    family, pt = REFERENCE_TYPES[model_type]
    aux = _get(raw, "aux_mode", str, "gen-depth-seg")
    order = aux.split("-")
    bad = [t for t in order if t not in TASK_FIELDS]
    if bad or len(set(order)) != len(order):
        raise InteropError(f"config.json: aux_mode: {aux!r} must be distinct tasks among {list(TASK_FIELDS)}")
    k = _get(raw, "num_task_tokens", int, None)
    if k is None:
        if has_task_tokens:
            raise InteropError("config.json: num_task_tokens is missing but the weights hold model.special_*_tokens")
        k = 0
    if k < 0:
        raise InteropError(f"config.json: num_task_tokens: {k} must be >= 0")
    select = _get(raw, "mm_vision_select_feature", str, "patch")
    if select not in _SELECT_FEATURE:
        raise InteropError(f"config.json: mm_vision_select_feature: {select!r} is not one of {list(_SELECT_FEATURE)}")
    merge = _get(raw, "mm_patch_merge_type", str, "flat")
    if merge != "flat":
        raise InteropError(f"config.json: mm_patch_merge_type: {merge!r} is not supported (only 'flat')")
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if raw.get(key):
            raise InteropError(f"config.json: {key}: true is not supported (image start/end tokens)")
    aspect = _get(raw, "image_aspect_ratio", str, "square")
    if opts.image_geometry is None and aspect not in _GEOMETRY:
        raise InteropError(f"config.json: image_aspect_ratio: {aspect!r} has no olavlm geometry; pass --image-geometry")
    template = opts.template or DEFAULT_TEMPLATES[family]
    from olavlm.data.templates import TEMPLATES

    if template not in TEMPLATES:
        raise InteropError(f"--template: {template!r} is not one of {', '.join(TEMPLATES)}")
    dicts = {}
    for task, (name, _, _) in TASK_FIELDS.items():
        value = raw.get(name)
        if value is not None and not isinstance(value, dict):
            raise InteropError(f"config.json: {name}: expected a dict, got {type(value).__name__}")
        dicts[task] = value or {}
    return ReferenceConfig(
        raw=raw, model_type=model_type, family=family, pt=pt, task_order=order, num_task_tokens=k,
        task_token_format=_task_token_format(raw, pt, opts) if k else "expand_emb",
        vision_tower=_get(raw, "mm_vision_tower", str, ""),
        vision_image_size=_res_suffix(_get(raw, "mm_vision_tower", str, "")),
        vision_feature_layer=_get(raw, "mm_vision_select_layer", int, -2),
        vision_drop_cls=_SELECT_FEATURE[select], projector=_get(raw, "mm_projector_type", str, "linear"),
        image_geometry=opts.image_geometry or _GEOMETRY[aspect], template=template,
        use_contrastive=bool(raw.get("use_contrastive", True)),
        contrastive_weight=float(_get(raw, "contrastive_loss_weight", (int, float), 0.3)),
        pass_text_to_predictors=bool(raw.get("pass_text_to_aux", True)), task_dicts=dicts)


def llm_config(ref: ReferenceConfig):
    """The base LLM's transformers config: the reference config minus its multimodal fields."""
    import transformers

    config_cls = getattr(transformers, FAMILY_CLASSES[ref.family][0])
    known = set(config_cls().to_dict()) | _LEGACY_LLM_KEYS
    skip = ("model_type", "architectures", "_name_or_path", "transformers_version")
    kept = {k: v for k, v in ref.raw.items()
            if k in known and k not in skip and not (k in _LEGACY_LLM_KEYS and v is None)}
    try:
        cfg = config_cls(**kept)
    except (TypeError, ValueError) as e:
        raise InteropError(f"config.json: the {ref.family} LLM fields do not form a {config_cls.__name__} "
                           f"({str(e).splitlines()[0]})") from None
    cfg.architectures = [FAMILY_CLASSES[ref.family][1]]
    return cfg
