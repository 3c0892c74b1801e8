"""Checkpoints and run directories under damage and misuse: every kind of damaged checkpoint file
falls back to the previous intact checkpoint, a planted pickle never runs, the run directory is
locked (a live holder refuses, a dead one is taken over), a torn metrics line is tolerated, a
finished run is not retrained, an older --resume sets newer checkpoints aside, and changed
hyper-parameters are reported."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from olavlm.cli import main as cli_main
from olavlm.config import TrainConfig, load_config
from olavlm.errors import UserError
from olavlm.train import checkpoint as ckpt
from olavlm.train import manifest, rundir
from olavlm.train.loop import train
from olavlm.train.metrics import MetricsLogger, read_metrics
from olavlm.devkit.smoke import smoke_overrides, write_smoke_dataset

PT = Path("configs/llama3_8b_clip336/pt.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# -- a small model, optimizer and scheduler behind a real Accelerator --------------------------------


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)


@pytest.fixture
def setup(tmp_path):
    from transformers import get_scheduler

    from olavlm.train.engine import build_accelerator

    accelerator = build_accelerator(TrainConfig(bf16=False), 1)
    torch.manual_seed(0)
    model = Small()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)
    return accelerator, model, opt, sched, tmp_path


def _step(model, opt, sched):
    sum((p ** 2).sum() for p in model.parameters()).backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def _save(setup, step):
    accelerator, model, opt, sched, out = setup
    _step(model, opt, sched)
    state = ckpt.TrainState(step=step, step_in_epoch=step, samples=4 * step)
    return ckpt.save_checkpoint(accelerator, model, opt, sched, state, out, keep_last=5, engine_state=False,
                                config={"train": {"learning_rate": 0.1, "step": step}})


def _resume(setup, resume="auto"):
    """What the loop does on resume: choose (verify, fall back), load, restore RNG."""
    accelerator, model, opt, sched, out = setup
    chosen = rundir.choose_checkpoint(rundir.plan_resume(out, resume), accelerator)
    if chosen is not None:
        ckpt.load_checkpoint(chosen, accelerator, model, opt, sched, engine_state=False)
        ckpt.restore_rng(chosen, 0)
    return chosen


def _resign(folder: Path, rel: str) -> None:
    """Rewrite the manifest entry of ``rel`` to match its (planted) content, as an attacker would."""
    data = json.loads((folder / manifest.MANIFEST).read_text())
    size, digest = manifest._digest(folder / rel, sync=False)
    data["files"][rel] = {"size": size, "sha256": digest}
    (folder / manifest.MANIFEST).write_text(json.dumps(data))


FILES = ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng/rank0.json", "state.json", "manifest.json"]


def _damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif how == "delete":
        file.unlink()
    else:  # garble: same size, 16 bytes flipped in the middle
        mid = len(data) // 2
        file.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 16]) + data[mid + 16:])


@pytest.mark.parametrize("how", ["truncate", "delete", "garble"])
@pytest.mark.parametrize("rel", FILES)
def test_damaged_newest_checkpoint_falls_back_to_previous(setup, rel, how, caplog):
    accelerator, model, opt, sched, out = setup
    good = _save(setup, 2)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    bad = _save(setup, 4)
    _damage(bad / rel, how)
    with caplog.at_level(logging.WARNING, logger="olavlm.train.rundir"):
        assert _resume(setup) == good
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 1 and rel in lines[0] and "step-00000004" in lines[0] and "step-00000002" in lines[0], lines
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    with pytest.raises(ckpt.CheckpointError, match=r"--resume .*step-00000004") as e:  # named explicitly: an error
        _resume(setup, str(bad))
    assert "\n" not in str(e.value) and rel.split("/")[-1] in str(e.value) and isinstance(e.value, UserError)


def test_missing_marker_and_only_damaged_checkpoints(setup, caplog):
    out = setup[-1]
    good, bad = _save(setup, 2), _save(setup, 4)
    (bad / ckpt.MARKER).unlink()
    with caplog.at_level(logging.WARNING, logger="olavlm.train.rundir"):
        assert _resume(setup) == good
    assert any("complete marker is missing" in r.getMessage() for r in caplog.records)
    _damage(good / "optimizer.pt", "garble")  # nothing intact left: a one-line error, not a silent restart
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint.*--resume none") as e:
        _resume(setup)
    assert "\n" not in str(e.value)
    assert _resume(setup, "none") is None


def test_state_json_is_validated_strictly(setup):
    path = _save(setup, 2)
    good = json.loads((path / "state.json").read_text())
    cases = {"{}": "missing field", json.dumps({**good, "step": True}): "step must be an integer",
             json.dumps({**good, "epoch": "1"}): "epoch must be an integer",
             json.dumps({**good, "samples": -4}): "samples must be an integer >= 0",
             json.dumps({**good, "extra": 1}): "unknown field",
             json.dumps({**good, "step": 3}): "does not match the folder name",
             json.dumps({**good, "skipped": {"too_long": 1.5}}): "skipped must map",
             "[1, 2]": "expected a JSON object", "{": "not valid JSON"}
    for text, message in cases.items():
        (path / "state.json").write_text(text)
        with pytest.raises(ckpt.CheckpointError, match=message):
            ckpt.read_state(path)
        _resign(path, "state.json")  # even with a matching digest the checkpoint does not verify
        problem = ckpt.verify(path, setup[0])
        assert problem is not None and message.split()[0] in problem, (text, problem)


# -- planted pickles ------------------------------------------------------------------------------


class Payload:
    """Unpickling runs ``exec``: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _payload_bytes(marker: Path, fmt: str, tmp: Path) -> bytes:
    if fmt == "pickle":
        return pickle.dumps({"state": Payload(marker)})
    torch.save({"state": Payload(marker), "t": torch.zeros(2)}, tmp)
    return tmp.read_bytes()


