"""The pre-flight: every check of a run that needs no weights, before any weights load.

``olavlm check CONFIG.yaml [--section.key=value ...]`` runs it alone; ``olavlm train`` runs it first.
It reads only small files: the config, the LLM's and the vision tower's ``config.json`` /
``preprocessor_config.json``, the teachers' JSON files (a weight-free target spec per teacher,
:mod:`olavlm.teachers.specs`), the data file, the DeepSpeed JSON and the ``init_from`` folder's
``config.json``. A failing check is one line that starts with the field it concerns; all failures
found are raised together as one :class:`PreflightError` (one line each). On success the
function returns notes: what the run will use, one line each.

What is checked, in order: config types, choices and ranges (:func:`olavlm.config.validate`);
the environment (optional packages a setting needs, world-size divisibility); the
DeepSpeed JSON; ``train.init_from`` (a finished model, its architecture against the recipe); the
LLM and the tower (layers within depth, token-count divisibility, layouts, feature layer); the
teachers' target shapes against the predictors' outputs; the template, the data file (parses,
has records), the image folder (exists, holds the first images); the target cache folder; the
output directory (writable).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from olavlm.config import ConfigError, ModelConfig, RunConfig, explicit_fields, validate_against_model
from olavlm.config_checks import predictor_output_shape
from olavlm.errors import read_json_object

IMAGES_TO_CHECK = 32  # first image paths of the data file that must exist under data.image_folder


class PreflightError(ConfigError):
    """One or more pre-flight failures; ``problems`` holds one line per failure, naming the field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class _ModelFacts:
    """The model the run will build, read weight-free."""

    cfg: ModelConfig  # the recipe's model section, or init_from's saved one with the recipe's runtime fields
    num_layers: int
    hidden_size: int
    num_image_tokens: int
    grid: int


def preflight(cfg: RunConfig) -> list[str]:
    """Run every weight-free check of ``cfg``; returns notes, raises :class:`PreflightError`."""
    cfg.validate()  # types, choices, ranges, cross-field rules: the first failure stops here
    notes: list[str] = []
    problems: list[str] = []

    def attempt(check, *args):
        try:
            return check(*args, notes)
        except ConfigError as e:
            problems.extend(e.problems if isinstance(e, PreflightError) else [str(e)])
        return None

    attempt(_check_environment, cfg)
    attempt(_check_deepspeed, cfg)
    facts = attempt(_model_facts, cfg)
    if facts is not None:
        attempt(_check_teachers, cfg, facts)
    attempt(_check_data, cfg)
    attempt(_check_output_dir, cfg)
    if problems:
        raise PreflightError(problems)
    return notes


# -- environment and engine ------------------------------------------------------------------------

def _check_environment(cfg: RunConfig, notes: list[str]) -> None:
    from olavlm.train.engine import accumulation_steps, world_size
    from olavlm.train.metrics import check_report_to

    problems = []
    for check in (lambda: check_report_to(cfg.train.report_to),
                  lambda: accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, world_size())):
        try:
            check()
        except ConfigError as e:
            problems.append(str(e))
    if cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        problems.append("model.attn_implementation: 'flash_attention_2' needs the flash-attn package, which is not "
                        "installed (pip install flash-attn, or use sdpa)")
    if problems:
        raise PreflightError(problems)


