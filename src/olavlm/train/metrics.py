"""Training metrics: accumulation over micro-steps and ranks, and the sinks.

The model only *returns* detached scalars (``out.metrics``); everything is logged from here, on the
main process: a tqdm progress bar with ETA, ``metrics.jsonl``, TensorBoard, and W&B when
``train.report_to`` lists it. At the end: ``summary.json`` and ``loss.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import typing
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from olavlm.config import ReportSink

log = logging.getLogger(__name__)

SINKS = tuple(s for s in typing.get_args(ReportSink) if s != "none")  # ("none" = only jsonl + bar)


def check_report_to(report_to: list[str]) -> None:
    """Fail early (before the model loads) on an unknown sink or a missing optional package."""
    from olavlm.config import ConfigError

    for sink in report_to:
        if sink not in (*SINKS, "none"):
            raise ConfigError(f"train.report_to: {sink!r} is not one of {[*SINKS, 'none']}")
    if "wandb" in report_to:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise ConfigError("train.report_to: 'wandb' is listed but the wandb package is not installed "
                              "(pip install wandb, or the [wandb] extra)") from e


class StepAccumulator:
    """Sums ``out.metrics`` over the micro-steps of a logging interval, plus throughput counters.

    :meth:`reduce` averages each metric over the micro-steps (and ranks) that reported it and sums
    the counters (samples, tokens, skipped/<reason>) over ranks.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.counters: dict[str, int] = defaultdict(int)
        self._pending: list[dict[str, torch.Tensor]] = []

    def add_metrics(self, metrics: dict[str, Any]) -> None:
        self._pending.append({k: (v.detach() if torch.is_tensor(v) else torch.tensor(float(v)))
                              for k, v in metrics.items()})

    def add_counts(self, **counts: int) -> None:
        for k, v in counts.items():
            self.counters[k] += int(v)

    def add_skipped(self, skipped: dict[str, int] | None) -> None:
        for reason, n in (skipped or {}).items():
            self.counters[f"skipped/{reason}"] += int(n)

    def _flush(self) -> None:  # one host sync per logging interval, not per micro-step
        for metrics in self._pending:
            for k, v in metrics.items():
                self.sums[k] += float(v.float())
                self.counts[k] += 1
        self._pending.clear()

    def reduce(self, accelerator=None) -> dict[str, float]:
        """Metrics averaged over micro-steps and ranks; counters summed over ranks. Resets."""
        self._flush()
        local = {"sums": dict(self.sums), "counts": dict(self.counts), "counters": dict(self.counters)}
        parts = [local]
        if accelerator is not None and accelerator.num_processes > 1:
            import torch.distributed as dist

            parts = [None] * accelerator.num_processes
            dist.all_gather_object(parts, local)
        sums, counts, counters = defaultdict(float), defaultdict(int), defaultdict(int)
        for part in parts:
            for k, v in part["sums"].items():
                sums[k] += v
                counts[k] += part["counts"][k]
            for k, v in part["counters"].items():
                counters[k] += v
        self.reset()
        out = {k: sums[k] / counts[k] for k in sorted(sums)}
        out.update(sorted(counters.items()))
        return out


def log_due(step: int, log_every: int, total_steps: int, *, forced: bool = False) -> bool:
    """A logged step: every ``log_every`` steps, the last step, and whenever ``forced`` (a save or an
    epoch end, so the run state's counters are complete there)."""
    return step % log_every == 0 or step == total_steps or forced


def fold_counters(values: dict[str, float], state, epoch_skipped: dict[str, int], lr: float,
                  elapsed: float) -> dict[str, float]:
    """Move the interval's counters (samples, tokens, skipped/<reason>) into the run state
    (``olavlm.train.checkpoint.TrainState``), and add lr and throughput; returns what gets logged."""
    elapsed = max(elapsed, 1e-9)
    values["lr"] = lr
    values["samples_per_s"] = values.get("samples", 0) / elapsed
    values["tokens_per_s"] = values.get("tokens", 0) / elapsed
    state.samples += int(values.pop("samples", 0))
    state.tokens += int(values.pop("tokens", 0))
    for key in [k for k in values if k.startswith("skipped/")]:
        reason = key.split("/", 1)[1]
        state.skipped[reason] = state.skipped.get(reason, 0) + int(values[key])
        epoch_skipped[reason] = epoch_skipped.get(reason, 0) + int(values[key])
    return values


class MetricsLogger:
    """Sinks for per-step metrics. Only the main process writes; others get a no-op logger."""

    def __init__(self, run_dir: str | Path, *, report_to: list[str], total_steps: int, start_step: int = 0,
                 enabled: bool = True, run_name: str | None = None, config: dict | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.run_dir / "metrics.jsonl"
        _truncate_after(self.jsonl, start_step)  # a resumed run rewrites the steps after its checkpoint
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(name=run_name, dir=str(self.run_dir), config=config, resume="allow")
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Write one logged step to every sink."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _finite(v) for k, v in values.items()}}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.bar is not None:
            shown = {k: f"{values[k]:.4g}" for k in ("loss", "lr") if k in values}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def epoch_end(self, epoch: int, skipped: dict[str, int]) -> None:
        """Print the epoch's skipped-sample counts (also when there were none)."""
        if not self.enabled:
            return
        text = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
        message = f"epoch {epoch} done; skipped samples: {text}"
        if self.bar is not None:
            self.bar.write(message)
        log.info(message)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Write summary.json and loss.png (when given a summary) and close the sinks."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if summary is not None:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            plot_losses(self.jsonl, self.run_dir / "loss.png")
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            if summary is not None:
                self.wandb.summary.update({k: v for k, v in summary.items() if not isinstance(v, dict)})
            self.wandb.finish()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A line that is not a JSON object (a torn last line left by a
    killed process, or damage) is skipped with one warning naming the file and line numbers."""
    return _parse_metrics(Path(path))[0]


def _parse_metrics(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(records, numbers of the skipped lines)."""
    if not path.is_file():
        return [], []
    records, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad.append(number)
    if bad:
        log.warning("%s: skipped %d unreadable line(s) (%s), e.g. a line torn by a killed run", path, len(bad),
                    ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else ""))
    return records, bad


def _truncate_after(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (a resumed run rewrites the ones after), dropping torn lines."""
    records, bad = _parse_metrics(path)
    kept = [r for r in records if r["step"] <= step]
    torn_end = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    if len(kept) != len(records) or bad or torn_end:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)


def _finite(v: float) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def plot_losses(jsonl: str | Path, out: str | Path) -> Path | None:
    """``loss.png``: total loss and each component (``loss``, ``loss/ntp``, ``loss/<task>``) per step;
    the per-layer terms go in a second panel when present. Returns None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(jsonl)
    keys = sorted({k for r in records for k, v in r.items() if k.startswith("loss") and v is not None})
    if not keys:
        return None
    main = [k for k in keys if k.count("/") <= 1]
    layers = [k for k in keys if k.count("/") > 1]
    panels = [main] + ([layers] if layers else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, group, title in zip(axes[0], panels, ["loss components", "per-layer embedding terms"]):
        for k in group:
            pts = [(r["step"], r[k]) for r in records if r.get(k) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 30 else None)
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