def test_payloads_are_live(tmp_path):
    """The payloads below do run when unpickled the unsafe way (so the next test can fail)."""
    marker = tmp_path / "ran"
    pickle.loads(_payload_bytes(marker, "pickle", tmp_path / "p"))
    assert marker.exists()
    marker.unlink()
    _payload_bytes(marker, "torch", tmp_path / "p")
    torch.load(tmp_path / "p", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_planted_pickle_in_any_checkpoint_file_never_runs(setup, fmt, tmp_path):
    accelerator, model, opt, sched, out = setup
    marker = tmp_path / "PAYLOAD-RAN"
    good = _save(setup, 2)
    for rel in ckpt_files(good):
        for resign in (False, True):
            bad = _save(setup, 4)
            (bad / rel).write_bytes(_payload_bytes(marker, fmt, tmp_path / "payload.pt"))
            if resign and rel != manifest.MANIFEST:
                _resign(bad, rel)
            try:
                chosen = _resume(setup)
                assert chosen == good, (rel, resign)  # fell back past it
            except ckpt.CheckpointError as e:  # or refused it with one line naming the file
                assert "\n" not in str(e) and rel.split("/")[-1] in str(e), (rel, resign, str(e))
                assert resign and rel.endswith((".pt", ".safetensors")), (rel, resign, str(e))
                if rel.endswith(".pt"):  # stopped by weights_only=True, naming the global when torch reports it
                    assert "refused" in str(e) and (fmt == "pickle" or "(exec)" in str(e)), str(e)
            assert not marker.exists(), f"payload in {rel} ran (resigned manifest: {resign})"
            shutil.rmtree(bad)


def ckpt_files(path: Path) -> list[str]:
    """Every file resume reads: all listed files plus the manifest itself."""
    found = manifest.files_of(path, skip=(ckpt.MARKER,))
    assert {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng/rank0.json", "state.json",
            "config.json", "manifest.json"} <= set(found), found
    return found


def test_engine_loads_are_forced_weights_only(tmp_path):
    """Accelerate and DeepSpeed ask for weights_only=False when reading engine/; inside
    weights_only_loads() they get weights_only=True, and DeepSpeed's own plain-data classes pass."""
    from accelerate.utils.other import load as accelerate_load
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    marker = tmp_path / "PAYLOAD-RAN"
    planted = tmp_path / "optim_states.pt"
    _payload_bytes(marker, "torch", planted)
    engine = TorchCheckpointEngine()
    real = torch.load
    with ckpt.weights_only_loads():
        for reader in (engine.load, accelerate_load, lambda f: torch.load(f, weights_only=False)):
            with pytest.raises(pickle.UnpicklingError, match="GLOBAL exec"):
                reader(str(planted))
        genuine = tmp_path / "genuine.pt"
        torch.save({"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
                    "address": fragment_address(numel=3, start=0), "t": torch.ones(2)}, genuine)
        back = engine.load(str(genuine))
        assert back["zero_stage"] == ZeroStageEnum.gradients and back["loss_scaler"].cur_scale == 1.0
    assert torch.load is real and not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # outside, DeepSpeed's classes are not allowed by default
        torch.load(genuine, weights_only=True)


def test_checkpoint_files_are_fsynced_before_rename_and_marker(setup, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))
    path = _save(setup, 2)
    synced = [p for kind, p in events if kind == "fsync"]
    rename = events.index(next(e for e in events if e[0] == "replace"))
    tmp = events[rename][1]
    before = {p for kind, p in events[:rename] if kind == "fsync"}
    for rel in manifest.files_of(path):
        assert f"{tmp}/{rel}" in before, rel  # every file, the manifest and the marker
    assert tmp in before and f"{tmp}/rng" in before  # and the directories
    assert synced.index(f"{tmp}/{manifest.MANIFEST}") < synced.index(f"{tmp}/{ckpt.MARKER}")
    assert str(path.parent) in {p for kind, p in events[rename:] if kind == "fsync"}  # the rename itself
    assert ckpt.verify(path) is None


