"""The model's processor: save -> load gives identical inputs; old folders (olavlm_run.json) still
load; a bad olavlm_processor.json is a one-line error naming the file and the field."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from olavlm.config import DataConfig
from olavlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from olavlm.data.images import ImageSpec, load_image, pixel_values, to_square, uint8_tensor
from olavlm.data.processor import LEGACY_FILE, PROCESSOR_FILE, OlaProcessor, ProcessorConfigError, read_settings

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tokenizers"
CONVERSATION = [{"from": "human", "value": "<image>\nWhat is in the picture?"},
                {"from": "gpt", "value": "A noisy square."},
                {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "Grey, mostly."}]
SPEC = ImageSpec(size=32, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
TEACHER_SIDE = 48  # teacher square side != tower side (32): the square is cut at 48 from the original


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("processor") / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(70, 110, 3), dtype=np.uint8)).save(path)
    return path


def _inputs(proc: OlaProcessor, image: Path) -> dict:
    return proc(CONVERSATION, [image])


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _expected_images(image: Path, geometry: str, spec: ImageSpec, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent: the tower's pixels from the square at its side; the teachers' uint8 square cut
    at max(tower, teacher) side from the ORIGINAL image."""
    img = load_image(image)
    pix = pixel_values(to_square(img, geometry, spec), spec)
    teacher = uint8_tensor(to_square(img, geometry, spec, max(spec.size, side)), side, spec.resample)
    return pix[None], teacher[None]


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    from olavlm.devkit.tiny import tiny_model_config
    from olavlm.model.vlm import OlaVLM

    return OlaVLM.from_config(tiny_model_config(tiny_dir), with_predictors=False).eval()


def test_round_trip_tiny_model(tiny_model, image, tmp_path):
    model = tiny_model
    data = DataConfig(template="llava_llama_3", image_geometry="pad")
    proc = OlaProcessor.for_model(model, data, teacher_image_size=TEACHER_SIDE, run={"stage": "pt"})
    assert proc.add_bos is True and proc.tokens_per_image == model.tokens_per_image  # auto, resolved
    model.save_pretrained(tmp_path, with_predictors=False)
    proc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / PROCESSOR_FILE).read_text())
    assert saved["version"] == 1 and saved["teacher_image_size"] == TEACHER_SIDE and saved["run"] == {"stage": "pt"}

    before = _inputs(proc, image)
    for loaded in (OlaProcessor.from_pretrained(tmp_path),  # its own tokenizer files
                   OlaProcessor.from_pretrained(tmp_path, model=model)):  # checked against the model
        assert loaded == dataclass_copy(proc, loaded.tokenizer)
        _assert_same(before, _inputs(loaded, image))
    # and those inputs are what the pieces give independently
    from olavlm.data.tokenize import encode_conversation

    enc = encode_conversation(CONVERSATION, "llava_llama_3", model.tokenizer, num_images=1, add_bos=True)
    assert before["input_ids"].tolist() == enc.input_ids and before["labels"].tolist() == enc.labels
    assert before["input_ids"][0] == model.tokenizer.bos_token_id
    pix, teacher = _expected_images(image, "pad", model.image_spec, TEACHER_SIDE)
    torch.testing.assert_close(before["pixel_values"], pix, rtol=0, atol=0)
    assert before["images"].shape == (1, 3, TEACHER_SIDE, TEACHER_SIDE) and torch.equal(before["images"], teacher)


def dataclass_copy(proc: OlaProcessor, tokenizer) -> OlaProcessor:
    import dataclasses

    return dataclasses.replace(proc, tokenizer=tokenizer)


