"""PT embedding predictors of a released checkpoint -> olavlm ``predictors.<task>.<layer>.*``.

Reference module names: ``image_{gen,depth,seg}_heads.{k}.projector.<resampler key>`` (head k reads
the k-th layer of the task's layer string), plus ``image_depth_heads.{k}.linear_{1,2,3}.*`` on the
depth output. Inner keys map one to one onto :class:`olavlm.model.predictor.Predictor`:

================================  ===============================
reference (``.projector.``)        olavlm
================================  ===============================
``proj_in.*``                      ``proj_in.*`` (shared by states and queries)
``layers.{i}.0.norm1.*``           ``blocks.{i}.attn.norm_x.*`` (LayerNorm of the LLM states)
``layers.{i}.0.norm2.*``           ``blocks.{i}.attn.norm_q.*`` (LayerNorm of the queries)
``layers.{i}.0.to_{q,kv,out}.*``   ``blocks.{i}.attn.to_{q,kv,out}.*`` (K rows first, then V)
``layers.{i}.1.{0,1,3}.*``         ``blocks.{i}.ff.{0,1,3}.*`` (LayerNorm, Linear, GELU, Linear)
``proj_out.*`` / ``norm_out.*``    ``proj_out.*`` / ``norm_out.*``
``linear_1.{0,2}.*`` (depth)       ``output_mlp.{0,2}.*`` (the supervised output)
``linear_2.*``, ``linear_3.*``     dropped: unsupervised outputs olavlm does not build
================================  ===============================

The depth and seg queries are the task-token rows ``model.special_{depth,seg}_tokens``; they become
``task_tokens.rows.<task>``, which olavlm uses both in the sequence and as those predictors' queries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from olavlm.config import PredictorConfig
from olavlm.interop import InteropError
from olavlm.interop.reference_config import TASK_FIELDS, ReferenceConfig, parse_layers

HEAD_PREFIX = {task: f"image_{task}_heads." for task in TASK_FIELDS}
LAYOUT = {"gen": "vector", "depth": "tokens", "seg": "grid"}
_INNER = [
    (re.compile(r"^projector\.proj_in\.(weight|bias)$"), r"proj_in.\1"),
    (re.compile(r"^projector\.layers\.(\d+)\.0\.norm1\.(weight|bias)$"), r"blocks.\1.attn.norm_x.\2"),
    (re.compile(r"^projector\.layers\.(\d+)\.0\.norm2\.(weight|bias)$"), r"blocks.\1.attn.norm_q.\2"),
    (re.compile(r"^projector\.layers\.(\d+)\.0\.(to_q|to_kv|to_out)\.weight$"), r"blocks.\1.attn.\2.weight"),
    (re.compile(r"^projector\.layers\.(\d+)\.1\.(0|1|3)\.(weight|bias)$"), r"blocks.\1.ff.\2.\3"),
    (re.compile(r"^projector\.(proj_out|norm_out)\.(weight|bias)$"), r"\1.\2"),
    (re.compile(r"^linear_1\.(0|2)\.(weight|bias)$"), r"output_mlp.\1.\2"),
]
_DROPPED = re.compile(r"^linear_[23]\.(0|2)\.(weight|bias)$")
_HEAD = re.compile(r"^(\d+)\.(.+)$")


_INVERSE = [
    (re.compile(r"^proj_in\.(.+)$"), r"projector.proj_in.\1"),
    (re.compile(r"^blocks\.(\d+)\.attn\.norm_x\.(.+)$"), r"projector.layers.\1.0.norm1.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.norm_q\.(.+)$"), r"projector.layers.\1.0.norm2.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.(to_\w+)\.(.+)$"), r"projector.layers.\1.0.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.ff\.(\d+)\.(.+)$"), r"projector.layers.\1.1.\2.\3"),
    (re.compile(r"^(proj_out|norm_out)\.(.+)$"), r"projector.\1.\2"),
    (re.compile(r"^output_mlp\.(.+)$"), r"linear_1.\1"),
]


def reference_name(key: str, plans: dict) -> str:
    """The reference key an olavlm extras key comes from (for messages about missing tensors)."""
    parts = key.split(".")
    if parts[0] == "predictors" and len(parts) > 3 and parts[1] in plans and int(parts[2]) in plans[parts[1]].layers:
        k = plans[parts[1]].layers.index(int(parts[2]))
        inner = ".".join(parts[3:])
        for pattern, target in _INVERSE:
            if pattern.match(inner):
                return f"{HEAD_PREFIX[parts[1]]}{k}.{pattern.sub(target, inner)}"
    if parts[0] == "task_tokens" and len(parts) == 3:
        return f"model.special_{parts[2].split('_raw')[0]}_tokens"
    if parts[0] == "projector":
        return "model.mm_projector." + ".".join(parts[1:])
    if parts[0] == "logit_scales" and len(parts) == 2:
        return logit_scale_key(parts[1])
    return key


def logit_scale_key(task: str) -> str:
    return f"{task}_logit_scale"


@dataclass
class PredictorPlan:
    """One task's predictors: olavlm config, layers, and olavlm key -> reference key."""

    task: str
    layers: list[int]
    config: PredictorConfig
    weight: float
    tensors: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


