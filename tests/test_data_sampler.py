"""Batch samplers: permutation, disjoint covering shards, single-modality global batches, resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from olavlm.data.sampler import build_batch_sampler, split_to_even_chunks


def _lengths(n_img, n_txt, seed=0):
    rng = np.random.default_rng(seed)
    lens = np.concatenate([rng.integers(1, 200, n_img), -rng.integers(1, 200, n_txt)])
    return lens[rng.permutation(len(lens))].tolist()


def _all_ranks(kind, lengths, G, m, W, seed=3, epoch=0):
    return [list(build_batch_sampler(kind, lengths, global_batch_size=G, micro_batch_size=m, world_size=W,
                                     rank=r, seed=seed, epoch=epoch)) for r in range(W)]


def _global_batches(per_rank, G, m, W):
    """Reassemble global batches from the ranks' micro-batch streams."""
    acc = G // (m * W)
    steps = len(per_rank[0]) // acc
    return [[i for a in range(acc) for r in range(W) for i in per_rank[r][s * acc + a]] for s in range(steps)]


@pytest.mark.parametrize("kind", ["random", "modality_length"])
@pytest.mark.parametrize("W,m,G", [(1, 4, 4), (2, 3, 12), (4, 2, 16)])
def test_shards_disjoint_covering_permutation(kind, W, m, G):
    lengths = _lengths(5 * G - G // 2, G + 3) if kind == "modality_length" else [1] * (7 * G)
    n = len(lengths)
    per_rank = _all_ranks(kind, lengths, G, m, W)
    counts = {len(p) for p in per_rank}
    assert len(counts) == 1  # every rank has the same number of micro-batches
    assert all(len(b) == m for p in per_rank for b in p)
    flat = [i for p in per_rank for b in p for i in b]
    assert len(flat) == -(-n // G) * G  # padded to whole global batches
    assert set(flat) == set(range(n))  # covering
    c = Counter(flat)
    assert sum(v - 1 for v in c.values()) == len(flat) - n  # duplicates are exactly the padding
    if n % G == 0 and kind == "random":
        assert sorted(flat) == list(range(n))  # a permutation, shards disjoint
    sampler = build_batch_sampler(kind, lengths, global_batch_size=G, micro_batch_size=m, world_size=W, rank=0,
                                  seed=3)
    assert len(sampler) == len(per_rank[0])


def test_disjoint_without_padding():
    lengths = [5] * 48 + [-5] * 24  # both modalities multiples of G=12
    per_rank = _all_ranks("modality_length", lengths, 12, 3, 2)
    sets = [set(i for b in p for i in b) for p in per_rank]
    assert not sets[0] & sets[1] and sets[0] | sets[1] == set(range(72))
    assert sum(len(b) for p in per_rank for b in p) == 72


@pytest.mark.parametrize("n_img,n_txt", [(50, 13), (45, 20), (12, 12), (7, 0), (0, 9)])
def test_modality_single_per_global_batch(n_img, n_txt):
    G, m, W = 12, 3, 2  # accumulation 2
    lengths = _lengths(n_img, n_txt, seed=n_img)
    batches = _global_batches(_all_ranks("modality_length", lengths, G, m, W), G, m, W)
    mixed = [k for k, b in enumerate(batches) if len({lengths[i] > 0 for i in b}) > 1]
    assert mixed in ([], [len(batches) - 1])  # only the last global batch may mix
    if n_img % G + n_txt % G > G:  # leftovers do not fit one batch: padded per modality, nothing mixed
        assert mixed == []


def test_modality_batches_sorted_and_balanced():
    lengths = [int(x) for x in np.arange(1, 97)]  # all image, distinct lengths
    G, m, W = 16, 4, 2
    per_rank = _all_ranks("modality_length", lengths, G, m, W)
    for b in (b for p in per_rank for b in p):
        ls = [lengths[i] for i in b]
        assert ls == sorted(ls, reverse=True)  # longest first inside each micro-batch
    for g in _global_batches(per_rank, G, m, W):
        sums = [sum(lengths[i] for i in g[k * m:(k + 1) * m]) for k in range(G // m)]
        assert max(sums) - min(sums) <= max(lengths[i] for i in g)  # greedy balance bound


def test_split_to_even_chunks_matches_greedy():
    lens = np.array([10, 9, 8, 1, 1, 1])
    chunks = split_to_even_chunks(np.array([0, 1, 2, 3, 4, 5]), lens, 3)
    assert [c.tolist() for c in chunks] == [[0, 5], [1, 4], [2, 3]]  # 10+1, 9+1, 8+1
    # randomized comparison with LLaVA's list-based implementation (llava_trainer.split_to_even_chunks)
    rng = np.random.default_rng(0)
    for _ in range(20):
        k, per = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        lens = rng.integers(1, 5, k * per)  # many ties
        order = np.argsort(-lens, kind="stable")
        ref, totals = [[] for _ in range(k)], [0] * k
        for i in order.tolist():
            c = totals.index(min(totals))
            ref[c].append(i)
            totals[c] += int(lens[i])
            if len(ref[c]) == per:
                totals[c] = float("inf")
        assert [c.tolist() for c in split_to_even_chunks(order, lens, k)] == ref


@pytest.mark.parametrize("kind", ["random", "modality_length"])
def test_deterministic_epoch_and_resume(kind):
    lengths = _lengths(40, 17)
    kw = dict(global_batch_size=8, micro_batch_size=2, world_size=2, rank=1, seed=11)
    a = list(build_batch_sampler(kind, lengths, **kw))
    assert a == list(build_batch_sampler(kind, lengths, **kw))  # same (seed, epoch) -> same order
    s = build_batch_sampler(kind, lengths, **kw)
    s.set_epoch(1)
    b = list(s)
    assert a != b and len(a) == len(b)
    for n in (0, 1, 5, len(a)):
        resumed = build_batch_sampler(kind, lengths, **kw, skip_batches=n)
        assert list(resumed) == a[n:] and len(resumed) == len(a) - n
    e1 = build_batch_sampler(kind, lengths, **kw, epoch=1, skip_batches=3)
    assert list(e1) == b[3:]
    e1.set_epoch(2)
    assert len(list(e1)) == len(a)  # skip applies to the resumed epoch only


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple"):
        build_batch_sampler("random", [1] * 10, global_batch_size=10, micro_batch_size=3, world_size=1, rank=0, seed=0)
    with pytest.raises(ValueError, match="rank"):
        build_batch_sampler("random", [1] * 10, global_batch_size=4, micro_batch_size=2, world_size=2, rank=2, seed=0)
    with pytest.raises(ValueError, match="not one of"):
        build_batch_sampler("length", [1] * 10, global_batch_size=4, micro_batch_size=2, world_size=2, rank=0, seed=0)
    with pytest.raises(ValueError, match="are 0"):
        build_batch_sampler("modality_length", [1, 0, -1], global_batch_size=2, micro_batch_size=1, world_size=1,
                            rank=0, seed=0)
