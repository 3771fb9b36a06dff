"""The pretraining sampler: Megatron's chunk order across DP ranks, exact resume, and each sample's
position in its global batch (the key random-LTD draws on)."""

import numpy as np
import pytest

from megatron.core.datasets.samplers import PretrainingSampler, global_sample_offsets


def served_positions(total, consumed, mbs, dp_rank, dp, gbs):
    """(indices, global-batch positions) of each micro-batch the sampler serves, the positions as
    random-LTD's plan computes them: micro-batch m of the iteration -> global_sample_offsets(m, ...)."""
    per_iteration = gbs // (mbs * dp)
    for k, indices in enumerate(PretrainingSampler(total, consumed, mbs, dp_rank, dp)):
        yield indices, global_sample_offsets(k % per_iteration, mbs, dp_rank, dp)


def all_ranks(total, consumed, mbs, dp):
    return [list(PretrainingSampler(total, consumed, mbs, d, dp)) for d in range(dp)]


def test_single_rank_reads_consecutive_micro_batches():
    assert list(PretrainingSampler(10, 0, 3, 0, 1)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # last 1 dropped
    assert len(PretrainingSampler(10, 0, 3, 0, 1)) == 10


def test_ranks_take_their_slice_of_each_chunk():
    mbs, dp = 2, 3
    ranks = all_ranks(30, 0, mbs, dp)
    assert ranks[0][:2] == [[0, 1], [6, 7]]
    assert ranks[1][:2] == [[2, 3], [8, 9]]
    assert ranks[2][:2] == [[4, 5], [10, 11]]
    for step in range(len(ranks[0])):  # together the ranks read one whole chunk per step
        chunk = sorted(i for r in ranks for i in r[step])
        assert chunk == list(range(step * mbs * dp, (step + 1) * mbs * dp))


@pytest.mark.parametrize("consumed", [0, 12, 24, 36])
def test_resume_continues_exactly(consumed):
    mbs, dp, total = 2, 2, 50
    for d in range(dp):
        fresh = list(PretrainingSampler(total, 0, mbs, d, dp))
        resumed = list(PretrainingSampler(total, consumed, mbs, d, dp))
        assert resumed == fresh[consumed // (mbs * dp):]


def test_global_positions_cover_each_global_batch_once_in_consumption_order():
    mbs, dp, m = 2, 3, 4
    gbs = mbs * dp * m
    total = 3 * gbs + 5
    seen = {}
    for d in range(dp):
        for indices, positions in served_positions(total, 0, mbs, d, dp, gbs):
            assert positions.dtype == np.int64 and len(positions) == mbs
            for i, p in zip(indices, positions):
                seen[i] = int(p)
    # dataset index i is the i-th sample consumed, so its position is i mod gbs
    assert seen == {i: i % gbs for i in range(3 * gbs)}


def test_global_sample_offsets_formula():
    mbs, dp = 4, 2
    assert global_sample_offsets(0, mbs, 0, dp).tolist() == [0, 1, 2, 3]
    assert global_sample_offsets(0, mbs, 1, dp).tolist() == [4, 5, 6, 7]
    assert global_sample_offsets(3, mbs, 1, dp).tolist() == [(3 * dp + 1) * mbs + j for j in range(mbs)]


def test_positions_after_resume_and_independent_of_dp_layout():
    """The same sample gets the same position whatever the DP size, and after a resume."""
    gbs = 12

    def positions(mbs, dp, consumed):
        out = {}
        for d in range(dp):
            for idx, pos in served_positions(48, consumed, mbs, d, dp, gbs):
                out.update(zip(idx, pos.tolist()))
        return out

    base = positions(1, 1, 0)
    assert positions(2, 3, 0) == base and positions(3, 2, 0) == base
    assert positions(2, 2, 24) == {i: p for i, p in base.items() if i >= 24}


def test_bad_arguments_assert():
    with pytest.raises(AssertionError):
        PretrainingSampler(10, 10, 1, 0, 1)  # nothing left to consume
    with pytest.raises(AssertionError):
        PretrainingSampler(10, 0, 1, 2, 2)
