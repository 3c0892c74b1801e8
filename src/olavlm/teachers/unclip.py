"""Generation teacher: the CLIP image encoder of Stable-Diffusion-2.1-unCLIP (docs/method.md, "Teachers and targets").

Target = ``CLIPVisionModelWithProjection(...).image_embeds`` -> (1, C) in the "vector" layout,
(1, 1024) for the unCLIP ViT-H/14 encoder. Preprocessing follows the pipeline's
``feature_extractor`` (CLIPImageProcessor: resize the shortest side to 224, centre crop 224,
CLIP mean/std), done batched on tensors. The repository layout (``image_encoder/`` +
``feature_extractor/`` subfolders) is configurable so a local folder with the same layout works.
"""

from __future__ import annotations

import torch

from olavlm.teachers.base import Teacher, _side, prepare_pixels, processor_dict, register_teacher

DEFAULT_SOURCE = "stabilityai/stable-diffusion-2-1-unclip"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL resample codes reproduced with antialiased interpolate


@register_teacher("unclip")
class UnCLIPTeacher(Teacher):
    layout = "vector"

    def __init__(self, encoder, *, resize: int, crop: int, mean, std, resample: str = "bicubic",
                 source: str = "") -> None:
        super().__init__(source)
        self.encoder = encoder  # CLIPVisionModelWithProjection
        self.resize = int(resize)  # side after resizing the (square) image
        self.crop = int(crop)  # centre crop side = encoder input side
        self.resample = resample
        self.mean, self.std = tuple(mean), tuple(std)
        self.embed_dim = int(encoder.config.projection_dim)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_SOURCE, *, grid: int | None = None,
                        subfolder: str | None = "image_encoder",
                        processor_subfolder: str | None = "feature_extractor",
                        dtype: torch.dtype | str | None = None, **hub_kwargs) -> "UnCLIPTeacher":
        """``path``: hub id or folder; ``subfolder``/``processor_subfolder`` locate the encoder
        weights and its CLIPImageProcessor config (None = the folder itself). ``grid`` is unused
        (the target is one vector per image)."""
        from transformers import CLIPVisionModelWithProjection

        kwargs = dict(hub_kwargs)
        if subfolder:
            kwargs["subfolder"] = subfolder
        encoder = CLIPVisionModelWithProjection.from_pretrained(path, dtype=dtype, **kwargs)
        proc = processor_dict(path, processor_subfolder, **hub_kwargs)
        size = int(encoder.config.image_size)
        resize = _side(proc.get("size"), "shortest_edge") or size
        crop = _side(proc.get("crop_size"), "height") or resize
        resample = proc.get("resample", 3)
        if resample not in _RESAMPLE:
            raise ValueError(f"unclip: processor resample {resample!r} is not one of {sorted(_RESAMPLE)}")
        if crop != size:
            raise ValueError(f"unclip: processor crop {crop} != encoder image_size {size} in {path}")
        return cls(encoder, resize=resize, crop=crop, mean=proc.get("image_mean", CLIP_MEAN),
                   std=proc.get("image_std", CLIP_STD), resample=_RESAMPLE[resample], source=str(path))

    @property
    def input_size(self) -> int:
        return self.resize

    @property
    def target_shape(self) -> tuple[int, ...]:
        return (1, self.embed_dim)

    def preprocessing(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "resample": f"{self.resample}-antialias",
                "mean": list(self.mean), "std": list(self.std), "channels": "RGB", "output": "image_embeds"}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_pixels(images, size=self.resize, crop=self.crop, mean=self.mean, std=self.std,
                              device=self.device, dtype=self.dtype, mode=self.resample)

    def forward_features(self, inputs: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        return self.encoder(pixel_values=inputs).image_embeds.unsqueeze(1)


class UnCLIPDecoder:
    """The unCLIP pipeline (diffusers), loaded on request: an image variation from ``image_embeds``.

    diffusers is an optional extra; :meth:`from_pretrained` raises ``ImportError`` with a one-line
    message when it is missing."""

    MISSING = ("generation decoding needs diffusers (pip install diffusers); the unCLIP panels are "
               "skipped without it")

    def __init__(self, pipe, steps: int = 25) -> None:
        self.pipe, self.steps = pipe, steps

    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_SOURCE, *, dtype=None, steps: int = 25, **hub_kwargs) -> "UnCLIPDecoder":
        try:
            from diffusers import DPMSolverMultistepScheduler, StableUnCLIPImg2ImgPipeline
        except ImportError:
            raise ImportError(cls.MISSING) from None
        pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(path, torch_dtype=dtype, **hub_kwargs)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        return cls(pipe, steps)

    @torch.no_grad()
    def decode(self, image_embeds: torch.Tensor, seed: int = 0):
        """(N, 1, C) or (N, C) embeddings -> list of PIL images."""
        emb = image_embeds.reshape(image_embeds.shape[0], -1)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return self.pipe(image_embeds=emb.to(self.pipe.device, self.pipe.dtype), num_inference_steps=self.steps,
                         generator=gen).images
