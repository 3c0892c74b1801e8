"""Typed run configuration: dataclasses, YAML loading, dotted overrides and validation.

A run is one YAML file with three sections (``model``, ``data``, ``train``). Every field is typed
and commented here; unknown keys and wrong types fail at load time with an error that names the
field (``train.lr: unknown key ...``). Checks that need the loaded LLM (layer within depth, ...)
are in :func:`validate_against_model`, called while the model is built, before any data is read.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from olavlm.config_parsing import ConfigError, coerce, parse_layer_spec, parse_weight_spec  # noqa: F401 (re-exported)

# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


@dataclass
class PredictorConfig:
    """One embedding predictor (Perceiver-Resampler block stack), spec §2.4."""

    dim: int | None = None  # internal width D; None = the LLM hidden size
    num_queries: int | None = None  # None = number of image tokens ("task_tokens" source) / 1 ("hidden")
    query_source: str = "task_tokens"  # "task_tokens": the task's learnable rows; "hidden": the layer's states of the task's sequence tokens, pooled
    out_dim: int = 1024  # channels of the predicted embedding (must equal the teacher's)
    output_layout: str = "tokens"  # "tokens" -> (N, Q, C); "grid" -> (N, C, h, w); "vector" -> (N, 1, C)
    output_mlp: bool = False  # extra Linear-ReLU-Linear on the output (depth, spec §2.4); it is supervised
    depth: int = 1  # number of Perceiver blocks
    heads: int = 4
    dim_head: int = 32
    ff_mult: int = 1


@dataclass
class TaskConfig:
    """One auxiliary task: its teacher, the LLM layers it reads, its loss weight and predictor."""

    teacher: str = ""  # teacher registry name (e.g. "depth_anything", "oneformer", "unclip", "shapeworld_depth")
    teacher_path: str | None = None  # hub id or local folder of the teacher weights
    layers: list[int] = field(default_factory=list)  # 1-based decoder layer numbers (hidden_states[l]); [] = tokens only, no predictor/loss
    weight: float = 0.5  # multiplies the sum over this task's layers
    token_rows: int | None = None  # rows of the task-token parameter; None = num_queries (task_tokens source) else num_task_tokens
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments for the teacher class


def default_tasks() -> dict[str, TaskConfig]:
    """The reference defaults (spec §12): gen, depth, seg with code-default layers and 0.5 weights."""
    return {
        "gen": TaskConfig(
            teacher="unclip",
            teacher_path="stabilityai/stable-diffusion-2-1-unclip",
            layers=[12, 20],
            predictor=PredictorConfig(dim=1024, num_queries=1, query_source="hidden",
                                      out_dim=1024, output_layout="vector"),
        ),
        "depth": TaskConfig(
            teacher="depth_anything",
            teacher_path="depth-anything/Depth-Anything-V2-Large-hf",
            layers=[8, 20],
            predictor=PredictorConfig(dim=None, out_dim=1024, output_layout="tokens", output_mlp=True),
        ),
        "seg": TaskConfig(
            teacher="oneformer",
            teacher_path="shi-labs/oneformer_coco_swin_large",
            layers=[10, 18],
            predictor=PredictorConfig(dim=1536, out_dim=1536, output_layout="grid"),
        ),
    }


@dataclass
class ModelConfig:
    """The multimodal model. Saved (as a plain dict) in every checkpoint's config.json."""

    llm: str = ""  # hub id or local folder of an AutoModelForCausalLM
    tokenizer: str | None = None  # hub id or folder; None = same as llm
    vision_tower: str = ""  # hub id or local folder of the vision encoder
    vision_type: str = "clip"  # vision registry key: "clip", "siglip"
    vision_feature_layer: int = -2  # hidden_states index of the tower (−2 = penultimate)
    vision_drop_cls: bool | None = None  # drop the CLS token; None = the tower's default
    projector: str = "mlp2x_gelu"  # "linear" or "mlp<N>x_gelu"
    dtype: str = "bfloat16"  # dtype of the frozen LLM / vision weights: bfloat16, float16, float32
    attn_implementation: str = "sdpa"  # sdpa, eager, flash_attention_2
    num_task_tokens: int = 8  # K sequence tokens per task, inserted after every image (0 = none)
    task_order: list[str] = field(default_factory=lambda: ["gen", "depth", "seg"])  # order of task tokens
    tasks: dict[str, TaskConfig] = field(default_factory=default_tasks)
    layer_spec: str | None = None  # reference compact form, e.g. "d18-20_s10-18_g12-20" (overrides tasks.*.layers)
    weight_spec: str | None = None  # reference compact form, e.g. "d0.5_s0.5_g0.5" (overrides tasks.*.weight)
    pass_text_to_predictors: bool = True  # predictors also see system/text tokens (spec pass_text_to_aux)
    use_contrastive: bool = True
    contrastive_weight: float = 0.3  # λ_c
    logit_scale_init: float = 2.0  # θ, scale = exp(θ)
    logit_scale_max: float = 100.0
    smooth_l1_beta: float = 1.0
    pad_token: str | None = None  # added when the tokenizer has none (and no unk)

    def __post_init__(self) -> None:
        letters = {"d": "depth", "s": "seg", "g": "gen"}
        if self.layer_spec:
            for task, layers in parse_layer_spec(self.layer_spec, letters).items():
                if task not in self.tasks:
                    raise ConfigError(f"model.layer_spec: task {task!r} is not in model.tasks")
                self.tasks[task].layers = layers
        if self.weight_spec:
            for task, weight in parse_weight_spec(self.weight_spec, letters).items():
                if task not in self.tasks:
                    raise ConfigError(f"model.weight_spec: task {task!r} is not in model.tasks")
                self.tasks[task].weight = weight


