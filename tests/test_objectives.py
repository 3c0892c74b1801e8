"""olavlm.objectives: values AND gradients against straightforward independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from olavlm.constants import IGNORE_INDEX
from olavlm.objectives.embedding import embedding_loss
from olavlm.objectives.ntp import ntp_loss


def _reference_embedding_loss(pred, target, valid, theta, *, beta, cw, scale_max):
    """Element-by-element formulas of the per-layer loss (docs/method.md, "Losses") with the per-image mask done right (float64)."""
    idx = [i for i in range(pred.shape[0]) if valid[i]]
    p, t = pred.double(), target.double()
    terms = []
    for i in idx:
        d = (p[i] - t[i]).flatten()
        a = d.abs()
        terms.append(torch.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta))
    sl1 = torch.cat(terms).mean()
    scale = torch.clamp(theta.double().exp(), max=scale_max)
    ce = []
    for i in idx:
        pi = p[i].flatten() / p[i].flatten().norm()
        logits = [scale * (pi @ (t[j].flatten() / t[j].flatten().norm())) for j in idx]
        own = logits[idx.index(i)]
        ce.append(-(own - torch.log(sum(torch.exp(x) for x in logits))))
    con = sum(ce) / len(ce)
    return sl1 + cw * con, sl1, con


@pytest.mark.parametrize("shape, theta0", [((6, 5), 2.0), ((3, 4, 2, 2), 2.0), ((1, 7), 5.0)])
def test_embedding_loss_matches_reference_values_and_grads(shape, theta0):
    torch.manual_seed(0)
    n = 5
    pred = torch.randn(n, *shape, requires_grad=True)
    target = torch.randn(n, *shape) * 1.5
    valid = torch.tensor([True, False, True, True, False])
    target[1] = float("nan")  # a masked image's target may be anything: it must not leak in
    theta = torch.tensor(theta0, requires_grad=True)
    out = embedding_loss(pred, target, valid, theta, beta=1.0, contrastive_weight=0.3, scale_max=100.0)
    ref_pred = pred.detach().clone().requires_grad_(True)
    ref_theta = theta.detach().clone().requires_grad_(True)
    ref = _reference_embedding_loss(ref_pred, torch.nan_to_num(target), valid, ref_theta, beta=1.0, cw=0.3,
                                    scale_max=100.0)
    for got, want in zip((out.total, out.sl1, out.contrastive), ref):
        assert torch.isfinite(got) and abs(got.item() - want.item()) < 1e-5
    assert out.contrastive.item() > 0
    out.total.backward()
    ref[0].backward()
    torch.testing.assert_close(pred.grad, ref_pred.grad.float(), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(theta.grad, ref_theta.grad.float(), atol=1e-6, rtol=1e-4)
    assert torch.all(pred.grad[~valid] == 0)  # masked images get no gradient
    if math.exp(theta0) > 100:
        assert float(theta.grad) == 0.0  # scale clamped at 100 (as in the reference)


def test_masked_image_leaves_loss_unchanged():
    torch.manual_seed(1)
    pred, target = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    theta = torch.tensor(2.0)
    base = embedding_loss(pred, target, None, theta)
    extra = embedding_loss(torch.cat([pred, torch.randn(1, 4, 8)]), torch.cat([target, torch.zeros(1, 4, 8)]),
                           torch.tensor([True, True, True, False]), theta)
    for a, b in zip((base.total, base.sl1, base.contrastive), (extra.total, extra.sl1, extra.contrastive)):
        assert abs(float(a) - float(b)) < 1e-6


def test_no_valid_image_is_a_connected_zero():
    pred = torch.randn(2, 3, requires_grad=True)
    theta = torch.tensor(2.0, requires_grad=True)
    for n in (2, 0):
        out = embedding_loss(pred[:n], torch.randn(n, 3), torch.zeros(n, dtype=torch.bool), theta)
        assert out.total.item() == 0.0
        out.total.backward()
        assert pred.grad is not None and theta.grad is not None
        assert float(pred.grad.abs().sum()) == 0 and float(theta.grad) == 0


def test_contrastive_disabled_and_shape_mismatch():
    pred, target = torch.randn(2, 3), torch.randn(2, 3)
    out = embedding_loss(pred, target, None, None)
    assert out.contrastive.item() == 0 and out.total.item() == out.sl1.item() > 0
    with pytest.raises(ValueError, match="prediction shape"):
        embedding_loss(pred, torch.randn(2, 4))


@pytest.mark.parametrize("chunk", [2048, 3])
def test_ntp_equals_full_logits_cross_entropy(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, 1, 2], [IGNORE_INDEX] * 3 + [7, 8, IGNORE_INDEX]])
    loss, count = ntp_loss(hidden, labels, head, chunk_size=chunk)
    assert count == 6
    h2 = hidden.detach().clone().requires_grad_(True)
    logits = head(h2).float()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert abs(loss.item() - ref.item()) < 1e-6
    loss.backward()
    w_grad = head.weight.grad.clone()
    head.weight.grad = None
    ref.backward()
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(w_grad, head.weight.grad)
    none, count = ntp_loss(hidden, torch.full_like(labels, IGNORE_INDEX), head)
    assert count == 0 and none.item() == 0 and none.requires_grad


def test_auxiliary_losses_sum_embedding_and_alignment_tasks_like_the_reference():
    """weight x sum over layers (embedding) + weight x mean over layers (alignment), masked images out."""
    from types import SimpleNamespace

    from olavlm.objectives import auxiliary_losses

    torch.manual_seed(0)
    n, valid = 3, torch.tensor([True, False, True])
    emb_t, ali_t = torch.randn(n, 4, 5), torch.randn(n, 6, 8)
    emb = {2: torch.randn(n, 4, 5, requires_grad=True), 4: torch.randn(n, 4, 5, requires_grad=True)}
    ali = {1: torch.randn(n, 6, 8, requires_grad=True), 3: torch.randn(n, 6, 8, requires_grad=True)}
    theta = torch.tensor(1.5, requires_grad=True)
    cfg = SimpleNamespace(use_contrastive=True, smooth_l1_beta=0.7, contrastive_weight=0.3, logit_scale_max=100.0,
                          tasks={"depth": SimpleNamespace(kind="embedding", weight=0.5),
                                 "viral": SimpleNamespace(kind="alignment", weight=0.25)})
    loss, metrics = auxiliary_losses({"depth": emb, "viral": ali}, {"depth": emb_t, "viral": ali_t}, valid, cfg,
                                     {"depth": theta}, num_images=n, target_shapes={"depth": (4, 5), "viral": (6, 8)})
    ref_emb = sum(_reference_embedding_loss(p, emb_t, valid, theta, beta=0.7, cw=0.3, scale_max=100.0)[0]
                  for p in emb.values())
    ref_ali = torch.stack([-F.cosine_similarity(p[valid].double(), ali_t[valid].double(), dim=-1).mean()
                           for p in ali.values()]).mean()
    ref = 0.5 * ref_emb + 0.25 * ref_ali
    assert torch.allclose(loss.double(), ref, atol=1e-5)
    assert torch.allclose(metrics["loss/viral"].double(), 0.25 * ref_ali, atol=1e-6)
    assert set(metrics) >= {"loss/depth", "loss/depth/layer2/sl1", "loss/depth/layer4/contrastive",
                            "loss/viral/layer3/neg_cosine", "logit_scale/depth"}
    params = [*emb.values(), *ali.values(), theta]
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(ref, params)
    for g, w in zip(got, want):
        assert torch.allclose(g.double(), w.double(), atol=1e-5)
    assert float(got[0][1].abs().sum()) == 0.0  # the masked image gets no gradient
    with pytest.raises(ValueError, match="missing task 'viral'"):
        auxiliary_losses({"viral": ali}, {}, None, cfg, {}, num_images=n, target_shapes={"viral": (6, 8)})
    with pytest.raises(ValueError, match="target_mask must be bool"):
        auxiliary_losses({}, {}, valid[:2], cfg, {}, num_images=n, target_shapes={})


def test_forward_plan_decides_predictors_scoring_and_keepalive_once():
    from olavlm.model.vlm import ForwardPlan

    auto = ForwardPlan.decide("auto", has_predictors=True, has_targets=False, training=True)
    assert (auto.predict, auto.score, auto.keepalive) == (False, False, True)
    scored = ForwardPlan.decide("auto", has_predictors=True, has_targets=True, training=False)
    assert (scored.predict, scored.score, scored.keepalive) == (True, True, False)
    forced = ForwardPlan.decide("predict", has_predictors=True, has_targets=False, training=False)
    assert (forced.predict, forced.score) == (True, False)
    lm = ForwardPlan.decide("lm", has_predictors=True, has_targets=True, training=True)
    assert (lm.predict, lm.score, lm.keepalive) == (False, False, True)
    assert not ForwardPlan.decide("predict", has_predictors=False, has_targets=False, training=True).predict
    with pytest.raises(ValueError, match="no predictors"):
        ForwardPlan.decide("auto", has_predictors=False, has_targets=True, training=False)
    with pytest.raises(ValueError, match="mode: 'bogus'"):
        ForwardPlan.decide("bogus", has_predictors=True, has_targets=False, training=False)
