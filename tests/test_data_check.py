"""`olavlm data check` / `data show` on a fixture folder with planted problems."""

from __future__ import annotations

import json

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
