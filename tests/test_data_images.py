"""olavlm.data.images: decoding by content, mode conversion, bad files, the shared square geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from olavlm.data import BadSample
from olavlm.data.images import ImageLimits, ImageSpec, load_image, pixel_values, to_square, uint8_tensor

CLIP_SPEC = ImageSpec(size=64, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))


def _rgb(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _write(img, path, fmt, **kw):
    img.save(path, format=fmt, **kw)
    return path


# ------------------------------------------------------------------------------------------ decoding

def test_gif_and_png_named_jpg_decode_by_content(tmp_path):
    src = _rgb(20, 10)
    png = _write(src, tmp_path / "a.jpg", "PNG")
    out = load_image(png)
    assert out.mode == "RGB" and out.size == (20, 10)
    assert np.array_equal(np.asarray(out), np.asarray(src))  # lossless, so identical
    frames = [Image.new("P", (8, 6), i) for i in range(3)]
    for f in frames:
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    gif = tmp_path / "b.jpg"
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    out = load_image(gif)
    assert out.mode == "RGB" and out.size == (8, 6)
    assert np.asarray(out)[0, 0].tolist() == [0, 0, 0]  # first frame (palette index 0)


def test_modes_become_rgb(tmp_path):
    # CMYK JPEG
    cmyk = Image.new("CMYK", (12, 9), (0, 255, 255, 0))  # pure red in CMYK
    out = load_image(_write(cmyk, tmp_path / "c.jpg", "JPEG", quality=100))
    assert out.mode == "RGB" and out.size == (12, 9)
    r, g, b = np.asarray(out).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60
    # 16-bit greyscale PNG: 65535 -> 255, 257*k -> k
    arr16 = (np.arange(12 * 5).reshape(5, 12) * 257).astype(np.uint16)
    out = load_image(_write(Image.fromarray(arr16), tmp_path / "g16.png", "PNG"))
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out)[..., 0], (arr16 // 257).astype(np.uint8))
    # LA with full transparency -> white; opaque stays
    la = Image.new("LA", (4, 4), (10, 0))
    la.putpixel((0, 0), (10, 255))
    out = np.asarray(load_image(_write(la, tmp_path / "la.png", "PNG")))
    assert out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [10, 10, 10]
    # P with transparency index
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.info["transparency"] = 1
    out = np.asarray(load_image(_write(p, tmp_path / "p.png", "PNG", transparency=1)))
    assert out[0, 0].tolist() == [255, 255, 255]
    # 1-bit
    out = load_image(_write(Image.new("1", (5, 5), 1), tmp_path / "one.png", "PNG"))
    assert np.asarray(out)[0, 0].tolist() == [255, 255, 255]


def test_bad_files_raise_reasons(tmp_path):
    with pytest.raises(BadSample) as e:
        load_image(tmp_path / "nope.jpg")
    assert e.value.reason == "missing_image"
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(BadSample) as e:
        load_image(tmp_path / "zero.jpg")
    assert e.value.reason == "unreadable_image" and "zero-byte" in str(e.value)
    full = _write(_rgb(64, 64), tmp_path / "full.jpg", "JPEG").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(full[: len(full) // 2])
    with pytest.raises(BadSample) as e:
        load_image(tmp_path / "trunc.jpg")
    assert e.value.reason == "unreadable_image"
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(BadSample) as e:
        load_image(tmp_path / "text.jpg")
    assert e.value.reason == "unreadable_image"
    big = _write(Image.new("L", (200, 200)), tmp_path / "big.png", "PNG")
    with pytest.raises(BadSample) as e:
        load_image(big, limits=ImageLimits(max_pixels=100 * 100))
    assert e.value.reason == "unreadable_image" and "decompression" in str(e.value)
    with pytest.raises(BadSample):
        load_image(tmp_path)  # a directory is not an image file


def test_bad_sample_reason_checked_and_picklable():
    import pickle
    with pytest.raises(ValueError):
        BadSample("whatever", "x")
    e = pickle.loads(pickle.dumps(BadSample("too_long", "123 > 100")))
    assert e.reason == "too_long" and e.msg == "123 > 100"


# ------------------------------------------------------------------------------------------ geometry

def test_pad_square_resize_geometry():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = to_square(img, "pad", CLIP_SPEC, 40)
    a = np.asarray(sq)
    assert sq.size == (40, 40)
    assert a[0, 0].tolist() == [122, 116, 104] == list(CLIP_SPEC.pad_color)  # reference expand2square colour
    assert a[10:30, :].reshape(-1, 3).tolist() == [[255, 0, 0]] * 800  # centred: rows 10..29
    assert a[30:, :].reshape(-1, 3).tolist() == [[122, 116, 104]] * 400
    # square: centre crop keeps the middle columns of a wide image
    img = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8)[None, :, None], (20, 1, 3)))
    sq = np.asarray(to_square(img, "square", CLIP_SPEC, 20))
    assert sq[0, :, 0].tolist() == list(range(10, 30))
    # resize: squashes, whole image kept
    assert to_square(img, "resize", CLIP_SPEC, 16).size == (16, 16)
    with pytest.raises(ValueError, match="geometry"):
        to_square(img, "crop", CLIP_SPEC)


@pytest.mark.parametrize("tower,geometry", [("vision-clip", "square"), ("vision-siglip", "resize")])
def test_matches_hf_image_processor(tiny_dir, tower, geometry):
    """pixel_values(to_square(...)) equals the tower's own HF processor output."""
    from transformers import AutoImageProcessor

    from olavlm.config import ModelConfig
    from olavlm.model.vision import vision_geometry

    proc = AutoImageProcessor.from_pretrained(tiny_dir / tower)
    spec = vision_geometry(ModelConfig(vision_tower=str(tiny_dir / tower), vision_type=tower.split("-")[1])).spec  # production's reader
    assert spec.size == 64
    for i, (w, h) in enumerate([(100, 70), (33, 90), (64, 64)]):
        img = _rgb(w, h, seed=i)
        ref = torch.as_tensor(np.asarray(proc(images=img, return_tensors="pt")["pixel_values"][0]))
        mine = pixel_values(to_square(img, geometry, spec), spec)
        assert mine.dtype == torch.float32 and mine.shape == (3, 64, 64)
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)