@pytest.mark.parametrize("name,template", [("llama3", "llava_llama_3"), ("phi3", "llava_phi_3")])
@pytest.mark.parametrize("geometry", ["pad", "square"])
def test_round_trip_real_tokenizers(name, template, geometry, image, tmp_path):
    from transformers import AutoTokenizer

    if not (FIXTURES / name / "tokenizer.json").is_file():
        pytest.skip(f"real tokenizer fixture {FIXTURES / name} is absent")
    tok = AutoTokenizer.from_pretrained(FIXTURES / name)
    proc = OlaProcessor(tok, template, "auto", geometry, SPEC, tokens_per_image=80, teacher_image_size=TEACHER_SIDE)
    proc.save_pretrained(tmp_path)
    loaded = OlaProcessor.from_pretrained(tmp_path)
    assert (loaded.template, loaded.add_bos, loaded.image_geometry, loaded.image_spec) == \
        (template, proc.add_bos, geometry, SPEC)
    before, after = _inputs(proc, image), _inputs(loaded, image)
    _assert_same(before, after)
    ids, labels = before["input_ids"].tolist(), before["labels"].tolist()
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and (ids[0] == tok.bos_token_id) == proc.add_bos
    # supervised tokens decode to the two replies (+ their end-of-turn)
    supervised = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert "A noisy square." in supervised and "Grey, mostly." in supervised and "colour" not in supervised
    pix, teacher = _expected_images(image, geometry, SPEC, TEACHER_SIDE)
    assert torch.equal(before["pixel_values"], pix) and torch.equal(before["images"], teacher)
    # generation inputs: the training ids up to the first reply
    gen = loaded.generation_inputs(CONVERSATION[:1], [image])
    prompt = gen["input_ids"][0].tolist()
    first_reply = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert prompt == ids[:first_reply] and torch.equal(gen["pixel_values"], pix)


def test_overrides_replace_the_saved_values(tiny_model, tmp_path):
    proc = OlaProcessor.for_model(tiny_model, DataConfig(template="llava_llama_3", image_geometry="pad"))
    proc.save_pretrained(tmp_path)
    loaded = OlaProcessor.from_pretrained(tmp_path, image_geometry="square", add_bos="false")
    assert (loaded.image_geometry, loaded.add_bos, loaded.template) == ("square", False, "llava_llama_3")
    ids = loaded.prompt_ids([{"from": "human", "value": "Hi"}], num_images=0)
    assert ids == proc.prompt_ids([{"from": "human", "value": "Hi"}], num_images=0)[1:]  # the BOS dropped
    assert OlaProcessor.from_pretrained(tmp_path, template="plain").template == "plain"


def test_old_folder_with_only_olavlm_run_json(tiny_model, image, tmp_path, caplog):
    (tmp_path / LEGACY_FILE).write_text(json.dumps({"stage": "ift", "template": "llava_llama_3",
                                                    "image_geometry": "square", "add_bos": False}))
    with caplog.at_level(logging.INFO, logger="olavlm.data.processor_io"):
        proc = OlaProcessor.from_pretrained(tmp_path, model=tiny_model)
    assert any(LEGACY_FILE in r.getMessage() for r in caplog.records)  # a note in the log
    assert (proc.template, proc.image_geometry, proc.add_bos) == ("llava_llama_3", "square", False)
    assert proc.image_spec == tiny_model.image_spec and proc.tokens_per_image == tiny_model.tokens_per_image
    assert proc.run == {"stage": "ift"} and read_settings(tmp_path)["run"] == {"stage": "ift"}
    assert proc(CONVERSATION, [image])["input_ids"][0] != tiny_model.tokenizer.bos_token_id
    # an old file without the BOS policy: what the tokenizer does
    (tmp_path / LEGACY_FILE).write_text(json.dumps({"template": "llava_llama_3", "image_geometry": "pad"}))
    assert OlaProcessor.from_pretrained(tmp_path, model=tiny_model).add_bos is True
    with pytest.raises(ProcessorConfigError, match="together with the model"):
        OlaProcessor.from_pretrained(tmp_path)
    (tmp_path / LEGACY_FILE).unlink()
    with pytest.raises(ProcessorConfigError, match="--template and --image-geometry"):
        OlaProcessor.from_pretrained(tmp_path, model=tiny_model)
    assert OlaProcessor.from_pretrained(tmp_path, model=tiny_model, template="plain",
                                        image_geometry="pad").template == "plain"


