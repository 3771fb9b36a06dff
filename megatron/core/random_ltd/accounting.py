"""Layer-tokens: the compute unit random-LTD saves, counted over a run, and training-length plans.

One layer-token is one token processed by one transformer layer. Iteration t consumes

    LT_t = G * ((L - n) * s + n * r_t)          G global batch, L layers, n LTD layers, r_t from MSLG

(a dense step consumes G * L * s). The theoretical saving so far is 1 - consumed / (L * s * samples):
linear in tokens, so it ignores the quadratic attention term and the embedding/LM head (paper footnote 2);
wall-clock savings are smaller.

Plans answer "how long is this run?" for the four ways to set a length. Every stop rule is "stop after
the first iteration at which the consumed quantity reaches N" (iterations, samples, raw tokens read =
samples * s, or layer-tokens), evaluated in closed form over the schedule's runs of constant r, so a
300k-iteration plan costs microseconds.
"""

from dataclasses import asdict, dataclass
from typing import Optional

from megatron.core.random_ltd.schedule import MSLGSchedule


def layer_tokens_per_iteration(
    global_batch_size: int, num_layers: int, num_ltd_layers: int, seq_length: int, kept_length: int
) -> int:
    """LT_t = G * ((L - n) * s + n * r); r >= s (or n = 0) gives the dense G * L * s."""
    kept_length = min(kept_length, seq_length)
    return global_batch_size * ((num_layers - num_ltd_layers) * seq_length + num_ltd_layers * kept_length)


def theoretical_saving(consumed_layer_tokens: int, num_layers: int, seq_length: int, consumed_samples: int):
    """1 - consumed layer-tokens / what a dense model would have consumed on the same samples."""
    if consumed_samples == 0:
        return 0.0
    return 1.0 - consumed_layer_tokens / (num_layers * seq_length * consumed_samples)


@dataclass(frozen=True)
class LayerTokenCurve:
    """Layer-tokens of a whole run as a function of the iteration count; schedule None means dense."""

    num_layers: int  # L
    seq_length: int  # s
    global_batch_size: int  # G
    num_ltd_layers: int = 0  # n
    schedule: Optional[MSLGSchedule] = None

    def __post_init__(self):
        if self.schedule is not None:
            assert self.schedule.seq_length == self.seq_length, "schedule and curve disagree on s"

    def kept_length(self, iteration: int) -> int:
        return self.seq_length if self.schedule is None else self.schedule.kept_length(iteration)

    def at(self, iteration: int) -> int:
        """LT_t of 0-based iteration t."""
        L, n, s, G = self.num_layers, self.num_ltd_layers, self.seq_length, self.global_batch_size
        return layer_tokens_per_iteration(G, L, n, s, self.kept_length(iteration))

    def cumulative(self, iterations: int) -> int:
        """Layer-tokens consumed by iterations [0, iterations)."""
        L, n, s, G = self.num_layers, self.num_ltd_layers, self.seq_length, self.global_batch_size
        kept = s * iterations if self.schedule is None else self.schedule.sum_kept_lengths(iterations)
        return G * ((L - n) * s * iterations + n * kept)

    def iterations_to_reach(self, layer_tokens: int) -> int:
        """Smallest N with cumulative(N) >= layer_tokens: stop after the iteration that reaches the budget."""
        if layer_tokens <= 0:
            return 0
        if self.schedule is None:
            return -(-layer_tokens // self.at(0))
        full = self.schedule.full_length_iteration()  # iterations [0, full) hold every ramp run and one at r = s
        consumed = 0
        for start, stop, _ in self.schedule.runs(full):
            per_iteration = self.at(start)
            if consumed + (stop - start) * per_iteration >= layer_tokens:
                return start + -(-(layer_tokens - consumed) // per_iteration)
            consumed += (stop - start) * per_iteration
        return full + -(-(layer_tokens - consumed) // self.at(full))  # r = s from here on


@dataclass(frozen=True)
class TrainingPlan:
    """What a run will read and compute; the fields are `tools/ltd_budget.py --json`'s keys."""

    iterations: int
    raw_tokens: int  # samples * s: tokens read from the dataset
    layer_tokens: int
    dense_layer_tokens: int  # L * s * samples: the same samples with every layer on all s tokens
    saving: float  # 1 - layer_tokens / dense_layer_tokens
    full_length_iteration: int  # 1-based iteration at which r reaches s (1 when LTD is off)

    def as_dict(self) -> dict:
        return asdict(self)


def plan_training(
    curve: LayerTokenCurve,
    *,
    train_iters: Optional[int] = None,
    train_samples: Optional[int] = None,
    train_tokens: Optional[int] = None,
    train_layer_tokens: Optional[int] = None,
) -> TrainingPlan:
    """Resolve exactly one training length into iterations, tokens read, layer-tokens and saving."""
    given = [v for v in (train_iters, train_samples, train_tokens, train_layer_tokens) if v is not None]
    assert len(given) == 1, "give exactly one of train_iters, train_samples, train_tokens, train_layer_tokens"
    G, s, L = curve.global_batch_size, curve.seq_length, curve.num_layers
    if train_iters is not None:
        iterations = train_iters
    elif train_samples is not None:
        iterations = -(-train_samples // G)
    elif train_tokens is not None:
        iterations = -(-train_tokens // (G * s))
    else:
        iterations = curve.iterations_to_reach(train_layer_tokens)
    samples = iterations * G
    layer_tokens = curve.cumulative(iterations)
    dense = L * s * samples
    return TrainingPlan(
        iterations=iterations,
        raw_tokens=samples * s,
        layer_tokens=layer_tokens,
        dense_layer_tokens=dense,
        saving=theoretical_saving(layer_tokens, L, s, samples),
        full_length_iteration=1 if curve.schedule is None else curve.schedule.full_length_iteration(),
    )