def test_same_square_feeds_tower_and_teacher():
    """The teacher tensor and the pixel values come from one square: a marker lands at the same
    relative position in both."""
    img = Image.new("RGB", (90, 30), (0, 0, 0))
    img.paste((255, 255, 255), (60, 0, 90, 30))  # right third white
    for geometry in ("pad", "square", "resize"):
        sq = to_square(img, geometry, CLIP_SPEC, 96)
        u8 = uint8_tensor(sq, 48)
        pv = pixel_values(sq, CLIP_SPEC)  # 64 px
        assert u8.dtype == torch.uint8 and u8.shape == (3, 48, 48)
        white_u8 = (u8[0].float() > 200).float().mean(0)  # fraction white per column
        white_pv = (pv[0] > 1.0).float().mean(0)
        # column profiles agree after rescaling to a common width
        prof_u8 = torch.nn.functional.interpolate(white_u8[None, None], size=16, mode="area")[0, 0]
        prof_pv = torch.nn.functional.interpolate(white_pv[None, None], size=16, mode="area")[0, 0]
        assert (prof_u8 - prof_pv).abs().max() < 0.15, geometry
    # values: uint8 at the same size is the square itself, pixel_values its normalisation
    sq = to_square(_rgb(64, 64), "pad", CLIP_SPEC)
    u8 = uint8_tensor(sq, 64)
    assert np.array_equal(u8.permute(1, 2, 0).numpy(), np.asarray(sq))
    expect = (u8.float() / 255 - torch.tensor(CLIP_SPEC.mean)[:, None, None]) / torch.tensor(CLIP_SPEC.std)[:, None, None]
    torch.testing.assert_close(pixel_values(sq, CLIP_SPEC), expect)
