"""Typed run configuration: dataclasses, YAML loading, dotted overrides and validation.

A run is one YAML file with three sections (``model``, ``data``, ``train``). Every field is typed
and commented here; unknown keys and wrong types fail at load time with an error that names the
field (``train.lr: unknown key ...``). Ranges and cross-field rules are in
:mod:`olavlm.config_checks`; checks against the LLM's and tower's ``config.json`` (layer within
depth, ...) run in the weight-free pre-flight (:mod:`olavlm.preflight`) before any weights load.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from olavlm.config_parsing import ConfigError, coerce, parse_layer_spec, parse_weight_spec  # noqa: F401 (re-exported)
from olavlm.dtypes import Dtype, DtypeSpelling  # the one dtype table (olavlm.dtypes)

# The accepted values of every choice field, stated once: loading checks them (olavlm.config_parsing.coerce)
# and so does validate() for configs built in code; other modules read them with typing.get_args.
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
QuerySource = Literal["task_tokens", "hidden"]
OutputLayout = Literal["tokens", "grid", "vector"]
ImageGeometry = Literal["pad", "square", "resize"]
OnBadSample = Literal["skip", "error"]
SamplerKind = Literal["random", "modality_length"]
CacheMiss = Literal["error", "online"]
Stage = Literal["pt", "vpt", "ift", "probe"]
TaskKind = Literal["embedding", "alignment"]
LrScheduler = Literal["cosine", "linear", "constant"]
ReportSink = Literal["tensorboard", "wandb", "none"]

# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


@dataclass
class PredictorConfig:
    """One embedding predictor (Perceiver-Resampler block stack) (docs/method.md, "Embedding predictors")."""

    dim: int | None = None  # internal width D; None = the LLM hidden size
    num_queries: int | None = None  # None = number of image tokens ("task_tokens" source) / 1 ("hidden")
    query_source: QuerySource = "task_tokens"  # "task_tokens": the task's learnable rows; "hidden": the layer's states of the task's sequence tokens, pooled
    out_dim: int = 1024  # channels of the predicted embedding (must equal the teacher's)
    output_layout: OutputLayout = "tokens"  # "tokens" -> (N, Q, C); "grid" -> (N, C, h, w); "vector" -> (N, 1, C)
    output_mlp: bool = False  # extra Linear-ReLU-Linear on the output (depth); it is supervised
    depth: int = 1  # number of Perceiver blocks
    heads: int = 4
    dim_head: int = 32
    ff_mult: int = 1
    mlp_dim: int = 2048  # alignment tasks only: hidden width of the token-wise MLP (Linear-SiLU-Linear-SiLU-Linear)


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
    # "embedding" (OLA-VLM): Perceiver predictor over the allowed tokens, smooth-L1 + InfoNCE, summed over layers;
    # "alignment" (VIRAL): token-wise MLP at the image-token positions, mean -cosine, averaged over layers
    kind: TaskKind = "embedding"
    stages: list[Stage] | None = None  # stages the predictor and loss are active in; None = kind default (docs/methods.md)


# the stages a task is active in when ``TaskConfig.stages`` is None
DEFAULT_TASK_STAGES: dict[str, tuple[str, ...]] = {"embedding": ("pt",), "alignment": ("ift",)}


def task_stages(task: "TaskConfig") -> tuple[str, ...]:
    """The stages ``task``'s predictor and loss are active in."""
    return tuple(task.stages) if task.stages is not None else DEFAULT_TASK_STAGES[task.kind]


def active_tasks(model_cfg: "ModelConfig", stage: str) -> dict[str, "TaskConfig"]:
    """The tasks whose predictors and losses run in ``stage`` (layers set, stage in their stages)."""
    if stage not in typing.get_args(Stage):
        raise ConfigError(f"train.stage: {stage!r} is not one of {list(typing.get_args(Stage))}")
    return {n: t for n, t in model_cfg.tasks.items() if t.layers and stage in task_stages(t)}


