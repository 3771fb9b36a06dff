"""MSLG: monotonic sequence length growth of the kept length r_t.

    r_t = min(s, q * floor((r_0 + (t / T_r) * (s - r_0)) / q))        t = completed optimizer steps (0-based)

Why it exists: dropping adds gradient noise and makes the middle layers non-autoregressive while they
drop; growing r to s closes that gap by the end of training (paper section 3.2). r is a pure function
of t, so all micro-batches of a step share it and a resumed run continues exactly.

All arithmetic is on Python integers: with x = r_0*T_r + t*(s - r_0), r_t = min(s, q * (x // (T_r*q)))
(flooring twice equals flooring once for an integer q), so no float rounding can move a step boundary.
t is not clamped at T_r: when s is not a multiple of q, r_{T_r} is the largest multiple of q below s
and r reaches s a few iterations later. One deliberate deviation: r_0 = s means "no ramp" and gives
r_t = s, where the bare formula would keep q*floor(s/q) < s forever.

Because r_t is a non-decreasing staircase, `runs` lists it as at most s/q + 1 runs of constant r,
which makes sums over 300k iterations closed-form (see accounting.py).
"""

from dataclasses import dataclass
from typing import Iterator, Tuple

from megatron.core.errors import UserError
from megatron.core.random_ltd.config import RandomLTDConfig, check_schedule_values


@dataclass(frozen=True)
class MSLGSchedule:
    """Kept tokens per sample r_t for iteration t (0-based); raises UserError for invalid values."""

    seq_length: int  # s
    start_seq_length: int  # r_0
    seq_step: int  # q
    ramp_iters: int  # T_r

    def __post_init__(self):
        check_schedule_values(self.seq_length, self.start_seq_length, self.seq_step, self.ramp_iters)

    @classmethod
    def from_config(cls, config: RandomLTDConfig, seq_length: int) -> "MSLGSchedule":
        if not config.enabled:
            raise UserError("an MSLG schedule needs --random-ltd; without it every layer sees all tokens")
        return cls(seq_length, config.start_seq_length, config.seq_step, config.ramp_iters)

    def kept_length(self, iteration: int) -> int:
        """r_t: tokens each LTD layer keeps per sample at 0-based iteration t."""
        assert iteration >= 0, f"iteration must be >= 0, got {iteration}"
        s, r0, q, T = self.seq_length, self.start_seq_length, self.seq_step, self.ramp_iters
        if r0 == s:
            return s
        x = r0 * T + iteration * (s - r0)  # T_r times the unrounded length
        return min(s, q * (x // (T * q)))

    def _first_iteration_with_steps(self, k: int) -> int:
        """Smallest t with floor(x_t / (T_r q)) >= k, i.e. the first iteration where r_t >= k*q (r_0 < s)."""
        s, r0, q, T = self.seq_length, self.start_seq_length, self.seq_step, self.ramp_iters
        need = k * q * T - r0 * T  # t * (s - r0) must reach this
        return max(0, -(-need // (s - r0)))

    def full_length_iteration(self) -> int:
        """The 1-based iteration at which r first equals s (1 when r_0 = s)."""
        s, r0, q = self.seq_length, self.start_seq_length, self.seq_step
        if r0 == s:
            return 1
        return self._first_iteration_with_steps(-(-s // q)) + 1

    def runs(self, iterations: int) -> Iterator[Tuple[int, int, int]]:
        """(start, stop, r) for the runs of constant r covering iterations [0, iterations), stop exclusive."""
        t = 0
        while t < iterations:
            r = self.kept_length(t)
            if r >= self.seq_length:
                stop = iterations
            else:  # r = k*q; the run ends where the next multiple of q is reached
                stop = min(iterations, self._first_iteration_with_steps(r // self.seq_step + 1))
            assert stop > t, "the schedule must advance"
            yield t, stop, r
            t = stop

    def sum_kept_lengths(self, iterations: int) -> int:
        """Sum of r_t over t in [0, iterations), exactly."""
        return sum((stop - start) * r for start, stop, r in self.runs(iterations))
