"""torchrun worker (2 processes, gloo, CPU) for tests/test_model_dist.py.

1. Distributed InfoNCE / embedding loss over ranks holding 3 and 2 images (one masked) equals the
   single-process value over the same 5 images: loss, and gradients of predictions, targets and
   the logit scale.
2. DDP(find_unused_parameters=False) on the tiny OlaVLM: text-only micro-batches (N = 0 on one
   or both ranks), a PT batch without targets, and an IFT-style model on text-only data all
   train without unused-parameter errors, and gradients stay in sync across ranks.
3. Ranks agree on the number of LM-head calls of the NTP loss (what ZeRO-3 needs).
Prints "OK <rank>" at the end; any failure raises (non-zero exit).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from olavlm.objectives.embedding import embedding_loss  # noqa: E402


def check_distributed_infonce(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(0)
    counts = [3, 2]
    total = sum(counts)
    pred_all = torch.randn(total, 4, 6, generator=g)
    target_all = torch.randn(total, 4, 6, generator=g)
    valid_all = torch.tensor([True, True, True, True, False])
    theta0 = 2.3
    # single process over all 5 images (no gather)
    p_ref = pred_all.clone().requires_grad_(True)
    t_ref = target_all.clone().requires_grad_(True)
    th_ref = torch.tensor(theta0, requires_grad=True)
    ref = embedding_loss(p_ref, t_ref, valid_all, th_ref, gather=False)
    ref.total.backward()
    # this rank's share, weighted by its valid rows so the sum over ranks is the global mean
    lo = sum(counts[:rank])
    sl = slice(lo, lo + counts[rank])
    p = pred_all[sl].clone().requires_grad_(True)
    t = target_all[sl].clone().requires_grad_(True)
    th = torch.tensor(theta0, requires_grad=True)
    valid = valid_all[sl]
    out = embedding_loss(p, t, valid, th)
    share = valid.sum() / valid_all.sum()
    (out.total * share).backward()
    loss = (out.total * share).detach()
    dist.all_reduce(loss)
    assert abs(loss.item() - ref.total.item()) < 1e-5, (loss.item(), ref.total.item())
    contrast = (out.contrastive * share).detach()
    dist.all_reduce(contrast)
    assert abs(contrast.item() - ref.contrastive.item()) < 1e-5
    torch.testing.assert_close(p.grad, p_ref.grad[sl], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(t.grad, t_ref.grad[sl], atol=1e-6, rtol=1e-4)  # through the differentiable gather
    theta_grad = th.grad.clone()
    dist.all_reduce(theta_grad)
    torch.testing.assert_close(theta_grad, th_ref.grad, atol=1e-6, rtol=1e-4)
    assert torch.all(p.grad[~valid] == 0)


def _grad_checksum(module: torch.nn.Module) -> torch.Tensor:
    return torch.stack([p.grad.double().sum() for p in module.parameters() if p.requires_grad and p.grad is not None])


def _step(ddp, opt, batch) -> None:
    opt.zero_grad()
    out = ddp(**batch)
    out.loss.backward()
    local = _grad_checksum(ddp.module)
    other = local.clone()
    dist.broadcast(other, 0)
    torch.testing.assert_close(local, other)  # all-reduced: identical on every rank
    opt.step()


def check_ddp_text_only(rank: int, tiny_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from olavlm.devkit.tiny import tiny_model_config
    from olavlm.model.vlm import OlaVLM
    from test_model_vlm import make_batch, pt_mode, targets_for

    torch.manual_seed(0)
    model = pt_mode(OlaVLM.from_config(tiny_model_config(tiny_dir, vision="siglip")))
    ddp = DDP(model, find_unused_parameters=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tok = model.tokenizer
    text = make_batch(tok, [(0, False, "Only text."), (1, False, "More text, no image.")])
    text_pt = {**text, "pixel_values": None, "targets": targets_for(model, 0)}
    image = {**make_batch(tok, [(0, True, "A circle."), (1, True, "Two squares.")]),
             "pixel_values": torch.randn(2, 3, 64, 64), "targets": targets_for(model, 2)}
    _step(ddp, opt, image if rank == 0 else text_pt)  # rank 1 has no image at all
    _step(ddp, opt, text_pt)  # no image anywhere: predictors and task tokens get no real input
    _step(ddp, opt, {**image, "targets": None})  # PT batch without targets: predictors unused
    _step(ddp, opt, image)  # back to normal: would raise if a previous step left a reduction pending
    # IFT-style: no predictors, LLM + projector train, task tokens frozen
    torch.manual_seed(0)
    ift = OlaVLM.from_config(tiny_model_config(tiny_dir, vision="siglip"), with_predictors=False)
    ift.task_tokens.requires_grad_(False)
    ift.train()
    ddp2 = DDP(ift, find_unused_parameters=False)
    opt2 = torch.optim.SGD([p for p in ift.parameters() if p.requires_grad], lr=1e-3)
    _step(ddp2, opt2, {**text, "pixel_values": None})
    _step(ddp2, opt2, {k: v for k, v in image.items() if k != "targets"} if rank == 0 else {**text, "pixel_values": None})
    _step(ddp2, opt2, {**text, "pixel_values": None})


def check_agreed_ntp_chunks(rank: int) -> None:
    """Ranks whose batches need 3 and 1 LM-head chunks (2048 tokens each) both make 3 calls (ZeRO-3)."""
    from olavlm.constants import IGNORE_INDEX
    from olavlm.model.lockstep import agreed_ntp_chunks

    labels = torch.full((2, 2600), IGNORE_INDEX)
    labels[:, 1:] = 5 if rank == 0 else IGNORE_INDEX  # rank 0: 5198 supervised tokens -> 3 chunks
    labels[0, 1:11] = 5
    assert agreed_ntp_chunks(labels) == 3
    assert agreed_ntp_chunks(torch.full((1, 4), IGNORE_INDEX)) == 1  # nothing supervised anywhere: still one call


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with torchrun --nproc_per_node 2"
    check_distributed_infonce(rank, world)
    check_ddp_text_only(rank, sys.argv[1])
    check_agreed_ntp_chunks(rank)
    dist.barrier()
    print(f"OK {rank}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
