"""The training loop: Megatron's `pretrain()` with random-LTD accounting, on one process or many.

    pretrain(args, model_provider, datasets_provider, forward_step)

Per iteration t (0-based): r_t from the MSLG schedule; the LR from the progress before t (samples, or
layer-tokens with --layer-token-lr-schedule); this data-parallel rank's micro-batches, each carrying the
global index of its samples in the global batch (the random-LTD key, so every layout drops the same
tokens); the forward/backward schedule (no pipelining, or 1F1B across pipeline stages) with the
data-parallel gradient all-reduce; the tied-embedding gradient all-reduce between the first and last
stage; one optimizer step (overflow check and clipping across model-parallel ranks); counters advance;
the last stage's first rank logs; evaluation and checkpoints.

Reliability (docs/RELIABILITY.md): after every iteration one small all-reduce tells all ranks whether
any of them was signalled (--exit-signal-handler), ran past --exit-duration-in-mins or saw an inf/NaN
loss; they then save and exit 0 together, or stop with one error line before anything corrupt is saved.
As in Megatron, an iteration whose fp16 update was skipped (overflow) does not advance the LR schedule:
its progress counters (`sched_samples`, `sched_layer_tokens`) count successful steps only and are
checkpointed as `opt_param_scheduler`, while the data position counts every iteration.
"""

import math
import os
import random
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from megatron.core import parallel_state as ps
from megatron.core.datasets.samplers import PretrainingSampler, global_sample_offsets
from megatron.core.distributed import DataParallelGradSync, allreduce_grads_in_group
from megatron.core.errors import UserError
from megatron.core.optimizer.optimizer import Optimizer, OptimizerConfig
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.random_ltd import RandomLTDState, theoretical_saving
from megatron.core.tensor_parallel import get_rng_tracker, model_parallel_manual_seed
from megatron.training import checkpointing
from megatron.training.arguments import print_args
from megatron.training.logging import RunLogger
from megatron.training.lr_schedule import LRScheduleConfig, lr_at, progress_samples, schedule_lengths
from megatron.training.run_length import RunLength, resolve_run_length
from megatron.training.signals import Deadline, SignalRecorder, any_rank, ignore_stop_signals
from megatron.training.state import TrainState

# forward_step(data_iterator, model) -> (output tensor, loss_fn); on the last pipeline stage
# loss_fn(output) -> (loss scalar, {metric name: tensor, or (numerator, denominator) for a ratio of totals,
# see _mean_metrics}). Each batch from the iterator carries "ltd".
ForwardStep = Callable


def print_rank_0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def is_logging_rank() -> bool:
    """The last pipeline stage's first rank: the one that has the loss and prints the log line."""
    return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    model_parallel_manual_seed(seed)  # torch default generator (+100 * pp rank) and the TP-rank tracker


def _loader(dataset, consumed: int, mbs: int, seed: int, num_workers: int, worker_init_fn=None):
    """This DP rank's micro-batches from `consumed` on, in Megatron's order; never touches the global RNG."""
    sampler = PretrainingSampler(total_samples=len(dataset), consumed_samples=consumed, micro_batch_size=mbs,
                                 data_parallel_rank=ps.get_data_parallel_rank(),
                                 data_parallel_size=ps.get_data_parallel_world_size())
    generator = torch.Generator().manual_seed(seed)
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, generator=generator,
                           persistent_workers=num_workers > 0, worker_init_fn=worker_init_fn))


class NumericalFault(UserError):
    """An inf/NaN loss or gradient that loss scaling cannot absorb. Reported like a user error, one line
    and no traceback: the remedy (resume from the last checkpoint, lower the LR) is the user's."""


# Flags a checkpoint's model must share with the run that loads it (shape and meaning of the weights);
# the position flags only where the position embedding uses them (rope has no table, learned no base).
MODEL_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "position_embedding_type",
               "normalization", "norm_epsilon", "swiglu", "disable_bias_linear",
               "untie_embeddings_and_output_weights", "padded_vocab_size", "true_vocab_size", "bert_binary_head")
POSITION_FLAGS = {"learned_absolute": ("max_position_embeddings",), "rope": ("rotary_base",)}


