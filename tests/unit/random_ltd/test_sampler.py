"""Kept indices: a uniform, layout-invariant draw keyed by (seed, iteration, sample, layer)."""

import random

import numpy as np
import pytest
import torch

from megatron.core.random_ltd import kept_indices, kept_indices_for_layers
from megatron.core.random_ltd.sampler import _mix32, _mul32, kept_indices_host, position_keys


def test_shape_sorted_unique_in_range():
    idx = kept_indices(seed=1234, iteration=3, sample_ids=torch.arange(8), layer=5, seq_length=64, kept_length=20)
    assert idx.shape == (8, 20) and idx.dtype == torch.long
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "strictly ascending means sorted and unique"
    assert int(idx.min()) >= 0 and int(idx.max()) < 64


def test_keep_all_and_keep_one():
    assert torch.equal(kept_indices(0, 0, torch.arange(3), 1, 16, 16), torch.arange(16).expand(3, 16))
    assert kept_indices(0, 0, torch.arange(3), 1, 16, 1).shape == (3, 1)


def test_golden_values_pin_the_hash():
    """Resume across code versions and CPU/CUDA agreement both rest on these exact numbers."""
    idx = kept_indices(1234, 7, torch.tensor([0, 1, 511]), 5, 32, 6)
    assert idx.tolist() == [[7, 8, 17, 23, 26, 28], [9, 11, 15, 24, 30, 31], [1, 9, 13, 16, 23, 29]]
    keys = position_keys(2**64 - 1, 2**40, torch.tensor([3]), [22], 4)[0]  # 64-bit seed and iteration
    assert keys.tolist() == [[2986392685, 3944482380, 2414069932, 3496644265]]


def test_reproducible_and_independent_of_batch_composition():
    ids = torch.tensor([5, 0, 17, 3, 9, 2, 11, 8])
    batch = kept_indices(42, 100, ids, 3, 128, 40)
    assert torch.equal(batch, kept_indices(42, 100, ids.clone(), 3, 128, 40))
    for row, j in enumerate(ids.tolist()):  # alone, or in another micro-batch split
        assert torch.equal(batch[row], kept_indices(42, 100, torch.tensor([j]), 3, 128, 40)[0])
    perm = torch.randperm(8)
    assert torch.equal(kept_indices(42, 100, ids[perm], 3, 128, 40), batch[perm])
    assert torch.equal(kept_indices(42, 100, ids[:3], 3, 128, 40), batch[:3])


def test_all_layers_at_once_equals_layer_by_layer():
    ids = torch.tensor([3, 0, 7])
    layers = [1, 2, 5, 22]
    together = kept_indices_for_layers(9, 4, ids, layers, 64, 24)  # [n, b, r]
    assert together.shape == (4, 3, 24)
    for i, layer in enumerate(layers):
        assert torch.equal(together[i], kept_indices(9, 4, ids, layer, 64, 24))


def test_global_rng_is_neither_used_nor_consulted():
    torch.manual_seed(0)
    a = kept_indices(7, 1, torch.arange(4), 2, 64, 16)
    state = torch.get_rng_state()
    torch.manual_seed(999)
    b = kept_indices(7, 1, torch.arange(4), 2, 64, 16)
    assert torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(state, torch.get_rng_state())


def _rows_equal_fraction(a, b):
    return (a == b).all(dim=1).float().mean().item()


def test_draws_differ_across_samples_layers_iterations_seeds():
    ids = torch.arange(64)
    base = kept_indices(1, 10, ids, 4, 256, 64)
    assert len({tuple(r) for r in base.tolist()}) == 64, "samples differ"
    assert _rows_equal_fraction(base, kept_indices(1, 10, ids, 5, 256, 64)) == 0, "layers differ"
    assert _rows_equal_fraction(base, kept_indices(1, 11, ids, 4, 256, 64)) == 0, "iterations differ"
    assert _rows_equal_fraction(base, kept_indices(2, 10, ids, 4, 256, 64)) == 0, "seeds differ"
    assert _rows_equal_fraction(base, kept_indices(1 + 2**32, 10, ids, 4, 256, 64)) == 0, "high seed bits count"


def test_keys_distinct_per_row_so_no_ties():
    keys = position_keys(3, 5, torch.arange(16), [1], 4096)[0]  # [16, 4096]
    assert all(row.unique().numel() == 4096 for row in keys)
    assert int(keys.min()) >= 0 and int(keys.max()) < 2**32


