"""`olavlm visualize`: decode what the distilled layers of a PT model predict, next to the teachers.

One PNG per image: the input; per task the teacher's own decoded output and the decode of each
predictor layer's prediction, through the teacher's own decoder fed where the teacher's features
go:

* depth: Depth-Anything's DPT neck + head (the prediction replaces the backbone read-outs; each
  panel min-max normalised);
* gen: the unCLIP pipeline from ``image_embeds`` (diffusers, an optional extra: without it these
  panels are skipped with a message);
* seg: OneFormer's pixel decoder + transformer decoder (task "semantic"), the prediction in place
  of the last backbone stage and the real image's earlier stages, all resized to the token grid;
  shown as a semantic label map.

The decoders are loaded here, on request; training never loads them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)
PROMPT = "Describe the image in two lines."


def load_decoders(model_cfg, tasks: list[str], device) -> tuple[dict, dict[str, str]]:
    """({task: decoder}, {task: why skipped}) for the model's tasks."""
    from olavlm.teachers.depth_anything import DepthDecoder
    from olavlm.teachers.oneformer import SegDecoder
    from olavlm.teachers.unclip import UnCLIPDecoder

    decoders, skipped = {}, {}
    for task in tasks:
        tc = model_cfg.tasks[task]
        if tc.teacher == "depth_anything":
            decoders[task] = DepthDecoder.from_pretrained(tc.teacher_path)
            decoders[task].model.to(device)
        elif tc.teacher == "oneformer":
            decoders[task] = SegDecoder.from_pretrained(tc.teacher_path)
            decoders[task].model.to(device)
        elif tc.teacher == "unclip":
            try:
                decoders[task] = UnCLIPDecoder.from_pretrained(tc.teacher_path)
                decoders[task].pipe.to(device)
            except ImportError as e:
                skipped[task] = str(e)
        else:
            skipped[task] = f"no decoder for teacher {tc.teacher!r} (depth_anything, oneformer, unclip are decoded)"
    return decoders, skipped


def _normalise(depth: torch.Tensor) -> torch.Tensor:
    lo, hi = depth.amin(dim=(-2, -1), keepdim=True), depth.amax(dim=(-2, -1), keepdim=True)
    return (depth - lo) / (hi - lo).clamp_min(1e-8)


def panels_for(model, teachers, decoders: dict, image, processor, *, layers: list[int] | None = None) -> dict:
    """{task: {"teacher": panel, layer: panel, ...}} for one PIL image (panels: arrays or PIL images).
    Prompt, pixels and the teachers' square come from ``processor`` (the teachers' square at the
    side training gave them: the processor's, else the largest teacher input)."""
    proc = processor.with_overrides(teacher_image_size=processor.teacher_image_size or teachers.input_size)
    ids = torch.tensor([proc.prompt_ids([{"from": "human", "value": "<image>\n" + PROMPT}], num_images=1)])
    inputs = proc.images([image])
    pixels = inputs["pixel_values"]
    dev = model.device
    with torch.no_grad():
        out = model(input_ids=ids.to(dev), pixel_values=pixels.to(dev), mode="predict")
    grid = model.geometry.grid
    result = {}
    for task, dec in decoders.items():
        teacher = teachers[task]
        timg = inputs["images"].to(teacher.device)
        want = sorted(out.predictions[task]) if layers is None else [x for x in layers if x in out.predictions[task]]
        if hasattr(dec, "teacher_depth"):
            panels = {"teacher": _normalise(dec.teacher_depth(teacher.preprocess(timg)))[0].cpu()}
            for layer in want:
                panels[layer] = _normalise(dec.decode(out.predictions[task][layer], grid))[0].cpu()
        elif hasattr(dec, "teacher_segmentation"):
            px = teacher.preprocess(timg)
            panels = {"teacher": dec.teacher_segmentation(px)[0].cpu()}
            for layer in want:
                panels[layer] = dec.decode(out.predictions[task][layer], px)[0].cpu()
        else:
            panels = {"teacher": dec.decode(teacher.encode(timg))[0]}
            for layer in want:
                panels[layer] = dec.decode(out.predictions[task][layer])[0]
        result[task] = panels
    return result


def save_figure(image, panels: dict, path: Path, skipped: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(panels))
    cols = 1 + max((len(p) for p in panels.values()), default=0)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("input", fontsize=8)
    for r, (task, by_key) in enumerate(panels.items()):
        for c, (key, panel) in enumerate(by_key.items(), 1):
            ax = axes[r, c]
            if not torch.is_tensor(panel):  # an unCLIP image
                ax.imshow(panel)
            elif panel.is_floating_point():  # depth in [0, 1]
                ax.imshow(panel.numpy(), cmap="inferno")
            else:  # semantic labels
                ax.imshow(panel.numpy() % 20, cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
            ax.set_title(f"{task}: {'teacher' if key == 'teacher' else f'layer {key}'}", fontsize=8)
    if skipped:
        fig.text(0.01, 0.01, "; ".join(f"{t}: {why}" for t, why in skipped.items()), fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def visualize(model_dir: str | Path, images: list[str | Path], *, layers: list[int] | None = None,
              output: str | Path = "visualize", device: str | None = None, **overrides) -> dict:
    """Write ``OUTPUT/<image stem>.png`` per image; returns {image: {"panels", "skipped", "png"}}.
    ``overrides``: template / image_geometry / add_bos instead of the processor's."""
    from olavlm.errors import UserError
    from olavlm.evaluation.runner import load_eval_model
    from olavlm.teachers import build_teachers

    em = load_eval_model(model_dir, device=device, with_predictors=True, **overrides)
    model = em.model
    if not model.predictors:
        raise UserError(f"{model_dir}: no predictors (visualize needs a PT model saved with them)")
    tasks = list(model.predictors)
    teachers = build_teachers(model.cfg, grid=model.geometry.grid, device=em.device, dtype=torch.float32)
    decoders, skipped = load_decoders(model.cfg, tasks, em.device)
    for task, why in skipped.items():
        log.warning("visualize: %s panels skipped: %s", task, why)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for path in images:
        img = em.processor.load_image(path)
        panels = panels_for(model, teachers, decoders, img, em.processor, layers=layers)
        png = out / f"{Path(path).stem}.png"
        save_figure(img, panels, png, skipped)
        results[str(path)] = {"panels": panels, "skipped": skipped, "png": png}
    return results
