"""The run's configuration: the flags resolved once into small frozen dataclasses, passed down explicitly.

    flags = parse_args(argv)                                  # arguments.py: parsed, every range checked
    tokenizer = build_tokenizer(tokenizer_config_from_args(flags))
    config = resolve_config(flags, tokenizer.vocab_size)      # cross-flag rules, derived values; frozen
    pretrain(config, model_provider, datasets_provider, forward_step)

Every derived value is computed here and only here: Megatron's default global batch (micro batch x data
parallel size, from torchrun's WORLD_SIZE), the padded vocabulary, the run length and random-LTD schedule,
the LR schedule in progress units. The trainer, the checkpoint code and the entry points read the sections;
nothing reads argparse flags after this point, and nothing mutates a config.

Checkpoints store `RunConfig.as_dict()` (plain dicts, loadable with weights_only) under "config" and,
for Megatron's tools and older readers, `RunConfig.args`: the flat dict of Megatron's flag names with the
derived values filled in (`padded_vocab_size`, `global_batch_size`, ...), also what the banner prints.
"""

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional, Tuple

import torch

from megatron.core import parallel_state as ps
from megatron.core.errors import UserError
from megatron.core.optimizer.optimizer import OptimizerConfig
from megatron.core.random_ltd import RandomLTDConfig
from megatron.core.tokenizer import TokenizerConfig, tokenizer_config_from_args, vocab_size_with_padding
from megatron.core.transformer.config import TransformerConfig
from megatron.checkpoint.model_args import transformer_config_from_args
from megatron.training.lr_schedule import LRScheduleConfig, schedule_lengths
from megatron.training.run_length import RunLength, resolve_run_length

DEFAULT_SPLIT = "969,30,1"
LTD_FLAGS = ("random_ltd_start_seq_length", "random_ltd_seq_step", "random_ltd_ramp_iters", "random_ltd_ramp_fraction",
             "random_ltd_layers")  # only mean something with --random-ltd (parser default None = not given)


@dataclass(frozen=True)
class DataConfig:
    data_path: Tuple[str, ...]  # --data-path: a prefix, or a blend `w1 p1 w2 p2 ...`; empty with mock data
    split: str  # --split train,valid,test weights
    data_cache_path: Optional[str]
    mock_data: bool
    num_workers: int  # DataLoader worker processes per rank
    reset_position_ids: bool
    eod_mask_loss: bool


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int  # world size / (tp * pp)
    distributed_backend: Optional[str]  # None: NCCL with CUDA, else gloo (parallel_state decides)

    @property
    def world_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.data_parallel_size


@dataclass(frozen=True)
class TrainingConfig:
    micro_batch_size: int  # b
    global_batch_size: int  # G = b x data-parallel size x micro-batches per iteration
    num_micro_batches: int  # per data-parallel rank and iteration
    seed: int
    bf16: bool
    fp16: bool
    check_for_nan_in_loss_and_grad: bool
    exit_interval: Optional[int]
    exit_duration_in_mins: Optional[float]
    exit_signal_handler: bool

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    @property
    def params_dtype(self) -> torch.dtype:
        """The model's parameters (and, without --fp32-residual-connection, its activations)."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


@dataclass(frozen=True)
class DistributedDataParallelConfig:
    """Gradient buffers and their reduction (megatron/core/distributed)."""
    grad_reduce_in_fp32: bool  # main_grad fp32 (--accumulate-allreduce-grads-in-fp32; bf16's default)
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    use_distributed_optimizer: bool
    bucket_size: Optional[int]  # elements; None = one bucket per buffer


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int
    log_json: Optional[str]
    tensorboard_dir: Optional[str]
    eval_interval: int
    eval_iters: int
    log_throughput: bool = False  # TFLOP/s per GPU and MFU in the log line and JSON (flops.py)
    peak_tflops: Optional[float] = None  # None: the known GPU's bf16/fp16 peak, else no MFU
    timing_log_level: int = 0  # timers.py; 0 = off
    profile: bool = False  # torch.profiler trace of iterations profile_step_start+1..profile_step_end
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: Tuple[int, ...] = (0,)  # global ranks


@dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str]
    load: Optional[str]
    save_interval: Optional[int]
    no_load_optim: bool
    no_load_rng: bool
    finetune: bool
    load_fallback: bool
    ckpt_format: str = "torch_dist"  # or "torch": Megatron's legacy files
    async_save: bool = False


@dataclass(frozen=True)
class RunConfig:
    model: TransformerConfig
    tokenizer: TokenizerConfig
    data: DataConfig
    optimizer: OptimizerConfig
    lr: LRScheduleConfig  # in schedule progress units (samples, or dense-equivalent samples)
    run: RunLength  # iterations, budget, random-LTD set and MSLG schedule
    parallel: ParallelConfig
    ddp: DistributedDataParallelConfig
    training: TrainingConfig
    logging: LoggingConfig
    checkpoint: CheckpointConfig
    args: Mapping[str, Any]  # Megatron's flag names -> values, derived ones filled in (read-only)

    @property
    def random_ltd(self) -> RandomLTDConfig:
        return self.run.ltd

    def as_dict(self) -> dict:
        """Every section as plain dicts, lists and scalars (what a checkpoint stores under "config")."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "args"}


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (frozenset, set)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def warn_unused_ltd_flags(flags: argparse.Namespace, file=None) -> None:
    """Rank 0, one line: random-LTD flags given without --random-ltd (else `--random-ltd-ramp-iters 200000`
    alone would silently train dense)."""
    given = [name for name in LTD_FLAGS if getattr(flags, name) is not None]
    if given and not flags.random_ltd and os.environ.get("RANK", "0") == "0":
        names = ", ".join("--" + name.replace("_", "-") for name in given)
        print(f"WARNING: {names} ignored: random-LTD is off (add --random-ltd to drop tokens)",
              file=file or sys.stderr, flush=True)