# -- the loop on tiny models ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    file = write_smoke_dataset(root / "data", num_images=10, text_only=2, seed=1)
    return root, smoke_overrides(tiny_dir, PT, root) + [
        f"--data.train_file={file}", f"--data.image_folder={file.parent / 'images'}",
        "--train.global_batch_size=4", "--train.micro_batch_size=2",  # 3 steps per epoch
        "--train.max_steps=8", "--train.save_every=2", "--train.keep_last=3", "--train.report_to=[]"]


def _cfg(data, out: Path, *extra: str):
    return load_config(PT, data[1] + [f"--train.output_dir={out}", *extra])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "olavlm.safetensors"))


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(data):
    out = data[0] / "straight"
    train(_cfg(data, out), resume="none")
    return out


def test_loop_falls_back_past_a_damaged_checkpoint_exactly(data, straight, caplog):
    out = data[0] / "fallback"
    train(_cfg(data, out), stop_after_steps=6)  # checkpoints 2, 4, 6
    _damage(out / "checkpoints" / "step-00000006" / "optimizer.pt", "truncate")
    with caplog.at_level(logging.WARNING, logger="olavlm.train.rundir"):
        res = train(_cfg(data, out))
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 1 and "optimizer.pt" in lines[0] and "resuming from step-00000004" in lines[0], lines
    assert res.summary["steps"] == 8
    aside = list((out / "superseded").glob("*/checkpoints/step-00000006"))
    assert len(aside) == 1 and (aside[0] / "optimizer.pt").is_file()  # set aside, not deleted
    a, b = _weights(straight), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _steps(out) == list(range(1, 9))


