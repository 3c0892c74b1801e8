"""MMStar: the benchmark's answer matching and category averages on a hand-made file, the file formats."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from olavlm.evaluation.mmstar import (SUFFIX, MMStarFormatError, build_prompt, format_table, image_bytes, is_correct,
                                      load_items, score)


def _rec(i, cat, l2, answer, image="img.png"):
    return {"index": i, "question": f"Q{i}? Options: A: x, B: y, C: z, D: w", "answer": answer,
            "category": cat, "l2_category": l2, "image": image}


# two categories; "coarse perception" has two fine categories of different sizes
ITEMS = [
    _rec(0, "coarse perception", "image emotion", "A"),
    _rec(1, "coarse perception", "image emotion", "B"),
    _rec(2, "coarse perception", "image emotion", "C"),
    _rec(3, "coarse perception", "image style & quality", "D"),
    _rec(4, "math", "geometry", "A"),
    _rec(5, "math", "geometry", "B"),
    _rec(6, "math", "geometry", "C"),
    _rec(7, "math", "geometry", "D"),
]
OUTPUTS = [
    "A",            # letter: right
    "(B)",          # parenthesised: right
    "c.",           # lower case with a dot: right
    "",             # no answer: wrong
    "A. because",   # letter and dot: right
    "The answer is B",  # "the answer is " prefix: right
    "I think C",    # letter not first: wrong
    "option d",     # "option " prefix: right
]


def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    Image.new("RGB", (8, 6), (10, 200, 30)).save(path.parent / "img.png")
    return path


def test_matching_rules():
    assert is_correct("A", "A") and is_correct("(A)", "A") and is_correct("A.", "A") and is_correct("a", "A")
    assert is_correct("  (b) yes", "B") and is_correct("Option C", "C") and is_correct("the answer is d.", "D")
    assert not is_correct("", "A") and not is_correct("B", "A") and not is_correct("()", "A")
    assert not is_correct("Response: A", "A")  # only the benchmark's own prefixes count
    assert is_correct("Answer: B", "A")  # the benchmark's quirk: only the first character is read
    assert not is_correct("(", "A") and not is_correct("option ", "A")


def test_scoring_hand_made_file(tmp_path):
    items = load_items(_write_jsonl(tmp_path / "mmstar.jsonl", ITEMS))
    res = score(items, OUTPUTS)
    assert [p["correct"] for p in res["per_item"]] == [True, True, True, False, True, True, False, True]
    # fine categories: emotion 3/3, style 0/1, geometry 3/4
    assert res["by_l2_category"] == {"geometry": 0.75, "image emotion": 1.0, "image style & quality": 0.0}
    assert res["by_category"] == {"coarse perception": 0.5, "math": 0.75}  # mean of its fine categories
    assert res["overall"] == pytest.approx((1.0 + 0.0 + 0.75) / 3)  # mean over fine categories
    assert res["accuracy"] == pytest.approx(6 / 8)
    assert "overall  58.3%" in format_table(res)
    with pytest.raises(ValueError, match="8 items but 1 outputs"):
        score(items, ["A"])


def test_prompt_is_question_plus_the_benchmark_suffix():
    assert build_prompt(ITEMS[0]) == ITEMS[0]["question"] + SUFFIX
    assert SUFFIX == "\nAnswer with the option's letter from the given choices directly, such as answer letter 'A' only. \n"


def test_tsv_layout_with_base64_and_shared_image(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((32, 32), 60).convert("RGB").save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    assert len(b64) > 1000
    path = tmp_path / "MMStar.tsv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "answer", "category", "l2_category", "image"])
        w.writerow([0, "q0", "A", "math", "geometry", b64])
        w.writerow([1, "q1", "B", "math", "geometry", "0"])  # refers to index 0's image
    items = load_items(path)
    by_index = {str(it["index"]): it for it in items}
    for it in items:
        name, data = image_bytes(it, by_index, tmp_path)
        assert data == buf.getvalue()


@pytest.mark.parametrize("rec,msg", [
    ({k: v for k, v in _rec(0, "m", "g", "A").items() if k != "category"}, "missing field 'category'"),
    (_rec(0, "m", "g", "AB"), "not a single letter"),
])
def test_bad_records(tmp_path, rec, msg):
    with pytest.raises(MMStarFormatError, match=msg):
        load_items(_write_jsonl(tmp_path / "bad.jsonl", [rec]))


def test_bad_files(tmp_path):
    with pytest.raises(MMStarFormatError, match="no such file"):
        load_items(tmp_path / "none.jsonl")
    (tmp_path / "x.jsonl").write_text("{oops\n")
    with pytest.raises(MMStarFormatError, match="x.jsonl:1: invalid JSON"):
        load_items(tmp_path / "x.jsonl")
    with pytest.raises(MMStarFormatError, match="not unique"):
        load_items(_write_jsonl(tmp_path / "dup.jsonl", [ITEMS[0], ITEMS[0]]))
    items = load_items(_write_jsonl(tmp_path / "missing.jsonl", [_rec(0, "m", "g", "A", image="nope.png")]))
    with pytest.raises(MMStarFormatError, match="nope.png not found"):
        image_bytes(items[0], {}, tmp_path)
