"""torchrun worker for tests/test_train_dist.py: one training run, then every rank dumps its live
trainable parameters (whole, also under ZeRO-3) so the test can check that the ranks agree.

    torchrun --nproc_per_node 2 tests/dist/train_worker.py RECIPE OUT_DIR [--section.key=value ...]

With OLAVLM_TEST_STOP_AFTER=N the run leaves after N steps (checkpoint written); the next
invocation resumes from it (``--resume auto``).
"""

from __future__ import annotations

import contextlib
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def _full(model: torch.nn.Module):
    """Context in which a ZeRO-3 partitioned or FSDP-sharded model holds its full parameters."""
    from olavlm.train.engine import is_sharded, unsharded

    if is_sharded(model):
        return unsharded(model)
    params = list(model.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def main() -> None:
    from olavlm.config import load_config
    from olavlm.train.loop import train

    recipe, out, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    cfg = load_config(recipe, overrides + [f"--train.output_dir={out}"])
    stop = os.environ.get("OLAVLM_TEST_STOP_AFTER")
    result = train(cfg, resume="auto", stop_after_steps=int(stop) if stop else None)
    rank = dist.get_rank()
    with _full(result.model):  # ZeRO-3 leaves each rank a shard: compare whole parameters
        live = {n: p.detach().float().cpu().clone() for n, p in result.model.named_parameters() if p.requires_grad}
    torch.save({"trainable": live, "summary": result.summary, "world": dist.get_world_size()},
               os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
