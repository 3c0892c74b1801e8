"""The stability check of the benchmark table: two result folders -> verdict or "unstable", the
±10 % boundary, missing or incomparable second runs, the headline statistic of a ratio, and the
busy neighbour of ``benchmarks.run --stability`` (started, and stopped however the run ends)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import readme_table, stability  # noqa: E402
from benchmarks.common import ratio, summarize  # noqa: E402

CODE = {"fingerprint": "abc123", "commit": None, "files": 1}
MACHINE = {"platform": "Linux-x", "cpu_count": 2, "torch": "2.x", "transformers": "5.x", "cuda": None}


def _ratio(value: float, goal: float | None = 1.10, better: str = "lower") -> dict:
    # a ratio record as common.ratio writes it, headline on the CPU minima; the wall median differs on purpose
    return {"value": value * 1.3, "value_min": value * 1.2, "value_cpu": value * 1.1, "value_cpu_min": value,
            "range": [value / 2, value * 2], "goal": goal, "better": better, "headline": "value_cpu_min"}


def _write(folder: Path, pt: float | None = None, depth: float | None = None, memory: float | None = None, *,
           code: dict = CODE, config: dict | None = None, load: tuple = (0.5, 1.5)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = {"machine": MACHINE, "code": code, "config": {"batch": 4, "quick": False, **(config or {}),
                                                         "load_average_after": [load[1], 0, 0]}}
    if pt is not None:
        (folder / "pt_vs_ntp.json").write_text(json.dumps({"name": "pt_vs_ntp", **base,
                                                           "ratios": {"pt_cached_over_ntp": _ratio(pt)}}))
    if depth is not None:
        (folder / "teacher_batching.json").write_text(json.dumps(
            {"name": "teacher_batching", **base, "results": {"depth": {"ratio": _ratio(depth, 4.0, "higher")}}}))
    if memory is not None:
        (folder / "pt_memory.json").write_text(json.dumps(
            {"name": "pt_memory", **base, "ratios": {"peak_memory_olavlm_over_reference": {"value": memory}}}))
    (folder / "run.json").write_text(json.dumps({"load_average_before": [load[0], 0, 0],
                                                 "load_average_after": [load[1], 0, 0],
                                                 "neighbour": "a spin loop" if folder.name == "busy" else None}))
    return folder


def _row(table: str, label_start: str) -> list[str]:
    line = next(ln for ln in table.splitlines() if ln.startswith(label_start))
    return [c.strip() for c in line.strip("|").split("|")]


PT, DEPTH, MEM = "| 1 | PT step", "| 3 | per-image loop ÷ batched encode: depth", "| 4 | PT peak memory"


def test_agree_is_symmetric_with_the_10_percent_boundary_inclusive():
    assert stability.agree(1.0, 1.1) and stability.agree(1.1, 1.0)
    assert stability.agree(2.0, 2.2) and stability.agree(0.2, 0.22)
    assert not stability.agree(1.0, 1.1001) and not stability.agree(1.1001, 1.0)
    assert not stability.agree(3.45, 0.17)  # the two runs the check exists for
    assert stability.agree(0.0, 0.0) and not stability.agree(0.0, 1.0)


def test_agreeing_runs_get_a_verdict_on_the_worse_value(tmp_path):
    a = _write(tmp_path / "r", pt=1.00, depth=5.0, memory=0.35)
    _write(a / "busy", pt=1.08, depth=4.6, memory=0.35, load=(2.0, 3.0))
    table = readme_table.render(a)
    row = _row(table, PT)
    assert row[2] == "1.00 (CPU min; wall 1.30)" and row[3] == "1.08" and row[5] == "pass"
    assert _row(table, DEPTH)[3:6] == ["4.60", ">= 4", "pass"]
    assert _row(table, MEM)[2:6] == ["0.35 (exact)", "0.35", "<= 0.5", "pass"]
    assert "load average 0.5 → 1.5; second run: load average 2.0 → 3.0" in table
    assert "beside a spin loop" in table and "3 of 3 compared rows agree" in table
    assert "Measured with code abc123; the tree is now" in table  # results of other code say so
    # within 10 % of each other but the second run misses the goal: the verdict is the worse one
    _write(a, pt=1.05, depth=4.1, memory=0.35)
    _write(a / "busy", pt=1.12, depth=3.9, memory=0.35)
    table = readme_table.render(a)
    assert _row(table, PT)[5] == "**miss**" and _row(table, DEPTH)[5] == "**miss**"


def test_disagreeing_runs_say_unstable_instead_of_a_verdict(tmp_path):
    a = _write(tmp_path / "r", pt=1.00, depth=3.45)
    _write(a / "busy", pt=1.1001, depth=0.17)
    table = readme_table.render(a)
    assert _row(table, PT)[5] == "**unstable** (1.00 vs 1.10)"
    assert _row(table, DEPTH)[5] == "**unstable** (3.45 vs 0.17)"
    assert "0 of 2 compared rows agree" in table
    # exactly at the boundary it agrees
    _write(a / "busy", pt=1.10, depth=3.45 * 1.1)
    recs = {r["result"]: r for r in readme_table.compare(a, a / "busy") if r["value"] is not None}
    assert recs["pt_vs_ntp"]["status"] == recs["teacher_batching"]["status"] == "agree"


def test_missing_or_incomparable_second_run_is_not_checked(tmp_path):
    a = _write(tmp_path / "r", pt=1.00, depth=5.0)
    table = readme_table.render(a)  # no busy/ folder at all
    assert _row(table, PT)[3:6] == ["–", "<= 1.1", "pass; stability not checked (no second run)"]
    assert "Stability not checked: no comparable second run" in table
    _write(a / "busy", depth=5.0, code={**CODE, "fingerprint": "other"})
    recs = {r["result"]: r for r in readme_table.compare(a, a / "busy") if r["value"] is not None}
    assert recs["pt_vs_ntp"]["why"] == "no second run" and recs["teacher_batching"]["why"] == "different code"
    _write(a / "busy", pt=1.0, depth=5.0, config={"batch": 8})
    assert {r["why"] for r in readme_table.compare(a, a / "busy") if r["value"] is not None} == {"different settings"}
    _write(a / "busy", pt=1.0, config={}, load=(9.0, 9.0))  # only the load differs: comparable
    assert readme_table.compare(a, a / "busy")[0]["status"] == "agree"
    assert _row(readme_table.render(a), "| 2 | IFT step ÷")[2:6] == ["not run", "–", "<= 1", "not run"]


def test_ratio_headline_is_the_cpu_minimum_and_judges_the_goal():
    num = summarize([2.0, 9.0, 3.0], [1.9, 2.2, 2.0])  # wall disturbed, CPU not
    den = summarize([1.0, 1.5, 8.0], [1.0, 1.1, 1.05])
    r = ratio(num, den, goal=1.95)
    assert r["headline"] == "value_cpu_min" and r["value_cpu_min"] == pytest.approx(1.9 / 1.0)
    assert r["value"] == pytest.approx(3.0 / 1.5) and r["value_cpu"] == pytest.approx(2.0 / 1.05)
    assert r["pass"] is True  # 1.9 <= 1.95, although the wall median (2.0) is above the goal
    wall = ratio(summarize([2.0, 9.0, 3.0]), summarize([1.0, 1.5, 8.0]), goal=1.95)
    assert wall["headline"] == "value_min" and "value_cpu_min" not in wall and wall["pass"] is False
    assert ratio(num, den, goal=1.95, headline="value")["pass"] is False
    with pytest.raises(ValueError, match="headline"):
        ratio(summarize([1.0]), summarize([1.0]), headline="value_cpu_min")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper has stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_busy_neighbour_spins_and_is_always_stopped():
    with stability.busy_neighbour() as proc:
        end = time.monotonic() + 10
        while stability.busy_seconds(proc.pid) < 0.3 and time.monotonic() < end:
            time.sleep(0.1)
        assert stability.busy_seconds(proc.pid) >= 0.3  # it really burns CPU
    assert proc.poll() is not None and not _alive(proc.pid)
    with pytest.raises(RuntimeError):
        with stability.busy_neighbour() as proc:
            raise RuntimeError("a benchmark run failed")
    assert proc.poll() is not None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_busy_neighbour_stops_when_the_run_is_interrupted_or_killed(how):
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from benchmarks.stability import busy_neighbour
        with busy_neighbour() as proc:
            print(proc.pid, flush=True)
            time.sleep(60)
    """)
    run = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(run.stdout.readline())
        assert _alive(pid)
        run.send_signal(how)
        run.wait(10)
        assert _wait_gone(pid), f"spinner {pid} still running after {how!r}"
    finally:
        if run.poll() is None:
            run.kill()


