"""Probing as a training stage (``train.stage: probe``): one probe per (teacher task, LLM layer).

The probed model (``train.init_from``: a PT, IFT or baseline folder) is frozen entirely; each
probe reads all tokens of its layer's hidden states (system, image, task tokens if any, text;
padding masked) and regresses the teacher's target for the image with smooth-L1. Losses of all
probes are summed. The regular training loop runs it, so Accelerate, DDP / ZeRO, checkpoints,
resume and metrics are the same as for PT; the data streams through the loader, nothing is kept.

Probes (``train.probe``):

* ``resampler`` (default): the plain Perceiver-Resampler with its own learnable latents
  (N(0,1)/sqrt(D)), one block, 4 heads of 32, ff_mult 1, internal width D = the target's
  channels, output LayerNorm; one latent per target token (depth tokens, seg grid cells) or one
  (gen vector);
* ``small``: the same block at width 32 with 2 heads of 16 (a cheap check).

Depth target (``train.probe_depth_target``): ``last_block`` (default) = the last backbone
block's features of Depth-Anything, ``training`` = the mean of the blocks PT distils.

``RUN_DIR/final/`` holds ``probes.safetensors`` and ``probe_config.json`` (what was probed and
how); ``olavlm probe eval`` reads them.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

from olavlm.config import ConfigError, RunConfig
from olavlm.model.predictor import PerceiverBlock

PROBES_FILE = "probes.safetensors"
PROBE_CONFIG = "probe_config.json"
SIZES = {"resampler": None, "small": {"dim": 32, "heads": 2, "dim_head": 16}}  # None = the paper's probe


class ProbeResampler(nn.Module):
    """Latents (Q, D) -> ``depth`` Perceiver blocks over proj_in(states) -> proj_out -> LayerNorm."""

    def __init__(self, d_in: int, shape: tuple[int, ...], layout: str, *, dim: int | None = None,
                 heads: int = 4, dim_head: int = 32, ff_mult: int = 1, depth: int = 1) -> None:
        super().__init__()
        self.layout, self.shape = layout, tuple(shape)
        if layout == "grid":
            out_dim, queries = shape[0], shape[1] * shape[2]
        else:
            queries, out_dim = shape
        dim = dim or out_dim
        self.latents = nn.Parameter(torch.randn(queries, dim) / math.sqrt(dim))
        self.proj_in = nn.Linear(d_in, dim)
        self.blocks = nn.ModuleList(PerceiverBlock(dim, heads, dim_head, ff_mult) for _ in range(depth))
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, states: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """states (N, L, d_in), key_mask bool (N, L) -> (N, *shape)."""
        dtype = self.latents.dtype
        if not torch.is_autocast_enabled(states.device.type):
            states = states.to(dtype)
        x = self.proj_in(states)
        q = self.latents[None].expand(states.shape[0], -1, -1).to(x.dtype)
        for block in self.blocks:
            q = block(x, q, key_mask)
        out = self.norm_out(self.proj_out(q))
        if self.layout == "grid":  # token n <-> row n // side, column n % side
            return out.transpose(1, 2).reshape(out.shape[0], *self.shape)
        return out


def probe_target_shape(task_cfg, num_image_tokens: int) -> tuple[int, ...]:
    """The teacher target's per-image shape, read from the task's predictor settings."""
    p = task_cfg.predictor
    if p.output_layout == "vector":
        return (1, p.out_dim)
    q = p.num_queries or num_image_tokens
    if p.output_layout == "grid":
        side = math.isqrt(q)
        if side * side != q:
            raise ConfigError(f"model.tasks: grid layout needs a square number of queries, got {q}")
        return (p.out_dim, side, side)
    return (q, p.out_dim)


class ProbeModel(nn.Module):
    """The frozen model + its probes, with the facade the training loop uses."""

    def __init__(self, base, probe_cfg: dict) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        base.eval()
        self.probe_cfg = probe_cfg
        self.cfg = copy.deepcopy(base.cfg)  # what teachers / the target cache are built from
        self.cfg.tasks = {name: _task_from_dict(t) for name, t in probe_cfg["tasks"].items()}
        self.layers = list(probe_cfg["layers"])
        size = SIZES[probe_cfg["kind"]] or {}
        d = base.llm.config.hidden_size
        self.probes = nn.ModuleDict({
            task: nn.ModuleDict({str(layer): ProbeResampler(d, tuple(t["shape"]), t["layout"], **size)
                                 for layer in self.layers})
            for task, t in probe_cfg["tasks"].items()})

    # -- what the loop reads ------------------------------------------------------------------
    tokenizer = property(lambda self: self.base.tokenizer)
    geometry = property(lambda self: self.base.geometry)
    image_spec = property(lambda self: self.base.image_spec)
    tokens_per_image = property(lambda self: self.base.tokens_per_image)
    llm = property(lambda self: self.base.llm)

    @property
    def max_length(self):
        return self.base.max_length

    @max_length.setter
    def max_length(self, value) -> None:
        self.base.max_length = value

    @property
    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        return {task: tuple(t["shape"]) for task, t in self.probe_cfg["tasks"].items()}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {**self.base.param_groups(), "probes": list(self.probes.parameters())}

    def gradient_checkpointing_enable(self) -> None:  # nothing to checkpoint: no gradient reaches the LLM
        pass

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # the probed model is never in training mode (dropout stays off)
        return self

    # -- forward ------------------------------------------------------------------------------
    def predict(self, input_ids, attention_mask, pixel_values) -> tuple[dict, object]:
        """{task: {layer: (N, *shape)}} for every image of the batch, and the batch's layout."""
        with torch.no_grad():
            states, layout = self.base.layer_states(input_ids, attention_mask, pixel_values, self.layers)
        sample = layout.image_sample
        key_mask = layout.attention_mask[sample]  # all real tokens of the image's sample
        preds = {task: {int(k): probe(states[int(k)][sample], key_mask) for k, probe in by_layer.items()}
                 for task, by_layer in self.probes.items()}
        return preds, layout

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, targets=None,
                target_mask=None, num_images=None, **_):
        from olavlm.model.vlm import OlaVLMOutput
        from olavlm.objectives.embedding import masked_smooth_l1

        preds, layout = self.predict(input_ids, attention_mask, pixel_values)
        if targets is None:
            return OlaVLMOutput(loss=None, predictions=preds, layout=layout)
        n = layout.num_images
        valid = (torch.ones(n, dtype=torch.bool, device=input_ids.device) if target_mask is None
                 else target_mask.bool())
        loss, metrics = None, {}
        for task, by_layer in preds.items():
            target = targets[task]
            if tuple(target.shape) != (n, *self.target_shapes[task]):
                raise ValueError(f"targets[{task!r}]: shape {tuple(target.shape)} != {(n, *self.target_shapes[task])}")
            for layer, pred in by_layer.items():
                sl1 = masked_smooth_l1(pred, target.to(pred.device), valid, beta=1.0)
                metrics[f"loss/{task}/layer{layer}/sl1"] = sl1.detach()
                loss = sl1 if loss is None else loss + sl1
        metrics["loss"] = loss.detach()
        return OlaVLMOutput(loss=loss, metrics=metrics, predictions=preds, layout=layout)

    # -- files --------------------------------------------------------------------------------
    def save_pretrained(self, path, **_) -> None:
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.probes.state_dict().items()},
                  str(folder / PROBES_FILE), metadata={"format": "pt"})
        (folder / PROBE_CONFIG).write_text(json.dumps(self.probe_cfg, indent=1) + "\n")


