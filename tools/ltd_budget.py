"""Plan a random-LTD run before spending GPUs on it: iterations, tokens read, layer-tokens, saving.

Takes the trainer's own flags (pretrain_gpt_ltd.py's parser, so a recipe's whole command line can be
pasted) and resolves the length with the trainer's own `resolve_run_length`, so the plan is by
construction what training does: every length flag stops after the first iteration at which its count
reaches N (raw tokens read are samples * s), and --train-layer-tokens with another length stops at
whichever comes first. Flags that do not decide the length (--hidden-size, --lr, --data-path, ...) are
accepted and ignored; only --num-layers, --seq-length and the batch size are needed. Example, the
paper's GPT-3 1.3B recipe (stop at 4800B layer-tokens, 2/3 of a dense 300B-token baseline's 7200B):

    python tools/ltd_budget.py --num-layers 24 --seq-length 2048 --global-batch-size 512 \
        --random-ltd --random-ltd-start-seq-length 128 --random-ltd-seq-step 16 \
        --random-ltd-ramp-iters 200000 --random-ltd-layers 1-22 --train-layer-tokens 4800e9 \
        --baseline-train-tokens 300e9

`saving` compares with a dense model on the SAME samples; the paper's 33.3% compares with a dense
baseline of another length, which `--baseline-train-tokens` gives (`baseline_layer_tokens` = L * N,
`baseline_saving`).
"""

import argparse
import json
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatron.core.errors import UserError  # noqa: E402
from megatron.core.random_ltd import plan_training  # noqa: E402
from megatron.training import arguments  # noqa: E402
from megatron.training.config import run_length_from_flags, warn_unused_ltd_flags  # noqa: E402
from megatron.training.run_length import RunLength  # noqa: E402


def _count(text: str) -> int:
    """A positive integer, also written like 300e9 or 1_000; never rounded."""
    try:
        value = Decimal(text.replace("_", ""))
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not value.is_finite() or value != value.to_integral_value() or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    """The trainer's parser with nothing required (a plan needs no --lr or data), plus the tool's flags."""
    p = arguments.build_parser("Plan a random-LTD run: iterations, raw tokens, layer-tokens, theoretical saving.")
    for action in p._actions:
        action.required = False
    g = p.add_argument_group("plan")
    g.add_argument("--baseline-train-tokens", type=_count, help="raw tokens of a dense baseline to compare")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def resolve(args) -> RunLength:
    """The trainer's RunLength for these flags; raises UserError."""
    G = args.global_batch_size or args.micro_batch_size  # Megatron's default on one data-parallel rank
    missing = [flag for flag, value in (("--num-layers", args.num_layers), ("--seq-length", args.seq_length),
                                        ("--global-batch-size", G)) if value is None]
    if missing:
        raise UserError(f"a plan needs {', '.join(missing)} (or paste the trainer's whole command line)")
    arguments.check_ranges(args)
    warn_unused_ltd_flags(args)  # on stderr, so --json output stays one JSON object
    return run_length_from_flags(args, G)


def make_plan(args, run: RunLength) -> dict:
    """The plan as a dict of `TrainingPlan` fields (+ baseline keys when asked)."""
    plan = plan_training(run.curve, train_iters=run.train_iters).as_dict()
    if args.baseline_train_tokens is not None:
        plan["baseline_layer_tokens"] = args.num_layers * args.baseline_train_tokens
        plan["baseline_saving"] = 1.0 - plan["layer_tokens"] / plan["baseline_layer_tokens"]
    return plan


def _ranges(layers) -> str:
    """Layer numbers as a --random-ltd-layers spec: {1, 2, 3, 7} -> '1-3,7'."""
    runs = []  # [first, last] of each run of consecutive layers
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _billions(n: int) -> str:
    return f"{n / 1e9:,.1f}B ({n:,})"


def format_plan(plan: dict, args, run: RunLength) -> str:
    L, s = args.num_layers, args.seq_length
    if run.ltd_enabled:
        sched = run.curve.schedule
        head = (f"random-LTD on layers {_ranges(run.ltd_layers)} of {L}: r {sched.start_seq_length} -> {s} in "
                f"steps of {sched.seq_step} over {sched.ramp_iters:,} iterations")
    else:
        head = f"dense: {L} layers on all {s} tokens"
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
        run = resolve(args)
        plan = make_plan(args, run)
        text = json.dumps(plan) if args.json else format_plan(plan, args, run)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
