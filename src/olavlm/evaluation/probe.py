"""Layer probing (docs/method.md, "Probing"; a lighter probe): how well does each LLM layer encode a teacher's targets?

For every probed layer a small probe reads that layer's frozen hidden states (all tokens of the
sequence, padding masked) and is trained to regress the teacher's targets for the image with
smooth-L1; the score is the cosine similarity between the flattened prediction and the flattened
target on held-out images, averaged over images (the paper's probe metric). The probe is a
one-block Perceiver-Resampler (own learnable latents -> cross-attention over the layer's tokens ->
feed-forward -> linear to the target channels), one query per target token (tokens / grid
layouts) or a single query (vector layout).

Also reported, for honesty: the cosine of a constant prediction (the training-set mean target),
which a probe must beat before its number says anything about the layer, and the *centred*
cosine: prediction and target both minus the training-set mean target, i.e. how much of the
image-specific part of the target the layer carries (0 for the constant prediction). When the
targets share a large common component (ShapeWorld's sky and ground look alike in every image)
the raw cosine is close to 1 for any probe and the centred one is the informative number.

``train_probes`` works on given hidden states (no model needed); ``run_probe`` collects them from a
saved model with ``OlaVLM.layer_states`` and writes ``probe.json`` + ``probe.png``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class ProbeSpec:
    """Probe size and optimisation."""

    dim: int = 32  # probe internal width
    heads: int = 2
    steps: int = 300  # optimisation steps (all layers' probes train together)
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05  # AdamW weight decay of the probes
    heldout_fraction: float = 0.25  # images kept out of probe training and scored
    seed: int = 0
    bf16: bool = False  # autocast the probe forward in bf16 on CPU


class LayerwiseProbes(nn.Module):
    """One one-block resampler probe per layer, all evaluated in the same tensor ops (every
    parameter carries a leading layer axis): latents -> LayerNorm -> multi-head cross-attention over
    the layer's projected, LayerNormed tokens (padding masked) -> residual -> LayerNorm-GELU MLP ->
    residual -> linear to the target channels. Output ``(n_layers, N, n_queries, out_dim)``."""

    def __init__(self, n_layers: int, d_in: int, n_queries: int, out_dim: int, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"probe dim {dim} is not divisible by heads {heads}")
        self.heads, self.dim = heads, dim

        def w(*shape, fan_in):
            return nn.Parameter(torch.randn(n_layers, *shape) / math.sqrt(fan_in))

        def zeros(*shape):
            return nn.Parameter(torch.zeros(n_layers, 1, 1, *shape))

        self.latents = w(n_queries, dim, fan_in=dim)
        self.w_in, self.b_in = w(d_in, dim, fan_in=d_in), zeros(dim)
        self.w_q, self.w_k, self.w_v, self.w_o = (w(dim, dim, fan_in=dim) for _ in range(4))
        self.w_ff1, self.b_ff1 = w(dim, dim, fan_in=dim), zeros(dim)
        self.w_ff2, self.b_ff2 = w(dim, dim, fan_in=dim), zeros(dim)
        self.w_out, self.b_out = w(dim, out_dim, fan_in=dim), zeros(out_dim)

    @staticmethod
    def _mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight.unsqueeze(1)  # (Ly, N, T, a) @ (Ly, 1, a, b)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (n_layers, N, L, d_in); mask bool (N, L), True on real tokens."""
        ly, n, length, _ = x.shape
        h, d = self.heads, self.dim // self.heads
        kv = F.layer_norm(self._mm(x, self.w_in) + self.b_in, (self.dim,))
        q0 = self.latents.unsqueeze(1).expand(-1, n, -1, -1)
        qn = F.layer_norm(q0, (self.dim,))

        def heads(t: torch.Tensor) -> torch.Tensor:  # (Ly, N, T, D) -> (Ly*N, H, T, d)
            return t.reshape(ly * n, t.shape[2], h, d).transpose(1, 2)

        # plain softmax attention: for these tiny head sizes it is much faster on CPU than SDPA's kernels
        scores = heads(self._mm(qn, self.w_q)) @ heads(self._mm(kv, self.w_k)).transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(~mask.repeat(ly, 1)[:, None, None, :], float("-inf"))
        att = torch.softmax(scores.float(), dim=-1).to(kv.dtype) @ heads(self._mm(kv, self.w_v))
        att = att.transpose(1, 2).reshape(ly, n, -1, self.dim)
        q = q0 + self._mm(att, self.w_o)
        ff = self._mm(F.gelu(self._mm(F.layer_norm(q, (self.dim,)), self.w_ff1) + self.b_ff1), self.w_ff2)
        q = q + ff + self.b_ff2
        return self._mm(q, self.w_out) + self.b_out


