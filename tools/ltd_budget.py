"""Plan a random-LTD run before spending GPUs on it: iterations, tokens read, layer-tokens, saving.

Takes the training flags that decide the length of a run and prints the plan. Example, the paper's
GPT-3 1.3B recipe (stop at 4800B layer-tokens, 2/3 of a dense 300B-token baseline's 7200B):

    python tools/ltd_budget.py --num-layers 24 --seq-length 2048 --global-batch-size 512 \
        --random-ltd --random-ltd-start-seq-length 128 --random-ltd-seq-step 16 \
        --random-ltd-ramp-iters 200000 --random-ltd-layers 1-22 --train-layer-tokens 4800e9 \
        --baseline-train-tokens 300e9

Every length flag stops after the first iteration at which its count reaches N (raw tokens read are
samples * s). `saving` compares with a dense model on the SAME samples; the paper's 33.3% compares with a
dense baseline of another length, which `--baseline-train-tokens` gives (`baseline_layer_tokens` = L * N,
`baseline_saving`). `--random-ltd-ramp-fraction` is a fraction of the training iterations, which
`--train-layer-tokens` only fixes once the ramp is known, so that pair is rejected.
"""

import argparse
import json
import sys
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatron.core.errors import UserError  # noqa: E402
from megatron.core.random_ltd import (  # noqa: E402
    LayerTokenCurve,
    MSLGSchedule,
    RandomLTDConfig,
    parse_layer_spec,
    plan_training,
    ramp_iters_from_fraction,
)


def _integer(text: str) -> int:
    """An integer, also written like 4800e9 or 1_000; never rounded."""
    try:
        value = Decimal(text.replace("_", ""))
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not value.is_finite() or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def _count(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _fraction(text: str) -> Fraction:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction such as 0.7")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: main prints it
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Plan a random-LTD run: iterations, raw tokens, layer-tokens, theoretical saving.")
    p.add_argument("--num-layers", type=_count, required=True)
    p.add_argument("--seq-length", type=_count, required=True)
    p.add_argument("--global-batch-size", type=_count, required=True)
    p.add_argument("--random-ltd", action="store_true", help="drop tokens; without it the plan is dense")
    p.add_argument("--random-ltd-start-seq-length", type=_integer, default=128, help="r_0 (default 128)")
    p.add_argument("--random-ltd-seq-step", type=_integer, default=16, help="q (default 16)")
    ramp = p.add_mutually_exclusive_group()
    ramp.add_argument("--random-ltd-ramp-iters", type=_integer, help="T_r: iterations for r to reach s")
    ramp.add_argument("--random-ltd-ramp-fraction", type=_fraction, help="T_r as a fraction of the iterations")
    p.add_argument("--random-ltd-layers", help="0-based layers, e.g. 1-22 (default: all but first and last)")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--train-iters", type=_count)
    length.add_argument("--train-samples", type=_count)
    length.add_argument("--train-tokens", type=_count, help="raw tokens read (samples * seq length)")
    length.add_argument("--train-layer-tokens", type=_count, help="stop once consumed layer-tokens reach N")
    p.add_argument("--baseline-train-tokens", type=_count, help="raw tokens of a dense baseline to compare")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _iterations_without_ltd(args) -> int:
    """Training iterations for a length that does not depend on the schedule (for the ramp fraction)."""
    if args.train_layer_tokens is not None:
        raise UserError(
            "--random-ltd-ramp-fraction is a fraction of the training iterations, which --train-layer-tokens "
            "only fixes once the ramp is known; give --random-ltd-ramp-iters instead"
        )
    G, s = args.global_batch_size, args.seq_length
    if args.train_iters is not None:
        return args.train_iters
    if args.train_samples is not None:
        return -(-args.train_samples // G)
    return -(-args.train_tokens // (G * s))


def make_plan(args) -> dict:
    """The plan as a dict of `TrainingPlan` fields (+ baseline keys when asked); raises UserError."""
    L, s, G = args.num_layers, args.seq_length, args.global_batch_size
    schedule, n = None, 0
    if args.random_ltd:
        ramp_iters = args.random_ltd_ramp_iters
        if args.random_ltd_ramp_fraction is not None:
            ramp_iters = ramp_iters_from_fraction(args.random_ltd_ramp_fraction, _iterations_without_ltd(args))
        layers = None if args.random_ltd_layers is None else parse_layer_spec(args.random_ltd_layers, L)
        config = RandomLTDConfig(True, args.random_ltd_start_seq_length, args.random_ltd_seq_step, ramp_iters, layers)
        config.validate(L, s)
        args.resolved_ramp_iters = ramp_iters
        schedule, n = MSLGSchedule.from_config(config, s), len(config.ltd_layers(L))
    curve = LayerTokenCurve(L, s, G, n, schedule)
    plan = plan_training(
        curve,
        train_iters=args.train_iters,
        train_samples=args.train_samples,
        train_tokens=args.train_tokens,
        train_layer_tokens=args.train_layer_tokens,
    ).as_dict()
    if args.baseline_train_tokens is not None:
        plan["baseline_layer_tokens"] = L * args.baseline_train_tokens
        plan["baseline_saving"] = 1.0 - plan["layer_tokens"] / plan["baseline_layer_tokens"]
    return plan


def _billions(n: int) -> str:
    return f"{n / 1e9:,.1f}B ({n:,})"


def format_plan(plan: dict, args) -> str:
    if args.random_ltd:
        layers = args.random_ltd_layers or f"1-{args.num_layers - 2}"
        head = (
            f"random-LTD on layers {layers} of {args.num_layers}: r {args.random_ltd_start_seq_length} -> "
            f"{args.seq_length} in steps of {args.random_ltd_seq_step} over {args.resolved_ramp_iters:,} iterations"
        )
    else:
        head = f"dense: {args.num_layers} layers on all {args.seq_length} tokens"
    full = plan["full_length_iteration"]
    lines = [
        head,
        f"iterations:                {plan['iterations']:,}",
        f"raw tokens read:           {_billions(plan['raw_tokens'])}",
        f"layer-tokens:              {_billions(plan['layer_tokens'])}",
        f"dense layer-tokens:        {_billions(plan['dense_layer_tokens'])} (same samples, no dropping)",
        f"theoretical saving:        {plan['saving']:.2%}",
        f"full length at iteration:  {full:,}" + (" (after the end of training)" if full > plan["iterations"] else ""),
    ]
    if "baseline_layer_tokens" in plan:
        lines.append(f"baseline layer-tokens:     {_billions(plan['baseline_layer_tokens'])}")
        lines.append(f"saving vs baseline:        {plan['baseline_saving']:.2%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        plan = make_plan(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan) if args.json else format_plan(plan, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
