"""Megatron's command-line flags and the range of every numeric one, checked in one place.

Flag names and defaults follow Megatron-LM so existing launch scripts work; the model flags take their
defaults from `TransformerConfig` itself, so no default is written twice. `parse_args` returns the parsed
flags with every value range checked (`RANGES`); `megatron.training.config.resolve_config` then turns them,
once, into the frozen `RunConfig` that everything else reads. Nothing mutates the namespace.
"""

import argparse
import dataclasses
import sys

from megatron.checkpoint.saved_flags import checkpoint_flags
from megatron.core.errors import UserError
from megatron.core.tokenizer import add_tokenizer_args
from megatron.core.transformer.config import TransformerConfig
from megatron.training.cli import ArgumentParser

MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}


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
    g.add_argument("--position-embedding-type", default=MODEL_DEFAULTS["position_embedding_type"], choices=["learned_absolute", "rope", "none"])
    g.add_argument("--rotary-base", type=int, default=MODEL_DEFAULTS["rotary_base"])
    g.add_argument("--rotary-percent", type=float, default=MODEL_DEFAULTS["rotary_percent"],
                   help="fraction of each head's dimensions that RoPE rotates")
    g.add_argument("--group-query-attention", action="store_true",
                   help="grouped-query attention: query heads share key/value heads in --num-query-groups groups")
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="with --group-query-attention (default 1: multi-query attention)")
    g.add_argument("--normalization", default=MODEL_DEFAULTS["normalization"], choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", "--layernorm-epsilon", dest="norm_epsilon", type=float,
                   default=MODEL_DEFAULTS["layernorm_epsilon"])
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--openai-gelu", action="store_true",
                   help="the tanh approximation of GELU (GPT-2's gelu_new), as Megatron's flag")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=MODEL_DEFAULTS["hidden_dropout"])
    g.add_argument("--attention-dropout", type=float, default=MODEL_DEFAULTS["attention_dropout"])
    g.add_argument("--init-method-std", type=float, default=MODEL_DEFAULTS["init_method_std"])
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
    g.add_argument("--bf16", action="store_true", help="bf16 parameters, fp32 main parameters and gradients")
    g.add_argument("--fp16", action="store_true", help="fp16 parameters and fp32 main parameters, loss scaling")

    g = p.add_argument_group("mixed precision and data parallelism (docs/training.md)")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="accumulate and reduce gradients in fp32 (always with --bf16 unless --grad-reduce-in-bf16)")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="with --bf16: accumulate and reduce gradients in bf16 (half the buffer and traffic)")
    g.add_argument("--fp32-residual-connection", action="store_true",
                   help="keep the residual stream and pipeline messages fp32 under --bf16/--fp16")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard fp32 main parameters and Adam state over the data-parallel ranks (ZeRO-1)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce each gradient bucket while backward computes the earlier layers")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: gather updated parameters during the next forward")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="elements per gradient bucket (default: max(40M, 1M x dp) with --overlap-grad-reduce, "
                        "else one bucket)")
    g.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"])
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split norms, dropouts and the residual stream along the sequence over the TP ranks")

    g = p.add_argument_group("activation recomputation (docs/training.md)")
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"],
                   help="full: recompute whole layers (needs --recompute-method); selective: core attention only")
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"],
                   help="uniform: chunks of --recompute-num-layers layers keep only their input; "
                        "block: recompute the first --recompute-num-layers layers of each pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, default=None, help="with full granularity (default 1)")
    g.add_argument("--recompute-activations", action="store_true", help="= --recompute-granularity selective")

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
    # default None = "not given" (a warning names LTD flags given without --random-ltd); the defaults are
    # RandomLTDConfig's, taken when the config is resolved
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
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model flags, and the tokenizer flags unless --tokenizer-type is given, from the "
                        "--load checkpoint (ours, a Hugging Face import or a Megatron-LM checkpoint)")
    g.add_argument("--load-fallback", action="store_true",
                   help="if the tracker's checkpoint is damaged, resume from the newest loadable older iteration")
    g.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist", "torch"],
                   help="torch_dist (default): every rank writes its pieces through PyTorch's distributed checkpoint "
                        "and any layout resumes, optimizer included; torch: Megatron's legacy mp_rank_* files "
                        "(docs/checkpoints.md). --load reads either")
    g.add_argument("--async-save", action="store_true",
                   help="torch_dist: write checkpoints in the background while training continues")
    g = p.add_argument_group("speed: compiling, throughput, timers, profiling (docs/training.md)")
    g.add_argument("--torch-compile", action="store_true",
                   help="compile each transformer layer with torch.compile (inductor), its token dimension dynamic")
    g.add_argument("--log-throughput", action="store_true",
                   help="log TFLOP/s per GPU (Megatron's FLOP formula): the FLOPs run and, with random-LTD, the "
                        "dense-equivalent ones; MFU against --peak-tflops")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of one GPU for MFU (default: the bf16/fp16 dense peak of a known GPU)")
    g.add_argument("--timing-log-level", type=int, default=0, choices=[0, 1, 2],
                   help="0: no timers; 1: forward-backward, optimizer, gradient reduction, ...; 2: also per "
                        "micro-batch (data, random-LTD draw, compute, pipeline p2p). Timers synchronise the GPU")
    g.add_argument("--profile", action="store_true",
                   help="write a torch.profiler trace of iterations --profile-step-start+1..--profile-step-end "
                        "into --tensorboard-dir")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="global ranks to profile")
    return p



