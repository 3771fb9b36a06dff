"""How long a run is and how its token dropping evolves, resolved once from the flags.

Lengths: `--train-iters`, `--train-samples` (rounded up to whole iterations), `--train-tokens` (raw tokens
read = samples x s), and `--train-layer-tokens` (stop after the first iteration whose consumed layer-tokens
reach the budget, how the paper spends 2/3 of the dense budget). A layer-token budget together with
another length stops at whichever comes first.
"""

from dataclasses import dataclass
from typing import FrozenSet, Optional

from megatron.core.errors import UserError
from megatron.core.random_ltd import (
    LayerTokenCurve, MSLGSchedule, RandomLTDConfig, parse_layer_spec, plan_training, ramp_iters_from_fraction,
)


@dataclass
class RunLength:
    train_iters: int
    global_batch_size: int
    ltd_enabled: bool
    ltd_layers: FrozenSet[int]
    curve: LayerTokenCurve  # layer-tokens per iteration; holds the MSLG schedule when LTD is on
    layer_token_budget: Optional[int]
    decay_default_samples: float  # LR decay length when no --lr-decay-* flag is given

    def keep_at(self, t: int) -> int:
        """r_t: tokens each LTD layer keeps at 0-based iteration t (s when LTD is off)."""
        return self.curve.keep_at(t)

    def budget_reached(self, consumed_layer_tokens: int) -> bool:
        return self.layer_token_budget is not None and consumed_layer_tokens >= self.layer_token_budget

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
            text += (f"; random-LTD on layers {sorted(self.ltd_layers)}: r {sched.seq_length_at(0)} -> "
                     f"{sched.seq_length} in steps of {sched.seq_step}, full length from iteration "
                     f"{sched.full_length_iteration()}")
        return text


def resolve_run_length(args, num_layers: int) -> RunLength:
    s, G = args.seq_length, args.global_batch_size
    other = dict(train_iters=args.train_iters, train_samples=args.train_samples, train_tokens=args.train_tokens)
    other = {k: v for k, v in other.items() if v is not None}
    if len(other) > 1:
        raise UserError(f"give one of --train-iters, --train-samples, --train-tokens (got {', '.join(other)})")
    dense = LayerTokenCurve(num_layers, s, G)
    iters = plan_training(dense, **other).iterations if other else None

    schedule, layers = None, ()
    if args.random_ltd:
        ramp = args.random_ltd_ramp_iters
        if args.random_ltd_ramp_fraction is not None:
            if ramp is not None:
                raise UserError("give one of --random-ltd-ramp-iters and --random-ltd-ramp-fraction")
            if iters is None:
                raise UserError("--random-ltd-ramp-fraction needs --train-iters/--train-samples/--train-tokens "
                                "(a layer-token budget's length depends on the ramp); use --random-ltd-ramp-iters")
            ramp = ramp_iters_from_fraction(args.random_ltd_ramp_fraction, iters)
        spec = args.random_ltd_layers
        cfg = RandomLTDConfig(enabled=True, start_seq_length=args.random_ltd_start_seq_length,
                              seq_step=args.random_ltd_seq_step, ramp_iters=ramp,
                              layers=parse_layer_spec(spec, num_layers) if spec else None)
        cfg.validate(num_layers, s)
        layers = cfg.ltd_layers(num_layers)
        schedule = MSLGSchedule.from_config(cfg, s)
    curve = LayerTokenCurve(num_layers, s, G, len(layers), schedule)

    budget = args.train_layer_tokens
    if budget is not None:
        by_budget = curve.iterations_to_reach(budget)
        iters = by_budget if iters is None else min(iters, by_budget)
        decay_default = budget / (num_layers * s)  # the budget in dense-equivalent samples
    else:
        decay_default = float(iters * G)
    return RunLength(iters, G, bool(layers), frozenset(layers), curve, budget, decay_default)
