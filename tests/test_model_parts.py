"""Model parts without checkpoints: projector, task-token pooling, predictor masking and layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from olavlm.config import ConfigError, PredictorConfig
from olavlm.model.predictor import Predictor, adapt_queries
from olavlm.model.projector import build_projector
from olavlm.model.task_tokens import TaskTokens
from olavlm.devkit.tiny import tiny_model_config


def test_projector_kinds():
    assert isinstance(build_projector("linear", 4, 6), nn.Linear)
    mlp = build_projector("mlp3x_gelu", 4, 6)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert mlp[0].in_features == 4 and mlp[-1].out_features == 6
    for bad in ("mlp0x_gelu", "mlp2x_relu", "conv"):
        with pytest.raises(ConfigError, match="model.projector"):
            build_projector(bad, 4, 6)


def test_task_tokens_rows_and_pooling(tmp_path):
    cfg = tiny_model_config(tmp_path, num_task_tokens=4)
    tt = TaskTokens(cfg, hidden_size=8, num_image_tokens=16, with_predictors=True)
    assert {k: tuple(v.shape) for k, v in tt.rows.items()} == {"gen": (4, 8), "depth": (16, 8), "seg": (16, 8)}
    rows = tt.rows["depth"]
    expected = torch.stack([rows[4 * j:4 * j + 4].mean(0) for j in range(4)])  # K contiguous groups
    torch.testing.assert_close(tt.sequence_tokens("depth"), expected)
    torch.testing.assert_close(tt.sequence_tokens("gen"), tt.rows["gen"])
    assert tt.all_sequence_tokens().shape == (12, 8) and tt.tokens_per_image == 12
    none = TaskTokens(tiny_model_config(tmp_path, num_task_tokens=0, task_order=[],
                                        tasks={k: v for k, v in cfg.tasks.items() if k != "gen"}),
                      hidden_size=8, num_image_tokens=16, with_predictors=False)
    assert len(none.rows) == 0 and none.all_sequence_tokens().shape == (0, 8) and none.tokens_per_image == 0


def test_adapt_queries():
    q = torch.randn(2, 3, 5)
    assert torch.equal(adapt_queries(q, 3), q)
    assert torch.equal(adapt_queries(q, 6), torch.cat([q, q], 1))
    torch.testing.assert_close(adapt_queries(q, 4), q.mean(1, keepdim=True).expand(-1, 4, -1))


@pytest.mark.parametrize("layout, shape", [("tokens", (9, 6)), ("grid", (6, 3, 3))])
def test_predictor_ignores_masked_keys(layout, shape):
    torch.manual_seed(0)
    pred = Predictor(16, PredictorConfig(dim=12, out_dim=6, output_layout=layout, output_mlp=True), num_queries=9)
    assert pred.output_shape == shape
    states = torch.randn(2, 7, 16)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    image_sample = torch.tensor([0, 1, 0])
    key_mask = mask[image_sample]
    queries = torch.randn(1, 9, 16)
    out = pred(states, image_sample, key_mask, queries)
    assert out.shape == (3, *shape)
    changed = torch.where(mask[:, :, None], states, torch.randn(2, 7, 16) * 100)
    torch.testing.assert_close(pred(changed, image_sample, key_mask, queries), out)
    unmasked = pred(changed, image_sample, torch.ones_like(key_mask), queries)
    assert not torch.allclose(unmasked, out)
    if layout == "grid":  # token n <-> row n // side, column n % side
        tokens = Predictor(16, PredictorConfig(dim=12, out_dim=6, output_layout="tokens", output_mlp=True),
                           num_queries=9)
        tokens.load_state_dict(pred.state_dict())
        t = tokens(states, image_sample, key_mask, queries)
        for n in (0, 5, 7):
            torch.testing.assert_close(out[:, :, n // 3, n % 3], t[:, n, :])
    vec = Predictor(16, PredictorConfig(dim=8, out_dim=4, output_layout="vector"), num_queries=1)
    assert vec(states, image_sample, key_mask, torch.randn(3, 2, 16)).shape == (3, 1, 4)
    assert pred(states, image_sample[:0], key_mask[:0], queries).shape == (0, *shape)
