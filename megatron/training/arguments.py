"""Megatron's command-line flags, parsed in one place and turned into config dataclasses.

Flag names and defaults follow Megatron-LM so existing launch scripts work. Library code never sees the
argparse namespace: `build_configs` hands out dataclasses.
"""

import argparse
import os
import sys

from megatron.core.errors import UserError
from megatron.core.tokenizer import add_tokenizer_args
from megatron.training.cli import ArgumentParser
from megatron.training.run_length import check_ltd_flags, resolve_run_length


def _int_or_float(text: str) -> int:
    """Accept 300e9 as well as 300000000000 for token counts."""
    value = float(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text}")
    return int(value)


def build_parser(description: str = "Pretrain a GPT model with random-LTD") -> argparse.ArgumentParser:
    p = ArgumentParser(description=description)  # a bad flag is one `error:` line, no usage dump

    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--position-embedding-type", default="learned_absolute", choices=["learned_absolute", "rope", "none"])
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", "--layernorm-epsilon", dest="norm_epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    add_tokenizer_args(p)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="prefix, or weighted blend 'w1 p1 w2 p2 ...'")
    g.add_argument("--split", default=None, help="train,valid,test weights (default 969,30,1)")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--eod-mask-loss", action="store_true")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro batch x data-parallel size (no gradient accumulation)")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--train-tokens", type=_int_or_float, default=None, help="raw tokens read (samples x seq)")
    g.add_argument("--train-layer-tokens", type=_int_or_float, default=None,
                   help="stop at the first iteration whose consumed layer-tokens reach this")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit when the iteration is a multiple of this")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit at the first iteration that ends this many minutes after start-up")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM/SIGINT finish the iteration, save a checkpoint and exit 0 (all ranks agree)")
    g.add_argument("--check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad", action="store_true",
                   default=True, help="stop on an inf/NaN loss, or gradient without an fp16 loss scaler (default)")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"])
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)

    g = p.add_argument_group("learning rate")
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="linear",
                   choices=["constant", "linear", "cosine", "inverse-square-root"])
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-tokens", type=_int_or_float, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-samples", type=int, default=None)
    g.add_argument("--lr-decay-tokens", type=_int_or_float, default=None)
    g.add_argument("--layer-token-lr-schedule", action="store_true",
                   help="measure LR warmup/decay progress in layer-tokens (random-LTD)")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adam", choices=["adam"])
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)

    g = p.add_argument_group("random-LTD")
    g.add_argument("--random-ltd", action="store_true", help="enable random layerwise token dropping")
    # default None = "not given" (a warning names LTD flags given without --random-ltd); 128 and 16 are
    # filled in by check_ltd_flags
    g.add_argument("--random-ltd-start-seq-length", type=int, default=None, help="r_0 (default 128)")
    g.add_argument("--random-ltd-seq-step", type=int, default=None, help="q (default 16)")
    g.add_argument("--random-ltd-ramp-iters", type=int, default=None)
    g.add_argument("--random-ltd-ramp-fraction", type=float, default=None)
    g.add_argument("--random-ltd-layers", default=None, help="0-based layers, e.g. 1-22 (default: all but first and last)")

    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--log-json", default=None, help="append one JSON object per logged iteration")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true")
    g.add_argument("--load-fallback", action="store_true",
                   help="if the tracker's checkpoint is damaged, resume from the newest loadable older iteration")
    return p