def test_two_trainings_on_one_dir(data, monkeypatch):
    """The second run stops with one line naming the holder's pid and host; the first is unharmed."""
    out = data[0] / "locked"
    reached, go, result = threading.Event(), threading.Event(), {}
    real_save = ckpt.save_checkpoint

    def pausing_save(*a, **k):  # the first run pauses after its first checkpoint
        path = real_save(*a, **k)
        reached.set()
        assert go.wait(60)
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", pausing_save)
    first = threading.Thread(target=lambda: result.update(res=train(_cfg(data, out), resume="none")))
    first.start()
    try:
        assert reached.wait(60)
        holder = json.loads((out / rundir.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(rundir.RunDirLocked) as e:
            train(_cfg(data, out))
    finally:
        go.set()
        first.join(60)
    message = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in message
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message and str(out) in message
    assert result["res"].summary["steps"] == 8 and _steps(out) == list(range(1, 9))  # no duplicated rows
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_stale_lock_of_a_killed_process_is_taken_over(data, tmp_path, caplog):
    out = data[0] / "stale"
    code = ("import sys, time; from olavlm.train.rundir import RunDirLock; RunDirLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["src", os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunDirLocked, match=f"pid {proc.pid} on host"):  # alive: refused
            rundir.RunDirLock(out).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert json.loads((out / rundir.LOCK_NAME).read_text())["pid"] == proc.pid  # the stale file is still there
    with caplog.at_level(logging.WARNING, logger="olavlm.train.rundir"):
        res = train(_cfg(data, out, "--train.max_steps=2"), resume="none")
    assert res.summary["steps"] == 2
    assert any(f"taking over the lock left by pid {proc.pid}" in r.getMessage() for r in caplog.records)


def test_lock_leaves_no_directory_behind_on_early_errors(data, tmp_path):
    from olavlm.config import ConfigError

    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="train.init_from"):  # raised while the lock is held
        train(_cfg(data, out, "--train.init_from=/nowhere"), resume="none")
    assert not out.exists()
    with rundir.RunDirLock(out) as lock:
        assert lock.fd is not None and (out / rundir.LOCK_NAME).is_file()
    assert not out.exists()


def test_lock_file_replaced_while_locking_is_locked_again(tmp_path, monkeypatch):
    """Locking a file that was unlinked and recreated in between would lock nothing: retry on the new one."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    real_flock, calls = fcntl.flock, []

    def racing_flock(fd, op):
        real_flock(fd, op)
        calls.append(fd)
        if len(calls) == 1:  # another process removes and recreates the lock file right now
            (out / rundir.LOCK_NAME).unlink()
            (out / rundir.LOCK_NAME).write_text("")

    monkeypatch.setattr(fcntl, "flock", racing_flock)
    lock = rundir.RunDirLock(out)
    lock.acquire()
    try:
        assert len(calls) == 2 and os.fstat(lock.fd).st_ino == os.stat(out / rundir.LOCK_NAME).st_ino
        assert json.loads((out / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_torn_metrics_line_is_tolerated(data, tmp_path, caplog):
    log_dir = tmp_path / "m"
    logger = MetricsLogger(log_dir, report_to=[], total_steps=5)
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step})
    logger.close()
    with open(log_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.2')  # killed in the middle of a write
    with caplog.at_level(logging.WARNING, logger="olavlm.train.metrics"):
        assert [r["step"] for r in read_metrics(log_dir / "metrics.jsonl")] == [1, 2, 3]
    assert any("metrics.jsonl: skipped 1 unreadable line(s) (4)" in r.getMessage() for r in caplog.records)
    resumed = MetricsLogger(log_dir, report_to=[], total_steps=5, start_step=3)
    resumed.log(4, {"loss": 0.25})
    resumed.close()
    assert [json.loads(x)["step"] for x in (log_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    # in a real run: torn after a stop, the resumed run still finishes and its log parses
    out = data[0] / "torn"
    train(_cfg(data, out), stop_after_steps=4)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    assert train(_cfg(data, out)).summary["steps"] == 8
    assert _steps(out) == list(range(1, 9))


def test_finished_run_is_not_retrained(data, straight, monkeypatch, capsys):
    import olavlm.train.loop as loop

    straight = shutil.copytree(straight, data[0] / "finished")
    before = (straight / "final" / "olavlm.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(loop, "build_model", lambda cfg: pytest.fail("a finished run was trained again"))
    res = train(_cfg(data, straight))
    assert res.already_finished and res.final_dir == straight / "final" and res.summary["steps"] == 8
    assert cli_main(["train", str(PT), *data[1], f"--output-dir={straight}"]) == 0
    assert "already finished (step 8)" in capsys.readouterr().out
    assert (straight / "final" / "olavlm.safetensors").stat().st_mtime_ns == before
    monkeypatch.undo()
    again = train(_cfg(data, straight, "--train.max_steps=2"), force=True)  # --force: from step 0
    assert not again.already_finished and again.summary["steps"] == 2 and _steps(straight) == [1, 2]
    aside = list((straight / "superseded").glob("*-from-step-0"))
    assert len(aside) == 1 and (aside[0] / "final" / "olavlm.safetensors").is_file()
    assert sorted(p.name for p in (aside[0] / "checkpoints").iterdir()) == ["step-00000002", "step-00000004",
                                                                               "step-00000006"]
    assert len(read_metrics(aside[0] / "metrics.jsonl")) == 8


def test_resume_to_older_checkpoint_sets_newer_aside(data, caplog):
    out = data[0] / "older"
    train(_cfg(data, out), stop_after_steps=6)
    older = out / "checkpoints" / "step-00000002"
    with caplog.at_level(logging.WARNING, logger="olavlm.train.rundir"):
        res = train(_cfg(data, out), resume=str(older), stop_after_steps=1)
    assert res.summary["steps"] == 3
    moved = [r.getMessage() for r in caplog.records if "aside" in r.getMessage()]
    assert len(moved) == 1 and "checkpoints/step-00000004, checkpoints/step-00000006" in moved[0], moved
    assert "continues from step 2" in moved[0] and "not deleted" in moved[0]
    aside = next((out / "superseded").glob("*-from-step-2"))
    for name in ("step-00000004", "step-00000006"):
        assert ckpt.verify(aside / "checkpoints" / name) is None  # intact where they were moved
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002", "step-00000003"]
    assert _steps(out) == [1, 2, 3]


def test_changed_hyperparameters_are_reported_on_resume(data, caplog):
    out = data[0] / "changed"
    train(_cfg(data, out), stop_after_steps=2)
    lr = load_config(PT, data[1]).train.learning_rate
    with caplog.at_level(logging.WARNING, logger="olavlm.train.rundir"):
        train(_cfg(data, out, f"--train.learning_rate={lr / 2}", "--train.warmup_ratio=0.25"), stop_after_steps=1)
    lines = [r.getMessage() for r in caplog.records if "changed" in r.getMessage()]
    assert lines == [f"resume from step-00000002: train.learning_rate changed {json.dumps(lr)} -> {json.dumps(lr / 2)}",
                     f"resume from step-00000002: train.warmup_ratio changed "
                     f"{json.dumps(load_config(PT, data[1]).train.warmup_ratio)} -> 0.25"], lines
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="olavlm.train.rundir"):  # the same config again: nothing to say
        train(_cfg(data, out, f"--train.learning_rate={lr / 2}", "--train.warmup_ratio=0.25"), stop_after_steps=1)
    assert not [r for r in caplog.records if "changed" in r.getMessage()]