def run_length_from_flags(flags: argparse.Namespace, global_batch_size: int) -> RunLength:
    """`resolve_run_length` on the length and random-LTD flags (also tools/ltd_budget.py's plan)."""
    return resolve_run_length(
        num_layers=flags.num_layers, seq_length=flags.seq_length, global_batch_size=global_batch_size,
        train_iters=flags.train_iters, train_samples=flags.train_samples, train_tokens=flags.train_tokens,
        train_layer_tokens=flags.train_layer_tokens, random_ltd=flags.random_ltd,
        start_seq_length=flags.random_ltd_start_seq_length, seq_step=flags.random_ltd_seq_step,
        ramp_iters=flags.random_ltd_ramp_iters, ramp_fraction=flags.random_ltd_ramp_fraction,
        layers=flags.random_ltd_layers, layer_token_lr_schedule=flags.layer_token_lr_schedule)


def _check_cross_flags(f: argparse.Namespace) -> None:
    """Rules between flags (each value's own range is arguments.RANGES')."""
    if f.global_batch_size is not None and f.global_batch_size % f.micro_batch_size:
        raise UserError(f"--global-batch-size {f.global_batch_size} is not a multiple of --micro-batch-size "
                        f"{f.micro_batch_size}; gradient accumulation needs a whole number of micro-batches")
    if f.bf16 and f.fp16:
        raise UserError("choose one of --bf16 and --fp16")
    if f.train_iters is not None and f.train_samples is not None:
        raise UserError("give only one of --train-iters and --train-samples")
    if not f.mock_data and not f.data_path:
        raise UserError("no training data: pass --data-path PREFIX (see tools/preprocess_data.py) or --mock-data")
    if f.save_interval is not None and f.save is None:
        raise UserError("--save-interval needs --save DIR")
    if f.async_save and f.ckpt_format != "torch_dist":
        raise UserError(f"--async-save needs --ckpt-format torch_dist (the {f.ckpt_format} format is written "
                        "synchronously); drop one of them")
    if f.profile and f.profile_step_end <= f.profile_step_start:
        raise UserError(f"--profile-step-end {f.profile_step_end} must be after --profile-step-start "
                        f"{f.profile_step_start} (the trace covers iterations start+1..end)")
    if f.profile and not f.tensorboard_dir:
        raise UserError("--profile writes its trace into --tensorboard-dir: add --tensorboard-dir DIR")
    if f.num_query_groups is not None and not f.group_query_attention:
        raise UserError("--num-query-groups needs --group-query-attention")
    if f.overlap_param_gather and not f.use_distributed_optimizer:
        raise UserError("--overlap-param-gather needs --use-distributed-optimizer (only sharded parameters are "
                        "gathered); add it, or drop --overlap-param-gather")
    if f.grad_reduce_in_bf16 and not f.bf16:
        raise UserError("--grad-reduce-in-bf16 needs --bf16" + (" (fp16 gradients are reduced in fp16 unless "
                        "--accumulate-allreduce-grads-in-fp32)" if f.fp16 else ""))
    if f.grad_reduce_in_bf16 and f.accumulate_allreduce_grads_in_fp32:
        raise UserError("--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 contradict; give one")
    if f.fp32_residual_connection and not (f.bf16 or f.fp16):
        raise UserError("--fp32-residual-connection needs --bf16 or --fp16 (in fp32 the residual is fp32 already)")
    if not f.initial_loss_scale >= f.min_loss_scale:
        raise UserError(f"--initial-loss-scale {f.initial_loss_scale:g} is below --min-loss-scale "
                        f"{f.min_loss_scale:g}; raise the first or lower the second")


