"""Segmentation teacher: the Swin backbone of OneFormer (docs/method.md, "Teachers and targets").

Target = the backbone's last stage (after its per-stage LayerNorm; 1536 channels, stride 32 for
Swin-L), bilinearly resized to the image-token grid: (C, grid, grid) in the "grid" layout, e.g.
(1536, 24, 24). The input side defaults to grid x backbone stride (768 px for grid 24 and Swin-L,
the reference's size), where the resize is the identity. Only the backbone (OneFormer's
``pixel_level_module.encoder``) is kept; pixel decoder, transformer decoder and task encoder are
dropped after loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from olavlm.teachers.base import IMAGENET_MEAN, IMAGENET_STD, Teacher, prepare_pixels, processor_dict, register_teacher

DEFAULT_SOURCE = "shi-labs/oneformer_coco_swin_large"


def backbone_stride(backbone) -> int | None:
    """Output stride of a hierarchical (Swin-like) backbone's last returned stage, or None if unknown."""
    cfg = backbone.config
    patch, depths = getattr(cfg, "patch_size", None), getattr(cfg, "depths", None)
    if not isinstance(patch, int) or not depths:
        return None
    stage = backbone.out_features[-1]  # "stageK", K 1-based; every stage after the first halves the map
    k = backbone.stage_names.index(stage)
    return patch * 2 ** (k - 1)


@register_teacher("oneformer")
class OneFormerTeacher(Teacher):
    layout = "grid"

    def __init__(self, backbone, *, grid: int, image_size: int | None, mean, std, source: str = "") -> None:
        super().__init__(source)
        self.backbone = backbone  # e.g. SwinBackbone
        self.grid = grid  # side of the target grid
        self.channels = int(backbone.channels[-1])
        stride = backbone_stride(backbone)
        if image_size is None:
            if stride is None:
                raise ValueError(f"oneformer: cannot infer the stride of a {type(backbone).__name__}; "
                                 "pass teacher_kwargs.image_size")
            image_size = grid * stride
        self.image_size = int(image_size)  # input side in px
        self.mean, self.std = tuple(mean), tuple(std)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_SOURCE, *, grid: int, image_size: int | None = None,
                        dtype: torch.dtype | str | None = None, mean=None, std=None,
                        **hub_kwargs) -> "OneFormerTeacher":
        """``path``: hub id or folder of a OneFormer checkpoint (``OneFormerForUniversalSegmentation``
        or ``OneFormerModel``). ``image_size`` defaults to grid x backbone stride (768 for Swin-L)."""
        from transformers import OneFormerModel

        model = OneFormerModel.from_pretrained(path, dtype=dtype, **hub_kwargs)
        backbone = model.pixel_level_module.encoder
        del model
        proc = processor_dict(path, **hub_kwargs)
        # OneFormer processors store mean/std on the 0..255 scale
        mean = mean if mean is not None else _unit_scale(proc.get("image_mean"), IMAGENET_MEAN)
        std = std if std is not None else _unit_scale(proc.get("image_std"), IMAGENET_STD)
        return cls(backbone, grid=grid, image_size=image_size, mean=mean, std=std, source=str(path))

    @property
    def input_size(self) -> int:
        return self.image_size

    @property
    def target_shape(self) -> tuple[int, ...]:
        return (self.channels, self.grid, self.grid)

    def preprocessing(self) -> dict:
        return {"resize": self.image_size, "resample": "bilinear-antialias", "mean": list(self.mean),
                "std": list(self.std), "channels": "RGB", "stage": self.backbone.out_features[-1],
                "to_grid": "bilinear"}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_pixels(images, size=self.image_size, mean=self.mean, std=self.std,
                              device=self.device, dtype=self.dtype, mode="bilinear")

    def forward_features(self, inputs: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        feat = self.backbone(inputs).feature_maps[-1]
        if feat.shape[-2:] != (self.grid, self.grid):
            feat = F.interpolate(feat.float(), size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return feat


def _unit_scale(values, default):
    """Processor mean/std given on the 0..255 scale (OneFormer) -> 0..1; None -> default."""
    if values is None:
        return default
    values = [float(v) for v in values]
    return tuple(v / 255.0 for v in values) if max(values) > 1.0 else tuple(values)


class SegDecoder:
    """OneFormer's pixel decoder + transformer decoder, loaded on request (visualisation only).

    :meth:`decode` puts a predicted last-stage map (N, C, g, g) where the backbone's last stage
    goes; the earlier stages come from the real image, and all stages are bilinearly resized to
    the g x g grid before the pixel decoder. :meth:`teacher_segmentation` is the unchanged model.
    Both return a semantic label map (N, H, W) at the pixels' size (class probabilities of the
    queries times their sigmoid masks, argmax over classes).
    """

    def __init__(self, model, task_inputs: torch.Tensor) -> None:
        self.model = model.eval().requires_grad_(False)  # OneFormerModel
        self.task_inputs = task_inputs  # (1, task_seq_len) token ids of "the task is <task>"

    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_SOURCE, *, task: str = "semantic", dtype=None,
                        **hub_kwargs) -> "SegDecoder":
        import logging

        from transformers import CLIPTokenizer, OneFormerForUniversalSegmentation

        full = OneFormerForUniversalSegmentation.from_pretrained(path, dtype=dtype, **hub_kwargs)
        model = full.model  # the class head and mask embedder live in model.transformer_module
        del full
        length = int(model.config.task_seq_len)
        try:
            tok = CLIPTokenizer.from_pretrained(path, **hub_kwargs)  # what OneFormerProcessor uses
            if tok.vocab_size < 256:  # transformers builds an empty tokenizer when the files are missing
                raise ValueError("no tokenizer files")
            ids = tok(f"the task is {task}", padding="max_length", max_length=length, truncation=True).input_ids
        except (OSError, ValueError, TypeError):  # a checkpoint without its tokenizer (the tiny test teacher)
            logging.getLogger(__name__).warning("oneformer decoder: no tokenizer in %s; task text left empty", path)
            ids = [0] * length
        return cls(model, torch.tensor([ids]))

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model.pixel_level_module.encoder(pixels).feature_maps)

    @torch.no_grad()
    def decode_features(self, features: list[torch.Tensor], size: tuple[int, int], *, scores: bool = False) -> torch.Tensor:
        m = self.model
        dec = m.pixel_level_module.decoder(features)
        task = m.task_encoder(self.task_inputs.to(features[0].device).expand(features[0].shape[0], -1).to(m.dtype))
        out = m.transformer_module(multi_scale_features=dec.multi_scale_features, mask_features=dec.mask_features,
                                   task_token=task)
        classes = out.prediction_class.float().softmax(-1)[..., :-1]  # the last class is "no object"
        masks = F.interpolate(out.prediction_masks.float(), size=size, mode="bilinear", align_corners=False).sigmoid()
        per_class = torch.einsum("nqc,nqhw->nchw", classes, masks)
        return per_class if scores else per_class.argmax(1)

    @torch.no_grad()
    def teacher_segmentation(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.decode_features(self.features(pixels), tuple(pixels.shape[-2:]))

    @torch.no_grad()
    def decode(self, pred: torch.Tensor, pixels: torch.Tensor, *, scores: bool = False) -> torch.Tensor:
        grid = pred.shape[-2:]
        real = [F.interpolate(f.float(), size=grid, mode="bilinear", align_corners=False) for f in self.features(pixels)]
        feats = [f.to(pred.dtype) for f in real[:-1]] + [pred.to(real[-1].dtype)]
        return self.decode_features(feats, tuple(pixels.shape[-2:]), scores=scores)