def targets_as_tokens(targets: torch.Tensor, layout: str) -> torch.Tensor:
    """Teacher targets (N, *shape) -> (N, Q, C) token form (grid (C,h,w) -> (h*w, C), row-major)."""
    if layout == "tokens" or layout == "vector":
        return targets
    if layout == "grid":
        return targets.flatten(2).transpose(1, 2)
    raise ValueError(f"unknown target layout {layout!r}")


def cosine_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image's flattened prediction and target: (N,)."""
    return F.cosine_similarity(pred.flatten(1).float(), target.flatten(1).float(), dim=1, eps=1e-8)


def split_indices(n: int, heldout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n < 4:
        raise ValueError(f"probing needs at least 4 images, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = min(n - 2, max(2, int(round(n * heldout_fraction))))
    return perm[n_test:], perm[:n_test]


def train_probes(states: dict[int, torch.Tensor], mask: torch.Tensor, targets: torch.Tensor, layout: str,
                 spec: ProbeSpec | None = None, progress=None) -> dict:
    """Train one probe per layer on frozen ``states`` {layer: (N, L, d)} to predict ``targets``.

    Returns ``{"layers": {layer: {"cosine", "cosine_std", "train_loss"}}, "constant_cosine",
    "n_train", "n_test", "spec"}`` with cosines on the held-out images.
    """
    spec = spec or ProbeSpec()
    if not states:
        raise ValueError("train_probes: no layers given")
    tok = targets_as_tokens(targets.float(), layout)  # (N, Q, C)
    n, q, c = tok.shape
    for layer, s in states.items():
        if s.shape[:2] != mask.shape or s.shape[0] != n:
            raise ValueError(f"train_probes: layer {layer} states {tuple(s.shape)} do not match mask "
                             f"{tuple(mask.shape)} / {n} targets")
    train_idx, test_idx = split_indices(n, spec.heldout_fraction, spec.seed)
    # the probe regresses standardised targets (train-set mean / std per element), so it spends its
    # capacity on what differs between images; predictions are mapped back before scoring
    mu = tok[train_idx].mean(0, keepdim=True)
    sd = tok[train_idx].std(0, keepdim=True).clamp_min(1e-6) if len(train_idx) > 1 else torch.ones_like(mu)
    z = (tok - mu) / sd
    torch.manual_seed(spec.seed)
    layers = sorted(states)
    widths = {states[lay].shape[-1] for lay in layers}
    if len(widths) != 1:
        raise ValueError(f"train_probes: layers have different widths {sorted(widths)}")
    x_all = torch.stack([states[lay].float() for lay in layers])  # (Ly, N, L, d)
    probes = LayerwiseProbes(len(layers), widths.pop(), q, c, spec.dim, spec.heads)
    opt = torch.optim.AdamW(probes.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    warm = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, spec.steps)))))
    gen = torch.Generator().manual_seed(spec.seed + 1)
    last = {lay: [] for lay in layers}
    probes.train()
    for step in range(spec.steps):
        pick = train_idx[torch.randint(len(train_idx), (min(spec.batch_size, len(train_idx)),), generator=gen)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16):
            pred = probes(x_all[:, pick], mask[pick])
        per_layer = F.smooth_l1_loss(pred.float(), z[pick].unsqueeze(0).expand_as(pred), reduction="none")
        per_layer = per_layer.flatten(1).mean(1)  # (Ly,): each probe's own loss
        if step >= spec.steps - 10:
            for lay, v in zip(layers, per_layer.detach().tolist()):
                last[lay].append(v)
        per_layer.sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress:
            progress(1)
    probes.eval()
    out = {}
    with torch.no_grad():
        mean_target = mu
        preds = probes(x_all[:, test_idx], mask[test_idx]) * sd + mu
        for i, lay in enumerate(layers):
            pred = preds[i]
            cos = cosine_per_image(pred, tok[test_idx])
            centred = cosine_per_image(pred - mean_target, tok[test_idx] - mean_target)
            out[lay] = {"cosine": float(cos.mean()), "cosine_std": float(cos.std()) if len(cos) > 1 else 0.0,
                        "centred_cosine": float(centred.mean()),
                        "train_loss": sum(last[lay]) / max(1, len(last[lay]))}
        constant = float(cosine_per_image(mean_target.expand(len(test_idx), -1, -1), tok[test_idx]).mean())
    return {"layers": out, "constant_cosine": constant, "n_train": len(train_idx), "n_test": len(test_idx),
            "spec": asdict(spec)}