def _recompute_fields(f: argparse.Namespace, pp: int) -> dict:
    """TransformerConfig's recompute fields from the flags; the config checks how they combine."""
    granularity = f.recompute_granularity
    if f.recompute_activations:
        if granularity == "full":
            raise UserError("--recompute-activations means --recompute-granularity selective; give only one")
        granularity = "selective"
    per_stage = f.num_layers // pp
    if granularity == "full" and f.recompute_num_layers is not None and f.recompute_num_layers > per_stage:
        raise UserError(f"--recompute-num-layers {f.recompute_num_layers} is more than the {per_stage} layers of a "
                        f"pipeline stage (--num-layers {f.num_layers} / --pipeline-model-parallel-size {pp})")
    return dict(recompute_granularity=granularity, recompute_method=f.recompute_method,
                recompute_num_layers=f.recompute_num_layers)


def _sequence_parallel(f: argparse.Namespace, tp: int) -> bool:
    """--sequence-parallel, checked: off at TP = 1 (Megatron's rule, with one warning line); the sequence and
    every kept length must split evenly over the TP ranks."""
    if not f.sequence_parallel:
        return False
    if tp == 1:
        if os.environ.get("RANK", "0") == "0":
            print("WARNING: --sequence-parallel has no effect with --tensor-model-parallel-size 1; turned off",
                  file=sys.stderr, flush=True)
        return False
    if f.seq_length % tp:
        raise UserError(f"--sequence-parallel splits the sequence over the TP ranks: --seq-length {f.seq_length} "
                        f"is not divisible by --tensor-model-parallel-size {tp}")
    if f.random_ltd:
        step = f.random_ltd_seq_step if f.random_ltd_seq_step is not None else RandomLTDConfig.seq_step
        if step % tp:
            raise UserError(f"--sequence-parallel with random-LTD splits every kept length over the TP ranks: "
                            f"--random-ltd-seq-step {step} is not divisible by --tensor-model-parallel-size {tp}")
    return True