def parse_args(argv=None, parser=None) -> argparse.Namespace:
    args = (parser or build_parser()).parse_args(argv)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Cross-flag rules, with Megatron's derived defaults filled in."""
    # A missing --global-batch-size stays None here: Megatron's default, micro batch x data-parallel
    # size, is known only once the process group exists (trainer._pretrain fills it in).
    if args.micro_batch_size < 1 or (args.global_batch_size is not None and args.global_batch_size < 1):
        raise UserError("--micro-batch-size and --global-batch-size must be positive")
    if args.global_batch_size is not None and args.global_batch_size % args.micro_batch_size:
        raise UserError(
            f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
            f"{args.micro_batch_size}; gradient accumulation needs a whole number of micro-batches"
        )
    if args.bf16 and args.fp16:
        raise UserError("choose one of --bf16 and --fp16")
    lengths = [n for n in ("train_iters", "train_samples", "train_tokens", "train_layer_tokens")
               if getattr(args, n) is not None]
    if not lengths:
        raise UserError("give the training length: --train-iters, --train-samples, --train-tokens "
                        "or --train-layer-tokens")
    if args.train_iters is not None and args.train_samples is not None:
        raise UserError("give only one of --train-iters and --train-samples")
    for name in lengths:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if not args.mock_data and not args.data_path:
        raise UserError("no training data: pass --data-path PREFIX (see tools/preprocess_data.py) or --mock-data")
    if args.split is None:
        args.split = "969,30,1"
    if args.log_interval < 1 or args.eval_interval < 1 or args.eval_iters < 0:
        raise UserError("--log-interval and --eval-interval must be positive, --eval-iters non-negative")
    if args.save_interval is not None and args.save_interval < 1:
        raise UserError("--save-interval must be positive")
    if args.save_interval is not None and args.save is None:
        raise UserError("--save-interval needs --save DIR")
    if args.tensor_model_parallel_size < 1 or args.pipeline_model_parallel_size < 1:
        raise UserError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    if args.num_workers < 0:
        raise UserError("--num-workers must be >= 0")
    if args.exit_interval is not None and args.exit_interval < 1:
        raise UserError("--exit-interval must be positive")
    if args.exit_duration_in_mins is not None and not args.exit_duration_in_mins > 0:
        raise UserError("--exit-duration-in-mins must be positive")
    _check_loss_scale_flags(args)
    # random-LTD and run length: checked now, before the process group, the banner or the model exist
    check_ltd_flags(args)
    probe = args
    if args.global_batch_size is None:  # the DP size torchrun's WORLD_SIZE implies; _pretrain sets the real one
        dp = max(1, int(os.environ.get("WORLD_SIZE", "1")) // (args.tensor_model_parallel_size *
                                                             args.pipeline_model_parallel_size))
        probe = argparse.Namespace(**{**vars(args), "global_batch_size": args.micro_batch_size * dp})
    resolve_run_length(probe, args.num_layers)


def _check_loss_scale_flags(args: argparse.Namespace) -> None:
    """The fp16 loss-scale flags (checked in every precision: no value they refuse means anything)."""
    if args.loss_scale is not None and not args.loss_scale > 0:
        raise UserError(f"--loss-scale must be positive, got {args.loss_scale:g} (the gradients are divided by "
                        "it); omit it for dynamic loss scaling")
    if args.hysteresis < 1:
        raise UserError(f"--hysteresis must be >= 1, got {args.hysteresis}: it counts the overflowing iterations "
                        "before the loss scale is halved")
    if args.loss_scale_window < 1:
        raise UserError(f"--loss-scale-window must be >= 1, got {args.loss_scale_window}: it counts the clean "
                        "iterations before the loss scale is doubled")
    if not args.min_loss_scale > 0:
        raise UserError(f"--min-loss-scale must be positive, got {args.min_loss_scale:g}")
    if not args.initial_loss_scale >= args.min_loss_scale:
        raise UserError(f"--initial-loss-scale {args.initial_loss_scale:g} is below --min-loss-scale "
                        f"{args.min_loss_scale:g}; raise the first or lower the second")


def print_args(args: argparse.Namespace, file=None) -> None:
    """Megatron's start-up banner: every argument, sorted, dotted to a column."""
    file = file or sys.stdout
    print("------------------------ arguments ------------------------", file=file)
    for key in sorted(vars(args)):
        print(f"  {key} {'.' * max(1, 48 - len(key))} {getattr(args, key)}", file=file)
    print("-------------------- end of arguments ---------------------", file=file, flush=True)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


