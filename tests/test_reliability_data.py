"""Hostile images and bad records: the image size guard (decode, geometry, dataset, check, chat, eval,
precompute) and the skip policy (cross-modality fallback, unique skip counts, no valid record)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from olavlm.config import ConfigError, DataConfig, load_config
from olavlm.data import REASONS, BadSample
from olavlm.data.collate import Collator
from olavlm.data.dataset import LlavaDataset
from olavlm.data.errors import NoValidRecord
from olavlm.data.images import (DEFAULT_LIMITS, ImageLimits, ImageSpec, geometry_pixels, load_image, read_image,
                                teacher_image, to_square)

SPEC = ImageSpec(size=32, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
TPI = 10


def _strip(path: Path, w: int, h: int) -> Path:
    Image.new("L", (w, h), 7).save(path, format="PNG", optimize=True)
    return path


@pytest.fixture(scope="module")
def strips(tmp_path_factory):
    """The two hostile files: 200000 x 1 and 1 x 1000000 PNGs of a few KB."""
    root = tmp_path_factory.mktemp("strips")
    return {"wide": _strip(root / "wide.png", 200_000, 1), "tall": _strip(root / "tall.png", 1, 1_000_000)}


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")


def _conv(image=True, a="A shape."):
    return [{"from": "human", "value": ("<image>\n" if image else "") + "What is this?"}, {"from": "gpt", "value": a}]


# ------------------------------------------------------------------------------------------ guard


def test_reason_is_listed():
    assert "bad_image_size" in REASONS and REASONS.index("bad_image_size") == REASONS.index("unreadable_image") + 1


def test_elongated_png_is_refused_from_the_header(strips, monkeypatch):
    """A 1-3 KB strip is refused before any pixel is decoded (load() would allocate and crash later)."""
    assert all(p.stat().st_size < 4096 for p in strips.values())

    def no_decode(self, *a, **k):
        raise AssertionError("pixels were decoded before the size guard")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    for name, path in strips.items():
        for fn in (load_image, read_image):
            with pytest.raises(BadSample) as e:
                fn(path)
            assert e.value.reason == "bad_image_size" and "aspect ratio" in e.value.msg and str(path) in e.value.msg


def test_to_square_never_sees_an_unguarded_image(monkeypatch):
    """Called directly on an in-memory strip, to_square refuses it before building any canvas."""
    wide = Image.new("RGB", (200_000, 1))
    made = []
    real_new = Image.new
    monkeypatch.setattr(Image, "new", lambda mode, size, *a: made.append(size) or real_new(mode, size, *a))
    for geometry in ("pad", "square", "resize"):
        with pytest.raises(BadSample) as e:
            to_square(wide, geometry, SPEC)
        assert e.value.reason == "bad_image_size"
        with pytest.raises(BadSample):
            teacher_image(wide, None, geometry, SPEC, 48)
    assert made == []  # no canvas was allocated


@pytest.mark.parametrize("w,h,geometry,side", [(120, 20, "pad", 32), (20, 90, "pad", 300), (33, 90, "square", 64),
                                               (90, 33, "square", 50), (40, 40, "pad", 64), (70, 20, "resize", 96)])
def test_geometry_pixels_is_the_largest_image_to_square_builds(w, h, geometry, side, monkeypatch):
    """geometry_pixels (used on the header) against the sizes PIL actually allocates in to_square."""
    sizes = []
    real_new, real_resize = Image.new, Image.Image.resize

    def new(mode, size, *a):
        sizes.append(size[0] * size[1])
        return real_new(mode, size, *a)

    def resize(self, size, *a, **k):
        sizes.append(size[0] * size[1])
        return real_resize(self, size, *a, **k)

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    monkeypatch.setattr(Image, "new", new)
    monkeypatch.setattr(Image.Image, "resize", resize)
    sq = to_square(img, geometry, SPEC, side)
    assert sq.size == (side, side)
    assert geometry_pixels(w, h, geometry, side) == max(sizes + [side * side])


def test_size_after_geometry_and_limits(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (120, 20)).save(path)  # aspect 6: fine by default
    small = ImageLimits(max_geometry_pixels=100 * 100)
    assert load_image(path, limits=small).size == (120, 20)  # no geometry given: only aspect / pixels
    with pytest.raises(BadSample, match="14400-pixel intermediate") as e:
        load_image(path, limits=small, geometry="pad", side=32)  # pad canvas 120 x 120
    assert e.value.reason == "bad_image_size"
    assert load_image(path, limits=small, geometry="resize", side=32).size == (120, 20)
    assert load_image(path, limits=small, geometry="square", side=32).size == (120, 20)  # 32 x 192
    with pytest.raises(BadSample):
        to_square(load_image(path), "pad", SPEC, limits=small)
    with pytest.raises(BadSample, match="max_image_aspect 5"):
        load_image(path, limits=ImageLimits(max_aspect=5))
    assert DEFAULT_LIMITS == ImageLimits(max_pixels=89_478_485, max_aspect=20.0, max_geometry_pixels=8192 ** 2)


def test_limits_come_from_the_data_config(tmp_path):
    cfg = load_config(None, ["data.max_image_aspect=4", "data.max_geometry_pixels=1000"])
    assert ImageLimits.from_config(cfg.data) == ImageLimits(max_aspect=4.0, max_geometry_pixels=1000)
    assert ImageLimits.from_config(DataConfig()) == DEFAULT_LIMITS
    with pytest.raises(ConfigError, match="^data.max_image_aspect: must be a number > 0"):
        ImageLimits.from_config(DataConfig(max_image_aspect=0))
    with pytest.raises(ConfigError, match="data.max_geometry_pixels"):
        load_config(None, ["data.max_geometry_pixels=lots"])


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, strips):
    """Image records: good ones, the two strips, and a pad canvas over a tight geometry limit."""
    root = tmp_path_factory.mktemp("hostile")
    images = root / "images"
    images.mkdir()
    for name, path in strips.items():
        (images / path.name).write_bytes(path.read_bytes())
    Image.new("RGB", (30, 20), (9, 9, 9)).save(images / "good.png")
    Image.new("RGB", (300, 30), (9, 9, 9)).save(images / "wide10.png")  # aspect 10, pad canvas 90000 px
    records = [{"id": "g1", "image": "good.png", "conversations": _conv()},
               {"id": "wide", "image": "wide.png", "conversations": _conv()},
               {"id": "tall", "image": "tall.png", "conversations": _conv()},
               {"id": "w10", "image": "wide10.png", "conversations": _conv()},
               {"id": "g2", "image": "good.png", "conversations": _conv()}]
    (root / "data.json").write_text(json.dumps(records))
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(train_file=str(root / "data.json"), image_folder=str(root / "images"), template="llava_llama_3",
                      max_length=kw.pop("max_length", 200), **kw)


def test_dataset_skips_and_errors_on_oversized_images(hostile, tok):
    ds = LlavaDataset(_cfg(hostile, max_geometry_pixels=50_000), tok, image_spec=SPEC, tokens_per_image=TPI,
                      teacher_image_size=48)
    for i, rid in enumerate(["g1", "wide", "tall", "w10", "g2"]):
        s = ds[i]
        if rid.startswith("g"):
            assert s["id"] == rid and s["skipped"] == {} and s["images"].shape == (1, 3, 48, 48)
        else:
            assert s["id"] in ("g1", "g2") and s["skipped"] == {"bad_image_size": 1}
    strict = LlavaDataset(_cfg(hostile, on_bad_sample="error"), tok, image_spec=SPEC, tokens_per_image=TPI)
    with pytest.raises(BadSample, match="record 1 .id wide.*aspect ratio") as e:
        strict[1]
    assert e.value.reason == "bad_image_size"
    assert strict[3]["id"] == "w10"  # the default limits accept a 300 x 30 image


def test_data_check_reports_oversized_images(hostile, capsys):
    from olavlm.cli import main
    from olavlm.data.check import check_dataset

    report = check_dataset(hostile / "data.json", hostile / "images", progress=False, workers=2)
    assert report["problems"] == {"bad_image_size": 2} and report["examples"]["bad_image_size"] == ["wide", "tall"]
    assert report["ok"] == 3
    rc = main(["data", "check", "--data", str(hostile / "data.json"), "--image-folder", str(hostile / "images"),
               "--no-progress", "--max-image-aspect", "5"])
    out = capsys.readouterr()
    assert rc == 1 and "bad_image_size" in out.out and "records: 5   ok: 2" in out.out


def test_chat_and_eval_use_the_guard(strips):
    from olavlm.data.processor import OlaProcessor
    from olavlm.infer.chat import ChatSession

    proc = OlaProcessor(None, "plain", False, "pad", SPEC, tokens_per_image=16)  # images only: no tokenizer
    with pytest.raises(BadSample) as e:
        proc.load_image(strips["wide"])  # what eval's image loaders call
    assert e.value.reason == "bad_image_size"
    session = object.__new__(ChatSession)  # the image path only needs the processor
    session.processor, session.device, session.messages = proc, torch.device("cpu"), []
    with pytest.raises(BadSample) as e:
        session.set_image(strips["tall"])
    assert e.value.reason == "bad_image_size"


def test_precompute_reader_lists_oversized_images_as_unreadable(hostile):
    from olavlm.teachers.precompute import _ImageReader

    from olavlm.data.processor import OlaProcessor

    proc = OlaProcessor(None, "plain", False, "pad", SPEC, tokens_per_image=16, teacher_image_size=48)
    reader = _ImageReader([(0, "good.png"), (0, "wide.png")], str(hostile / "images"), proc)
    ok, bad = reader[0], reader[1]
    assert ok[3].shape == (3, 48, 48) and ok[4] is None and len(ok[2]) == 40
    assert bad[3] is None and bad[4].startswith("bad_image_size")


# ------------------------------------------------------------------------------------------ skip policy


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """25 image records, 15 of them bad (missing image / bad conversation), plus one malformed
    text-only record (no image: it is the only member of its modality)."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "images").mkdir()
    Image.new("RGB", (20, 16), (200, 0, 0)).save(root / "images" / "ok.png")
    records = []
    for i in range(25):
        if i % 5 in (1, 3):
            records.append({"id": f"m{i}", "image": f"gone{i}.png", "conversations": _conv()})
        elif i % 5 == 4:
            records.append({"id": f"c{i}", "image": "ok.png", "conversations": _conv(a="")})
        else:
            records.append({"id": f"g{i}", "image": "ok.png", "conversations": _conv()})
    records.append({"id": "text-bad", "conversations": "not a list"})
    (root / "data.json").write_text(json.dumps(records))
    return root


