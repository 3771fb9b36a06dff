"""How long a run is and how its token dropping evolves, resolved once from the flags.

Lengths: `--train-iters`, `--train-samples` (rounded up to whole iterations), `--train-tokens` (raw tokens
read = samples x s), and `--train-layer-tokens` (stop after the first iteration whose consumed layer-tokens
reach the budget, how the paper spends 2/3 of the dense budget). A layer-token budget together with
another length stops at whichever comes first.

`resolve_run_length` is called by `config.resolve_config` (before the process group, the banner or the
model exist, so a bad r_0 or layer list fails first) and by tools/ltd_budget.py, so the plan is what the
trainer does.
"""

from dataclasses import dataclass
from typing import FrozenSet, Optional

from megatron.core.errors import UserError
from megatron.core.random_ltd import (
    LayerTokenCurve, MSLGSchedule, RandomLTDConfig, parse_layer_spec, plan_training, ramp_iters_from_fraction,
)


@dataclass(frozen=True)
class RunLength:
    train_iters: int
    global_batch_size: int
    ltd: RandomLTDConfig  # resolved: ramp_iters set (from the fraction when given), disabled when off
    ltd_layers: FrozenSet[int]  # empty when random-LTD is off
    curve: LayerTokenCurve  # layer-tokens per iteration; holds the MSLG schedule when LTD is on
    layer_token_budget: Optional[int]
    decay_default_samples: float  # LR decay length when no --lr-decay-* flag is given (schedule progress units)

    @property
    def ltd_enabled(self) -> bool:
        return bool(self.ltd_layers)

    def kept_length(self, t: int) -> int:
        """r_t: tokens each LTD layer keeps at 0-based iteration t (s when LTD is off)."""
        return self.curve.kept_length(t)

    def budget_reached(self, consumed_layer_tokens: int) -> bool:
        return self.layer_token_budget is not None and consumed_layer_tokens >= self.layer_token_budget

    def stage_ltd_layers(self, layer_offset: int, num_local_layers: int) -> FrozenSet[int]:
        """The LTD layers of the pipeline stage holding global layers [offset, offset + num_local_layers)."""
        return frozenset(layer for layer in self.ltd_layers if layer_offset <= layer < layer_offset + num_local_layers)

    def num_samples(self, eval_interval: int, eval_iters: int):
        """Samples each split must provide (Megatron's rule)."""
        G = self.global_batch_size
        return (self.train_iters * G, (self.train_iters // eval_interval + 1) * eval_iters * G, eval_iters * G)

    def describe(self) -> str:
        text = f"{self.train_iters} iterations"
        if self.layer_token_budget is not None:
            text += f", stopping at {self.layer_token_budget:.4g} layer-tokens"
        if self.ltd_enabled:
            sched = self.curve.schedule
            text += (f"; random-LTD on layers {sorted(self.ltd_layers)}: r {sched.kept_length(0)} -> "
                     f"{sched.seq_length} in steps of {sched.seq_step}, full length from iteration "
                     f"{sched.full_length_iteration()}")
        return text


def resolve_run_length(*, num_layers: int, seq_length: int, global_batch_size: int, train_iters=None,
                       train_samples=None, train_tokens=None, train_layer_tokens=None, random_ltd: bool = False,
                       start_seq_length: Optional[int] = None, seq_step: Optional[int] = None,
                       ramp_iters: Optional[int] = None, ramp_fraction: Optional[float] = None,
                       layers: Optional[str] = None, layer_token_lr_schedule: bool = False) -> RunLength:
    """The run's length, LTD set and schedule from the flags (None: not given, RandomLTDConfig's default);
    raises UserError for any bad combination."""
    s, G = seq_length, global_batch_size
    if num_layers < 1 or s < 1 or G < 1:
        raise UserError("--num-layers, --seq-length and --global-batch-size must be positive")
    lengths = {"train_iters": train_iters, "train_samples": train_samples, "train_tokens": train_tokens,
               "train_layer_tokens": train_layer_tokens}
    lengths = {k: v for k, v in lengths.items() if v is not None}
    if not lengths:
        raise UserError("give the training length: --train-iters, --train-samples, --train-tokens "
                        "or --train-layer-tokens")
    other = {k: v for k, v in lengths.items() if k != "train_layer_tokens"}
    if len(other) > 1:
        raise UserError(f"give one of --train-iters, --train-samples, --train-tokens (got "
                        f"{', '.join('--' + k.replace('_', '-') for k in other)})")
    dense = LayerTokenCurve(num_layers, s, G)
    iters = plan_training(dense, **other).iterations if other else None

    schedule, ltd_layers, ltd = None, (), RandomLTDConfig(enabled=False)
    if random_ltd:
        ramp = ramp_iters
        if ramp_fraction is not None:
            if ramp is not None:
                raise UserError("give one of --random-ltd-ramp-iters and --random-ltd-ramp-fraction")
            if iters is None:
                raise UserError("--random-ltd-ramp-fraction needs --train-iters/--train-samples/--train-tokens "
                                "(a layer-token budget's length depends on the ramp); use --random-ltd-ramp-iters")
            ramp = ramp_iters_from_fraction(ramp_fraction, iters)
        given = {"start_seq_length": start_seq_length, "seq_step": seq_step}
        ltd = RandomLTDConfig(enabled=True, ramp_iters=ramp, layers=parse_layer_spec(layers, num_layers) if layers
                              else None, **{k: v for k, v in given.items() if v is not None})
        ltd.validate(num_layers, s)
        ltd_layers = ltd.ltd_layers(num_layers)
        schedule = MSLGSchedule.from_config(ltd, s)
    curve = LayerTokenCurve(num_layers, s, G, len(ltd_layers), schedule)

    budget = train_layer_tokens
    if budget is not None:
        by_budget = curve.iterations_to_reach(budget)
        iters = by_budget if iters is None else min(iters, by_budget)
    # The default decay length is the run in the schedule's own progress unit. The LayerToken schedule
    # counts dense-equivalent samples C/(L*s), so a budget is budget/(L*s) of them; the plain schedule
    # counts samples read, iters*G (budget/(L*s) would end the decay early: at ~69% of the 1.3B run).
    if budget is not None and layer_token_lr_schedule:
        decay_default = budget / (num_layers * s)
    else:
        decay_default = float(iters * G)
    return RunLength(iters, G, ltd, frozenset(ltd_layers), curve, budget, decay_default)
