"""Reading a folder's ``olavlm_processor.json`` (or an old folder's ``olavlm_run.json``) into an
:class:`~olavlm.data.processor.OlaProcessor`; every bad field is a one-line error naming file and field."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from olavlm.data.images import GEOMETRIES, ImageLimits, ImageSpec
from olavlm.data.processor import LEGACY_FILE, PROCESSOR_FILE, VERSION, ProcessorConfigError, _read_json
from olavlm.data.templates import TEMPLATES

log = logging.getLogger(__name__)


def load_processor(cls, folder: Path, *, model=None, tokenizer=None, overrides: dict[str, Any]):
    overrides = {k: v for k, v in overrides.items() if v is not None}
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    file = folder / PROCESSOR_FILE
    if file.is_file():
        fields = parse_file(file)
        if tokenizer is None:
            tokenizer = _load_tokenizer(folder)
        if model is not None:
            _check_against_model(file, fields, model)
    else:
        fields = _legacy_fields(folder, model, overrides)
    wanted = {k: overrides.pop(k) for k in ("template", "image_geometry") if k in overrides}
    fields.update(wanted)
    if "template" in wanted and "add_bos" not in overrides:
        fields["add_bos"] = "auto"  # a recorded policy belongs to the recorded template
    try:
        proc = cls(tokenizer=tokenizer, **fields)
        return proc.with_overrides(**overrides)
    except ValueError as e:
        raise ProcessorConfigError(f"{folder}: {e}") from None


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "right"
    if tok.pad_token is None and tok.unk_token is not None:
        tok.pad_token = tok.unk_token
    return tok


def _field(file: Path, data: dict, name: str, check, what: str, default=...):
    if name not in data:
        if default is ...:
            raise ProcessorConfigError(f"{file}: field {name!r} is missing ({what})")
        return default
    value = data[name]
    if not check(value):
        raise ProcessorConfigError(f"{file}: field {name!r} is {value!r}, expected {what}")
    return value


def _is_int(v, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def parse_file(file: Path) -> dict[str, Any]:
    """Validated constructor fields of a olavlm_processor.json (all but the tokenizer)."""
    data = _read_json(file)
    version = _field(file, data, "version", _is_int, "an integer version")
    if version > VERSION:
        raise ProcessorConfigError(f"{file}: field 'version' is {version}, newer than this olavlm reads "
                                   f"({VERSION}); upgrade olavlm")
    spec = _field(file, data, "image_spec", lambda v: isinstance(v, dict), "an object (size, mean, std, resample)")
    try:
        image_spec = ImageSpec(size=int(spec["size"]), mean=tuple(float(x) for x in spec["mean"]),
                               std=tuple(float(x) for x in spec["std"]), resample=str(spec.get("resample", "bicubic")))
    except (KeyError, TypeError, ValueError) as e:
        raise ProcessorConfigError(f"{file}: field 'image_spec' is not usable ({e})") from None
    limits = _field(file, data, "limits", lambda v: isinstance(v, dict), "an object", default={})
    try:
        limits = ImageLimits(**limits)
    except (TypeError, ValueError) as e:
        raise ProcessorConfigError(f"{file}: field 'limits' is not usable ({e})") from None
    return {
        "template": _field(file, data, "template", lambda v: v in TEMPLATES, f"one of {', '.join(TEMPLATES)}"),
        "add_bos": _field(file, data, "add_bos", lambda v: isinstance(v, bool) or v == "auto", "true, false or \"auto\""),
        "image_geometry": _field(file, data, "image_geometry", lambda v: v in GEOMETRIES, f"one of {GEOMETRIES}"),
        "image_spec": image_spec,
        "tokens_per_image": _field(file, data, "tokens_per_image", _is_int, "an integer >= 1"),
        "teacher_image_size": _field(file, data, "teacher_image_size", lambda v: v is None or _is_int(v),
                                     "null or an integer >= 1", default=None),
        "limits": limits,
        "run": _field(file, data, "run", lambda v: isinstance(v, dict), "an object", default={}),
    }


def _check_against_model(file: Path, fields: dict, model) -> None:
    """The saved image facts must be the loaded model's (a folder edited by hand, or mixed up)."""
    if fields["tokens_per_image"] != model.tokens_per_image:
        raise ProcessorConfigError(f"{file}: field 'tokens_per_image' is {fields['tokens_per_image']}, but the model "
                                   f"in this folder expands an image to {model.tokens_per_image} positions")
    if fields["image_spec"] != model.image_spec:
        raise ProcessorConfigError(f"{file}: field 'image_spec' is {fields['image_spec']}, but the model's vision "
                                   f"tower wants {model.image_spec}")


def _legacy_fields(folder: Path, model, overrides: dict) -> dict[str, Any]:
    """An old folder: template / BOS / geometry from olavlm_run.json (or the overrides), image facts
    from the loaded model."""
    legacy = folder / LEGACY_FILE
    info = _read_json(legacy) if legacy.is_file() else {}
    template = overrides.get("template") or info.get("template")
    geometry = overrides.get("image_geometry") or info.get("image_geometry")
    if not template or not geometry:
        raise ProcessorConfigError(f"{folder}: no {PROCESSOR_FILE} (nor {LEGACY_FILE}) with the data template / "
                                   "image geometry; pass --template and --image-geometry (the values the model "
                                   "was trained with)")
    if model is None:
        raise ProcessorConfigError(f"{folder}: has no {PROCESSOR_FILE}; its processor can only be rebuilt "
                                   "together with the model")
    if legacy.is_file():
        log.info("%s: no %s, read the older %s (template, BOS policy, geometry; image facts from the model)",
                 folder, PROCESSOR_FILE, LEGACY_FILE)
    run = {k: v for k, v in info.items() if k not in ("template", "image_geometry", "add_bos")}
    return {"template": template, "add_bos": info.get("add_bos", "auto"), "image_geometry": geometry,
            "image_spec": model.image_spec, "tokens_per_image": model.tokens_per_image, "run": run}