# --- Data --------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Training data (LLaVA-format JSON / JSONL) and how a sample becomes tensors."""

    train_file: str = ""  # LLaVA JSON list or JSONL
    image_folder: str = ""  # root the records' image paths are relative to
    template: str = "llava_llama_3"  # llava_llama_3, llava_phi_3, vicuna_v1, plain, chat_template
    add_bos: bool | str = "auto"  # BOS first in every sequence: auto (as the tokenizer does) | true | false
    image_geometry: str = "pad"  # pad | square | resize: how an image becomes the shared square
    teacher_image_size: int | None = None  # side of the square carried for online teachers; None = largest teacher input
    max_length: int = 4096  # after image and task-token expansion
    truncate: bool = False  # cut over-long text (never inside an image/task span) instead of rejecting
    on_bad_sample: str = "skip"  # skip | error
    num_workers: int = 2
    sampler: str = "random"  # random | modality_length
    target_cache: str | None = None  # folder written by `olavlm targets precompute`
    cache_miss: str = "error"  # error | online (fall back to the teacher for missing entries)


# --- Training ----------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Optimisation, engine, checkpointing and logging."""

    stage: str = "pt"  # pt | vpt | ift
    init_from: str | None = None  # previous stage's output folder (model + tokenizer)
    global_batch_size: int = 256  # samples per optimizer step over all ranks
    micro_batch_size: int = 32  # samples per device per forward
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    lr_scheduler: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.03
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    max_grad_norm: float | None = 1.0  # None = no clipping
    bf16: bool = True  # autocast in bfloat16
    tf32: bool = True  # on CUDA
    gradient_checkpointing: bool = False
    freeze_task_tokens: bool | None = None  # None = stage default (trainable in PT, frozen after)
    unfreeze_vision_tower: bool = False
    seed: int = 42
    output_dir: str = "runs/olavlm"
    save_every: int = 200  # optimizer steps between checkpoints (0 = only the final model)
    keep_last: int = 3
    log_every: int = 1
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb
    run_name: str | None = None
    deepspeed: str | None = None  # path to a DeepSpeed JSON (configs/deepspeed/*.json)
    fsdp: bool = False
    teacher_dtype: str | None = None  # None = bf16 if train.bf16 else float32


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = model_config_to_dict(self.model)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        validate(self)


def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Plain dict that rebuilds ``cfg`` exactly: removed default tasks are written as null."""
    out = dataclasses.asdict(cfg)
    for name in default_tasks():
        if name not in cfg.tasks:
            out["tasks"][name] = None
    return out


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    return from_dict(ModelConfig, data, "model")


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with field-naming errors
# ----------------------------------------------------------------------------------------------


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    raw_tasks = data.get("tasks") if cls is ModelConfig else None
    kwargs = {k: coerce(v, hints[k], f"{prefix}{k}", from_dict) for k, v in data.items() if k != "tasks" or raw_tasks is None}
    if raw_tasks is not None:
        kwargs["tasks"] = _merge_task_defaults(raw_tasks, f"{prefix}tasks")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def _merge_task_defaults(raw: Any, where: str) -> dict[str, TaskConfig]:
    """``model.tasks`` patches the defaults (gen/depth/seg): a named default inherits unspecified
    fields, a new name is built from scratch, and ``null`` removes a task."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    base = {name: dataclasses.asdict(task) for name, task in default_tasks().items()}
    for name, value in raw.items():
        if value is None:
            base.pop(name, None)
        elif not isinstance(value, (dict, TaskConfig)):
            raise ConfigError(f"{where}.{name}: expected a mapping or null")
        else:
            value = dataclasses.asdict(value) if isinstance(value, TaskConfig) else value
            base[name] = _deep_update(base.get(name, {}), value)
    return {name: from_dict(TaskConfig, value, f"{where}.{name}") for name, value in base.items()}