def default_tasks() -> dict[str, TaskConfig]:
    """The reference defaults: gen, depth, seg with code-default layers and 0.5 weights."""
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
    vision_type: str = "clip"  # vision registry key: "clip", "siglip", "convnext" (olavlm.model.vision.TOWERS)
    vision_feature_layer: int = -2  # hidden_states index of the tower (−2 = penultimate)
    vision_drop_cls: bool | None = None  # drop the CLS token; None = the tower's default
    projector: str = "mlp2x_gelu"  # "linear" or "mlp<N>x_gelu"
    dtype: Dtype = "bfloat16"  # dtype of the frozen LLM / vision weights: bfloat16, float16, float32
    attn_implementation: AttnImplementation = "sdpa"  # sdpa, eager, flash_attention_2
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
    image_geometry: ImageGeometry = "pad"  # pad | square | resize: how an image becomes the shared square
    teacher_image_size: int | None = None  # side of the square carried for online teachers; None = largest teacher input
    max_length: int = 4096  # after image and task-token expansion
    truncate: bool = False  # cut over-long text (never inside an image/task span) instead of rejecting
    on_bad_sample: OnBadSample = "skip"  # skip | error
    max_image_aspect: float = 20.0  # long / short side; beyond = bad_image_size (checked from the file header)
    max_image_pixels: int = 89_478_485  # decoded width x height; beyond = unreadable_image (decompression bomb)
    max_geometry_pixels: int = 67_108_864  # largest image the geometry builds (pad canvas max(w,h)^2); 8192^2
    num_workers: int = 2
    sampler: SamplerKind = "random"  # random | modality_length
    target_cache: str | None = None  # folder written by `olavlm targets precompute`
    cache_miss: CacheMiss = "error"  # error | online (fall back to the teacher for missing entries)
    packing: bool = False  # lay each micro-batch's samples back to back in rows of max_length (no padding)


# --- Training ----------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """LoRA adapters on the LLM for vpt / ift (``train.lora: {}`` = these defaults); base weights frozen."""

    r: int = 16  # adapter rank
    alpha: float = 32.0  # scaling = alpha / r
    dropout: float = 0.05  # on the adapter input
    target_modules: list[str] | None = None  # None = every linear projection of the decoder layers (attention + MLP)
    modules_to_save: list[str] = field(default_factory=list)  # LLM modules trained fully, e.g. [embed_tokens, lm_head]
    load_in_4bit: bool = False  # QLoRA: 4-bit NF4 base weights (CUDA + bitsandbytes)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"train.lora.r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"train.lora.alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"train.lora.dropout: must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("train.lora.target_modules: empty list (omit it for attention + MLP projections)")


@dataclass
class TrainConfig:
    """Optimisation, engine, checkpointing and logging."""

    stage: Stage = "pt"  # pt | vpt | ift | probe
    init_from: str | None = None  # previous stage's output folder (model + tokenizer)
    global_batch_size: int = 256  # samples per optimizer step over all ranks
    micro_batch_size: int = 32  # samples per device per forward
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    lr_scheduler: LrScheduler = "cosine"  # cosine | linear | constant
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
    report_to: list[ReportSink] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb
    run_name: str | None = None
    deepspeed: str | None = None  # path to a DeepSpeed JSON (configs/deepspeed/*.json)
    fsdp: bool = False
    teacher_dtype: DtypeSpelling | None = None  # None = bf16 if train.bf16 else float32 (olavlm.dtypes)
    lora: LoraConfig | None = None  # LoRA / QLoRA adapters instead of full LLM training (vpt / ift)
    probe: Literal["resampler", "small"] = "resampler"  # stage probe: the probe per (task, layer) (docs/evaluation.md)
    probe_layers: list[int] = field(default_factory=list)  # stage probe: 1-based LLM layers; [] = every layer
    probe_depth_target: Literal["last_block", "training"] = "last_block"  # depth probe target: last DA block or the PT mean


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
    cfg._explicit_fields = frozenset(_dotted_keys(data))  # what the file + overrides set (see explicit_fields)
    return cfg


def _dotted_keys(data: dict[str, Any], prefix: str = ""):
    for key, value in data.items():
        yield prefix + str(key)
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{prefix}{key}.")


def explicit_fields(cfg: RunConfig) -> frozenset[str] | None:
    """Dotted names (``model.projector``, ``model.tasks.depth.token_rows`` ...) that the YAML file or
    an override of :func:`load_config` set; None for a config built in code (every field counts)."""
    return getattr(cfg, "_explicit_fields", None)


# Validation lives in olavlm.config_checks (re-exported here: validate, validate_against_model, task_token_rows)
from olavlm.config_checks import task_token_rows, validate, validate_against_model  # noqa: E402,F401