def _flag_text(key: str, saved, here) -> str:
    if key == "bert_binary_head":  # store_false flag: name the flag the user types
        return f"--bert-no-binary-head {not saved!r} in the checkpoint, {not here!r} here"
    name = key if key.endswith("vocab_size") else "--" + key.replace("_", "-")
    return f"{name} {saved!r} in the checkpoint, {here!r} here"


def check_model_flags(saved: dict, args, where: str) -> None:
    """Every model flag that differs between a checkpoint's saved args and this run's, in one line
    (not only the first). Flags the checkpoint does not record (older checkpoints) are not compared."""
    keys = MODEL_FLAGS + POSITION_FLAGS.get(getattr(args, "position_embedding_type", None), ())
    differ = [(k, saved[k], getattr(args, k)) for k in keys
              if k in saved and hasattr(args, k) and saved[k] != getattr(args, k)]
    if differ:
        text = "; ".join(_flag_text(*d) for d in differ)
        raise UserError(f"{where} has another model: {text}; use the checkpoint's model flags")


def describe_state_dict_mismatch(expected: dict, saved: dict, limit: int = 3) -> str:
    """Why `saved` does not load into a model whose state dict is `expected`, in one line: missing and
    unexpected keys and differing shapes, `limit` of each, then how many more."""
    def few(items):
        return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")

    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [f"{k} {list(saved[k].shape)} in the checkpoint, {list(v.shape)} here" for k, v in expected.items()
              if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(v.shape)]
    parts = [f"{what} {few(items)}" for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                                        ("shapes differ:", shapes)) if items]
    return "; ".join(parts)


def _mean_metrics(metrics: list) -> dict:
    """{name: value} for every metric that loss_fn returns ("lm loss", BERT's "sop loss", ...); {} off the
    last pipeline stage. A tensor is averaged over this rank's micro-batches and the data-parallel group
    (Megatron's way for losses). A (numerator, denominator) pair is a ratio of totals: both are summed over
    micro-batches and ranks and divided once (0 when nothing was counted), so BERT's MLM accuracy weighs
    every predicted token alike and a micro-batch without one does not count as 0."""
    out = {}
    for name in metrics[0] if metrics else {}:
        values = [m[name] for m in metrics]
        out[name] = _ratio_over_dp(values) if isinstance(values[0], tuple) else float(_mean_over_dp(values))
    return out


def _ratio_over_dp(pairs: list) -> float:
    """sum(numerators) / sum(denominators) over this rank's micro-batches and the data-parallel group."""
    total = torch.stack([torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in pair])
                         for pair in pairs]).sum(0).to(ps.get_device())  # [2]
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    num, den = total.tolist()
    return num / den if den > 0 else 0.0


def _mean_over_dp(values: list) -> Optional[torch.Tensor]:
    """Mean of this rank's micro-batch values, averaged over the data-parallel group."""
    if not values:
        return None
    mean = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values]).mean().to(ps.get_device())
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(mean, group=ps.get_data_parallel_group())
        mean /= ps.get_data_parallel_world_size()
    return mean