def resolve_config(flags: argparse.Namespace, true_vocab_size: int, world_size: Optional[int] = None,
                   model_type: Optional[str] = None) -> RunConfig:
    """The frozen RunConfig of these (range-checked) flags; raises UserError for any bad combination.

    `true_vocab_size` is the tokenizer's; `world_size` defaults to torchrun's WORLD_SIZE (pretrain checks
    the process group agrees); `model_type` "bert" is recorded in the saved args (fine-tuning checks it).
    """
    f = flags
    _check_cross_flags(f)
    world = ps.world_size_from_env() if world_size is None else world_size
    tp, pp = f.tensor_model_parallel_size, f.pipeline_model_parallel_size
    dp = ps.check_parallel_sizes(world, tp, pp)
    if f.profile and not all(0 <= r < world for r in f.profile_ranks):
        ranks = " ".join(map(str, f.profile_ranks))
        raise UserError(f"--profile-ranks {ranks}: the ranks of this run are 0..{world - 1}")
    G = f.global_batch_size or f.micro_batch_size * dp  # Megatron's default: one micro batch per DP rank
    if f.num_layers % pp:
        raise UserError(f"--num-layers {f.num_layers} is not divisible by --pipeline-model-parallel-size {pp}; "
                        "pipeline stages must hold equal numbers of layers")
    if G % (f.micro_batch_size * dp):
        raise UserError(f"--global-batch-size {G} is not a multiple of --micro-batch-size "
                        f"{f.micro_batch_size} x data-parallel size {dp}")
    recompute = _recompute_fields(f, pp)
    sequence_parallel = _sequence_parallel(f, tp)
    warn_unused_ltd_flags(f)
    run = run_length_from_flags(f, G)

    padded_vocab = vocab_size_with_padding(true_vocab_size, f.make_vocab_size_divisible_by, tp)
    ltd = run.ltd  # RandomLTDConfig's defaults fill the flags not given
    args = {**vars(f), "global_batch_size": G, "max_position_embeddings": f.max_position_embeddings or f.seq_length,
            "split": f.split or DEFAULT_SPLIT,
            # Megatron's default: one query group (multi-query attention) when not given
            "num_query_groups": (f.num_query_groups or 1) if f.group_query_attention else None, "padded_vocab_size": padded_vocab, "true_vocab_size": true_vocab_size,
            **{f"random_ltd_{k}": getattr(ltd, k) if getattr(f, f"random_ltd_{k}") is None else getattr(f, f"random_ltd_{k}")
               for k in ("start_seq_length", "seq_step")}}
    if model_type is not None:
        args["model_type"] = model_type
    # model_type "bert": the bidirectional encoder; recomputation is this run's, not the checkpoint's model
    args["sequence_parallel"] = sequence_parallel
    model = transformer_config_from_args(args, **recompute, fp32_residual_connection=f.fp32_residual_connection,
                                         sequence_parallel=sequence_parallel,
                                         torch_compile="inductor" if f.torch_compile else None)

    lr = LRScheduleConfig(f.lr, f.min_lr, f.lr_decay_style, *schedule_lengths(
        global_batch_size=G, seq_length=f.seq_length, train_samples=run.decay_default_samples,
        warmup_iters=f.lr_warmup_iters, warmup_samples=f.lr_warmup_samples, warmup_tokens=f.lr_warmup_tokens,
        warmup_fraction=f.lr_warmup_fraction, decay_iters=f.lr_decay_iters, decay_samples=f.lr_decay_samples,
        decay_tokens=f.lr_decay_tokens), layer_tokens=f.layer_token_lr_schedule)
    optimizer = OptimizerConfig(
        lr=f.lr, weight_decay=f.weight_decay, adam_beta1=f.adam_beta1, adam_beta2=f.adam_beta2, adam_eps=f.adam_eps,
        clip_grad=f.clip_grad, fp16=f.fp16, loss_scale=f.loss_scale, initial_loss_scale=f.initial_loss_scale,
        min_loss_scale=f.min_loss_scale, loss_scale_window=f.loss_scale_window, hysteresis=f.hysteresis,
        check_for_nan=f.check_for_nan_in_loss_and_grad, use_distributed_optimizer=f.use_distributed_optimizer)
    # Megatron: bf16 accumulates and reduces gradients in fp32 unless --grad-reduce-in-bf16; fp16 and fp32
    # in the parameter dtype unless --accumulate-allreduce-grads-in-fp32
    bucket = f.ddp_bucket_size or (max(40_000_000, 1_000_000 * dp) if f.overlap_grad_reduce else None)
    ddp = DistributedDataParallelConfig(
        grad_reduce_in_fp32=f.accumulate_allreduce_grads_in_fp32 or (f.bf16 and not f.grad_reduce_in_bf16),
        overlap_grad_reduce=f.overlap_grad_reduce, overlap_param_gather=f.overlap_param_gather,
        use_distributed_optimizer=f.use_distributed_optimizer, bucket_size=bucket)
    args["accumulate_allreduce_grads_in_fp32"] = ddp.grad_reduce_in_fp32
    return RunConfig(
        model=model,
        tokenizer=tokenizer_config_from_args(f),
        data=DataConfig(tuple(f.data_path or ()), args["split"], f.data_cache_path, f.mock_data, f.num_workers,
                        f.reset_position_ids, f.eod_mask_loss),
        optimizer=optimizer,
        lr=lr,
        run=run,
        parallel=ParallelConfig(tp, pp, dp, f.distributed_backend),
        ddp=ddp,
        training=TrainingConfig(f.micro_batch_size, G, G // (f.micro_batch_size * dp), f.seed, f.bf16, f.fp16,
                                f.check_for_nan_in_loss_and_grad, f.exit_interval, f.exit_duration_in_mins,
                                f.exit_signal_handler),
        logging=LoggingConfig(f.log_interval, f.log_json, f.tensorboard_dir, f.eval_interval, f.eval_iters,
                              f.log_throughput, f.peak_tflops, f.timing_log_level, f.profile, f.profile_step_start,
                              f.profile_step_end, tuple(f.profile_ranks)),
        checkpoint=CheckpointConfig(f.save, f.load, f.save_interval, f.no_load_optim, f.no_load_rng, f.finetune,
                                    f.load_fallback, f.ckpt_format, f.async_save),
        args=MappingProxyType(args),
    )
