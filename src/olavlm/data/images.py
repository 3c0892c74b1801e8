"""Image decoding and the one square geometry shared by the vision tower and the teachers.

Pipeline of one image (docs/method.md, "Teachers see the tower's square")::

    load_image(path)                           -> RGB PIL image (decoded by content, any mode)
    to_square(img, geometry, spec, side)       -> the square PIL image (pad | square | resize)
    pixel_values(to_square(img, g, spec), spec) -> float (3, H, W), the vision tower's input (exactly
                                                   what the tower's HF processor gives)
    teacher_image(img, square, g, spec, S)     -> uint8 (3, S, S), the teachers' input: the same square
                                                   made at side max(spec.size, S), resized to S

Both come from the same geometry on the same image, so the teacher's grid covers the region the
image tokens cover: identical for ``pad`` and ``resize``, within the rounding of one
resized pixel for ``square``. Geometries:

* ``pad``    - expand to a square with the encoder's mean colour ``int(255 * mean)`` per channel
               (LLaVA ``expand2square``; CLIP gives (122, 116, 104)), image centred, then resize.
* ``square`` - resize the shortest side to ``side`` and centre-crop, exactly like
               ``CLIPImageProcessor`` (``shortest_edge`` resize + ``center_crop``).
* ``resize`` - squash the whole image to ``side`` x ``side`` (aspect ratio not kept).

Decoding policy of :func:`load_image`: the format comes from the file content (a GIF or PNG named
``.jpg`` decodes fine), animated images give their first frame, palette/greyscale/CMYK become RGB,
16-bit and 32-bit integer images are scaled to 8 bit, transparent pixels are composited onto
white, EXIF orientation is NOT applied (as in the reference and the HF processors). Problems raise
:class:`~olavlm.data.errors.BadSample` with reason ``missing_image`` or ``unreadable_image``.

Size guard (:class:`ImageLimits`, the ``data.max_image_*`` fields): from the file HEADER, before
any pixel is decoded or any canvas allocated, an image is refused with reason ``bad_image_size``
when its long/short side ratio exceeds ``max_aspect`` or when the largest image the geometry builds
on the way to the square (the ``pad`` canvas max(w, h)^2, the ``square`` resize side x side*long/short)
exceeds ``max_geometry_pixels``; more than ``max_pixels`` decoded pixels is ``unreadable_image``
(decompression bomb). :func:`to_square` applies the same check, so no caller can hand it an
unguarded image (a 200000 x 1 PNG of 2 KB would otherwise become a 40-gigapixel pad canvas).
"""

from __future__ import annotations

import hashlib
import io
import os
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from olavlm.config import ImageGeometry
from olavlm.data.errors import BadSample
from olavlm.geometry import ImageSpec  # noqa: F401  (re-exported: the tower's input spec)

GEOMETRIES = typing.get_args(ImageGeometry)  # ("pad", "square", "resize")
MAX_IMAGE_PIXELS = 89_478_485  # decompression-bomb guard: larger images are rejected (PIL's default limit)
MAX_ASPECT = 20.0  # long side / short side; beyond this an image is a strip, not a picture
MAX_GEOMETRY_PIXELS = 8192 * 8192  # largest intermediate image of a geometry (a pad canvas of 8192^2 = 192 MiB RGB)
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class ImageLimits:
    """The size guard (module docstring); ``from_config`` reads the ``data.max_image_*`` fields."""

    max_pixels: int = MAX_IMAGE_PIXELS  # decoded width x height (decompression bomb)
    max_aspect: float = MAX_ASPECT  # long side / short side
    max_geometry_pixels: int = MAX_GEOMETRY_PIXELS  # largest image the geometry builds (pad canvas, square resize)

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_aspect", "max_geometry_pixels"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, data_cfg) -> "ImageLimits":
        from olavlm.config_parsing import ConfigError

        fields = {"max_pixels": "max_image_pixels", "max_aspect": "max_image_aspect",
                  "max_geometry_pixels": "max_geometry_pixels"}
        values = {k: getattr(data_cfg, name) for k, name in fields.items()}
        for k, name in fields.items():
            if isinstance(values[k], bool) or not isinstance(values[k], (int, float)) or not values[k] > 0:
                raise ConfigError(f"data.{name}: must be a number > 0, got {values[k]!r}")
        return cls(**values)

    def check(self, w: int, h: int, geometry: str | None = None, side: int | None = None, where: str = "") -> None:
        """Raise :class:`BadSample` when a ``w`` x ``h`` image (cut with ``geometry`` at ``side``) is out of bounds."""
        where = f"{where}: " if where else ""
        if w < 1 or h < 1:
            raise BadSample("unreadable_image", f"{where}empty image {w}x{h}")
        if w * h > self.max_pixels:
            raise BadSample("unreadable_image", f"{where}{w}x{h} = {w * h} pixels exceeds the limit of "
                                                f"{self.max_pixels} (decompression-bomb guard, data.max_image_pixels)")
        aspect = max(w, h) / min(w, h)
        if aspect > self.max_aspect:
            raise BadSample("bad_image_size", f"{where}{w}x{h} has aspect ratio {aspect:.1f} > "
                                              f"data.max_image_aspect {self.max_aspect:g}")
        if geometry is not None:
            n = geometry_pixels(w, h, geometry, side or 1)
            if n > self.max_geometry_pixels:
                raise BadSample("bad_image_size", f"{where}{w}x{h} needs a {n}-pixel intermediate image for "
                                                  f"image_geometry {geometry!r} at side {side} > "
                                                  f"data.max_geometry_pixels {self.max_geometry_pixels}")


DEFAULT_LIMITS = ImageLimits()