def _first_nonfinite_losses(losses: dict) -> dict:
    """The losses of the lowest rank whose loss is not finite (ranks off the last stage have none), so
    every rank names the same values; gathered only on the fault path, where all ranks arrive together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return losses
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, losses)
    bad = [g for g in gathered if g and not all(math.isfinite(v) for v in g.values())]
    return bad[0] if bad else losses


class Trainer:
    def __init__(self, args, model: torch.nn.Module, datasets, forward_step: ForwardStep, num_layers: int,
                 run: RunLength, signals: Optional[SignalRecorder] = None, deadline: Optional[Deadline] = None):
        self.args = args
        self.device = ps.get_device()
        self.model = model.to(self.device)
        self.forward_step = forward_step
        self.train_ds, self.valid_ds, self.test_ds = datasets
        self.num_layers = num_layers
        self.s, self.G, self.mbs = args.seq_length, args.global_batch_size, args.micro_batch_size
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.num_micro = self.G // (self.mbs * self.dp)
        self.run = run
        # This pipeline stage's share of the LTD set (global layers [offset, offset + per_stage)), so a stage
        # draws indices only for the layers it runs; a layer's indices do not depend on the others.
        per_stage = num_layers // ps.get_pipeline_model_parallel_world_size()
        self.stage_ltd_layers = run.stage_ltd_layers(ps.get_pipeline_model_parallel_rank() * per_stage, per_stage)
        self.check_nan = getattr(args, "check_for_nan_in_loss_and_grad", True)
        self.signals, self.deadline = signals, deadline or Deadline(getattr(args, "exit_duration_in_mins", None))
        self.sched_samples = 0  # LR schedule progress: successful optimizer steps only (Megatron's num_steps)
        self.sched_layer_tokens = 0
        self.last_saved: Optional[int] = None  # iteration this run last saved
        self.last_checkpoint: Optional[str] = None  # "iteration N in DIR": the newest loaded or saved
        self._stop_reason: list = []
        self._memory_reported = False  # CUDA: the memory line is printed once, after the first log
        params = [p for p in model.parameters() if p.requires_grad]
        self.grad_sync = DataParallelGradSync(params, group=ps.get_data_parallel_group()) if self.dp > 1 else None
        self.forward_backward = get_forward_backward_func()
        self.tensor_shape = (self.mbs, self.s, args.hidden_size)
        self.optimizer = Optimizer(model, OptimizerConfig(
            lr=args.lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps, clip_grad=args.clip_grad, fp16=args.fp16, loss_scale=args.loss_scale,
            initial_loss_scale=args.initial_loss_scale, min_loss_scale=args.min_loss_scale,
            loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis,
            check_for_nan=self.check_nan))
        self.lr_cfg = LRScheduleConfig(args.lr, args.min_lr, args.lr_decay_style, *schedule_lengths(
            global_batch_size=self.G, seq_length=self.s, train_samples=run.decay_default_samples,
            warmup_iters=args.lr_warmup_iters, warmup_samples=args.lr_warmup_samples,
            warmup_tokens=args.lr_warmup_tokens, warmup_fraction=args.lr_warmup_fraction,
            decay_iters=args.lr_decay_iters, decay_samples=args.lr_decay_samples, decay_tokens=args.lr_decay_tokens))
        self.state = TrainState()
        self.autocast_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        logging = is_logging_rank()
        self.logger = RunLogger(args.log_json if logging else None, args.tensorboard_dir if logging else None,
                                enabled=logging)

    # ---- schedule ---------------------------------------------------------------------------------
    def lr_for_next_iteration(self) -> float:
        progress = progress_samples(self.sched_samples, self.sched_layer_tokens, self.num_layers, self.s,
                                    self.args.layer_token_lr_schedule)
        return lr_at(self.lr_cfg, progress)

    # ---- checkpoints ------------------------------------------------------------------------------
    def _rank_file(self):
        pp = ps.get_pipeline_model_parallel_world_size()
        return ps.get_tensor_model_parallel_rank(), (ps.get_pipeline_model_parallel_rank() if pp > 1 else None)

    def checkpoint_state(self) -> dict:
        rng = checkpointing.get_rng_state()
        rng["tracker"] = get_rng_tracker().get_states()
        return {
            "args": dict(vars(self.args)),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "opt_param_scheduler": {"max_lr": self.lr_cfg.max_lr, "min_lr": self.lr_cfg.min_lr,
                                    "lr_warmup_steps": self.lr_cfg.warmup_samples,
                                    "lr_decay_steps": self.lr_cfg.decay_samples,
                                    "lr_decay_style": self.lr_cfg.decay_style,
                                    "num_steps": self.sched_samples,
                                    "num_layer_tokens": self.sched_layer_tokens},
            "rng_state": rng,
            "train_state": self.state.state_dict(),
            "consumed_train_samples": self.state.consumed_train_samples,
            "consumed_valid_samples": self.state.consumed_valid_samples,
            "random_ltd": {"consumed_layer_tokens": self.state.consumed_layer_tokens,
                           "current_value": self.run.keep_at(max(self.state.iteration - 1, 0))},
        }

    def save(self) -> None:
        t0 = time.perf_counter()
        it = self.state.iteration
        print_rank_0(f"saving checkpoint at iteration {it:7d} to {self.args.save} in torch format")
        tp_rank, pp_rank = self._rank_file()
        checkpointing.save_checkpoint(self.args.save, it, self.checkpoint_state(), tp_rank, pp_rank,
                                      writer=self.dp_rank == 0, report=print_rank_0)
        self.last_saved, self.last_checkpoint = it, f"iteration {it} in {self.args.save}"
        print_rank_0(f"  successfully saved checkpoint at iteration {it:7d} to {self.args.save} "
                     f"[ t {time.perf_counter() - t0:.2f}s ]")

    def load(self) -> None:
        """Resume from --load: the tracker's iteration, or with --load-fallback the newest loadable one."""
        root, tp_rank, pp_rank = self.args.load, *self._rank_file()
        for name in checkpointing.incomplete_saves(root):
            print_rank_0(f"WARNING: ignoring {os.path.join(root, name)}: a save that was interrupted (never loaded; "
                         "the next save into this folder removes it)")
        chosen = checkpointing.select_checkpoint(root, tp_rank, pp_rank, getattr(self.args, "load_fallback", False),
                                                 before_load=self._check_layout, report=print_rank_0)
        if chosen is None:
            print_rank_0(f"WARNING: no checkpoint found at {root}; training from scratch")
            return
        iteration, ckpt = chosen
        where = f"checkpoint iteration {iteration} in {root}"
        check_model_flags(ckpt.get("args") or {}, self.args, where)
        if not isinstance(ckpt.get("model"), dict):
            raise UserError(f"{where} holds no model state dict")
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:  # flags the checkpoint does not record (older checkpoints), or a foreign one
            detail = describe_state_dict_mismatch(self.model.state_dict(), ckpt["model"])
            raise UserError(f"{where} does not fit this model: {detail or ' '.join(str(e).split())[:300]}") from None
        if self.args.finetune:
            print_rank_0(f" loaded weights from {root} at iteration {iteration} (finetune: "
                         "iteration, optimizer and counters reset)")
            return
        self.state.load_state_dict(ckpt["train_state"])
        sched = ckpt.get("opt_param_scheduler") or {}
        self.sched_samples = int(sched.get("num_steps", self.state.consumed_train_samples))
        self.sched_layer_tokens = int(sched.get("num_layer_tokens", self.state.consumed_layer_tokens))
        if not self.args.no_load_optim:
            if "optimizer" not in ckpt:
                raise UserError(f"checkpoint in {root} has no optimizer state (a converted checkpoint?); "
                                "add --no-load-optim --no-load-rng, or --finetune")
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if not self.args.no_load_rng:
            if "rng_state" not in ckpt:
                raise UserError(f"checkpoint in {root} has no RNG state; add --no-load-rng")
            rng = ckpt["rng_state"]
            checkpointing.set_rng_state(rng)
            if "tracker" in rng:
                get_rng_tracker().set_states(rng["tracker"])
        self.last_checkpoint = f"iteration {self.state.iteration} in {root}"
        print_rank_0(f"  successfully loaded checkpoint from {root} at iteration {self.state.iteration}")

    def _check_layout(self, iteration: int) -> None:
        saved = checkpointing.saved_layout(self.args.load, iteration)
        here = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if saved is not None and saved != here:
            raise UserError(f"checkpoint iteration {iteration} in {self.args.load} was saved with tensor x pipeline "
                            f"parallel {saved[0]} x {saved[1]}, this run uses {here[0]} x {here[1]}; convert it "
                            "with tools/checkpoint_util.py or launch the same layout")

    # ---- steps ------------------------------------------------------------------------------------
    def _step_forward(self, data_iterator, model):
        """The entry point's forward_step under this run's autocast."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.forward_step(data_iterator, model)

    def _micro_batches(self, data_iter, t: int, keep: Optional[int]):
        """This rank's micro-batches of iteration t, on the device, each with its random-LTD state."""
        for m in range(self.num_micro):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(data_iter).items()}
            ltd = None
            if keep is not None and self.stage_ltd_layers:
                ids = torch.from_numpy(global_sample_offsets(m, self.mbs, self.dp_rank, self.dp)).to(self.device)
                ltd = RandomLTDState(self.args.seed, t, ids, keep, self.stage_ltd_layers)  # ids: [b] in global batch
            batch["ltd"] = ltd
            yield batch

    def _sync_tied_embeddings(self) -> None:
        """First and last stage hold copies of the tied word embeddings: sum their gradients."""
        if ps.get_pipeline_model_parallel_world_size() == 1 or not ps.is_rank_in_embedding_group():
            return
        if not getattr(self.model, "share_embeddings", False):
            return
        if ps.is_pipeline_first_stage():
            weight = self.model.embedding.word_embeddings.weight
        elif ps.is_pipeline_last_stage():
            weight = self.model.output_layer.weight
        else:
            return
        allreduce_grads_in_group([weight], ps.get_embedding_group())

    def train_step(self, data_iter, t: int):
        """One iteration: the schedule runs every micro-batch forward and backward, then one optimizer step."""
        self.model.train()
        keep = self.run.keep_at(t)
        self.optimizer.zero_grad()
        metrics = self.forward_backward(
            self._step_forward, self._micro_batches(data_iter, t, keep), self.model, self.num_micro,
            self.tensor_shape, torch.float32, forward_only=False, loss_scale=self.optimizer.loss_scale,
            grad_sync=self.grad_sync)
        self._sync_tied_embeddings()
        result = self.optimizer.step()
        return _mean_metrics(metrics), result, keep

    @torch.no_grad()
    def evaluate(self, dataset, consumed: int) -> dict:
        """Mean metrics ({"lm loss": ...}) over --eval-iters global batches, full sequence (no token
        dropping); {} off the last stage."""
        self.model.eval()
        it = _loader(dataset, consumed, self.mbs, self.args.seed, 0)
        values = []
        for _ in range(self.args.eval_iters):
            metrics = self.forward_backward(self._step_forward, self._micro_batches(it, 0, None), self.model,
                                            self.num_micro, self.tensor_shape, torch.float32, forward_only=True)
            values += metrics
        return _mean_metrics(values)

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self) -> TrainState:
        args, st = self.args, self.state
        if args.load:
            self.load()
        train_iters = self.run.train_iters
        if self._stop_requested([], deadline=False)[0]:  # signalled while starting up: nothing new to save
            print_rank_0(f" exiting before training: {self._stop_reason[0]}")
            return st
        data_iter = _loader(self.train_ds, st.consumed_train_samples, self.mbs, args.seed, args.num_workers,
                            ignore_stop_signals if self.signals is not None else None)
        print_rank_0(f" training for {train_iters} iterations ({self.run.describe()}) on {self.device}"
                     f"{self._layout()}")
        # per log interval, as in Megatron: time, iterations, loss sums, skipped and nan iteration counts
        interval = {"time": 0.0, "iters": 0, "losses": {}, "skipped": 0, "nan": 0}
        stop = False
        while st.iteration < train_iters and not self.run.budget_reached(st.consumed_layer_tokens):
            t = st.iteration
            lr = self.lr_for_next_iteration()
            self.optimizer.set_lr(lr)
            t0 = time.perf_counter()
            losses, result, keep = self.train_step(data_iter, t)
            dt = time.perf_counter() - t0
            st.iteration += 1
            st.train_time_ms += round(dt * 1000)
            st.consumed_train_samples += self.G
            st.consumed_layer_tokens += self.run.curve.at(t)
            if not result.skipped:  # Megatron's scheduler steps only after a successful update
                self.sched_samples += self.G
                self.sched_layer_tokens += self.run.curve.at(t)
            st.skipped_iterations += int(result.skipped)
            bad_loss = not all(math.isfinite(v) for v in losses.values())
            st.nan_iterations += int(bad_loss)
            interval["time"] += dt
            interval["iters"] += 1
            interval["skipped"] += int(result.skipped)
            interval["nan"] += int(bad_loss)
            for name, value in losses.items():
                interval["losses"][name] = interval["losses"].get(name, 0.0) + value
            stop, bad_loss = self._stop_requested([self.check_nan and bad_loss])
            if bad_loss or result.nonfinite:
                self._log(interval, lr, keep, result)
                self._fault(losses, result)
            if st.iteration % args.log_interval == 0:
                self._log(interval, lr, keep, result)
                interval = {"time": 0.0, "iters": 0, "losses": {}, "skipped": 0, "nan": 0}
            if self.valid_ds is not None and args.eval_iters > 0 and st.iteration % args.eval_interval == 0:
                self._validate()
            if args.save and args.save_interval and st.iteration % args.save_interval == 0:
                self.save()
            if args.exit_interval and st.iteration % args.exit_interval == 0:
                stop, self._stop_reason = True, ["--exit-interval"]
            if stop:
                break
        if interval["iters"]:  # the iterations since the last log line, so the run's end is on record
            self._log(interval, lr, keep, result)
        if args.save and self.last_saved != st.iteration:
            self.save()
        if stop:  # Megatron's early exits skip the end-of-training evaluation
            print_rank_0(f" exiting at iteration {st.iteration}: {self._stop_reason[0]}")
        elif args.eval_iters > 0:
            if self.valid_ds is not None and st.iteration % args.eval_interval:
                self._validate()
            if self.test_ds is not None:
                self._report_eval(self.evaluate(self.test_ds, 0), "test")
        self.logger.close()
        return st

    def _stop_requested(self, extra: list, deadline: bool = True) -> list:
        """[stop, *extra], each agreed by all ranks in one all-reduce: stop when any rank was signalled or
        ran past --exit-duration-in-mins; `extra` are further flags to agree on (an inf/NaN loss)."""
        signalled = self.signals is not None and self.signals.received is not None
        flags = any_rank([signalled, deadline and self.deadline.passed(), *extra])
        reasons = []
        if flags[0]:
            reasons.append(f"received {self.signals.name} (--exit-signal-handler)" if signalled else
                           "another rank received a stop signal (--exit-signal-handler)")
        if flags[1]:
            reasons.append(f"ran {self.deadline.minutes:g} minutes (--exit-duration-in-mins)")
        self._stop_reason = reasons
        return [bool(reasons)] + flags[2:]

    def _fault(self, losses: dict, result) -> None:
        """Stop on an inf/NaN that loss scaling cannot absorb, before anything is saved. Every rank gets
        here on the same iteration (the loss verdict is all-reduced, the gradient norm is global) and
        raises the same line: the losses shown are those of the first rank whose loss is not finite."""
        it, precision = self.state.iteration, "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "fp32"
        if result.nonfinite:
            what = f"the gradient norm is {result.grad_norm} ({precision}); the update was not applied"
        else:
            losses = _first_nonfinite_losses(losses)
            shown = ", ".join(f"{k} {v}" for k, v in losses.items()) or "the loss on another rank"
            what = f"the loss is not finite ({shown}, {precision})"
        resume = (f"the last checkpoint is {self.last_checkpoint}: resume from it with --load (perhaps with a "
                  "lower --lr)" if self.last_checkpoint else "there is no checkpoint to resume from (try a lower --lr)")
        self.logger.close()
        raise NumericalFault(f"iteration {it}: {what}; nothing was saved and {resume}; "
                             "--no-check-for-nan-in-loss-and-grad turns this check off")

    def _layout(self) -> str:
        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        if tp * pp * self.dp == 1:
            return ""
        return f" (tensor x pipeline x data parallel = {tp} x {pp} x {self.dp})"

    def _validate(self) -> None:
        st = self.state
        losses = self.evaluate(self.valid_ds, st.consumed_valid_samples)
        st.consumed_valid_samples += self.args.eval_iters * self.G
        self._report_eval(losses, "validation")

    def _report_eval(self, losses: dict, name: str) -> None:
        """The "lm loss" block and `{val,test}_loss/_ppl`; other metrics (BERT's "sop loss", ...) beside."""
        others = {k: v for k, v in losses.items() if k != "lm loss"}
        st = self.state
        where = {"consumed_tokens": st.consumed_train_samples * self.s, "consumed_layer_tokens": st.consumed_layer_tokens,
                 "train_time_s": st.train_time_ms / 1000}  # so a curve can be drawn against any of them
        self.logger.validation(st.iteration, st.consumed_train_samples, losses.get("lm loss"), name=name,
                               extra=where, metrics=others)

    def _log(self, interval: dict, lr: float, keep: int, result) -> None:
        if not self.logger.enabled:
            return
        st, n = self.state, interval["iters"]
        elapsed_ms = 1000.0 * interval["time"] / n
        m = {
            "iteration": st.iteration, "train_iters": self.run.train_iters,
            "consumed_samples": st.consumed_train_samples,
            "consumed_tokens": st.consumed_train_samples * self.s,
            "elapsed_ms_per_iteration": elapsed_ms,
            "tokens_per_sec": self.G * self.s / (elapsed_ms / 1000.0),
            "lr": lr, "global_batch_size": self.G,
            **{k.replace(" ", "_"): v / n for k, v in interval["losses"].items()},  # lm_loss, sop_loss, ...
            "random_ltd": bool(getattr(self.args, "random_ltd", False)),  # the log line prints LTD fields
            "ltd_seq_length": keep,  # r_t, or s when random-LTD is off
            "consumed_layer_tokens": st.consumed_layer_tokens,
            "layer_token_saving": theoretical_saving(st.consumed_layer_tokens, self.num_layers, self.s,
                                                     st.consumed_train_samples),
            "loss_scale": result.loss_scale, "grad_norm": result.grad_norm,
            # in this interval (Megatron resets them after each log line); the run's totals are in TrainState
            "skipped_iterations": interval["skipped"], "nan_iterations": interval["nan"],
            "train_time_s": st.train_time_ms / 1000,
        }
        self.logger.train(m, metric_names=tuple(interval["losses"]))
        if self.device.type == "cuda" and not self._memory_reported:
            self._memory_reported = True
            mb, c = 2.0 ** 20, torch.cuda
            print(f"[Rank {dist.get_rank() if dist.is_initialized() else 0}] (after {st.iteration} iterations) "
                  f"memory (MB) | allocated: {c.memory_allocated() / mb:.1f} | max allocated: "
                  f"{c.max_memory_allocated() / mb:.1f} | reserved: {c.memory_reserved() / mb:.1f} | max reserved: "
                  f"{c.max_memory_reserved() / mb:.1f}", flush=True)