def test_uint32_arithmetic_is_exact():
    rng = random.Random(0)
    xs = [0, 1, 2**32 - 1] + [rng.getrandbits(32) for _ in range(2000)]
    for c in (0x85EBCA6B, 0xC2B2AE35, 0xFFFFFFFF, 1):
        assert [_mul32(x, c) for x in xs] == [(x * c) % 2**32 for x in xs]
        t = torch.tensor(xs, dtype=torch.long)
        assert _mul32(t, c).tolist() == [(x * c) % 2**32 for x in xs], "tensor path equals int path"
    sample = torch.arange(1 << 20, dtype=torch.long) * 2654435761 % 2**32
    assert _mix32(sample).unique().numel() == 1 << 20, "the mixer is a bijection"


def test_inclusion_frequency_is_uniform():
    """Each position is kept with probability r/s; pairs of positions with r(r-1)/(s(s-1))."""
    s, r, n = 32, 8, 20_000
    idx = kept_indices(11, 0, torch.arange(n), 1, s, r)  # [n, r]
    kept = torch.zeros(n, s).scatter_(1, idx, 1.0)  # [n, s]
    p = r / s
    freq = kept.mean(0)
    assert (freq - p).abs().max().item() < 5 * (p * (1 - p) / n) ** 0.5
    pair = (kept.T @ kept) / n  # [s, s]
    p2 = r * (r - 1) / (s * (s - 1))
    off_diag = pair[~torch.eye(s, dtype=torch.bool)]
    assert (off_diag - p2).abs().max().item() < 5.5 * (p2 * (1 - p2) / n) ** 0.5
    # the same over iterations and layers for one sample (the draw a single sample sees over training)
    over_time = torch.stack([kept_indices(11, t, torch.tensor([0]), 1 + t % 3, s, r)[0] for t in range(4000)])
    freq_t = torch.zeros(4000, s).scatter_(1, over_time, 1.0).mean(0)
    assert (freq_t - p).abs().max().item() < 5 * (p * (1 - p) / 4000) ** 0.5


def test_overlap_between_draws_matches_independence():
    s, r, n = 256, 64, 4000
    ids = torch.arange(n)
    a = torch.zeros(n, s).scatter_(1, kept_indices(5, 9, ids, 2, s, r), 1.0)
    others = (kept_indices(5, 9, ids, 3, s, r), kept_indices(5, 10, ids, 2, s, r), kept_indices(5, 9, ids + 1, 2, s, r))
    for other in others:  # another layer, the next iteration, the next sample
        b = torch.zeros(n, s).scatter_(1, other, 1.0)
        overlap = (a * b).sum(1)  # hypergeometric: mean r^2/s = 16, sd ~3.0
        assert abs(overlap.mean().item() - r * r / s) < 0.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree():
    ids = torch.arange(512)
    for seed, t, layer, s, r in [(1234, 0, 1, 2048, 128), (2**63 + 5, 2**33, 22, 4096, 1000), (0, 7, 3, 197, 66)]:
        cpu = kept_indices(seed, t, ids, layer, s, r)
        gpu = kept_indices(seed, t, ids.cuda(), layer, s, r)
        assert gpu.device.type == "cuda"
        assert torch.equal(cpu, gpu.cpu())
    many = kept_indices_for_layers(5, 6, ids.cuda(), list(range(1, 23)), 2048, 512)
    assert torch.equal(many.cpu(), kept_indices_for_layers(5, 6, ids, list(range(1, 23)), 2048, 512))


def test_host_twin_equals_the_torch_draw_bit_for_bit():
    """The numpy draw the trainer uses (uint32 arithmetic, argpartition) against the torch reference, over
    random seeds, iterations and sample ids up to 64 bits, layer sets and shapes, r = 1 .. s."""
    rng = random.Random(0)
    for case in range(80):
        seed = rng.choice([0, 1, 1234, 2 ** 32 + 5, 2 ** 64 - 1, rng.getrandbits(64)])
        iteration = rng.choice([0, 1, 7, 2 ** 31 + 3, 2 ** 40, rng.getrandbits(64)])
        s = rng.choice([1, 2, 16, 33, 128, 1000])
        r = rng.choice([1, s, rng.randint(1, s)])
        ids = [rng.choice([0, 1, rng.getrandbits(20), rng.getrandbits(40), 2 ** 63 - 1])
               for _ in range(rng.randint(1, 6))]
        layers = rng.sample(range(200), rng.randint(1, 4))
        host = kept_indices_host(seed, iteration, np.array(ids), layers, s, r)  # [n, b, r]
        want = kept_indices_for_layers(seed, iteration, torch.tensor(ids), layers, s, r)
        assert host.dtype == np.int32 and np.array_equal(host, want.numpy()), (case, seed, iteration, ids, layers, s, r)