def _check_deepspeed(cfg: RunConfig, notes: list[str]) -> None:
    if not cfg.train.deepspeed:
        return
    path = Path(cfg.train.deepspeed)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed: {path} does not exist (ship-ready configs: configs/deepspeed/*.json)")
    ds = read_json_object(path, ConfigError, f"train.deepspeed: {path}")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("train.deepspeed: the deepspeed package is not installed (pip install deepspeed)")
    stage = ds.get("zero_optimization", {}).get("stage") if isinstance(ds.get("zero_optimization"), dict) else None
    notes.append(f"train.deepspeed: {path} (ZeRO stage {stage})")


# -- the model: init_from, LLM, tower -------------------------------------------------------------

def _init_from_model(cfg: RunConfig, notes: list[str]) -> ModelConfig:
    """The saved model config a VPT/IFT stage starts from, with the recipe's runtime fields applied."""
    from olavlm.model import io
    from olavlm.train.loop import resolve_init_from

    folder = resolve_init_from(cfg.train.init_from)
    try:
        saved, _ = io.read_config(folder)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.init_from: {folder} holds no readable olavlm model: {e}") from None
    missing = [p for p in (folder / io.WEIGHTS_NAME, Path(saved.llm) / "config.json",
                           Path(saved.vision_tower) / "config.json") if not p.is_file()]
    if missing:
        raise ConfigError(f"train.init_from: {folder} is not a finished model (missing {missing[0]})")
    runtime, more = io.reconcile_init_from(saved, cfg.model, explicit_fields(cfg), str(folder))
    for name, value in runtime.items():
        setattr(saved, name, value)
    from olavlm.train.stages import stage_model_config

    stage_model_config(saved, cfg.model, cfg.train.stage)  # the recipe's alignment tasks of this stage join
    notes.append(f"train.init_from: {folder}")
    notes.extend(more)
    return saved


def _auto_config(path: str, field: str):
    from transformers import AutoConfig

    if not path:
        raise ConfigError(f"{field}: required (hub id or local folder)")
    if not Path(path).is_dir() and Path(path).exists():
        raise ConfigError(f"{field}: {path} is a file, not a checkpoint folder")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{field}: cannot read the config.json of {path}: {first}") from None


def _model_facts(cfg: RunConfig, notes: list[str]) -> _ModelFacts:
    from olavlm.geometry import vision_geometry

    t = cfg.train
    if t.init_from is not None and t.stage == "pt":
        raise ConfigError("train.init_from: PT starts from model.llm and model.vision_tower; unset init_from")
    if t.init_from is None and t.stage != "pt":
        notes.append(f"train.init_from is not set: {t.stage} starts from model.llm with a fresh projector")
    model_cfg = cfg.model if t.init_from is None else _init_from_model(cfg, notes)
    problems = []
    llm = None
    try:
        llm = _auto_config(model_cfg.llm, "model.llm").get_text_config()
        for key in ("final_logit_softcapping", "logit_scale"):
            if getattr(llm, key, None) not in (None, 1.0):
                raise ConfigError(f"model.llm: {model_cfg.llm} post-processes logits ({key}); supervised-only NTP "
                                  "does not support it")
    except ConfigError as e:
        problems.append(str(e))
    geometry = None
    try:
        tower = _auto_config(model_cfg.vision_tower, "model.vision_tower")
        tower = getattr(tower, "vision_config", tower)
        geometry = vision_geometry(model_cfg)
        n = int(tower.num_hidden_layers)
        if not -(n + 1) <= model_cfg.vision_feature_layer <= n:
            raise ConfigError(f"model.vision_feature_layer: {model_cfg.vision_feature_layer} is outside "
                              f"-{n + 1}..{n} for the {n}-layer tower {model_cfg.vision_tower}")
    except ConfigError as e:
        problems.append(str(e))
    except (OSError, ValueError) as e:
        problems.append(f"model.vision_tower: {e}")
    if problems:
        raise PreflightError(problems)
    layers = int(llm.num_hidden_layers)
    validate_against_model(model_cfg, num_layers=layers, num_image_tokens=geometry.num_tokens)
    notes.append(f"model: LLM {layers} layers x {llm.hidden_size}, tower {geometry.spec.size} px -> "
                 f"{geometry.grid}x{geometry.grid} grid, {geometry.num_tokens} image tokens")
    return _ModelFacts(model_cfg, layers, int(llm.hidden_size), geometry.num_tokens, geometry.grid)


# -- teachers --------------------------------------------------------------------------------------

def _check_teachers(cfg: RunConfig, facts: _ModelFacts, notes: list[str]) -> None:
    """Target shapes of the teachers the run builds against the predictors' output shapes."""
    from olavlm.teachers.registry import TEACHERS, target_spec
    from olavlm.teachers.specs import SpecError
    from olavlm.config import active_tasks

    d = cfg.data
    tasks = active_tasks(facts.cfg, cfg.train.stage)
    if tasks and d.target_cache:
        if not (Path(d.target_cache) / "index.json").is_file():
            raise ConfigError(f"data.target_cache: {d.target_cache} is not a target cache (no index.json); write "
                              "one with `olavlm targets precompute`")
        if d.cache_miss == "error":
            return  # the cache serves every target; it is verified against the model when opened
    problems, sides = [], []
    for name, task in tasks.items():
        where = f"model.tasks.{name}"
        if task.teacher not in TEACHERS:
            problems.append(f"{where}.teacher: {task.teacher!r} is not a registered teacher ({sorted(TEACHERS)})")
            continue
        try:
            spec = target_spec(task.teacher, task.teacher_path, grid=facts.grid, **dict(task.teacher_kwargs))
        except SpecError as e:
            problems.append(f"{where}.teacher_path: {e}")
            continue
        if spec is None:
            notes.append(f"{where}: teacher {task.teacher!r} has no weight-free spec; its shape is checked when it loads")
            continue
        want = predictor_output_shape(facts.cfg, name, facts.num_image_tokens)
        if tuple(spec.shape) != tuple(want):
            problems.append(f"{where}.predictor: outputs {tuple(want)} per image but teacher {task.teacher!r} "
                            f"({task.teacher_path}) gives targets {tuple(spec.shape)}; set out_dim / output_layout / "
                            "num_queries to match")
            continue
        sides.append(spec.input_size)
        notes.append(f"{where}: teacher {task.teacher} -> targets {tuple(spec.shape)}, input {spec.input_size} px")
    if problems:
        raise PreflightError(problems)
    if sides:
        notes.append(f"teachers read a {d.teacher_image_size or max(sides)} px square cut from each image")


# -- data and output -------------------------------------------------------------------------------

def _check_data(cfg: RunConfig, notes: list[str]) -> None:
    from olavlm.data.records import RecordFileError, iter_records, record_images
    from olavlm.data.templates import TEMPLATES

    d = cfg.data
    problems = []
    if d.template not in TEMPLATES:
        problems.append(f"data.template: {d.template!r} is not one of {sorted(TEMPLATES)}")
    folder = Path(d.image_folder) if d.image_folder else Path()  # records' image paths are relative to it
    folder_ok = folder.is_dir()
    if not folder_ok:
        problems.append(f"data.image_folder: {folder} is not a folder")
    if not d.train_file:
        problems.append("data.train_file: required (LLaVA JSON list or JSONL)")
    elif not Path(d.train_file).is_file():
        problems.append(f"data.train_file: {d.train_file} does not exist")
    else:
        count, first = 0, []
        try:
            for _, _, record in iter_records(d.train_file):
                count += 1
                if len(first) < IMAGES_TO_CHECK:
                    try:
                        first += record_images(record)[:IMAGES_TO_CHECK - len(first)]
                    except ValueError:
                        pass  # a malformed record is skipped or reported by the dataset (data.on_bad_sample)
        except (RecordFileError, OSError, UnicodeDecodeError) as e:
            problems.append(f"data.train_file: {e}")
        else:
            if count == 0:
                problems.append(f"data.train_file: {d.train_file} contains no records")
            missing = [p for p in first if not (folder / p).is_file()]
            if folder_ok and first and len(missing) == len(first):
                problems.append(f"data.image_folder: none of the first {len(first)} images of {d.train_file} exist "
                                f"under {folder.resolve()} (e.g. {missing[0]})")
            notes.append(f"data.train_file: {count} records; {len(first) - len(missing)} of the first "
                         f"{len(first)} images found")
    if problems:
        raise PreflightError(problems)


def _check_output_dir(cfg: RunConfig, notes: list[str]) -> None:
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} exists and is not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"train.output_dir: {out} lies under {probe}, which is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir: cannot write under {probe} (permission denied)")
    notes.append(f"train.output_dir: {out}" + (" (exists)" if out.is_dir() else " (will be created)"))


def check_command(config: str, overrides: list[str]) -> list[str]:
    """``olavlm check``: load the config and run the pre-flight; returns the notes."""
    from olavlm.config import load_config

    return preflight(load_config(config, overrides))
