"""`olavlm probe eval`: held-out cosine per layer of a probe stage's probes, streamed.

The held-out set is read twice through the training data pipeline (same tokenisation, image
geometry and teacher input as the probe stage): the first pass only runs the teachers and sums
the targets (for the mean target), the second runs the frozen model + probes and sums, per
(task, layer), the cosine of each image's flattened prediction and target, its square (for the
spread), and the *centred* cosine (prediction and target minus the held-out mean target). The
cosine of the mean target itself (a constant prediction) is the baseline a probe must beat.
Only these sums are kept: memory does not depend on the number of images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F


class CosineSums:
    """Running sums of one (task, layer): images, cosine, cosine², centred cosine."""

    def __init__(self) -> None:
        self.n, self.cos, self.cos2, self.centred = 0, 0.0, 0.0, 0.0

    def add(self, pred: torch.Tensor, target: torch.Tensor, mean: torch.Tensor) -> None:
        p, t, m = pred.flatten(1).double(), target.flatten(1).double(), mean.flatten().double()[None]
        cos = F.cosine_similarity(p, t, dim=1, eps=1e-8)
        self.n += int(cos.numel())
        self.cos += float(cos.sum())
        self.cos2 += float((cos * cos).sum())
        self.centred += float(F.cosine_similarity(p - m, t - m, dim=1, eps=1e-8).sum())

    def result(self) -> dict:
        n = max(self.n, 1)
        mean = self.cos / n
        var = max(0.0, (self.cos2 - n * mean * mean) / (n - 1)) if self.n > 1 else 0.0
        return {"cosine": mean, "cosine_std": math.sqrt(var), "centred_cosine": self.centred / n, "n": self.n}


def _run_config(folder: Path, data: str, image_folder: str | None):
    """The probe run's config with the held-out file as its data (RUN_DIR/config.yaml)."""
    from olavlm.config import load_config
    from olavlm.errors import UserError
    from olavlm.infer.chat import read_run_info

    info = read_run_info(folder)
    run_cfg = Path(info.get("run_dir") or folder.parent) / "config.yaml"
    if not run_cfg.is_file():
        raise UserError(f"{folder}: the probe run's config.yaml ({run_cfg}) is missing")
    root = image_folder if image_folder is not None else str(Path(data).parent)
    return load_config(run_cfg, [f"--data.train_file={data}", f"--data.image_folder={root}",
                                 "--data.target_cache=null", "--data.num_workers=0"])


def evaluate(folder: str | Path, data: str, *, image_folder: str | None = None, batch_size: int = 8,
             limit: int | None = None, device: str | None = None, progress: bool = True) -> dict:
    """{task: {"layers": {layer: {...}}, "constant_cosine", "n_images", "teacher"}} for one probe run."""
    from olavlm.data.collate import Collator
    from olavlm.data.dataset import LlavaDataset
    from olavlm.evaluation.probe_stage import load_probe_model
    from olavlm.teachers import build_teachers
    from olavlm.teachers.targets import TargetSource

    model = load_probe_model(folder, device=device)
    folder = Path(folder) / "final" if (Path(folder) / "final").is_dir() else Path(folder)
    cfg = _run_config(folder, data, image_folder)
    dev = model.base.device
    teachers = build_teachers(model.cfg, grid=model.geometry.grid, device=dev, dtype=torch.float32,
                              expected=model.target_shapes)
    side = cfg.data.teacher_image_size or teachers.input_size
    dataset = LlavaDataset(cfg.data, model.tokenizer, image_spec=model.image_spec,
                           tokens_per_image=model.tokens_per_image, teacher_image_size=side, seed=cfg.train.seed)
    indices = list(range(len(dataset)))[:limit] if limit else list(range(len(dataset)))
    collator = Collator(model.tokenizer.pad_token_id)

    def loader():
        subset = torch.utils.data.Subset(dataset, indices)
        return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collator)

    return stream_scores(model, TargetSource.live(teachers, teacher_image_size=side), loader, dev,
                         progress=progress, where=str(data))


def stream_scores(model, targets, make_loader, device, *, progress: bool = True, where: str = "data",
                  on_batch=None) -> dict:
    """The two streamed passes over ``make_loader()``; ``targets``: the TargetSource of the batches
    (olavlm.teachers.targets); ``on_batch()`` is called after every batch."""
    from tqdm.auto import tqdm

    from olavlm.errors import UserError
    from olavlm.train.loop import model_inputs

    tasks = list(model.target_shapes)
    sums = {t: torch.zeros(model.target_shapes[t], dtype=torch.float64) for t in tasks}
    count = 0
    with torch.no_grad():
        for batch in tqdm(make_loader(), desc="probe eval: mean target", disable=not progress):
            found = model_inputs(batch, device, targets).get("targets") or {}
            for t in tasks:
                if t in found:
                    sums[t] += found[t].double().sum(0).cpu()
            count += int(batch["num_images"].sum())
            if on_batch:
                on_batch()
        if count == 0:
            raise UserError(f"{where}: no usable image record to evaluate the probes on")
        means = {t: (sums[t] / count).float() for t in tasks}
        acc = {t: {layer: CosineSums() for layer in model.layers} for t in tasks}
        const = {t: CosineSums() for t in tasks}
        for batch in tqdm(make_loader(), desc="probe eval: probes", disable=not progress):
            inputs = model_inputs(batch, device, targets)
            preds, _ = model.predict(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
            for t in tasks:
                target = inputs["targets"][t].cpu()
                for layer, pred in preds[t].items():
                    acc[t][layer].add(pred.cpu(), target, means[t])
                const[t].add(means[t][None].expand_as(target), target, means[t])
            if on_batch:
                on_batch()
    return {t: {"teacher": model.cfg.tasks[t].teacher, "n_images": count,
                "constant_cosine": const[t].result()["cosine"],
                "layers": {str(layer): acc[t][layer].result() for layer in model.layers}} for t in tasks}


def run_probe_eval(folders: list[str], data: str, *, output: str | Path = "probe_eval", names: list[str] | None = None,
                   image_folder: str | None = None, batch_size: int = 8, limit: int | None = None,
                   device: str | None = None, progress: bool = True) -> dict:
    """Evaluate several probe runs on one held-out set; ``probe_eval.json`` + one PNG per task."""
    from olavlm.errors import UserError
    from olavlm.evaluation.probe import plot_probe
    from olavlm.evaluation.table import model_name

    names = names or [model_name(f) for f in folders]
    if len(names) != len(folders) or len(set(names)) != len(names):
        raise UserError(f"--names: need {len(folders)} distinct names, got {names}")
    results = {name: evaluate(f, data, image_folder=image_folder, batch_size=batch_size, limit=limit,
                              device=device, progress=progress) for f, name in zip(folders, names)}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_eval.json").write_text(json.dumps({"data": str(data), "models": results}, indent=1) + "\n")
    tasks = sorted({t for r in results.values() for t in r})
    for t in tasks:
        series = {name: r[t] for name, r in results.items() if t in r}
        plot_probe(series, out / f"probe_{t}.png", title=f"probe: {t}")
    return results
