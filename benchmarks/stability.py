"""The stability check of the benchmark table: which two runs may be compared, whether their headline
ratios agree, and the busy neighbour the second run of ``make bench-stability`` runs beside.

Two result files of one benchmark are comparable when they were measured with the same code (a hash
of ``src/olavlm`` and ``benchmarks/*.py``, recorded by every benchmark), the same settings (its
``config`` minus the load averages) and the same machine and library versions. Two comparable values
agree when the larger is at most ``1 + TOLERANCE`` times the smaller.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.10  # two runs agree when max / min <= 1.10
NEIGHBOUR_ENV = "OLAVLM_BENCH_NEIGHBOUR"  # set for the benchmarks of the busy run, recorded in their JSON

# A pure-Python spin loop: one core at 100 %, no memory traffic to speak of. It stops by itself when the
# process that started it is gone (checked every few million iterations), so a killed run leaves no spinner.
SPIN = """
import os, sys
parent, n = int(sys.argv[1]), 0
while True:
    n += 1
    if n % 2_000_000 == 0 and os.getppid() != parent:
        break
"""


def code_identity(root: Path = ROOT) -> dict[str, Any]:
    """``fingerprint``: sha256 of every ``src/olavlm/**/*.py`` and ``benchmarks/*.py`` (paths and
    bytes), the same whether or not the tree is committed; ``commit``: ``git rev-parse HEAD`` for
    people (None outside a git checkout)."""
    h = hashlib.sha256()
    files = sorted([*(root / "src" / "olavlm").rglob("*.py"), *(root / "benchmarks").glob("*.py")])
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"fingerprint": h.hexdigest()[:16], "commit": commit, "files": len(files)}


def _settings(config: dict) -> dict:
    return {k: v for k, v in (config or {}).items() if not k.startswith("load_average")}


def _machine(machine: dict) -> dict:
    return {k: machine.get(k) for k in ("platform", "cpu_count", "torch", "transformers", "cuda")}


def not_comparable(a: dict, b: dict) -> str | None:
    """Why two results of one benchmark may not be compared (None: they may)."""
    fa, fb = (a.get("code") or {}).get("fingerprint"), (b.get("code") or {}).get("fingerprint")
    if not fa or not fb:
        return "a run without a code fingerprint"
    if fa != fb:
        return "different code"
    if _settings(a.get("config")) != _settings(b.get("config")):
        return "different settings"
    if _machine(a.get("machine") or {}) != _machine(b.get("machine") or {}):
        return "different machine or versions"
    return None


def agree(a: float, b: float, tolerance: float = TOLERANCE) -> bool:
    """The two values are within ``tolerance`` of each other: max / min <= 1 + tolerance (both > 0)."""
    if a <= 0 or b <= 0:
        return a == b
    return max(a, b) / min(a, b) <= 1 + tolerance + 1e-12


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


@contextlib.contextmanager
def busy_neighbour() -> Iterator[subprocess.Popen]:
    """Run a one-core spin loop beside the block; it is stopped when the block ends, however it ends
    (an exception, Ctrl-C, SIGTERM: turned into SystemExit for the duration), and stops by itself if
    this process is killed."""
    proc = subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid())], stdin=subprocess.DEVNULL)
    previous = signal.getsignal(signal.SIGTERM)
    in_main = True
    try:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    except ValueError:  # not the main thread: SIGTERM keeps its handler, the spinner still stops itself
        in_main = False
    try:
        yield proc
    finally:
        stop(proc)
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):  # pragma: no cover - exercised through a subprocess in the tests
    raise SystemExit(128 + signum)


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate ``proc`` and wait for it; kill it when it does not go within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def busy_seconds(pid: int) -> float | None:
    """CPU seconds the process ``pid`` has used (Linux /proc), None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def describe_neighbour(proc: subprocess.Popen) -> str:
    return f"pure-Python spin loop, 1 process (pid {proc.pid}), started {time.strftime('%H:%M:%S', time.gmtime())}Z"
