"""MSLG: r_t = min(s, q * floor((r_0 + (t / T_r) * (s - r_0)) / q)), exact at every step boundary."""

import math
from fractions import Fraction

import pytest

from megatron.core.errors import UserError
from megatron.core.random_ltd import MSLGSchedule, RandomLTDConfig


def reference_r(t, s, r0, q, T):
    """The formula read literally, in exact rationals."""
    return min(s, q * math.floor((r0 + Fraction(t, T) * (s - r0)) / q))


PAPER = MSLGSchedule(seq_length=2048, start_seq_length=128, seq_step=16, ramp_iters=200_000)


def test_paper_example_step_boundaries():
    # +16 every 1666.67 steps: the first step lands at t = ceil(16 * 200000 / 1920) = 1667
    assert PAPER.kept_length(0) == 128
    assert PAPER.kept_length(1666) == 128
    assert PAPER.kept_length(1667) == 144
    assert PAPER.kept_length(3333) == 144
    assert PAPER.kept_length(3334) == 160
    assert PAPER.kept_length(100_000) == 1088
    assert PAPER.kept_length(199_999) == 2032
    assert PAPER.kept_length(200_000) == 2048
    assert PAPER.kept_length(10**9) == 2048
    assert PAPER.full_length_iteration() == 200_001  # 1-based


@pytest.mark.parametrize(
    "s, r0, q, T",
    [
        (2048, 128, 16, 200_000),
        (512, 200, 16, 1000),
        (197, 32, 8, 100),  # s not a multiple of q
        (64, 17, 4, 7),  # r_0 not a multiple of q
        (16, 16, 16, 3),
        (20, 20, 8, 5),  # r_0 = s, not a multiple of q
        (30, 3, 1, 11),
    ],
)
def test_matches_exact_rational_formula(s, r0, q, T):
    sched = MSLGSchedule(s, r0, q, T)
    horizon = min(3 * T, 4000)
    values = [sched.kept_length(t) for t in range(horizon)]
    expected = [reference_r(t, s, r0, q, T) for t in range(horizon)]
    if r0 == s:  # documented deviation: no ramp means full length, not q*floor(s/q)
        expected = [s] * horizon
    assert values == expected
    assert all(a <= b for a, b in zip(values, values[1:])), "r_t never shrinks"
    full = next((t + 1 for t, r in enumerate(values) if r == s), None)
    if full is None:
        assert sched.full_length_iteration() > horizon
    else:
        assert sched.full_length_iteration() == full


def test_seq_not_multiple_of_step_reaches_full_after_ramp():
    sched = MSLGSchedule(197, 32, 8, 100)
    assert sched.kept_length(100) == 192  # largest multiple of 8 below 197
    assert sched.kept_length(101) == 192
    assert sched.kept_length(102) == 197
    assert sched.full_length_iteration() == 103


def test_start_not_multiple_of_step_rounds_down():
    assert MSLGSchedule(2048, 100, 16, 1000).kept_length(0) == 96


def test_runs_cover_iterations_and_sum_exactly():
    sched = MSLGSchedule(512, 128, 16, 3000)
    n = 5000
    runs = list(sched.runs(n))
    assert runs[0][0] == 0 and runs[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    for start, stop, r in runs:
        assert sched.kept_length(start) == r == sched.kept_length(stop - 1)
    assert len(runs) == (512 - 128) // 16 + 1
    assert sched.sum_kept_lengths(n) == sum(sched.kept_length(t) for t in range(n))
    assert sched.sum_kept_lengths(0) == 0


def test_steep_ramp_skips_steps():
    sched = MSLGSchedule(256, 16, 16, 3)  # +80 per iteration: several steps at once
    assert [sched.kept_length(t) for t in range(4)] == [16, 96, 176, 256]
    assert [r for _, _, r in sched.runs(6)] == [16, 96, 176, 256]


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(start_seq_length=4096), "--random-ltd-start-seq-length"),
        (dict(start_seq_length=8), "--random-ltd-start-seq-length"),
        (dict(seq_step=0), "--random-ltd-seq-step"),
        (dict(ramp_iters=0), "--random-ltd-ramp-iters"),
        (dict(ramp_iters=None), "--random-ltd-ramp-iters"),
    ],
)
def test_invalid_values_raise_user_error(kwargs, flag):
    args = dict(seq_length=2048, start_seq_length=128, seq_step=16, ramp_iters=1000)
    args.update(kwargs)
    with pytest.raises(UserError, match=flag) as err:
        MSLGSchedule(**args)
    assert "\n" not in str(err.value)


def test_from_config():
    cfg = RandomLTDConfig(enabled=True, start_seq_length=128, seq_step=16, ramp_iters=200_000)
    assert MSLGSchedule.from_config(cfg, 2048) == PAPER
    with pytest.raises(UserError, match="--random-ltd"):
        MSLGSchedule.from_config(RandomLTDConfig(), 2048)
