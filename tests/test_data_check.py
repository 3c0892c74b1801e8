"""`olavlm data check` / `data show` on a fixture folder with planted problems."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from test_data_dataset import make_planted  # planted fixture builder (tests/ is on sys.path)

from olavlm.cli import main
from olavlm.data.check import check_dataset


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_planted(tmp_path_factory.mktemp("planted_check"))


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")


def _expected(expect, skip=()):
    problems, examples = {}, {}
    for rid, reason in expect.items():
        if reason and reason not in skip:
            problems[reason] = problems.get(reason, 0) + 1
            examples.setdefault(reason, []).append(rid)
    return problems, examples


def test_check_reports_every_planted_problem(planted, tok):
    data, expect = planted
    report = check_dataset(data, data.parent / "images", tokenizer=tok, template="llava_llama_3", max_length=300,
                           tokens_per_image=88, workers=2, progress=False)
    problems, examples = _expected(expect)
    assert report == {"total": len(expect), "ok": list(expect.values()).count(None), "problems": problems,
                      "examples": examples}


def test_check_without_tokenizer(planted):
    data, expect = planted
    report = check_dataset(data, data.parent / "images", workers=2, progress=False)
    problems, _ = _expected(expect, skip=("too_long",))  # needs the tokenizer
    assert report["problems"] == problems and report["ok"] == report["total"] - sum(problems.values())
    with pytest.raises(ValueError, match="tokens_per_image"):
        check_dataset(data, data.parent / "images", tokenizer=object(), template="plain", max_length=10)


def test_cli_check_exit_codes_and_report(planted, tiny_dir, tmp_path, capsys):
    data, expect = planted
    out = tmp_path / "report.json"
    base = ["data", "check", "--data", str(data), "--image-folder", str(data.parent / "images"), "--template",
            "llava_llama_3", "--tokenizer", str(tiny_dir / "tokenizer"), "--vision-tower", str(tiny_dir / "vision-clip"),
            "--max-length", "300", "--workers", "2", "--no-progress"]
    assert main(base + ["--report", str(out)]) == 1
    report = json.loads(out.read_text())
    problems, _ = _expected(expect)
    assert report["problems"] == problems
    printed = capsys.readouterr().out
    for reason in problems:
        assert reason in printed
    bad_fraction = sum(problems.values()) / len(expect)
    assert main(base + ["--max-bad-fraction", str(bad_fraction + 0.01)]) == 0
    # --vision-tower gives 64 image tokens + 24 task tokens = 88 positions: "multi" (85 text tokens) fits 300
    assert "multi" not in report["examples"].get("too_long", [])
    good = tmp_path / "good.json"
    good.write_text(json.dumps([r for r in json.loads(data.read_text()) if expect[r["id"]] is None]))
    assert main(base[:2] + ["--data", str(good)] + base[4:]) == 0
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1},\n{"id": 2')
    assert main(base[:2] + ["--data", str(broken)] + base[4:]) == 2
    assert "line 2" in capsys.readouterr().err


def test_cli_show(planted, tiny_dir, capsys):
    data, expect = planted
    args = ["data", "show", "--data", str(data), "--template", "llava_llama_3", "--tokenizer",
            str(tiny_dir / "tokenizer"), "--num-image-tokens", "64", "--color", "never"]
    assert main(args + ["--index", str(list(expect).index("multi"))]) == 0
    out = capsys.readouterr().out
    assert "[[A red circle.<|eot_id|>]]" in out and "[[On the left.<|eot_id|>]]" in out
    assert "<image x88>" in out and "1 x 88 = 88" in out
    assert "<|start_header_id|>user" in out and "[[<|start_header_id|>" not in out
    assert main(args + ["--id", "twoimg"]) == 1  # bad record: reason printed, non-zero
    assert "image_token_mismatch" in capsys.readouterr().err
    assert main(args + ["--index", "999"]) == 2


# -- real tokenizers (Llama-3 byte-level BPE, Phi-3 SentencePiece with/without BOS) ------------------

TEMPLATES = ["llava_llama_3", "llava_phi_3", "vicuna_v1", "plain", "chat_template"]


@pytest.fixture(scope="module")
def llava_small(tmp_path_factory):
    """A small clean LLaVA-format file (JSONL) like LLaVA-665K: image, multi-turn, text-only records;
    plus a single-turn file for `plain`. Returns (all records, single-turn only, image folder)."""
    from PIL import Image
    from test_tokenize_real import CONVS

    root = tmp_path_factory.mktemp("llava_small")
    (root / "images" / "coco").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "images" / "coco" / "a.jpg")
    Image.new("RGB", (20, 50), (10, 200, 10)).save(root / "images" / "coco" / "b.png")
    records = [{"id": k, **({"image": "coco/a.jpg" if i % 2 else "coco/b.png"} if "<image>" in str(c) else {}),
                "conversations": c} for i, (k, c) in enumerate(CONVS.items())]
    full, single = root / "all.jsonl", root / "single.jsonl"
    full.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    single.write_text("".join(json.dumps(r) + "\n" for r in records if len(r["conversations"]) == 2))
    return full, single, root / "images"


@pytest.mark.parametrize("name", ["llama3", "phi3", "phi3_bos"])
def test_check_real_tokenizers_no_false_problems(llava_small, name):
    from test_tokenize_real import fixture_pair

    tok = fixture_pair(name)[0]
    full, single, images = llava_small
    for template in TEMPLATES:
        data = single if template == "plain" else full
        report = check_dataset(data, images, tokenizer=tok, template=template, max_length=4096,
                               tokens_per_image=600, workers=2, progress=False)
        assert report["problems"] == {} and report["ok"] == report["total"] > 0, (template, report)


def _no_traceback(out: str) -> None:
    assert "Traceback" not in out and "Error:" not in out.replace("error:", "")


def test_cli_every_template_and_real_tokenizer(llava_small, monkeypatch, capsys):
    """`data check` / `data show` exit cleanly for every template x tokenizer pair (the tokenizers are
    loaded once; the loading itself is exercised below)."""
    from test_tokenize_real import fixture_pair

    import olavlm.data.cli as data_cli

    full, single, images = llava_small
    monkeypatch.setattr(data_cli, "_load_tokenizer", lambda path: fixture_pair(Path(path).name)[0])
    for name in ["llama3", "phi3", "phi3_bos"]:
        for template in TEMPLATES:
            data = str(single if template == "plain" else full)
            common = ["--data", data, "--template", template, "--tokenizer", f"fx/{name}"]
            assert main(["data", "check", *common, "--image-folder", str(images), "--no-progress",
                         "--num-image-tokens", "576", "--workers", "1"]) == 0, (name, template)
            assert main(["data", "show", *common, "--index", "1", "--color", "never"]) == 0, (name, template)
            out = capsys.readouterr()
            _no_traceback(out.out + out.err)
            assert "BOS:" in out.out and "before 1st image:" in out.out
    # refused up front with one line: BOS "false" against a chat template that writes BOS
    assert main(["data", "show", "--data", str(full), "--index", "0", "--template", "chat_template",
                 "--tokenizer", "fx/llama3", "--add-bos", "false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: data.add_bos: false")
    no_template = copy.deepcopy(fixture_pair("phi3")[0])
    no_template.chat_template = None
    monkeypatch.setattr(data_cli, "_load_tokenizer", lambda path: no_template)
    assert main(["data", "check", "--data", str(full), "--image-folder", str(images), "--template",
                 "chat_template", "--tokenizer", "fx/phi3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chat_template" in err


def test_cli_phi3_chat_template_real_loading(llava_small, capsys):
    """The real CLI path (tokenizer loaded from the folder) with Phi-3's own chat template, which ends
    every conversation with EOS: check exits 0, show prints the BOS policy and the image offset."""
    from test_tokenize_real import FIXTURES

    if not (FIXTURES / "phi3" / "tokenizer.json").is_file():
        pytest.skip("real tokenizer fixtures are absent")
    full, _, images = llava_small
    common = ["--data", str(full), "--template", "chat_template", "--tokenizer", str(FIXTURES / "phi3")]
    assert main(["data", "check", *common, "--image-folder", str(images), "--no-progress"]) == 0
    assert main(["data", "show", *common, "--id", "multi", "--color", "never"]) == 0
    out = capsys.readouterr()
    _no_traceback(out.out + out.err)
    assert "BOS:              no (data.add_bos: auto)" in out.out and "before 1st image: 1 tokens" in out.out
    assert "<|assistant|>\n [[A leading space.<|end|>]]\n<|user|>" in out.out
