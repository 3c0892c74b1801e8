"""What DeepSpeed needs from OlaVLM, checked without DeepSpeed: no 0-dim parameters (logit scales
are (1,), older 0-dim checkpoints still load), every parameter read happens inside a forward of a
module that owns it (ZeRO-3 gathers per module), and the keep-alive gives every trainable extra a
gradient through module forwards. The two-process ZeRO runs are in tests/test_train_dist.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from olavlm.model import io
from olavlm.devkit.tiny import tiny_model_config
from olavlm.model.vlm import OlaVLM
from olavlm.constants import IGNORE_INDEX
from olavlm.objectives.embedding import embedding_loss
from olavlm.objectives.ntp import chunks_needed, ntp_loss
from test_model_vlm import make_batch, pt_mode, targets_for


@pytest.fixture(scope="module")
def small(tiny_dir):
    torch.manual_seed(0)
    return pt_mode(OlaVLM.from_config(tiny_model_config(tiny_dir, vision="siglip")))


@pytest.fixture(scope="module")
def batches(small):
    tok = small.tokenizer
    image = {**make_batch(tok, [(0, True, "A red circle."), (1, True, "Two squares.")]),
             "pixel_values": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))}
    text = {**make_batch(tok, [(0, False, "Only text."), (1, False, "More text.")]), "pixel_values": None}
    return {"image": image, "text": text}


def test_no_zero_dim_parameters_and_scalar_logit_scale_metrics(small, batches):
    assert [n for n, p in small.named_parameters() if p.ndim == 0] == []
    init = small.cfg.logit_scale_init
    assert len(small.logit_scales) == 3
    for p in small.logit_scales.parameters():
        assert p.shape == (1,) and p.item() == init
    small.zero_grad()
    targets = targets_for(small, 2)
    out = small(**batches["image"], targets=targets)
    out.loss.backward()
    cfg = small.cfg
    for task in small.predictors:
        metric = out.metrics[f"logit_scale/{task}"]
        assert metric.ndim == 0 and metric.item() == pytest.approx(min(math.exp(init), cfg.logit_scale_max))
        # independent recomputation of the task loss from the (detached) predictions, with a 0-dim theta
        theta = torch.tensor(init, requires_grad=True)
        total = sum(embedding_loss(pred.detach(), targets[task], None, theta, beta=cfg.smooth_l1_beta,
                                   contrastive_weight=cfg.contrastive_weight, scale_max=cfg.logit_scale_max).total
                    for pred in out.predictions[task].values())
        (cfg.tasks[task].weight * total).backward()
        grad = small.logit_scales[task].grad
        assert grad.shape == (1,) and grad.abs().item() > 0
        torch.testing.assert_close(grad[0], theta.grad, rtol=1e-5, atol=1e-7)
    small.zero_grad()


def test_checkpoints_with_zero_dim_logit_scales_still_load(small, tmp_path):
    small.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / io.WEIGHTS_NAME
    state = load_file(str(weights))
    assert state["logit_scales.gen"].shape == (1,)
    old = {k: (torch.tensor(0.5 + i) if k.startswith("logit_scales.") else v) for i, (k, v) in enumerate(state.items())}
    save_file(old, str(weights), metadata={"format": "pt"})  # as written before the scales became (1,)
    loaded = OlaVLM.from_pretrained(tmp_path / "m")
    for key, value in old.items():
        if key.startswith("logit_scales."):
            param = loaded.logit_scales[key.split(".", 1)[1]]
            assert param.shape == (1,) and param.item() == value.item()
    copy = {k: v.clone() for k, v in old.items()}
    loaded.load_state_dict(copy, strict=False)  # plain load_state_dict too, without touching the caller's dict
    assert all(copy[k].ndim == 0 for k in copy if k.startswith("logit_scales."))


class _ReadLog(TorchFunctionMode):
    """Records parameters used by a torch op while no submodule holding them runs its forward: what
    ZeRO-3 would find as empty shards. (It gathers a module's parameters around its forward and
    backward, and a parameter looked up by attribute inside a running submodule's forward; reads at
    the top level, e.g. a sum over ``named_parameters()``, see empty shards.)"""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.holders: dict[int, set[int]] = {}  # parameter -> every non-root module that contains it
        self.names: dict[int, str] = {}
        for name, p in model.named_parameters():
            parts = name.split(".")[:-1]
            self.holders[id(p)] = {id(model.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts) + 1)}
            self.names[id(p)] = name
        self.active: list[int] = []
        self.outside: set[str] = set()
        self.reads = 0

    def __enter__(self):
        def enter(module, args) -> None:
            self.active.append(id(module))

        def leave(module, args, output) -> None:
            self.active.pop()

        self.handles = [nn.modules.module.register_module_forward_pre_hook(enter),
                        nn.modules.module.register_module_forward_hook(leave)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") != "__get__":  # .dtype/.shape/.device: metadata, no data read
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, nn.Parameter) and id(t) in self.names:
                    self.reads += 1
                    if not self.holders[id(t)] & set(self.active):
                        self.outside.add(self.names[id(t)])
        return func(*args, **kwargs)


@pytest.mark.parametrize("case", ["image+targets", "text+targets", "image, no targets", "eval predict"])
def test_parameters_are_read_only_inside_their_modules_forward(small, batches, case):
    batch = batches["text" if case.startswith("text") else "image"]
    n = 0 if batch["pixel_values"] is None else 2
    kwargs = {"targets": targets_for(small, n)} if "+targets" in case else {}
    small.train(case != "eval predict")
    small.zero_grad()
    try:
        with _ReadLog(small) as log:
            out = small(**batch, **kwargs, mode="predict" if case == "eval predict" else "auto")
            if small.training:
                out.loss.backward()
    finally:
        small.train()
        small.zero_grad()
    assert log.reads > 50  # the mode saw the model's parameter uses
    assert log.outside == set()


@pytest.mark.parametrize("case", ["text+targets", "image, no targets"])
def test_keepalive_gives_every_trainable_parameter_a_gradient_and_adds_zero(small, batches, case):
    batch = batches["text" if case.startswith("text") else "image"]
    kwargs = {"targets": targets_for(small, 0)} if case == "text+targets" else {}
    small.zero_grad()
    out = small(**batch, **kwargs)
    out.loss.backward()
    trainable = {n: p for n, p in small.named_parameters() if p.requires_grad}
    assert [n for n, p in trainable.items() if p.grad is None] == []
    idle = ("predictors.", "logit_scales.") if case == "image, no targets" else ("predictors.", "logit_scales.",
                                                                                   "task_tokens.", "projector.")
    for name, p in trainable.items():
        if name.startswith(idle):
            assert torch.count_nonzero(p.grad) == 0, name
    projector_learns = any(torch.count_nonzero(p.grad) for n, p in trainable.items() if n.startswith("projector."))
    assert projector_learns == (batch["pixel_values"] is not None)
    with torch.no_grad():  # the keep-alive adds exactly zero: same loss without it (eval mode)
        small.eval()
        ref = small(**batch, **kwargs)
        small.train()
    assert out.loss.item() == ref.loss.item()
    small.zero_grad()


class _CountingHead(nn.Linear):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


@pytest.mark.parametrize("num_chunks", [None, 3, 5])
def test_ntp_calls_the_head_exactly_num_chunks_times_with_the_same_loss(num_chunks):
    torch.manual_seed(0)
    head = _CountingHead(8, 11, bias=False)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, 1, 2], [IGNORE_INDEX] * 3 + [7, 8, IGNORE_INDEX]])
    assert chunks_needed(6, 2) == 3 and chunks_needed(0, 2) == 0 and chunks_needed(7, 2) == 4
    _CountingHead.calls = 0
    loss, count = ntp_loss(hidden, labels, head, chunk_size=2, num_chunks=num_chunks)
    assert count == 6 and _CountingHead.calls == (num_chunks or 3)
    loss.backward()
    assert _CountingHead.calls == 2 * (num_chunks or 3)  # every chunk recomputed in backward (> 1 chunk)
    h2 = hidden.detach().clone().requires_grad_(True)
    w2 = head.weight.detach().clone().requires_grad_(True)
    ref = F.cross_entropy((h2 @ w2.T)[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(head.weight.grad, w2.grad)
    with pytest.raises(ValueError, match="num_chunks=2 < 3"):
        ntp_loss(hidden, labels, head, chunk_size=2, num_chunks=2)


def test_ntp_without_supervised_tokens_still_calls_the_head_when_asked():
    head = _CountingHead(8, 11, bias=False)
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    _CountingHead.calls = 0
    loss, count = ntp_loss(hidden, torch.full((1, 4), IGNORE_INDEX), head, num_chunks=1)
    assert count == 0 and loss.item() == 0 and _CountingHead.calls == 1
    loss.backward()
    assert torch.count_nonzero(head.weight.grad) == 0 and torch.count_nonzero(hidden.grad) == 0


def test_lockstep_runs_the_tower_on_text_only_batches_and_agrees_on_head_calls(small, batches, monkeypatch):
    """With partitioned parameters (marked as DeepSpeed does, ``ds_id``), a text-only batch still
    calls the vision tower once and the LM head at least once; without, neither is needed."""
    calls = {"vision": 0, "head": 0}
    hooks = [small.vision.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1)),
             small.llm.get_output_embeddings().register_forward_hook(
                 lambda *a: calls.__setitem__("head", calls["head"] + 1))]
    text = batches["text"]
    unsupervised = {**text, "labels": torch.full_like(text["labels"], IGNORE_INDEX)}
    try:
        with torch.no_grad():
            plain = small(**unsupervised).loss
            assert calls == {"vision": 0, "head": 0} and not small.lockstep
            monkeypatch.setattr(small.projector_weight, "ds_id", 0, raising=False)
            assert small.lockstep
            locked = small(**unsupervised).loss
            assert calls == {"vision": 1, "head": 1}
            assert plain.item() == locked.item() == 0.0
            with_labels = small(**text)
            monkeypatch.delattr(small.projector_weight, "ds_id")
            assert with_labels.loss.item() == pytest.approx(small(**text).loss.item(), abs=1e-6)
    finally:
        for h in hooks:
            h.remove()