# Value ranges, checked here and nowhere else: flag dest -> (test, rule as the message says it[, why]).
# A flag left at None (not given) is not checked. The random-LTD schedule values are checked with their
# cross-field rules by `RandomLTDConfig.validate` (r_0 against s and q), the one place for those.
_POS = (lambda v: v > 0, "positive")
_GE1 = (lambda v: v >= 1, ">= 1")
_GE0 = (lambda v: v >= 0, ">= 0")
_PROB = (lambda v: 0.0 <= v < 1.0, "in [0, 1)")
_FRACTION = (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
RANGES = {
    # model
    "num_layers": _POS, "hidden_size": _POS, "ffn_hidden_size": _POS, "num_attention_heads": _POS,
    "seq_length": _POS, "max_position_embeddings": _POS, "rotary_base": _POS, "norm_epsilon": _POS,
    "rotary_percent": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"), "num_query_groups": _POS,
    "hidden_dropout": _PROB, "attention_dropout": _PROB, "init_method_std": _POS,
    "make_vocab_size_divisible_by": _GE1, "vocab_size": _GE1,
    # data and training
    "num_workers": _GE0, "micro_batch_size": _POS, "global_batch_size": _POS, "train_iters": _POS,
    "train_samples": _POS, "train_tokens": _POS, "train_layer_tokens": _POS, "exit_interval": _POS,
    "exit_duration_in_mins": _POS, "seed": _GE0, "tensor_model_parallel_size": _GE1,
    "pipeline_model_parallel_size": _GE1, "recompute_num_layers": _GE1, "ddp_bucket_size": _POS,
    # learning rate
    "lr": _GE0, "min_lr": _GE0, "lr_warmup_iters": _GE0, "lr_warmup_samples": _GE0, "lr_warmup_tokens": _GE0,
    "lr_warmup_fraction": _FRACTION, "lr_decay_iters": _POS, "lr_decay_samples": _POS, "lr_decay_tokens": _POS,
    # optimizer and loss scaling
    "weight_decay": _GE0, "adam_beta1": _PROB, "adam_beta2": _PROB, "adam_eps": _POS, "clip_grad": _GE0,
    "loss_scale": (*_POS, "the gradients are divided by it; omit it for dynamic loss scaling"),
    "initial_loss_scale": _POS, "min_loss_scale": _POS,
    "loss_scale_window": (*_GE1, "it counts the clean iterations before the loss scale is doubled"),
    "hysteresis": (*_GE1, "it counts the overflowing iterations before the loss scale is halved"),
    # logging, evaluation, checkpoints
    "log_interval": _POS, "eval_interval": _POS, "eval_iters": _GE0, "save_interval": _POS,
    "peak_tflops": _POS, "profile_step_start": _GE0, "profile_step_end": _POS,
    "timing_log_level": (lambda v: 0 <= v <= 2, "0, 1 or 2"), "profile_ranks": (lambda v: min(v) >= 0, ">= 0"),
    # BERT (pretrain_bert_ltd.py's parser)
    "mask_prob": (lambda v: 0.0 < v < 1.0, "in (0, 1)"), "short_seq_prob": _FRACTION, "masking_max_ngram": _GE1,
}


def check_ranges(flags: argparse.Namespace) -> None:
    """One `error:` line for the first flag whose value is out of range (e.g. `--lr -1`)."""
    for name, value in vars(flags).items():
        rule = RANGES.get(name)
        if rule is None or value is None or isinstance(value, bool):
            continue
        ok, words, *why = rule
        if not ok(value):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise UserError(f"--{name.replace('_', '-')} must be {words}, got {shown}" + (f" ({why[0]})" if why else ""))


def parse_args(argv=None, parser=None) -> argparse.Namespace:
    """The flags, parsed and range-checked; cross-flag rules are `config.resolve_config`'s.

    With --use-checkpoint-args the --load checkpoint's model flags are appended after the command line (so
    they win, as in Megatron: they must match the weights), and its tokenizer flags too when the command
    line gives no --tokenizer-type (a tokenizer whose files moved is named on the command line instead)."""
    parser = parser or build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)  # before the required model flags are checked
    first.add_argument("--use-checkpoint-args", action="store_true")
    first.add_argument("--load", default=None)
    first.add_argument("--tokenizer-type", default=None)
    early, _ = first.parse_known_args(argv)
    if early.use_checkpoint_args:
        if not early.load:
            raise UserError("--use-checkpoint-args reads the flags of the --load checkpoint: add --load DIR")
        _, _, _, saved = checkpoint_flags(early.load)
        argv = argv + saved.model + (saved.tokenizer if early.tokenizer_type is None else [])
    flags = parser.parse_args(argv)
    check_ranges(flags)
    return flags


def print_args(args: dict, file=None) -> None:
    """Megatron's start-up banner: every argument, sorted, dotted to a column."""
    file = file or sys.stdout
    print("------------------------ arguments ------------------------", file=file)
    for key in sorted(args):
        print(f"  {key} {'.' * max(1, 48 - len(key))} {args[key]}", file=file)
    print("-------------------- end of arguments ---------------------", file=file, flush=True)