def _map_head_key(task: str, key: str, layers: list[int]) -> tuple[str | None, int]:
    """(olavlm key or None for a dropped tensor, head index) of one reference predictor key."""
    m = _HEAD.match(key[len(HEAD_PREFIX[task]):])
    if not m:
        raise InteropError(f"{key}: unknown key (expected {HEAD_PREFIX[task]}<index>.<module>...)")
    k, inner = int(m.group(1)), m.group(2)
    if k >= len(layers):
        raise InteropError(f"{key}: head {k} but config.json's {TASK_FIELDS[task][1]} lists {len(layers)} layer(s)")
    if _DROPPED.match(inner) and task == "depth":
        return None, k
    for pattern, target in _INNER:
        if pattern.match(inner) and (task == "depth" or not inner.startswith("linear_")):
            return f"predictors.{task}.{layers[k]}.{pattern.sub(target, inner)}", k
    raise InteropError(f"{key}: unknown key inside a {task} predictor")


def _infer_config(task: str, shapes: dict[str, tuple[int, ...]], tensors: dict[str, str], layer: int,
                  cfg: dict, num_image_tokens: int) -> PredictorConfig:
    """The predictor's widths from the first head's tensor shapes, checked against config.json."""
    base = f"predictors.{task}.{layer}."

    def shape(name: str) -> tuple[int, ...]:
        key = base + name
        if key not in tensors:
            raise InteropError(f"{HEAD_PREFIX[task]}0.projector.{name}: missing from the checkpoint "
                               "(needed to size the predictor)")
        return shapes[tensors[key]]

    dim = shape("proj_in.weight")[0]
    out_dim = shape("proj_out.weight")[0]
    blocks = sorted({int(k[len(base):].split(".")[1]) for k in tensors if k.startswith(base + "blocks.")})
    heads, dim_head = int(cfg.get("num_heads", 4)), int(cfg.get("dim_head", 32))
    inner = shape("blocks.0.attn.to_q.weight")[0]
    if heads * dim_head != inner:
        raise InteropError(f"{tensors[base + 'blocks.0.attn.to_q.weight']}: {inner} rows but config.json's "
                           f"{TASK_FIELDS[task][0]} says num_heads {heads} x dim_head {dim_head}")
    ff = shape("blocks.0.ff.1.weight")[0]
    if ff % dim:
        raise InteropError(f"{tensors[base + 'blocks.0.ff.1.weight']}: {ff} rows are not a multiple of {dim}")
    for name, value in (("output_dim", out_dim), ("depth", len(blocks))):
        if name in cfg and int(cfg[name]) != value:
            raise InteropError(f"config.json: {TASK_FIELDS[task][0]}.{name}: {cfg[name]} but the weights have {value}")
    queries = int(cfg.get("num_tokens", 1 if task == "gen" else num_image_tokens))
    if task == "gen" and queries != 1:
        raise InteropError(f"config.json: image_gen.num_tokens: {queries}; the gen predictor has one query")
    return PredictorConfig(
        dim=dim, num_queries=queries, query_source="hidden" if task == "gen" else "task_tokens", out_dim=out_dim,
        output_layout=LAYOUT[task], output_mlp=any(k.startswith(base + "output_mlp.") for k in tensors),
        depth=len(blocks), heads=heads, dim_head=dim_head, ff_mult=ff // dim)


def plan_predictors(keys: list[str], shapes: dict[str, tuple[int, ...]], ref: ReferenceConfig,
                    num_image_tokens: int) -> dict[str, PredictorPlan]:
    """{task: plan} for every task of ``aux_mode`` (PT checkpoints: each must have its heads)."""
    plans = {}
    for task in ref.task_order:
        head_keys = [k for k in keys if k.startswith(HEAD_PREFIX[task])]
        if not head_keys:
            raise InteropError(f"{HEAD_PREFIX[task]}0.projector.proj_in.weight: missing from the checkpoint "
                               f"(aux_mode lists {task})")
        cfg_name, layer_field, weight_field = TASK_FIELDS[task]
        cfg = ref.task_dicts[task]
        if layer_field not in cfg:
            raise InteropError(f"config.json: {cfg_name}.{layer_field}: required for the {task} predictors")
        layers = parse_layers(cfg[layer_field], f"{cfg_name}.{layer_field}")
        plan = PredictorPlan(task, layers, PredictorConfig(), float(cfg.get(weight_field, 0.5)))
        seen = set()
        for key in head_keys:
            target, k = _map_head_key(task, key, layers)
            seen.add(k)
            if target is None:
                plan.dropped.append(key)
            else:
                plan.tensors[target] = key
        if seen != set(range(len(layers))):
            missing = sorted(set(range(len(layers))) - seen)
            raise InteropError(f"{HEAD_PREFIX[task]}{missing[0]}.projector.proj_in.weight: missing from the "
                               f"checkpoint ({layer_field} lists {len(layers)} layers)")
        plan.config = _infer_config(task, shapes, plan.tensors, layers[0], cfg, num_image_tokens)
        plans[task] = plan
    return plans
