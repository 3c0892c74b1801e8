"""LlavaDataset + Collator on a planted fixture folder: one record per bad-input reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from olavlm.config import DataConfig
from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from olavlm.data import BadSample
from olavlm.data.collate import Collator
from olavlm.data.dataset import LlavaDataset
from olavlm.data.images import ImageSpec, pixel_values, to_square, uint8_tensor
from olavlm.data.records import RecordFileError, RecordIndex, image_paths

SPEC = ImageSpec(size=32, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
TPI = 10  # positions per image after expansion


def _conv(q="What is this?", a="A red circle.", image=True):
    return [{"from": "human", "value": ("<image>\n" if image else "") + q}, {"from": "gpt", "value": a}]


def make_planted(root: Path) -> tuple[Path, dict[str, str | None]]:
    """Images + a JSON file with good records and one planted record per problem.

    Returns (json path, {record id: expected reason or None}).
    """
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(img_dir / "good.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (50, 20, 3), dtype=np.uint8)).save(img_dir / "tall.jpg", quality=95)
    Image.new("P", (16, 12), 3).save(img_dir / "gif.jpg", format="GIF")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(img_dir / "png.jpg", format="PNG")
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(img_dir / "cmyk.jpg", format="JPEG")
    (img_dir / "zero.jpg").write_bytes(b"")
    full = (img_dir / "good.jpg").read_bytes()
    (img_dir / "trunc.jpg").write_bytes(full[: len(full) // 2])
    records, expect = [], {}

    def add(rid, reason, **rec):
        records.append({"id": rid, **rec})
        expect[rid] = reason

    add("good", None, image="good.jpg", conversations=_conv())
    add("tall", None, image="tall.jpg", conversations=_conv("Describe.", "A tall image."))
    add("text", None, conversations=_conv("Hi there", "Hello.", image=False))
    add("multi", None, image="good.jpg", conversations=_conv() + [{"from": "human", "value": "Where?"},
                                                                    {"from": "gpt", "value": "On the left."}])
    add("gif", None, image="gif.jpg", conversations=_conv())
    add("png", None, image="png.jpg", conversations=_conv())
    add("cmyk", None, image="cmyk.jpg", conversations=_conv())
    add("text2", None, conversations=_conv("Tell me a joke", "No.", image=False))
    add("missing", "missing_image", image="nope/missing.jpg", conversations=_conv())
    add("zero", "unreadable_image", image="zero.jpg", conversations=_conv())
    add("trunc", "unreadable_image", image="trunc.jpg", conversations=_conv())
    add("roles", "bad_conversation", image="good.jpg",
        conversations=[{"from": "gpt", "value": "<image>\nA"}, {"from": "human", "value": "Q"}])
    add("empty", "bad_conversation", image="good.jpg", conversations=_conv(a=""))
    add("notlist", "bad_conversation", image="good.jpg", conversations="hello")
    add("twoimg", "image_token_mismatch", image="good.jpg",
        conversations=[{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "Two."}])
    add("long", "too_long", image="good.jpg", conversations=_conv("word " * 300, "Short."))
    data = root / "data.json"
    data.write_text(json.dumps(records, indent=1))
    return data, expect


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_planted(tmp_path_factory.mktemp("planted"))


def _ds(planted, tok, **kw):
    data, _ = planted
    cfg = DataConfig(train_file=str(data), image_folder=str(data.parent / "images"), template="llava_llama_3",
                     image_geometry=kw.pop("geometry", "pad"), max_length=kw.pop("max_length", 160),
                     on_bad_sample=kw.pop("on_bad", "skip"), truncate=kw.pop("truncate", False))
    return LlavaDataset(cfg, tok, image_spec=SPEC, tokens_per_image=TPI, **kw)


def test_each_reason_detected(planted, tok):
    ds = _ds(planted, tok)
    _, expect = planted
    assert len(ds) == len(expect)
    for i, (rid, reason) in enumerate(expect.items()):
        if reason is None:
            s = ds.load(i)
            assert s["id"] == rid
        else:
            with pytest.raises(BadSample) as e:
                ds.load(i)
            assert e.value.reason == reason, rid
            assert rid in str(e.value)


def test_sample_contents(planted, tok):
    ds = _ds(planted, tok, teacher_image_size=48)
    s = ds[0]
    assert s["id"] == "good" and s["skipped"] == {} and s["image_keys"] == ["good.jpg"]
    assert s["input_ids"].dtype == torch.long and (s["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1
    sup = s["labels"][s["labels"] != IGNORE_INDEX]
    assert tok.decode(sup) == "A red circle.<|eot_id|>"
    # pixels: the square at the tower's size; teacher images: the same geometry made at max(32, 48) = 48
    from olavlm.data.images import load_image
    img = load_image(Path(ds.cfg.image_folder) / "good.jpg")
    torch.testing.assert_close(s["pixel_values"][0], pixel_values(to_square(img, "pad", SPEC), SPEC))
    assert torch.equal(s["images"][0], uint8_tensor(to_square(img, "pad", SPEC, 48), 48))
    small = _ds(planted, tok, teacher_image_size=16)[0]  # smaller than the tower: resized from its square
    assert torch.equal(small["images"][0], uint8_tensor(to_square(img, "pad", SPEC), 16))
    assert s["pixel_values"].shape == (1, 3, 32, 32) and s["images"].shape == (1, 3, 48, 48)
    text = ds[2]
    assert text["pixel_values"].shape == (0, 3, 32, 32) and text["images"].shape == (0, 3, 48, 48)
    assert list(ds.lengths[:3]) == [7, 5, -3]  # signed word counts incl. '<image>' and ds.modalities.tolist()[:3] == [True, True, False]


def test_skip_replaces_deterministically_same_modality(planted, tok):
    _, expect = planted
    ds = _ds(planted, tok)
    ids = list(expect)
    for i, (rid, reason) in enumerate(expect.items()):
        s = ds[i]
        if reason is None:
            assert s["id"] == rid and s["skipped"] == {}
        else:
            assert expect[s["id"]] is None and sum(s["skipped"].values()) >= 1
            assert reason in s["skipped"]
            assert set(s["skipped"]) <= {r for r in expect.values() if r}
            assert (ds.lengths[ids.index(s["id"])] > 0) == (ds.lengths[i] > 0)  # same modality
            again = _ds(planted, tok)[i]  # fresh dataset (e.g. another worker): same replacement
            assert again["id"] == s["id"] and again["skipped"] == s["skipped"]


def test_error_policy_raises(planted, tok):
    ds = _ds(planted, tok, on_bad="error")
    with pytest.raises(BadSample, match="missing"):
        ds[list(planted[1]).index("missing")]


def test_truncate_policy(planted, tok):
    _, expect = planted
    i = list(expect).index("long")
    s = _ds(planted, tok, truncate=True, max_length=4000)[i]
    assert s["id"] == "long"  # fits without cutting
    s = _ds(planted, tok, truncate=True)[i]
    assert s["id"] != "long" and s["skipped"]["empty_target"] == 1  # the cut removes the reply


def test_collate_batch_contract(planted, tok):
    ds = _ds(planted, tok, teacher_image_size=48)
    _, expect = planted
    idx = [0, 2, list(expect).index("missing"), 3]
    samples = [ds[i] for i in idx]
    batch = Collator(tok.pad_token_id)(samples)
    B, T = batch["input_ids"].shape
    assert B == 4 and T == max(len(s["input_ids"]) for s in samples)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        assert torch.equal(batch["input_ids"][b, :n], s["input_ids"])
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all() and torch.equal(batch["labels"][b, :n], s["labels"])
        assert batch["attention_mask"][b].sum() == n and batch["attention_mask"].dtype == torch.bool
    nimg = [len(s["image_keys"]) for s in samples]
    assert batch["num_images"].tolist() == nimg
    assert batch["pixel_values"].shape == (sum(nimg), 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["image_keys"] == [k for s in samples for k in s["image_keys"]]
    assert batch["sample_ids"] == [s["id"] for s in samples]
    assert batch["skipped"] == {"missing_image": 1} or sum(batch["skipped"].values()) >= 1
    assert "targets" not in batch
    with pytest.raises(ValueError, match="pad_token_id"):
        Collator(None)


def test_targets_and_mask(planted, tok):
    table = {"good.jpg": {"depth": torch.full((4, 3), 1.0), "gen": torch.full((1, 5), 2.0)}}

    def lookup(key):
        return table[key]  # KeyError for any other image

    ds = _ds(planted, tok, target_lookup=lookup)
    _, expect = planted
    samples = [ds[list(expect).index(r)] for r in ("good", "text", "tall", "multi")]
    batch = Collator(tok.pad_token_id)(samples)
    assert batch["target_mask"].tolist() == [True, False, True]  # good, tall (missing), multi (good.jpg)
    assert batch["targets"]["depth"].shape == (3, 4, 3) and batch["targets"]["gen"].shape == (3, 1, 5)
    assert (batch["targets"]["depth"][1] == 0).all() and (batch["targets"]["depth"][2] == 1).all()
    # a batch where every image misses the cache still carries zero rows of the declared shapes
    only_missing = Collator(tok.pad_token_id, target_shapes={"depth": (4, 3)})([samples[2]])
    assert only_missing["target_mask"].tolist() == [False] and only_missing["targets"]["depth"].shape == (1, 4, 3)


def test_dataloader_with_workers_does_not_crash(planted, tok):
    from olavlm.data.sampler import build_batch_sampler
    ds = _ds(planted, tok, teacher_image_size=48)
    sampler = build_batch_sampler("modality_length", ds.lengths, global_batch_size=4, micro_batch_size=2,
                                  world_size=1, rank=0, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(tok.pad_token_id),
                                         num_workers=2)
    skipped, seen = {}, 0
    for batch in loader:
        seen += batch["input_ids"].shape[0]
        for k, v in batch["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        last_global_batch = seen > (len(sampler) - 2) * 2  # global batch = 2 micro-batches
        assert len({n > 0 for n in batch["num_images"].tolist()}) == 1 or last_global_batch
    assert seen == len(sampler) * 2
    assert set(skipped) <= {"missing_image", "unreadable_image", "bad_conversation", "image_token_mismatch",
                            "too_long"}
    assert sum(skipped.values()) >= 8  # all 8 planted records were visited (padding may revisit)


def test_record_index(tmp_path, planted):
    data, expect = planted
    idx = RecordIndex.build(data)
    assert len(idx) == len(expect) and idx[0]["id"] == "good" and idx.nbytes == len(idx) * 16
    assert image_paths(data) == ["good.jpg", "tall.jpg", "gif.jpg", "png.jpg", "cmyk.jpg", "nope/missing.jpg",
                                 "zero.jpg", "trunc.jpg"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in json.loads(data.read_text())) + "\n")
    j = RecordIndex.build(jsonl)
    assert [j[i] for i in range(len(j))] == [idx[i] for i in range(len(idx))]
    assert np.array_equal(j.lengths, idx.lengths)
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n{"id": 2,\n')
    with pytest.raises(RecordFileError, match="line 2"):
        RecordIndex.build(tmp_path / "bad.jsonl")
    (tmp_path / "bad.json").write_text('[\n {"id": 1},\n {"id": 2} x\n]')
    with pytest.raises(RecordFileError, match="line 3, column 12"):
        RecordIndex.build(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('[1, 2]')
    assert len(RecordIndex.build(tmp_path / "obj.json")) == 2  # non-object records -> bad_conversation later


def test_json_scan_across_chunk_boundaries(tmp_path, monkeypatch):
    import olavlm.data.records as records
    monkeypatch.setattr(records, "_CHUNK", 5)
    recs = [{"id": f"é{i}", "conversations": [{"from": "human", "value": "ünï ✓ " * i}]} for i in range(30)]
    p = tmp_path / "u.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(recs, ensure_ascii=False, indent=2).encode())
    idx = records.RecordIndex.build(p)
    assert [idx[i] for i in range(30)] == recs
    assert idx.lengths.tolist() == [-max(2 * i, 1) for i in range(30)]  # "ünï", "✓" per repeat
