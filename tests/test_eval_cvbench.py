"""CV-Bench protocol: prompt, answer parsing and the 2D/3D/overall arithmetic on known answers."""

from __future__ import annotations

import json

import pytest

from olavlm.evaluation.cvbench import (SUFFIX, CVBenchFormatError, build_prompt, format_table, load_items,
                                       parse_answer, score)


def _item(idx, type_, task, source, answer, **kw):
    rec = {"idx": idx, "type": type_, "task": task, "source": source, "answer": answer,
           "question": f"q{idx}?", "choices": ["x", "y", "z"], "filename": f"img/{idx}.png"}
    rec.update(kw)
    return rec


# real CV-Bench layout: 2D from ADE20K and COCO, 3D from Omni3D
ITEMS = [
    _item(0, "2D", "Count", "ADE20K", "(A)"), _item(1, "2D", "Relation", "ADE20K", "(B)"),
    _item(2, "2D", "Count", "COCO", "(C)"), _item(3, "2D", "Relation", "COCO", "(A)"),
    _item(4, "2D", "Count", "COCO", "(B)"), _item(5, "2D", "Count", "COCO", "(B)"),
    _item(6, "3D", "Depth", "Omni3D", "(A)"), _item(7, "3D", "Depth", "Omni3D", "(B)"),
    _item(8, "3D", "Distance", "Omni3D", "(A)"), _item(9, "3D", "Distance", "Omni3D", "(B)"),
]
OUTPUTS = [
    "(A)", "A",                      # ADE20K 1/2: "A" parsed as first letter -> wrong (B expected)
    "The answer is (C).", "(a)", "B", "(D) or (B)",  # COCO: C ok, a->A ok, B ok, first paren D wrong -> 3/4
    "(A)", "", "  A", "(C)",          # Omni3D: ok, unparsed, ok, wrong -> 2/4
]


def test_scoring_known_answers(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    items = load_items(path)
    res = score(items, OUTPUTS)
    assert res["by_source"] == {"ADE20K": 0.5, "COCO": 0.75, "Omni3D": 0.5}
    assert res["2D"] == pytest.approx(0.625)  # mean of sources, not of the 6 items (4/6)
    assert res["3D"] == pytest.approx(0.5)
    assert res["overall"] == pytest.approx(0.5625)
    assert res["by_task"] == {"Count": pytest.approx(0.75), "Depth": 0.5, "Distance": 0.5,
                              "Relation": pytest.approx(0.5)}
    assert res["n"] == 10 and res["n_unparsed"] == 1
    assert [p["correct"] for p in res["per_item"]] == [True, False, True, True, True, False, True, False, True, False]
    assert "overall  56.2%" in format_table(res)


def test_each_item_parsed_on_its_own():
    # an unparsable output after a correct one must not inherit the previous prediction (the reference's parser did)
    res = score(ITEMS[:2], ["(A)", "???"])
    assert [p["prediction"] for p in res["per_item"]] == ["(A)", None]


def test_parse_answer():
    assert parse_answer("(B)") == "B"
    assert parse_answer("I think (c) because") == "C"
    assert parse_answer("D. something") == "D"
    assert parse_answer("  b") == "B"
    assert parse_answer("") is None and parse_answer("42") is None and parse_answer("é") is None


def test_prompt_uses_preformatted_prompt_or_builds_it():
    real = _item(0, "2D", "Count", "ADE20K", "(A)", prompt="How many? Select from the following choices.\n(A) 1\n(B) 2")
    assert build_prompt(real) == real["prompt"] + SUFFIX
    built = build_prompt(_item(1, "2D", "Count", "ADE20K", "(A)"))
    assert built == "q1? Select from the following choices.\n(A) x\n(B) y\n(C) z" + SUFFIX


def test_only_2d_gives_overall_of_2d():
    res = score(ITEMS[:2], ["(A)", "(B)"])
    assert res["3D"] is None and res["overall"] == res["2D"] == 1.0


@pytest.mark.parametrize("line,msg", [
    ("{not json", "invalid JSON"),
    (json.dumps({"type": "2D", "task": "Count", "source": "S", "question": "q", "choices": [], "filename": "a"}),
     "missing field 'answer'"),
    (json.dumps({"type": "2D", "task": "Count", "source": "S", "answer": "A", "prompt": "p", "filename": "a"}),
     "is not like"),
    (json.dumps({"type": "2D", "task": "Count", "source": "S", "answer": "(A)", "prompt": "p"}), "no image path"),
])
def test_bad_files(tmp_path, line, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(CVBenchFormatError, match=msg):
        load_items(path)
    with pytest.raises(ValueError, match="2 items but 1 outputs"):
        score(ITEMS[:2], ["(A)"])