def pretrain(args, model_provider, datasets_provider, forward_step: ForwardStep) -> TrainState:
    """Megatron's pretrain(): join the process group, seed, build model and data, train, evaluate, save.

    `model_provider(args, pre_process, post_process, layer_offset, num_local_layers)` builds this pipeline
    stage; `datasets_provider(args, (train, valid, test) sample counts)` the datasets.
    """
    deadline = Deadline(getattr(args, "exit_duration_in_mins", None))
    ps.init_distributed(args.distributed_backend)
    checkpointing.check_save_dir(args.save)
    signals = SignalRecorder().install() if getattr(args, "exit_signal_handler", False) else None
    try:
        return _pretrain(args, model_provider, datasets_provider, forward_step, signals, deadline)
    finally:
        if signals is not None:
            signals.restore()


def _pretrain(args, model_provider, datasets_provider, forward_step, signals, deadline) -> TrainState:
    world = dist.get_world_size() if dist.is_initialized() else 1
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    dp = ps.check_parallel_sizes(world, tp, pp)
    if args.global_batch_size is None:  # Megatron's default: one micro batch per DP rank, no accumulation
        args.global_batch_size = args.micro_batch_size * dp
    if args.num_layers % pp:
        raise UserError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}; "
                        "pipeline stages must hold equal numbers of layers")
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise UserError(f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
                        f"{args.micro_batch_size} x data-parallel size {dp}")
    ps.initialize_model_parallel(tp, pp)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print_args(args)
    set_seed(args.seed)
    per_stage = args.num_layers // pp
    stage = ps.get_pipeline_model_parallel_rank()
    model = model_provider(args, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(), stage * per_stage,
                           per_stage)
    n_params = sum(p.numel() for p in model.parameters())
    print_rank_0(f" > number of parameters on (tensor, pipeline) model parallel rank "
                 f"({ps.get_tensor_model_parallel_rank()}, {stage}): {n_params}")
    run = resolve_run_length(args, args.num_layers)
    datasets = datasets_provider(args, run.num_samples(args.eval_interval, args.eval_iters))
    if signals is not None and not args.save:
        print_rank_0("WARNING: --exit-signal-handler without --save: a signal stops the run cleanly, but "
                     "nothing is saved")
    return Trainer(args, model, datasets, forward_step, args.num_layers, run, signals, deadline).train()
