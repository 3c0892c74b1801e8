"""``olavlm convert reference SRC DST``: a released OLA-VLM checkpoint -> an olavlm model folder.

Reads ``config.json`` and the safetensors shards directly (the reference classes are never built).
Every key is classified, renamed and shape-checked against the modules olavlm builds (on the meta
device, so nothing is allocated), then written:

========================================  =========================================================
reference key                              olavlm folder
========================================  =========================================================
``model.{embed_tokens,layers,norm}.*``,    ``llm/`` (an ordinary ``LlamaForCausalLM`` /
``lm_head.weight``                         ``Phi3ForCausalLM`` folder, same names)
``model.vision_tower.vision_tower.*``      ``vision/`` (see :mod:`olavlm.interop.reference_vision`)
``model.mm_projector.*``                   ``projector.*``
``model.special_{task}_tokens``            ``task_tokens.rows.<task>`` (see :func:`plan_task_tokens`)
``image_{task}_heads.*`` (PT)              ``predictors.<task>.<layer>.*`` (:mod:`.reference_predictors`)
``{task}_logit_scale`` (PT)                ``logit_scales.<task>``
``da_v2_head.*``, ``dav2_backbone.*``,     dropped (teachers / decoders are rebuilt from their own
``oneformer.*``, ``gen_encoder.*``         weights)
========================================  =========================================================

Anything else is an unknown key and stops the conversion. The folder also gets
``olavlm_processor.json`` (the processor: template, image geometry, image facts, stage; what ``chat`` /
``eval`` read) and
``olavlm_conversion.json`` (the source, every option used, what was dropped).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from olavlm.interop import InteropError
from olavlm.interop.reference_config import (FAMILY_CLASSES, ConvertOptions, ReferenceConfig, llm_config,
                                             read_reference_config)
from olavlm.interop.reference_predictors import HEAD_PREFIX, logit_scale_key, plan_predictors, reference_name
from olavlm.interop.reference_vision import PREFIX as VISION_PREFIX
from olavlm.interop.reference_vision import VisionResult, convert_vision
from olavlm.interop.shards import Checkpoint, ShardWriter, check_shapes, iter_tensors, meta_state_shapes

log = logging.getLogger(__name__)

CONVERSION_INFO = "olavlm_conversion.json"
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
TEACHER_PREFIXES = ("da_v2_head.", "dav2_backbone.", "oneformer.", "gen_encoder.")
_TOKEN_KEY = re.compile(r"^model\.special_(gen|depth|seg)_tokens$")


@dataclass
class KeyGroups:
    llm: list[str] = field(default_factory=list)
    vision: list[str] = field(default_factory=list)
    projector: list[str] = field(default_factory=list)
    task_tokens: dict[str, str] = field(default_factory=dict)  # task -> key
    predictors: list[str] = field(default_factory=list)
    logit_scales: dict[str, str] = field(default_factory=dict)  # task -> key
    teachers: list[str] = field(default_factory=list)


def classify_keys(keys: list[str]) -> KeyGroups:
    g = KeyGroups()
    scales = {logit_scale_key(t): t for t in HEAD_PREFIX}
    for key in keys:
        if key.startswith(LLM_PREFIXES):
            g.llm.append(key)
        elif key.startswith(VISION_PREFIX):
            g.vision.append(key)
        elif key.startswith("model.mm_projector."):
            g.projector.append(key)
        elif m := _TOKEN_KEY.match(key):
            g.task_tokens[m.group(1)] = key
        elif key.startswith(tuple(HEAD_PREFIX.values())):
            g.predictors.append(key)
        elif key in scales:
            g.logit_scales[scales[key]] = key
        elif key.startswith(TEACHER_PREFIXES):
            g.teachers.append(key)
        elif key == "model.image_newline":
            raise InteropError(f"{key}: image_newline (mm_patch_merge_type other than 'flat') is not supported")
        else:
            raise InteropError(f"{key}: unknown key in the reference checkpoint (not LLM, vision tower, "
                               "projector, task tokens, predictors or teachers)")
    if not g.llm:
        raise InteropError("model.embed_tokens.weight: missing from the checkpoint (no LLM weights found)")
    if not g.vision:
        raise InteropError(f"{VISION_PREFIX}*: missing from the checkpoint (no vision tower weights found)")
    if not g.projector:
        raise InteropError("model.mm_projector.0.weight: missing from the checkpoint (no projector weights found)")
    return g


def resolve_source(src: str, endpoint: str | None = None) -> Path:
    """A local folder, or a hub id downloaded (config, tokenizer and safetensors files only)."""
    local = Path(src)
    if local.is_dir():
        return local
    if local.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        raise InteropError(f"{src}: not a folder (nor a hub id like shi-labs/OLA-VLM-CLIP-ViT-Llama3-8b)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"],
                                      endpoint=endpoint))
    except Exception as e:  # network / auth / missing repo: one line for the user
        raise InteropError(f"{src}: could not download from the Hub ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def plan_task_tokens(ckpt: Checkpoint, groups: KeyGroups, ref: ReferenceConfig) -> tuple[list[str], dict[str, tuple[str, slice]]]:
    """(olavlm task order, {olavlm task: (reference key, row slice)}) for the sequence's task tokens.

    ``expand_emb``: one olavlm task per reference task, rows as stored (olavlm pools K means, as the
    reference does). ``emb``: every raw row is inserted, so a task whose R rows exceed K is split into
    R / K olavlm tasks ``<task>_raw<i>`` of K rows each (K rows pool to themselves), in order.
    """
    k = ref.num_task_tokens
    if not k:
        return [], {}
    order, rows = [], {}
    for task in ref.task_order:
        key = groups.task_tokens.get(task)
        if key is None:
            raise InteropError(f"model.special_{task}_tokens: missing from the checkpoint (aux_mode lists {task})")
        n = ckpt.shape(key)[0]
        if ref.task_token_format == "expand_emb" or n == k:
            order.append(task)
            rows[task] = (key, slice(0, n))
            continue
        if n % k:
            raise InteropError(f"{key}: {n} rows are not a multiple of num_task_tokens={k}")
        width = len(str(n // k - 1))
        for i in range(n // k):
            name = f"{task}_raw{i:0{width}d}"
            order.append(name)
            rows[name] = (key, slice(i * k, (i + 1) * k))
    return order, rows


def vision_fields(ref: ReferenceConfig, vision: VisionResult) -> dict[str, Any]:
    """``vision_feature_layer`` / ``vision_drop_cls`` of the converted model: config.json's, unless the
    tower decides them (a ConvNeXt gives its last stage, whatever ``mm_vision_select_layer`` says)."""
    return {"vision_feature_layer": ref.vision_feature_layer, "vision_drop_cls": ref.vision_drop_cls, **vision.config}


def _model_config(ref: ReferenceConfig, opts: ConvertOptions, vision: VisionResult, order: list[str], plans) -> Any:
    import copy

    from olavlm.config import ModelConfig, PredictorConfig, default_tasks

    defaults = default_tasks()
    tasks = {}
    for name in order:
        parent = name.split("_raw")[0]
        task = copy.deepcopy(defaults[parent])
        task.layers = []
        if name != parent:  # one block of raw rows: tokens only
            task.predictor = PredictorConfig(query_source="hidden")
        tasks[name] = task
    for task, plan in plans.items():
        tasks.setdefault(task, copy.deepcopy(defaults[task]))
        tasks[task].layers, tasks[task].predictor, tasks[task].weight = plan.layers, plan.config, plan.weight
    return ModelConfig(
        llm="llm", vision_tower="vision", vision_type=vision.vision_type, **vision_fields(ref, vision),
        projector=ref.projector, dtype=opts.dtype,
        num_task_tokens=ref.num_task_tokens, task_order=order, tasks=tasks,
        pass_text_to_predictors=ref.pass_text_to_predictors, use_contrastive=bool(plans) and ref.use_contrastive,
        contrastive_weight=ref.contrastive_weight)


def _expected_extras(cfg, out: Path, *, with_predictors: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of the extras OlaVLM builds for ``cfg`` (built on the meta device from the written configs)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from olavlm.config import ConfigError
    from olavlm.geometry import drop_cls, tower_type, vision_geometry
    from olavlm.model.vision import VisionTower
    from olavlm.model.vlm import EXTRA_PREFIXES, OlaVLM

    resolved = _resolved(cfg, out)
    try:
        geometry = vision_geometry(resolved)
        llm_cfg, vis_cfg = AutoConfig.from_pretrained(out / "llm"), AutoConfig.from_pretrained(out / "vision")

        def build():
            vision = VisionTower(AutoModel.from_config(vis_cfg), feature_layer=cfg.vision_feature_layer,
                                 drop_cls=drop_cls(resolved), family=tower_type(resolved).family)
            return OlaVLM(resolved, AutoModelForCausalLM.from_config(llm_cfg), vision, None, geometry,
                          with_predictors=with_predictors)

        shapes = meta_state_shapes(build)
    except ConfigError as e:
        raise InteropError(f"converted config: {e}") from None
    return {k: v for k, v in shapes.items() if k.startswith(EXTRA_PREFIXES)}


def _write_processor(out: Path, cfg, ref: ReferenceConfig, run: dict) -> None:
    """``olavlm_processor.json`` of the converted folder (template, geometry, image facts; BOS: what
    the converted tokenizer does), read weight-free from the written JSON files."""
    from transformers import AutoTokenizer

    from olavlm.data.processor import OlaProcessor
    from olavlm.model.task_tokens import task_tokens_per_image
    from olavlm.model.vision import vision_geometry

    geometry = vision_geometry(_resolved(cfg, out))
    task_tokens = task_tokens_per_image(cfg)
    try:
        proc = OlaProcessor(AutoTokenizer.from_pretrained(out), ref.template, "auto", ref.image_geometry,
                            geometry.spec, geometry.num_tokens + task_tokens, run=run)
    except ValueError as e:
        raise InteropError(f"converted processor: {e}") from None
    proc.save_pretrained(out, tokenizer=False)


def _image_tokens(out: Path, vision: VisionResult, ref: ReferenceConfig) -> int:
    """Image tokens per image of the written tower (the default predictor query count)."""
    from olavlm.config import ModelConfig
    from olavlm.geometry import vision_geometry

    return vision_geometry(ModelConfig(vision_tower=str(out / "vision"), vision_type=vision.vision_type,
                                       **vision_fields(ref, vision))).num_tokens


def _resolved(cfg, out: Path):
    import copy

    resolved = copy.deepcopy(cfg)
    resolved.llm, resolved.vision_tower = str(out / "llm"), str(out / "vision")
    return resolved


def _write_llm(ckpt: Checkpoint, keys: list[str], ref: ReferenceConfig, out: Path):
    from transformers import AutoModelForCausalLM

    cfg = llm_config(ref)
    expected = meta_state_shapes(lambda: AutoModelForCausalLM.from_config(cfg))
    if cfg.tie_word_embeddings and "lm_head.weight" not in keys:
        expected.pop("lm_head.weight", None)
    check_shapes({k: ckpt.shape(k) for k in keys}, expected, f"{FAMILY_CLASSES[ref.family][1]} LLM")
    writer = ShardWriter(out)
    for key, tensor in iter_tensors(ckpt, keys):
        writer.add(key, tensor)
    writer.close()
    cfg.save_pretrained(out)
    return cfg


@contextlib.contextmanager
def _quiet_transformers():
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)


def _write_tokenizer(folder: Path, opts: ConvertOptions, llm_cfg, out: Path) -> dict[str, Any]:
    """Tokenizer into ``llm/`` and the top level; ids past the tokenizer are never generated
    (the reference resizes its embeddings to the tokenizer at load time)."""
    from transformers import AutoTokenizer, GenerationConfig

    src = opts.tokenizer or str(folder)
    try:
        with _quiet_transformers():  # it reads config.json, whose model_type it does not know
            tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:  # missing / broken tokenizer files
        raise InteropError(f"{src}: no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0]}); "
                           "pass --tokenizer") from None
    rows = llm_cfg.vocab_size
    if len(tok) > rows:
        raise InteropError(f"model.embed_tokens.weight: {rows} rows but the tokenizer has {len(tok)} entries")
    tok.save_pretrained(out / "llm")
    tok.save_pretrained(out)
    unused = list(range(len(tok), rows))
    gen = GenerationConfig(bos_token_id=llm_cfg.bos_token_id, eos_token_id=llm_cfg.eos_token_id,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else llm_cfg.pad_token_id,
                           suppress_tokens=unused or None)
    gen.save_pretrained(out / "llm")
    return {"tokenizer_size": len(tok), "embedding_rows": rows, "suppressed_ids": [unused[0], unused[-1]] if unused else []}


def _extras(ckpt: Checkpoint, groups: KeyGroups, rows: dict[str, tuple[str, slice]], plans) -> tuple[dict, dict]:
    """(olavlm extras {key: fp32 tensor}, {olavlm key: reference key})."""
    names: dict[str, str] = {}
    for key in groups.projector:
        names["projector." + key[len("model.mm_projector."):]] = key
    for plan in plans.values():
        names.update(plan.tensors)
    for task, key in groups.logit_scales.items():
        if task in plans:
            names[f"logit_scales.{task}"] = key
    state = {new: ckpt.get(old).float() for new, old in names.items()}
    for key in [k for k in state if k.startswith("logit_scales.") and state[k].numel() == 1]:
        state[key] = state[key].reshape(1)  # stored 0-dim; olavlm keeps shape (1,)
    for task, (key, sl) in rows.items():
        state[f"task_tokens.rows.{task}"] = ckpt.get(key)[sl].float().contiguous()
        names[f"task_tokens.rows.{task}"] = key
    return state, names


def convert_reference(src: str, dst: str | Path, opts: ConvertOptions | None = None, *,
                      overwrite: bool = False, endpoint: str | None = None) -> dict[str, Any]:
    """Convert; returns the record written to ``DST/olavlm_conversion.json``. ``endpoint``: Hub
    endpoint for a hub-id ``src`` (None = HF_ENDPOINT or huggingface.co)."""
    opts = opts or ConvertOptions()
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise InteropError(f"{dst}: exists and is not empty (pass --overwrite)")
    folder = resolve_source(src, endpoint)
    ckpt = Checkpoint(folder)
    groups = classify_keys(ckpt.keys())
    ref = read_reference_config(folder, opts, has_task_tokens=bool(groups.task_tokens))
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        record = _convert_into(tmp, src, ckpt, groups, ref, opts)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s (%s) -> %s", src, ref.model_type, dst)
    return record


def _convert_into(out: Path, src: str, ckpt: Checkpoint, groups: KeyGroups, ref: ReferenceConfig,
                  opts: ConvertOptions) -> dict[str, Any]:
    from safetensors.torch import save_file

    from olavlm.model import io

    out.mkdir(parents=True)
    llm_cfg = _write_llm(ckpt, groups.llm, ref, out / "llm")
    vocab = _write_tokenizer(ckpt.folder, opts, llm_cfg, out)
    vision = convert_vision(ckpt, groups.vision, opts, out / "vision", opts.vision_image_size or ref.vision_image_size)
    shapes = {k: ckpt.shape(k) for k in ckpt.keys()}
    plans = plan_predictors(groups.predictors, shapes, ref, _image_tokens(out, vision, ref)) if ref.pt else {}
    order, rows = plan_task_tokens(ckpt, groups, ref)
    cfg = _model_config(ref, opts, vision, order, plans)
    state, names = _extras(ckpt, groups, rows, plans)
    expected = _expected_extras(cfg, out, with_predictors=bool(plans))
    check_shapes({k: tuple(v.shape) for k, v in state.items()}, expected, "olavlm model",
                 lambda k: names.get(k) or reference_name(k, plans))
    save_file(state, str(out / io.WEIGHTS_NAME), metadata={"format": "pt"})
    io.write_config(out, cfg, with_predictors=bool(plans))
    stage = "pt" if ref.pt else "ift"
    run = {"stage": stage, "max_length": int(ref.raw.get("tokenizer_model_max_length") or 4096), "init_from": None,
           "run_dir": None, "converted_from": src}
    _write_processor(out, cfg, ref, run)
    used_rows = {key for key, _ in rows.values()}
    record = {
        "source": src, "source_model_type": ref.model_type, "stage": stage, "options": asdict(opts),
        "reference": ref.facts(), "vision": vision.facts, "vocabulary": vocab,
        "tensors": {"llm": len(groups.llm), "vision": len(vision.keys), "projector": len(groups.projector),
                    "task_tokens": len(used_rows), "predictors": sum(len(p.tensors) for p in plans.values()),
                    "logit_scales": sum(1 for k in state if k.startswith("logit_scales."))},
        "dropped": {"teachers": len(groups.teachers),
                    "unsupervised_depth_outputs": sorted(k for p in plans.values() for k in p.dropped),
                    "task_tokens_not_in_aux_mode": sorted(set(groups.task_tokens.values()) - used_rows),
                    "predictors_of_an_ift_checkpoint": len(groups.predictors) if not ref.pt else 0,
                    "logit_scales_without_predictors": sorted(k for t, k in groups.logit_scales.items() if t not in plans)},
    }
    (out / CONVERSION_INFO).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record
