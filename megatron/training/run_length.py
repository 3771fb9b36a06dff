"""How long a run is and how its token dropping evolves, resolved once from the flags.

Lengths: `--train-iters`, `--train-samples` (rounded up to whole iterations), `--train-tokens` (raw tokens
read = samples x s), and `--train-layer-tokens` (stop after the first iteration whose consumed layer-tokens
reach the budget, how the paper spends 2/3 of the dense budget). A layer-token budget together with
another length stops at whichever comes first.

`check_ltd_flags` + `resolve_run_length` run at argument-parsing time (validate_args), so a bad r_0 or
layer list fails before the process group, the banner or the model exist; the trainer and
tools/ltd_budget.py resolve the same flags with the same function, so the plan is what the trainer does.
"""

import os
import sys
from dataclasses import dataclass
from typing import FrozenSet, Optional

from megatron.core.errors import UserError
from megatron.core.random_ltd import (
    LayerTokenCurve, MSLGSchedule, RandomLTDConfig, parse_layer_spec, plan_training, ramp_iters_from_fraction,
)

# Flags that only mean something with --random-ltd (parser default None = not given), and their defaults.
LTD_FLAG_DEFAULTS = {"random_ltd_start_seq_length": 128, "random_ltd_seq_step": 16, "random_ltd_ramp_iters": None,
                     "random_ltd_ramp_fraction": None, "random_ltd_layers": None}


def check_ltd_flags(args, file=None) -> None:
    """Warn (rank 0, one line) about random-LTD flags given without --random-ltd, then fill in defaults.

    Without the warning `--random-ltd-ramp-iters 200000` alone would silently train dense.
    """
    given = [name for name in LTD_FLAG_DEFAULTS if getattr(args, name, None) is not None]
    if given and not args.random_ltd and os.environ.get("RANK", "0") == "0":
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        print(f"WARNING: {flags} ignored: random-LTD is off (add --random-ltd to drop tokens)",
              file=file or sys.stderr, flush=True)
    for name, default in LTD_FLAG_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)


@dataclass
class RunLength:
    train_iters: int
    global_batch_size: int
    ltd_enabled: bool
    ltd_layers: FrozenSet[int]
    curve: LayerTokenCurve  # layer-tokens per iteration; holds the MSLG schedule when LTD is on
    layer_token_budget: Optional[int]
    decay_default_samples: float  # LR decay length when no --lr-decay-* flag is given (schedule progress units)

    def keep_at(self, t: int) -> int:
        """r_t: tokens each LTD layer keeps at 0-based iteration t (s when LTD is off)."""
        return self.curve.keep_at(t)

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
            text += (f"; random-LTD on layers {sorted(self.ltd_layers)}: r {sched.seq_length_at(0)} -> "
                     f"{sched.seq_length} in steps of {sched.seq_step}, full length from iteration "
                     f"{sched.full_length_iteration()}")
        return text


def resolve_run_length(args, num_layers: int) -> RunLength:
    """The run's length, LTD set and schedule from the flags; raises UserError for any bad combination."""
    s, G = args.seq_length, args.global_batch_size
    if num_layers < 1 or s < 1 or G < 1:
        raise UserError("--num-layers, --seq-length and --global-batch-size must be positive")
    lengths = {k: getattr(args, k) for k in ("train_iters", "train_samples", "train_tokens", "train_layer_tokens")}
    lengths = {k: v for k, v in lengths.items() if v is not None}
    if not lengths:
        raise UserError("give the training length: --train-iters, --train-samples, --train-tokens "
                        "or --train-layer-tokens")
    for name, value in lengths.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    other = {k: v for k, v in lengths.items() if k != "train_layer_tokens"}
    if len(other) > 1:
        raise UserError(f"give one of --train-iters, --train-samples, --train-tokens (got "
                        f"{', '.join('--' + k.replace('_', '-') for k in other)})")
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
    # The default decay length is the run in the schedule's own progress unit. The LayerToken schedule
    # counts dense-equivalent samples C/(L*s), so a budget is budget/(L*s) of them; the plain schedule
    # counts samples read, iters*G (budget/(L*s) would end the decay early: at ~69% of the 1.3B run).
    if budget is not None and getattr(args, "layer_token_lr_schedule", False):
        decay_default = budget / (num_layers * s)
    else:
        decay_default = float(iters * G)
    return RunLength(iters, G, bool(layers), frozenset(layers), curve, budget, decay_default)