def plot_probe(results: dict[str, dict], path, title: str = "probe cosine per layer") -> None:
    """``results``: {series name: train_probes() result}; raw cosine (solid), centred cosine (dotted),
    constant-prediction cosine (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for i, (name, res) in enumerate(results.items()):
        layers = sorted(int(k) for k in res["layers"])
        ys = [res["layers"][k if k in res["layers"] else str(k)]["cosine"] for k in layers]
        line, = ax.plot(layers, ys, marker="o", label=f"{name} cosine")
        cs = [res["layers"][k if k in res["layers"] else str(k)]["centred_cosine"] for k in layers]
        ax.plot(layers, cs, marker="s", ls=":", color=line.get_color(), label=f"{name} centred cosine")
        ax.axhline(res["constant_cosine"], color=line.get_color(), ls="--", lw=0.8, alpha=0.7)
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("held-out cosine")
    ax.set_title(title + " (dashed: mean-target baseline)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_layers(text: str | list[int] | None, n_layers: int) -> list[int]:
    """``"all"`` / None -> 1..n; ``"1,3"`` or [1, 3] -> those (1-based, checked)."""
    if text is None or text == "all":
        return list(range(1, n_layers + 1))
    layers = [int(x) for x in text.split(",")] if isinstance(text, str) else [int(x) for x in text]
    bad = [x for x in layers if not 1 <= x <= n_layers]
    if bad or not layers:
        raise ValueError(f"--layers: {bad or text} outside the LLM's 1..{n_layers}")
    return sorted(set(layers))


def resolve_teacher(model_cfg, name: str, teacher_path: str | None, teacher_kwargs: dict | None):
    """(registry name, path, kwargs) for ``name`` = a task of the model's config or a teacher name.

    A task name (``depth``) or a teacher used by one of the model's tasks takes that task's path and
    kwargs unless overridden; any other registered teacher needs ``teacher_path``.
    """
    tasks = model_cfg.tasks
    task = tasks.get(name) or next((t for t in tasks.values() if t.teacher == name), None)
    if task is not None:
        return (task.teacher, teacher_path or task.teacher_path,
                dict(task.teacher_kwargs) if teacher_kwargs is None else teacher_kwargs)
    if teacher_path is None:
        raise ValueError(f"--teacher {name!r} is neither a task of the model nor a teacher it uses; "
                         "pass --teacher-path")
    return name, teacher_path, teacher_kwargs or {}


def collect_states(em, records: list[dict], root: Path, layers: list[int], teachers: dict, batch_size: int = 16,
                   progress: bool = True, teacher_image_size: int | None = None):
    """Frozen hidden states {layer: (N, L, d)}, key mask (N, L) and {name: targets (N, *shape)}
    for each of ``teachers`` ({name: Teacher}), from one pass over ``records``.

    Ids, pixels and the teachers' images all come from the model's processor (``em.processor``), so
    the teachers get exactly what training and ``olavlm targets precompute`` give them for the same
    image: the geometry's square cut from the original image at max(tower side, S), resized to S,
    with S = ``teacher_image_size``, else the processor's, else the largest input of ``teachers``;
    each teacher then resizes S to its own input."""
    from tqdm.auto import tqdm

    from olavlm.evaluation.runner import batches, pad_right

    side = (teacher_image_size or em.processor.teacher_image_size
            or max((t.input_size for t in teachers.values()), default=em.model.image_spec.size))
    proc = em.processor.with_overrides(teacher_image_size=side)
    chunks, masks, targets = {lay: [] for lay in layers}, [], {name: [] for name in teachers}
    bar = tqdm(total=len(records), desc="probe: hidden states", disable=not progress, dynamic_ncols=True)
    for chunk in batches(records, batch_size):
        seqs = [proc.encode(r["conversations"], num_images=1).input_ids for r in chunk]
        ids, mask = pad_right(seqs, em.tokenizer.pad_token_id)
        inputs = proc.images([proc.load_image(root / r["image"]) for r in chunk], teacher=bool(teachers))
        with torch.no_grad():
            states, layout = em.model.layer_states(ids.to(em.device), mask.to(em.device),
                                                   inputs["pixel_values"].to(em.device), layers)
            for name, teacher in teachers.items():
                images = inputs["images"].to(teacher.device)
                targets[name].append(teacher.encode(images, [r["image"] for r in chunk]).float().cpu())
        for lay in layers:
            chunks[lay].append(states[lay].float().cpu())
        masks.append(layout.attention_mask.bool().cpu())
        bar.update(len(chunk))
    bar.close()
    width = max(m.shape[1] for m in masks)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, 0, 0, width - t.shape[1])) if t.ndim == 3 else F.pad(t, (0, width - t.shape[1]))

    states = {lay: torch.cat([pad(t) for t in chunks[lay]]) for lay in layers}
    return states, torch.cat([pad(m) for m in masks]), {name: torch.cat(t) for name, t in targets.items()}


def training_teacher_side(model_cfg, grid: int) -> int | None:
    """The square side training gave the model's teachers (largest input of the tasks with
    predictor layers, read weight-free), or None when unknown (no such task, unreadable teacher)."""
    from olavlm.teachers.specs import SpecError, teacher_side

    try:
        return teacher_side(model_cfg, grid)
    except SpecError as e:
        log.warning("probe: cannot size the training teachers' square (%s); using the probed teacher's input", e)
        return None


def run_probe(model_dir, data, teacher: str, *, teacher_path: str | None = None, teacher_kwargs: dict | None = None,
              layers="all", image_root=None, output=None, spec: ProbeSpec | None = None, limit: int | None = None,
              device: str | None = None, progress: bool = True, label: str | None = None,
              teacher_image_size: int | None = None, **overrides) -> dict:
    """Probe every requested LLM layer of a trained model for ``teacher``'s targets.

    ``data``: LLaVA-format JSON/JSONL with images (e.g. ShapeWorld's probe.json); image paths are
    relative to ``image_root`` (default: the data file's folder). Writes ``probe.json`` and
    ``probe.png`` into ``output`` when given. ``teacher_image_size``: side of the square the teacher
    reads; default = what training used (the processor's teacher side, else the largest input of the
    model's teachers) or the probed teacher's input when that is larger.
    """
    import json
    from pathlib import Path

    from olavlm.evaluation.runner import load_eval_model
    from olavlm.teachers.base import build_teacher

    spec = spec or ProbeSpec()
    path = Path(data)
    text = path.read_text()
    records = [json.loads(x) for x in text.splitlines() if x.strip()] if path.suffix == ".jsonl" else json.loads(text)
    with_image = [r for r in records if isinstance(r.get("image"), str)]
    skipped = len(records) - len(with_image)
    records = with_image[:limit] if limit else with_image
    root = Path(image_root) if image_root is not None else path.parent
    em = load_eval_model(model_dir, device=device, **overrides)  # template / image_geometry / add_bos
    n_layers = em.model.llm.config.num_hidden_layers
    layer_list = parse_layers(layers, n_layers)
    name, tpath, kwargs = resolve_teacher(em.model.cfg, teacher, teacher_path, teacher_kwargs)
    t = build_teacher(name, tpath, grid=em.model.geometry.grid, **kwargs).to(em.device).eval()
    trained = em.processor.teacher_image_size or training_teacher_side(em.model.cfg, em.model.geometry.grid)
    side = teacher_image_size or max(trained or 0, t.input_size)
    states, mask, targets = collect_states(em, records, root, layer_list, {name: t}, progress=progress,
                                           teacher_image_size=side)
    log.info("probe: %d images x %d layers, targets %s; training probes for %d steps", len(records),
             len(layer_list), tuple(targets[name].shape[1:]), spec.steps)
    result = train_probes(states, mask, targets[name], t.layout, spec)
    result.update({"model": str(model_dir), "data": str(data), "teacher": name, "teacher_path": str(tpath),
                   "teacher_kwargs": kwargs, "teacher_image_size": side, "skipped_text_only": skipped,
                   "n_images": len(records)})
    result["layers"] = {str(k): v for k, v in result["layers"].items()}
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe.json").write_text(json.dumps(result, indent=1) + "\n")
        plot_probe({label or name: result}, out / "probe.png", title=f"probe: {name}")
    return result
