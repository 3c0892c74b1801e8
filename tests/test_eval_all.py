"""Batched greedy evaluation on a tiny model: resume after a kill, `eval mmstar`, `eval all` table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from olavlm.cli import main as cli_main
from olavlm.config import load_config
from olavlm.evaluation import generation
from olavlm.evaluation.cvbench import score as cv_score
from olavlm.evaluation.mmstar import score as ms_score
from olavlm.model.vlm import OlaVLM
from olavlm.devkit.smoke import smoke_overrides

IFT = Path("configs/phi3_mini_clip336/ift.yaml")


@pytest.fixture(scope="module")
def models(tiny_dir, tmp_path_factory):
    """Two tiny model folders (different seeds) with their olavlm_run.json."""
    root = tmp_path_factory.mktemp("evalall")
    cfg = load_config(IFT, smoke_overrides(tiny_dir, IFT, root))
    out = []
    for seed, name in ((0, "runa"), (1, "runb")):
        torch.manual_seed(seed)
        final = root / name / "final"
        OlaVLM.from_config(cfg.model).save_pretrained(final)
        (final / "olavlm_run.json").write_text(json.dumps({"template": cfg.data.template, "image_geometry": "pad"}))
        out.append(final)
    return out


@pytest.fixture
def sets(tmp_path):
    """A small CV-Bench jsonl (2D + 3D) and a small MMStar jsonl, with images."""
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 0), (0, 90, 160)]
    (tmp_path / "img").mkdir()
    for i, c in enumerate(colors):
        Image.new("RGB", (20 + 3 * i, 16), c).save(tmp_path / "img" / f"{i}.png")
    kinds = [("2D", "Count", "ADE20K"), ("2D", "Relation", "COCO"), ("3D", "Depth", "Omni3D"),
             ("3D", "Distance", "Omni3D"), ("2D", "Count", "COCO")]
    cv = [{"idx": i, "type": t, "task": task, "source": src, "answer": "(A)", "question": f"How many {i}?",
           "choices": ["1", "2"], "filename": f"img/{i}.png"} for i, (t, task, src) in enumerate(kinds)]
    (tmp_path / "cv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cv))
    ms = [{"index": i, "question": f"What colour {i}? Options: A: red, B: green", "answer": "AB"[i % 2],
           "category": ["math", "coarse perception"][i % 2], "l2_category": ["geometry", "image emotion"][i % 2],
           "image": f"img/{i}.png"} for i in range(5)]
    (tmp_path / "ms.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ms))
    return tmp_path


def test_killed_eval_resumes_where_it_stopped(models, sets, monkeypatch):
    from olavlm.evaluation.cvbench import run_cvbench

    full = run_cvbench(models[0], sets / "cv.jsonl", batch_size=2, progress=False, device="cpu")
    calls, real = [], generation.generate_batch

    def killed_on_second_batch(em, prompts, images, n):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed while the second batch runs
        return real(em, prompts, images, n)

    monkeypatch.setattr(generation, "generate_batch", killed_on_second_batch)
    out = sets / "res" / "cv.json"
    with pytest.raises(KeyboardInterrupt):
        run_cvbench(models[0], sets / "cv.jsonl", output=out, batch_size=2, progress=False, device="cpu")
    partial = generation.partial_path(out)
    assert len(partial.read_text().splitlines()) == 1 + 2  # settings + the first batch
    with open(partial, "a") as f:
        f.write('{"key": "4:4", "outp')  # a line cut short by the kill is ignored
    calls.clear()
    monkeypatch.setattr(generation, "generate_batch", lambda *a: calls.append(len(a[1])) or real(*a))
    res = run_cvbench(models[0], sets / "cv.jsonl", output=out, batch_size=2, progress=False, device="cpu")
    assert calls == [2, 1]  # only the 3 items not answered before the kill
    assert [p["output"] for p in res["per_item"]] == [p["output"] for p in full["per_item"]]
    assert not partial.exists() and json.loads(out.read_text())["n"] == 5
    # a partial file from other settings is refused, not mixed in
    partial.write_text(json.dumps({"settings": {"benchmark": "cvbench", "max_new_tokens": 99}}) + "\n")
    with pytest.raises(generation.PartialMismatch, match="other settings"):
        run_cvbench(models[0], sets / "cv.jsonl", output=out, progress=False, device="cpu")


def test_batched_answers_equal_one_by_one(models, sets):
    from olavlm.evaluation.mmstar import run_mmstar

    one = run_mmstar(models[0], sets / "ms.jsonl", batch_size=1, progress=False, device="cpu", max_new_tokens=4)
    many = run_mmstar(models[0], sets / "ms.jsonl", batch_size=5, progress=False, device="cpu", max_new_tokens=4)
    assert [p["output"] for p in one["per_item"]] == [p["output"] for p in many["per_item"]]


def test_eval_mmstar_command(models, sets, capsys):
    out = sets / "ms.json"
    assert cli_main(["eval", "mmstar", "--model", str(models[0]), "--data", str(sets / "ms.jsonl"),
                     "--output", str(out), "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 5 and "MMStar (5 items)" in capsys.readouterr().out
    assert res["settings"]["suffix"].startswith("\nAnswer with the option's letter")


def test_eval_all_table_from_two_small_sets(models, sets, capsys):
    out = sets / "table"
    assert cli_main(["eval", "all", "--model", str(models[0]), str(models[1]), "--cvbench", str(sets / "cv.jsonl"),
                     "--mmstar", str(sets / "ms.jsonl"), "--output", str(out), "--device", "cpu"]) == 0
    table = json.loads((out / "table.json").read_text())
    assert list(table["rows"]) == ["runa", "runb"]
    cv_items = [json.loads(line) for line in (sets / "cv.jsonl").read_text().splitlines()]
    ms_items = [json.loads(line) for line in (sets / "ms.jsonl").read_text().splitlines()]
    for name in ("runa", "runb"):
        cv = json.loads((out / name / "cvbench.json").read_text())
        ms = json.loads((out / name / "mmstar.json").read_text())
        # independent arithmetic from the recorded outputs: CV-Bench 2D = mean over 2D sources
        ok = [p["correct"] for p in cv["per_item"]]
        ade, coco, omni = ok[0], (ok[1] + ok[4]) / 2, (ok[2] + ok[3]) / 2
        row = table["rows"][name]
        assert row["CV-Bench 2D"] == pytest.approx(100 * (ade + coco) / 2, abs=0.01)
        assert row["CV-Bench 3D"] == pytest.approx(100 * omni, abs=0.01)
        assert row["CV-Bench"] == pytest.approx(100 * ((ade + coco) / 2 + omni) / 2, abs=0.01)
        assert row["CV-Bench Count"] == pytest.approx(100 * (ok[0] + ok[4]) / 2, abs=0.01)
        assert row["CV-Bench Depth"] == pytest.approx(100 * ok[2], abs=0.01)
        assert cv == {**cv_score(cv_items, [p["output"] for p in cv["per_item"]]), "settings": cv["settings"]}
        ms_ok = [p["correct"] for p in ms["per_item"]]
        geometry, emotion = (ms_ok[0] + ms_ok[2] + ms_ok[4]) / 3, (ms_ok[1] + ms_ok[3]) / 2
        assert row["MMStar"] == pytest.approx(100 * (geometry + emotion) / 2, abs=0.01)
        assert ms["overall"] == ms_score(ms_items, [p["output"] for p in ms["per_item"]])["overall"]
    md = (out / "table.md").read_text().splitlines()
    assert md[0].startswith("| Model | CV-Bench 2D | CV-Bench 3D | CV-Bench |") and md[0].endswith("| MMStar |")
    assert md[2].startswith("| runa |") and md[3].startswith("| runb |")
    assert "wrote" in capsys.readouterr().out


def test_eval_all_without_any_benchmark_is_one_line(models, tmp_path, capsys):
    assert cli_main(["eval", "all", "--model", str(models[0]), "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no benchmark found" in err[0] and "data prepare cv-bench" in err[0]
