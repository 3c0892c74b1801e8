"""`olavlm demo --quick` end to end (generate -> bootstrap -> PT -> IFT -> eval -> probe -> report),
then `olavlm eval cvbench` and `olavlm probe` on what it produced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from olavlm.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "olavlm.cli", "demo", "--quick", "--output-dir", str(out),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_quick_demo_end_to_end(demo_dir):
    out, proc = demo_dir
    for k in range(1, 7):
        assert f"[demo {k}/6]" in proc.stderr  # progress is visible stage by stage
    assert "torch CPU threads: 1" in proc.stderr  # the thread policy is applied and logged
    for name in ("report.md", "report.json", "loss.png", "probe.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [("ola", 0), ("baseline", 0)]
    for run in report["runs"]:
        assert run["pt"]["finished"] and run["ift"]["finished"]
        cvb = run["cvbench"]
        assert cvb["n"] == 16 and set(cvb["by_task"]) == {"Count", "Relation", "Depth", "Distance"}
        assert all(0.0 <= v <= 1.0 for v in cvb["by_task"].values())
        for task in ("depth", "seg", "gen"):
            res = run["probe"]["ift"][task]
            assert sorted(res["layers"]) == ["1", "2", "3", "4"]
            assert all(-1.0 <= r["centred_cosine"] <= 1.0 for r in res["layers"].values())
    # only the OLA run trained with the three embedding losses (layers set in configs/shapeworld/pt.yaml)
    for variant, has_losses in (("ola", True), ("baseline", False)):
        metrics = [json.loads(x) for x in (out / f"runs/seed0/{variant}/pt/metrics.jsonl").read_text().splitlines()]
        for task in ("depth", "seg", "gen"):
            assert (metrics[0].get(f"loss/{task}", 0) > 0) == has_losses, (variant, task)


def test_report_lists_both_variants_side_by_side(demo_dir):
    out, _ = demo_dir
    md = (out / "report.md").read_text()
    lines = md.splitlines()
    assert lines[0] == "# ShapeWorld demo report"
    assert [ln[:2] for ln in lines[2:7]] == ["1.", "2.", "3.", "4.", "5."]  # the 5-line summary comes first
    assert "ola" in lines[4] and "baseline" in lines[4] and "OLA - baseline" in lines[4]
    assert "| task | items | chance | best constant letter | ola | baseline | OLA - baseline |" in md
    report = json.loads((out / "report.json").read_text())
    for task, row in report["tasks"].items():
        acc = {r["variant"]: r["cvbench"]["by_task"][task] for r in report["runs"]}
        assert row["diff"]["mean"] == pytest.approx(acc["ola"] - acc["baseline"])
        items = [i for i in report["runs"][0]["cvbench_items"] if i["task"] == task]
        letters = [i["answer"] for i in items]
        assert row["best_constant"] == pytest.approx(max(letters.count(x) for x in set(letters)) / len(items))
        assert f"| {task} | {len(items)} |" in md
    # portable: no absolute path of this machine in the report
    assert str(out) not in md and str(out.resolve()) not in md and "/tmp" not in md


def test_cli_eval_and_probe_on_demo_output(demo_dir, tmp_path, capsys):
    out, _ = demo_dir
    model = out / "runs/seed0/ola/ift/final"
    world = out / "world"
    assert main(["eval", "cvbench", "--model", str(model), "--data", str(world / "cvbench.jsonl"),
                 "--image-root", str(world), "--output", str(tmp_path / "cvb.json"), "--limit", "4"]) == 0
    res = json.loads((tmp_path / "cvb.json").read_text())
    assert res["n"] == 4 and len(res["per_item"]) == 4 and res["settings"]["decoding"] == "greedy"
    assert main(["probe", "--model", str(model), "--data", str(world / "probe.json"), "--teacher", "depth",
                 "--layers", "1,4", "--steps", "5", "--output", str(tmp_path / "probe")]) == 0
    probe = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert sorted(probe["layers"]) == ["1", "4"] and probe["teacher"] == "shapeworld_depth"
    assert (tmp_path / "probe" / "probe.png").stat().st_size > 0
    assert "centred cosine" in capsys.readouterr().out


def test_bootstrap_is_cached(demo_dir):
    from olavlm.demo.bootstrap import bootstrap
    from olavlm.demo.run import settings_for

    out, _ = demo_dir
    again = bootstrap(out / "world", out / "bootstrap", settings_for(True, 0).bootstrap)
    assert again.cached and (again.llm / "config.json").is_file() and (again.vision / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("argv, message", [(["--seeds", "0"], "--seeds must be >= 1"),
                                           (["--threads", "0"], "--threads must be >= 1"),
                                           (["--variants", "ola,bogus"], "--variants: expected")])
def test_bad_demo_arguments_are_one_line_errors(argv, message, tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "d"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("olavlm demo: error:") and message in err and "\n" not in err
    assert not (tmp_path / "d").exists()  # refused before anything ran


@pytest.mark.slow  # a third model (about a minute on 2 shared cores)
def test_quick_demo_with_viral_lists_three_methods(tmp_path):
    """`olavlm demo --quick --variants ola,baseline,viral`: VIRAL = the baseline's PT run (trained once)
    then configs/shapeworld/viral_ift.yaml; the report puts the three side by side."""
    out = tmp_path / "demo"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "olavlm.cli", "demo", "--quick", "--output-dir", str(out),
                           "--no-progress", "--variants", "ola,baseline,viral"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    runs = {r["variant"]: r for r in report["runs"]}
    assert list(runs) == ["ola", "baseline", "viral"]
    assert runs["viral"]["recipes"] == {"pt": "pt.yaml", "ift": "viral_ift.yaml"}
    # the baseline's PT run is reused, not trained twice; VIRAL has no PT folder of its own
    assert runs["viral"]["pt"]["reused"] and not runs["baseline"]["pt"].get("reused")
    assert runs["viral"]["metrics"]["pt"] == runs["baseline"]["metrics"]["pt"]
    assert not (out / "runs/seed0/viral/pt").exists()
    ift_cfg = (out / "runs/seed0/viral/ift/config.yaml").read_text()
    assert "baseline/pt" in ift_cfg and "kind: alignment" in ift_cfg
    # only the VIRAL IFT trained with the alignment loss (-cosine: it falls below 0); the others are NTP only
    for variant, has_loss in (("viral", True), ("baseline", False), ("ola", False)):
        rows = [json.loads(x) for x in (out / f"runs/seed0/{variant}/ift/metrics.jsonl").read_text().splitlines()]
        assert all(("loss/viral" in r) == has_loss for r in rows), variant
    rows = [json.loads(x) for x in (out / "runs/seed0/viral/ift/metrics.jsonl").read_text().splitlines()]
    assert min(r["loss/viral"] for r in rows) < 0
    # probes: the shared teachers for all three, VIRAL's own task on its model only
    for variant in runs:
        assert {"depth", "seg", "gen"} <= set(runs[variant]["probe"]["ift"])
    assert "viral" in runs["viral"]["probe"]["ift"] and "viral" not in runs["ola"]["probe"]["ift"]
    assert sorted(runs["viral"]["probe"]["ift"]["viral"]["layers"]) == ["1", "2", "3", "4"]
    md = (out / "report.md").read_text()
    assert ("| task | items | chance | best constant letter | ola | baseline | viral | OLA - baseline | "
            "VIRAL - baseline |") in md
    assert "| task | ola | baseline | viral |" in md  # letter histogram
    assert "**viral** (model after IFT)" in md and "| layer | viral centred | viral raw |" in md
    lines = md.splitlines()
    assert "OLA - baseline" in lines[4] and "VIRAL - baseline" in lines[4]
    for task, row in report["tasks"].items():
        acc = {v: r["cvbench"]["by_task"][task] for v, r in runs.items()}
        assert row["viral_diff"]["mean"] == pytest.approx(acc["viral"] - acc["baseline"])
        assert row["diff"]["mean"] == pytest.approx(acc["ola"] - acc["baseline"])


def test_recipes_ship_inside_the_package():
    """`olavlm demo` finds its recipes in the package (wheel package data); configs/shapeworld is the same copy."""
    from pathlib import Path

    import olavlm.demo
    from olavlm.demo.run import default_config_dir

    d = default_config_dir()
    assert d == Path(olavlm.demo.__file__).resolve().parent / "recipes"
    assert {"pt.yaml", "ift.yaml", "viral_ift.yaml"} <= {p.name for p in d.glob("*.yaml")}
    src_tree = Path(__file__).resolve().parents[1] / "configs" / "shapeworld"
    if src_tree.exists():
        assert src_tree.resolve() == d
    import tomllib
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "demo/recipes/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["olavlm"]


def test_variant_groups_keep_a_shared_pt_run_together():
    from olavlm.demo.run import default_jobs, variant_groups

    assert variant_groups(("ola", "baseline"), range(0, 2)) == [(0, ("ola",)), (0, ("baseline",)),
                                                                 (1, ("ola",)), (1, ("baseline",))]
    # viral trains on the baseline's PT run: one group, baseline first, so the shared run trains once
    assert variant_groups(("ola", "baseline", "viral"), range(0, 1)) == [(0, ("ola",)), (0, ("baseline", "viral"))]
    assert default_jobs(1) == 1 and 1 <= default_jobs(4) <= 4


def test_parallel_and_serial_demo_give_the_same_results(demo_dir, tmp_path):
    """The default runs the two variants in two processes (one per core here); --jobs 1 runs them one
    after the other in this process. Same seeds, same single thread: the same models and answers."""
    out, proc = demo_dir
    report = json.loads((out / "report.json").read_text())
    serial = tmp_path / "serial"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "olavlm.cli", "demo", "--quick", "--output-dir", str(serial),
                           "--no-progress", "--jobs", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    other = json.loads((serial / "report.json").read_text())
    assert other["jobs"] == 1 and report["jobs"] == min(2, os.cpu_count() or 1)
    for a, b in zip(report["runs"], other["runs"], strict=True):
        assert a["variant"] == b["variant"]
        assert a["cvbench_items"] == b["cvbench_items"]
        for stage in ("pt", "ift"):
            ma = (out / a["metrics"][stage]).read_text().splitlines()
            mb = (serial / b["metrics"][stage]).read_text().splitlines()
            assert [json.loads(x).get("loss") for x in ma] == [json.loads(x).get("loss") for x in mb]