def _deep_update(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "teacher_kwargs":
            base[k] = _deep_update(dict(base[k]), v)
        else:
            base[k] = v
    return base


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"{item}: override must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""  # values are YAML
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from defaults), apply overrides, build and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------
# Validation (static, before any model is loaded)
# ----------------------------------------------------------------------------------------------

_CHOICES = {
    "model.projector": None,
    "model.dtype": {"bfloat16", "float16", "float32"},
    "model.attn_implementation": {"sdpa", "eager", "flash_attention_2"},
    "data.image_geometry": {"pad", "square", "resize"},
    "data.on_bad_sample": {"skip", "error"},
    "data.sampler": {"random", "modality_length"},
    "data.cache_miss": {"error", "online"},
    "train.stage": {"pt", "vpt", "ift"},
    "train.lr_scheduler": {"cosine", "linear", "constant"},
}
_PROJECTOR = re.compile(r"^(linear|mlp(\d+)x_gelu)$")


def validate(cfg: RunConfig) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    for name, choices in _CHOICES.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if choices is not None and value not in choices:
            raise ConfigError(f"{name}: {value!r} is not one of {sorted(choices)}")
    if d.add_bos not in (True, False, "auto"):
        raise ConfigError(f"data.add_bos: {d.add_bos!r} is not auto, true or false")
    if not _PROJECTOR.match(m.projector):
        raise ConfigError(f"model.projector: {m.projector!r} is not 'linear' or 'mlp<N>x_gelu'")
    if m.num_task_tokens < 0:
        raise ConfigError("model.num_task_tokens: must be >= 0")
    if len(set(m.task_order)) != len(m.task_order):
        raise ConfigError(f"model.task_order: duplicate task in {m.task_order}")
    for task in m.task_order:
        if task not in m.tasks:
            raise ConfigError(f"model.task_order: {task!r} has no entry in model.tasks")
    for name, task in m.tasks.items():
        where = f"model.tasks.{name}"
        p = task.predictor
        if not task.teacher:
            raise ConfigError(f"{where}.teacher: required")
        if any(layer < 1 for layer in task.layers) or len(set(task.layers)) != len(task.layers):
            raise ConfigError(f"{where}.layers: must be distinct 1-based integers, got {task.layers}")
        if task.weight < 0:
            raise ConfigError(f"{where}.weight: must be >= 0")
        if p.query_source not in ("task_tokens", "hidden"):
            raise ConfigError(f"{where}.predictor.query_source: {p.query_source!r} is not task_tokens/hidden")
        if p.output_layout not in ("tokens", "grid", "vector"):
            raise ConfigError(f"{where}.predictor.output_layout: {p.output_layout!r} is not tokens/grid/vector")
        for key in ("depth", "heads", "dim_head", "ff_mult", "out_dim"):
            if getattr(p, key) < 1:
                raise ConfigError(f"{where}.predictor.{key}: must be >= 1")
        if p.query_source == "hidden" and m.num_task_tokens == 0:
            raise ConfigError(f"{where}.predictor.query_source: 'hidden' needs model.num_task_tokens > 0")
        if p.query_source == "hidden" and name not in m.task_order:
            raise ConfigError(f"{where}.predictor.query_source: 'hidden' needs {name!r} in model.task_order")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ConfigError("train.micro_batch_size: batch sizes must be >= 1")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size}")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError("train.warmup_ratio: must be in [0, 1)")
    if t.keep_last < 1:
        raise ConfigError("train.keep_last: must be >= 1")
    if t.deepspeed and t.fsdp:
        raise ConfigError("train.fsdp: cannot be combined with train.deepspeed")
    if d.max_length < 16:
        raise ConfigError("data.max_length: must be >= 16")


def task_token_rows(cfg: ModelConfig, task: str, num_image_tokens: int) -> int:
    """Rows of a task's learnable token parameter (spec §2.3)."""
    tc = cfg.tasks[task]
    if tc.token_rows is not None:
        return tc.token_rows
    if tc.predictor.query_source == "task_tokens":
        return tc.predictor.num_queries or num_image_tokens
    return cfg.num_task_tokens


def validate_against_model(cfg: ModelConfig, *, num_layers: int, num_image_tokens: int) -> None:
    """Checks that need the loaded LLM / vision tower: layer range, query and token divisibility."""
    for name, task in cfg.tasks.items():
        where = f"model.tasks.{name}"
        for layer in task.layers:
            if not 1 <= layer <= num_layers:
                raise ConfigError(f"{where}.layers: layer {layer} is outside the LLM's 1..{num_layers}")
        p = task.predictor
        if p.query_source == "task_tokens":
            q = p.num_queries or num_image_tokens
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
            q = p.num_queries or num_image_tokens
            side = int(round(q ** 0.5))
            if side * side != q:
                raise ConfigError(f"{where}.predictor.num_queries: grid layout needs a square count, got {q}")