@pytest.mark.parametrize("field,value,match", [
    ("image_geometry", "crop", "'image_geometry' is 'crop'"),
    ("template", "llava_nope", "'template' is 'llava_nope'"),
    ("tokens_per_image", 0, "'tokens_per_image' is 0"),
    ("add_bos", "maybe", "'add_bos' is 'maybe'"),
    ("image_spec", {"size": 32}, "'image_spec' is not usable"),
    ("version", 99, "'version' is 99, newer"),
    ("teacher_image_size", -3, "'teacher_image_size' is -3"),
])
def test_bad_field_is_one_line_naming_file_and_field(tiny_model, tmp_path, field, value, match):
    proc = OlaProcessor.for_model(tiny_model, DataConfig(template="llava_llama_3", image_geometry="pad"))
    file = proc.save_pretrained(tmp_path)
    data = json.loads(file.read_text())
    data[field] = value
    file.write_text(json.dumps(data))
    with pytest.raises(ProcessorConfigError, match=match) as e:
        OlaProcessor.from_pretrained(tmp_path)
    assert str(file) in str(e.value) and "\n" not in str(e.value)
    del data[field]
    file.write_text(json.dumps(data))
    if field in ("teacher_image_size",):  # optional field
        assert OlaProcessor.from_pretrained(tmp_path).teacher_image_size is None
    else:
        with pytest.raises(ProcessorConfigError, match=f"'{field}' is missing"):
            OlaProcessor.from_pretrained(tmp_path)


def test_saved_facts_must_match_the_model(tiny_model, tmp_path):
    proc = OlaProcessor.for_model(tiny_model, DataConfig(template="llava_llama_3", image_geometry="pad"))
    file = proc.save_pretrained(tmp_path)
    data = json.loads(file.read_text())
    file.write_text(json.dumps({**data, "tokens_per_image": data["tokens_per_image"] + 1}))
    with pytest.raises(ProcessorConfigError, match="tokens_per_image.*expands an image to"):
        OlaProcessor.from_pretrained(tmp_path, model=tiny_model)


def test_cli_bad_processor_is_one_line(tiny_model, tmp_path, capsys):
    """`olavlm data show --model FOLDER` reads the processor weight-free; a bad field is one line, exit 2."""
    from olavlm.cli import main

    folder = tmp_path / "model"
    proc = OlaProcessor.for_model(tiny_model, DataConfig(template="llava_llama_3", image_geometry="pad"))
    file = proc.save_pretrained(folder)
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps([{"id": "a", "conversations": CONVERSATION[2:]}]))
    assert main(["data", "show", "--model", str(folder), "--data", str(data_file), "--index", "0",
                 "--color", "never"]) == 0
    shown = capsys.readouterr().out
    explicit = ["data", "show", "--data", str(data_file), "--index", "0", "--color", "never",
                "--tokenizer", str(folder), "--template", "llava_llama_3", "--add-bos", "true",
                "--num-image-tokens", str(proc.tokens_per_image), "--task-tokens", "0"]
    assert main(explicit) == 0
    assert capsys.readouterr().out == shown  # the processor's settings = the same flags given by hand
    file.write_text(json.dumps({**json.loads(file.read_text()), "image_geometry": "crop"}))
    assert main(["data", "show", "--model", str(folder), "--data", str(data_file), "--index", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(file) in err and "image_geometry" in err


def test_data_check_reads_the_model_processor(tiny_model, image, tmp_path, capsys):
    """`data check --model`: tokenizer, template, geometry and the expanded length from the processor
    (a record too long after image expansion is caught without any other flag)."""
    from olavlm.cli import main

    folder = tmp_path / "model"
    OlaProcessor.for_model(tiny_model, DataConfig(template="llava_llama_3", image_geometry="pad")).save_pretrained(folder)
    records = [{"id": "ok", "image": image.name, "conversations": CONVERSATION[:2]}]
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps(records))
    args = ["data", "check", "--model", str(folder), "--data", str(data_file), "--image-folder", str(image.parent),
            "--no-progress", "--workers", "1"]
    assert main(args) == 0
    assert "not checked" not in capsys.readouterr().err  # tokens per image known: lengths checked
    limit = tiny_model.tokens_per_image + 5  # shorter than the record after image expansion
    assert main([*args, "--max-length", str(limit)]) == 1
    assert "too_long" in capsys.readouterr().out
