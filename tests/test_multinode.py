"""Two "nodes" on this machine: two ``torchrun --nnodes 2 --nproc_per_node 1`` launches meeting at a
c10d rendezvous on 127.0.0.1, training DDP through a stop and a resume into one run directory (the
shared filesystem). The result equals one uninterrupted two-process run; every file is written
once by the right rank; a run directory the other node cannot see is refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from olavlm.train import checkpoint as ckpt
from olavlm.devkit.smoke import smoke_overrides
from test_train_dist import WORKER, _assert_agree, _free_port, _ranks, _torchrun

PT = Path("configs/llama3_8b_clip336/pt.yaml")
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def _two_nodes(outs: tuple[Path, Path], overrides: list[str], **env) -> list[subprocess.CompletedProcess]:
    """Start both node launchers at once (node 0 hosts the rendezvous store) and wait for both."""
    port = _free_port()
    procs = []
    for node, out in enumerate(outs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"olavlm-{port}",
               "--rdzv_conf", f"is_host={int(node == 0)}", "--max_restarts", "0",
               str(WORKER), str(PT), str(out), *overrides]
        procs.append(subprocess.Popen(cmd, env={**os.environ, **ENV, **env}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    done = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, None))
    return done


def _ok(results: list[subprocess.CompletedProcess]) -> None:
    for r in results:
        assert r.returncode == 0, r.stdout[-6000:]


@pytest.mark.slow
def test_two_nodes_stop_resume_equals_one_node(tiny_dir, tmp_path):
    overrides = smoke_overrides(tiny_dir, PT, tmp_path) + [
        "--train.global_batch_size=4", "--train.micro_batch_size=1", "--train.max_steps=3", "--train.save_every=1",
        "--train.keep_last=2"]
    single = tmp_path / "one-node"
    _torchrun(PT, single, overrides)
    out = tmp_path / "two-nodes"
    _ok(_two_nodes((out, out), overrides, OLAVLM_TEST_STOP_AFTER="2"))
    first = ckpt.list_checkpoints(out)[-1]
    assert first.name == "step-00000002" and not (out / "final").exists()
    assert sorted(p.name for p in (first / "rng").iterdir()) == ["rank0.json", "rank1.json"]  # one file per rank
    _ok(_two_nodes((out, out), overrides))
    a, b = _ranks(out)
    _assert_agree(a, b)
    s = a["summary"]
    assert (s["world_size"], s["accumulation"], s["steps"], s["samples"], s["finished"]) == (2, 2, 3, 12, True)
    ref = torch.load(single / "rank0.pt", weights_only=False)["trainable"]
    for name, value in a["trainable"].items():
        torch.testing.assert_close(value, ref[name], rtol=1e-5, atol=1e-6, msg=name)
    # written once, by the main process: one metrics line per step over both invocations, rotation kept 2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    assert not list((out / "checkpoints").glob(".tmp-*")) and not list(out.glob(".shared-check-*"))
    assert (out / "final" / "olavlm.safetensors").is_file()


@pytest.mark.slow
def test_run_dir_not_shared_by_the_nodes_is_refused(tiny_dir, tmp_path):
    overrides = smoke_overrides(tiny_dir, PT, tmp_path) + ["--train.global_batch_size=2", "--train.micro_batch_size=1"]
    results = _two_nodes((tmp_path / "node0", tmp_path / "node1"), overrides)  # each node its own disk
    assert all(r.returncode != 0 for r in results)
    assert any("train.output_dir:" in r.stdout and "is not shared by all ranks" in r.stdout for r in results)
    assert not (tmp_path / "node1").exists()  # only the main process creates the run directory


SCRIPTS = Path("scripts/train")


def _script(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], env={**os.environ, "PYTHON": "python3", "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=60)


def test_launch_commands_for_rendezvous_static_ranks_and_deepspeed_hostfile(tmp_path):
    proc = _script(str(SCRIPTS / "pretrain.sh"), "--train.max_steps=5", NGPU="8", NNODES="2",
                   RDZV_ENDPOINT="node01:29500", RDZV_ID="pt")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["python3", "-m", "torch.distributed.run", "--nproc_per_node", "8", "--nnodes", "2",
                                   "--rdzv_backend", "c10d", "--rdzv_endpoint", "node01:29500", "--rdzv_id", "pt",
                                   "-m", "olavlm.cli", "train", "configs/llama3_8b_clip336/pt.yaml", "--train.max_steps=5"]
    proc = _script(str(SCRIPTS / "finetune.sh"), NGPU="4", NNODES="2", NODE_RANK="1", MASTER_ADDR="node01")
    assert "--nnodes 2 --node_rank 1 --master_addr node01 --master_port 29500" in proc.stdout
    hosts = tmp_path / "hostfile"
    hosts.write_text("node01 slots=8\nnode02 slots=8\n")
    proc = _script(str(SCRIPTS / "pretrain.sh"), NGPU="8", LAUNCHER="deepspeed", HOSTFILE=str(hosts))
    assert proc.stdout.split()[:3] == ["python3", "-m", "deepspeed.launcher.runner"]
    assert f"--hostfile {hosts} --master_port 29500 --no_local_rank --module olavlm.cli train" in proc.stdout
    proc = _script(str(SCRIPTS / "pretrain.sh"), NGPU="8", LAUNCHER="deepspeed")
    assert proc.returncode == 2 and "LAUNCHER=deepspeed needs HOSTFILE" in proc.stderr


def test_slurm_script_starts_one_launcher_per_node_at_the_first_nodes_rendezvous(tmp_path):
    """scontrol and srun replaced by stand-ins that print what they were given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/sh\necho "srun $* NNODES=$NNODES NGPU=$NGPU RDZV=$RDZV_ENDPOINT ID=$RDZV_ID"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(Path.cwd())}
    proc = _script(str(SCRIPTS / "slurm.sbatch"), "finetune", "--train.micro_batch_size=8", **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("srun --kill-on-bad-exit=1 bash scripts/train/finetune.sh --train.micro_batch_size=8 "
                                   "NNODES=2 NGPU=8 RDZV=gpu-a17:29500 ID=olavlm-4242")
    proc = _script(str(SCRIPTS / "slurm.sbatch"), "train9", **env)
    assert proc.returncode == 2 and "no scripts/train/train9.sh" in proc.stderr