def geometry_pixels(w: int, h: int, geometry: str, side: int) -> int:
    """Pixels of the largest image :func:`to_square` builds from a ``w`` x ``h`` image at ``side``."""
    if geometry == "pad":
        n = max(w, h)
        return max(n * n if w != h else 0, side * side)
    if geometry == "square":
        short, long = min(w, h), max(w, h)
        return side * int(side * long / short)
    if geometry == "resize":
        return side * side
    raise ValueError(f"image geometry {geometry!r} is not one of {GEOMETRIES}")


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike, *, limits: ImageLimits = DEFAULT_LIMITS, geometry: str | None = None,
               side: int | None = None) -> Image.Image:
    """Decode ``path`` by content into a fully loaded RGB image, or raise :class:`BadSample`.

    ``limits`` are checked on the header size before decoding; with ``geometry`` (and the largest
    ``side`` the image will be cut at) the size after the geometry is checked too."""
    return _decode(Path(path), None, limits, geometry, side)


def read_image(path: str | os.PathLike, *, limits: ImageLimits = DEFAULT_LIMITS, geometry: str | None = None,
               side: int | None = None) -> tuple[Image.Image, str]:
    """:func:`load_image` plus the sha1 of the file's bytes (read once; the target cache's content key)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadSample("missing_image", f"{path}: no such file") from None
    except OSError as e:
        raise BadSample("unreadable_image", f"{path}: {e.strerror or e}") from None
    return _decode(path, data, limits, geometry, side), hashlib.sha1(data).hexdigest()


def decode_image_bytes(data: bytes, name: str | os.PathLike, *, limits: ImageLimits = DEFAULT_LIMITS,
                       geometry: str | None = None, side: int | None = None) -> Image.Image:
    """:func:`load_image` of bytes already in memory (``name`` is for messages), e.g. a TSV's base64 image."""
    return _decode(Path(name), data, limits, geometry, side)


def _decode(path: Path, data: bytes | None, limits: ImageLimits, geometry: str | None, side: int | None):
    if data is None and not path.is_file():
        raise BadSample("missing_image", f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit
            with Image.open(path if data is None else io.BytesIO(data)) as img:
                w, h = img.size  # from the header: nothing is decoded yet
                limits.check(w, h, geometry, side, where=str(path))
                img.seek(0)  # first frame of animated GIF/WebP/TIFF
                img.load()
                return _to_rgb(img)
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample("unreadable_image", f"{path}: {e}") from None
    except UnidentifiedImageError:
        empty = (len(data) if data is not None else path.stat().st_size) == 0
        kind = "zero-byte file" if empty else "not a recognised image format"
        raise BadSample("unreadable_image", f"{path}: {kind}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated / corrupt data
        raise BadSample("unreadable_image", f"{path}: {type(e).__name__}: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = np.clip(arr, 0, 65535) / 257.0  # 16-bit range -> 8 bit
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode == "P":
        return img.convert("RGB")
    if mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------


def to_square(img: Image.Image, geometry: str, spec: ImageSpec, side: int | None = None, *,
              limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """The shared square image of side ``side`` (default ``spec.size``) for ``geometry``; an image
    beyond ``limits`` raises :class:`BadSample` before anything is allocated."""
    side = spec.size if side is None else int(side)
    resample = _RESAMPLE[spec.resample]
    if img.mode != "RGB":
        raise ValueError(f"to_square expects an RGB image, got mode {img.mode!r} (use load_image)")
    if geometry not in GEOMETRIES:
        raise ValueError(f"image geometry {geometry!r} is not one of {GEOMETRIES}")
    w, h = img.size
    limits.check(w, h, geometry, side)
    if geometry == "pad":
        if w != h:
            n = max(w, h)
            canvas = Image.new("RGB", (n, n), spec.pad_color)
            canvas.paste(img, ((n - w) // 2, (n - h) // 2))
            img = canvas
        return img if img.size == (side, side) else img.resize((side, side), resample)
    if geometry == "square":
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(side * long / short)
        new_w, new_h = (side, new_long) if w <= h else (new_long, side)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample)
        top, left = (new_h - side) // 2, (new_w - side) // 2
        return img.crop((left, top, left + side, top + side))
    if geometry == "resize":
        return img if img.size == (side, side) else img.resize((side, side), resample)
    raise ValueError(f"image geometry {geometry!r} is not one of {GEOMETRIES}")


def _resized(square: Image.Image, size: int, resample: str) -> Image.Image:
    if square.size[0] != square.size[1]:
        raise ValueError(f"expected a square image, got {square.size}")
    return square if square.size == (size, size) else square.resize((size, size), _RESAMPLE[resample])


def pixel_values(square: Image.Image, spec: ImageSpec) -> torch.Tensor:
    """Normalised float32 (3, size, size) vision-tower input from the shared square image."""
    arr = np.asarray(_resized(square, spec.size, spec.resample), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def uint8_tensor(square: Image.Image, size: int, resample: str = "bicubic") -> torch.Tensor:
    """uint8 (3, size, size) RGB tensor of the shared square image (the teachers' input)."""
    arr = np.asarray(_resized(square, size, resample), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def teacher_image(img: Image.Image, vision_square: Image.Image | None, geometry: str, spec: ImageSpec,
                  size: int, *, limits: ImageLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """The teachers' uint8 (3, size, size) input, as training and ``olavlm targets precompute`` make it:
    ``uint8_tensor(to_square(img, geometry, spec, max(spec.size, size)), size)``. ``vision_square``
    (the square at ``spec.size``) is reused when ``size <= spec.size``."""
    side = max(spec.size, size)
    square = (vision_square if vision_square is not None and side == spec.size
              else to_square(img, geometry, spec, side, limits=limits))
    return uint8_tensor(square, size, spec.resample)