FAKE = """
import json, os, sys
sys.path.insert(0, {root!r})
from benchmarks.common import ratio, results_dir, summarize  # light: write_result would import torch for machine()
from benchmarks.stability import NEIGHBOUR_ENV, code_identity
busy = os.environ.get(NEIGHBOUR_ENV)
pid = int(busy.split("pid ")[1].split(")")[0]) if busy else None
alive = pid is not None and os.path.exists(f"/proc/{{pid}}")
k = 2.0 if busy else 1.0  # the busy run disagrees on purpose
r = ratio(summarize([k], [k]), summarize([1.0], [1.0]), goal=1.10)
(results_dir() / "pt_vs_ntp.json").write_text(json.dumps({{
    "name": "pt_vs_ntp", "code": code_identity(), "neighbour": busy, "machine": {{}}, "config": {{"batch": 4}},
    "ratios": {{"pt_cached_over_ntp": r}}, "neighbour_alive": alive, "neighbour_pid": pid}}))
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_run_stability_end_to_end_with_a_fake_benchmark(tmp_path, monkeypatch):
    from benchmarks import run

    script = tmp_path / "fake.py"
    script.write_text(FAKE.format(root=str(ROOT)))
    out = tmp_path / "results"
    monkeypatch.setenv("OLAVLM_BENCH_RESULTS", str(out))
    monkeypatch.setattr(run, "BENCHMARKS", [run.Bench("pt_vs_ntp", "fake", False)])
    monkeypatch.setattr(run, "command", lambda bench, args: [sys.executable, str(script)])
    assert run.main(["--stability"]) == 0
    first, busy = (json.loads((f / "pt_vs_ntp.json").read_text()) for f in (out, out / "busy"))
    assert first["neighbour"] is None and first["neighbour_pid"] is None
    assert busy["neighbour_alive"] is True and not _alive(busy["neighbour_pid"])  # ran beside it, stopped after
    for folder, role in ((out, "first"), (out / "busy", "busy")):
        summary = json.loads((folder / "run.json").read_text())
        assert summary["role"] == role and len(summary["load_average_before"]) == 3
        assert summary["runs"][0]["ok"] and len(summary["runs"][0]["load_average_after"]) == 3
        rec = summary["stability"]["rows"][0]
        assert (rec["value"], rec["other"], rec["status"]) == (1.0, 2.0, "unstable")
    assert json.loads((out / "busy" / "run.json").read_text())["neighbour_cpu_s"] > 0
    assert "**unstable** (1.00 vs 2.00)" in readme_table.render(out)
    # a plain run afterwards compares with the busy run of the same code
    assert run.main([]) == 0
    assert json.loads((out / "run.json").read_text())["stability"]["rows"][0]["status"] == "unstable"
    os.environ.pop(stability.NEIGHBOUR_ENV, None)
