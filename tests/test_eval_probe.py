"""Probe trainer on given hidden states: informative layers score high, noise layers do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from olavlm.evaluation.probe import (ProbeSpec, cosine_per_image, parse_layers, split_indices, targets_as_tokens,
                                     train_probes)


def test_cosine_per_image_matches_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    got = cosine_per_image(a, b).numpy()
    an, bn = a.reshape(5, -1).numpy(), b.reshape(5, -1).numpy()
    want = (an * bn).sum(1) / np.linalg.norm(an, axis=1) / np.linalg.norm(bn, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_grid_targets_become_row_major_tokens():
    grid = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)  # (N, C, h, w)
    tok = targets_as_tokens(grid, "grid")
    assert tok.shape == (1, 12, 2)
    assert tok[0, 4 + 3].tolist() == grid[0, :, 1, 3].tolist()  # token n <-> row n // w, col n % w
    with pytest.raises(ValueError, match="layout"):
        targets_as_tokens(grid, "cube")


def test_informative_layer_beats_noise_layer_and_padding_is_ignored():
    g = torch.Generator().manual_seed(1)
    n, length, d, q, c = 128, 6, 32, 4, 4
    targets = torch.randn(n, q, c, generator=g) + 3.0  # a large common component, like ShapeWorld's
    # every token of the informative layer carries a (different) linear view of the whole target
    mix = torch.randn(length, q * c, d, generator=g) / (q * c) ** 0.5
    informative = torch.einsum("nk,tkd->ntd", targets.flatten(1) - 3.0, mix)
    noise = torch.randn(n, length, d, generator=g)
    pad = 3  # padded positions carry garbage that the key mask must hide
    mask = torch.ones(n, length + pad, dtype=torch.bool)
    mask[:, length:] = False
    garbage = 1e3 * torch.randn(n, pad, d, generator=g)
    states = {1: torch.cat([informative, garbage], 1), 2: torch.cat([noise, garbage], 1)}
    res = train_probes(states, mask, targets, "tokens", ProbeSpec(steps=200, lr=3e-3, dim=32, seed=0))
    good, bad = res["layers"][1], res["layers"][2]
    assert good["centred_cosine"] > 0.45, res  # small probe, 96 training images
    assert abs(bad["centred_cosine"]) < 0.25, res
    assert res["constant_cosine"] > 0.9  # the common component makes the raw cosine easy
    assert res["n_train"] + res["n_test"] == n and res["n_test"] == 32


def test_bad_inputs():
    with pytest.raises(ValueError, match="no layers"):
        train_probes({}, torch.ones(4, 2, dtype=torch.bool), torch.zeros(4, 1, 2), "vector")
    with pytest.raises(ValueError, match="do not match"):
        train_probes({1: torch.zeros(4, 3, 2)}, torch.ones(4, 2, dtype=torch.bool), torch.zeros(4, 1, 2), "vector")
    with pytest.raises(ValueError, match="at least 4"):
        split_indices(3, 0.25, 0)
    assert parse_layers("all", 4) == [1, 2, 3, 4] and parse_layers("3,1", 4) == [1, 3]
    with pytest.raises(ValueError, match="outside"):
        parse_layers("0,5", 4)