def _task_from_dict(t: dict):
    from olavlm.config import TaskConfig

    tc = TaskConfig(teacher=t["teacher"], teacher_path=t["teacher_path"], layers=[1],
                    teacher_kwargs=dict(t["teacher_kwargs"]))
    tc.predictor.output_layout = t["layout"]
    if t["layout"] == "grid":
        tc.predictor.out_dim, tc.predictor.num_queries = t["shape"][0], t["shape"][1] * t["shape"][2]
    else:
        tc.predictor.num_queries, tc.predictor.out_dim = t["shape"]
    return tc


def probe_tasks(cfg: RunConfig, num_image_tokens: int) -> dict[str, dict]:
    """The tasks of the recipe that name a teacher and have layers: what is probed, with which target."""
    tasks = {}
    for name, tc in cfg.model.tasks.items():
        if not tc.layers or not tc.teacher:
            continue
        kwargs = dict(tc.teacher_kwargs)
        if tc.teacher == "depth_anything" and cfg.train.probe_depth_target == "last_block":
            kwargs["blocks"] = [-1]
        tasks[name] = {"teacher": tc.teacher, "teacher_path": tc.teacher_path, "teacher_kwargs": kwargs,
                       "layout": tc.predictor.output_layout, "shape": list(probe_target_shape(tc, num_image_tokens))}
    if not tasks:
        raise ConfigError("model.tasks: the probe stage needs at least one task with a teacher and layers")
    return tasks


def build_probe_model(cfg: RunConfig):
    """(ProbeModel, init_dir) for the probe stage: the frozen ``train.init_from`` model + new probes."""
    from olavlm.config import explicit_fields
    from olavlm.model import io
    from olavlm.model.vlm import OlaVLM
    from olavlm.train.loop import resolve_init_from

    t = cfg.train
    if t.init_from is None:
        raise ConfigError("train.init_from: the probe stage probes a trained model; name its run or final folder")
    init_dir = resolve_init_from(t.init_from)
    runtime, _ = io.reconcile_init_from(io.read_config(init_dir)[0], cfg.model, explicit_fields(cfg), str(init_dir))
    base = OlaVLM.from_pretrained(init_dir, with_predictors=False, **runtime)
    n = base.llm.config.num_hidden_layers
    layers = sorted(set(t.probe_layers)) or list(range(1, n + 1))
    bad = [x for x in layers if not 1 <= x <= n]
    if bad:
        raise ConfigError(f"train.probe_layers: {bad} outside the LLM's 1..{n}")
    probe_cfg = {"base": str(Path(init_dir).resolve()), "kind": t.probe, "layers": layers,
                 "depth_target": t.probe_depth_target, "tasks": probe_tasks(cfg, base.num_image_tokens),
                 "runtime": runtime}
    return ProbeModel(base, probe_cfg), init_dir


def load_probe_model(folder: str | Path, *, device: str | torch.device | None = None) -> ProbeModel:
    """A finished probe stage's ``final/`` (probes + the base model it names), in eval mode."""
    from safetensors.torch import load_file

    from olavlm.errors import UserError
    from olavlm.model.vlm import OlaVLM

    folder = Path(folder)
    if (folder / "final" / PROBE_CONFIG).is_file():
        folder = folder / "final"
    if not (folder / PROBE_CONFIG).is_file():
        raise UserError(f"{folder}: no {PROBE_CONFIG} (not the output of a `train.stage: probe` run)")
    probe_cfg = json.loads((folder / PROBE_CONFIG).read_text())
    if not Path(probe_cfg["base"]).is_dir():
        raise UserError(f"{folder / PROBE_CONFIG}: the probed model {probe_cfg['base']} is not there any more")
    base = OlaVLM.from_pretrained(probe_cfg["base"], with_predictors=False, **probe_cfg.get("runtime", {}))
    model = ProbeModel(base, probe_cfg)
    model.probes.load_state_dict(load_file(str(folder / PROBES_FILE)))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(dev).eval()