def test_malformed_text_record_in_image_data_falls_back_across_modalities(mixed, tok, caplog):
    ds = LlavaDataset(_cfg(mixed), tok, image_spec=SPEC, tokens_per_image=TPI)
    assert int((ds.lengths < 0).sum()) == 1  # the malformed record is the whole text-only modality
    with caplog.at_level("WARNING"):
        s = ds[25]
    assert s["id"].startswith("g") and s["skipped"] == {"bad_conversation": 1}
    assert s["replacements"]["cross_modality"] == 1 and s["replacements"]["attempts"] >= 1
    assert "other modality" in caplog.text
    again = LlavaDataset(_cfg(mixed), tok, image_spec=SPEC, tokens_per_image=TPI)[25]  # deterministic
    assert again["id"] == s["id"]


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_counts_are_unique_records(mixed, tok, workers):
    """16 bad records (15 image + 1 text) visited once each -> skipped sums to 16, whatever the walks met."""
    ds = LlavaDataset(_cfg(mixed), tok, image_spec=SPEC, tokens_per_image=TPI)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=Collator(tok.pad_token_id))
    skipped, attempts, cross = {}, 0, 0
    for batch in loader:
        for k, v in batch["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        attempts += batch["replacements"].get("attempts", 0)
        cross += batch["replacements"].get("cross_modality", 0)
    assert skipped == {"missing_image": 10, "bad_conversation": 6}  # 10 + 5 image records, 1 text record
    image_bad = sum(v for k, v in skipped.items()) - 1
    assert image_bad == 15 and attempts >= 16 and cross == 1


def test_no_valid_record_at_all_is_an_error(tmp_path, tok):
    (tmp_path / "images").mkdir()
    records = [{"id": "a", "image": "gone.png", "conversations": _conv()},
               {"id": "b", "conversations": [{"from": "gpt", "value": "no human turn"}]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    ds = LlavaDataset(_cfg(tmp_path), tok, image_spec=SPEC, tokens_per_image=TPI)
    with pytest.raises(NoValidRecord, match="has no valid record in 2 .*missing_image"):
        ds[0]
