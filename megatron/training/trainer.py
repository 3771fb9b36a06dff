"""The training loop, on one process or many: `Trainer(config, model, datasets, forward_step).train()`,
which `pretrain()` (pretrain.py) calls once the process group, model and data exist.

One training step, file by file:
 1. `Trainer.train` (here): the LR for iteration t from the schedule's progress before it
    (`lr_schedule.py`: samples, or layer-tokens with --layer-token-lr-schedule).
 2. `Trainer.train_step`: `_micro_batches` takes this data-parallel rank's micro-batches from the loader
    (`datasets/samplers.py`, Megatron's order) and attaches each one's random-LTD state from
    `random_ltd/plan.py` (r_t and the global sample ids that key the draw, so every layout drops the
    same tokens; drawn on the host while the device ran the previous step).
 3. `pipeline_parallel/schedules.py` runs every micro-batch forward and backward (no pipelining, or 1F1B),
    calling the entry point's `forward_step` (pretrain_gpt_ltd.py) on the model in its parameter dtype;
    gradients accumulate into the fp32 `main_grad` buffers, which are reduced over the data-parallel
    group after the last backward (`distributed/ddp.py`; all-reduce, or reduce-scatter of shards).
 4. `models/gpt.py` -> `transformer/block.py`, where a layer of the LTD set runs on its kept tokens only
    (`random_ltd/routing.py`: gather, run, scatter).
 5. The tied-embedding gradients are summed between the first and last stage; `optimizer/optimizer.py`
    queues its step on the device (overflow check, clipping and skipping across the ranks, nothing read
    back), writes the fp32 main parameters back into the bf16/fp16 model and, with the distributed
    optimizer, all-gathers the updated shards.
 6. The iteration's one host read (`_read_step`): the losses reduced over micro-batches and DP ranks
    (`metrics.py`), the gradient norm, the inf/NaN verdict and the stop flags, in one copy
    (docs/training.md). Counters advance (`state.py`); the last stage's first rank logs (`logging.py`);
    then evaluation and checkpoints (`megatron/checkpoint/`).

Reliability (docs/RELIABILITY.md): after every iteration one small all-reduce, read with the loss, tells
all ranks whether any of them was signalled (--exit-signal-handler), ran past --exit-duration-in-mins or
saw an inf/NaN loss; they then save and exit 0 together, or stop with one error line before anything corrupt is saved.
As in Megatron, an iteration whose fp16 update was skipped (overflow) does not advance the LR schedule:
its progress counters (`sched_samples`, `sched_layer_tokens`) count successful steps only and are
checkpointed as `opt_param_scheduler`, while the data position counts every iteration.
"""

import math
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from megatron.checkpoint import training as checkpoint
from megatron.core import parallel_state as ps
from megatron.core.datasets.samplers import PretrainingSampler
from megatron.core.distributed import DataParallelGradSync
from megatron.core.errors import UserError
from megatron.core.optimizer.optimizer import Optimizer
from megatron.core.pipeline_parallel import ForwardStep, get_forward_backward_func
from megatron.core.random_ltd import RandomLTDPlan, theoretical_saving
from megatron.core.transformer.layer import compile_stats
from megatron.training.config import RunConfig
from megatron.training.flops import default_peak_tflops, iteration_flops
from megatron.training.logging import RunLogger, is_logging_rank, print_rank_0
from megatron.training.lr_schedule import lr_at
from megatron.training.metrics import (LogInterval, first_nonfinite_losses, mean_metrics, metrics_from_host,
                                       metrics_on_device, nonfinite_on_device, read_together)
from megatron.training.profiler import StepProfiler
from megatron.training.signals import Deadline, SignalRecorder, any_rank, any_rank_on_device, ignore_stop_signals
from megatron.training.state import TrainState
from megatron.core.timers import NO_TIMERS, Timers


def _loader(dataset, consumed: int, mbs: int, seed: int, num_workers: int, worker_init_fn=None):
    """This DP rank's micro-batches from `consumed` on, in Megatron's order; never touches the global RNG.
    On CUDA the batches come in pinned memory, so their non_blocking copies do not wait for the device."""
    sampler = PretrainingSampler(total_samples=len(dataset), consumed_samples=consumed, micro_batch_size=mbs,
                                 data_parallel_rank=ps.get_data_parallel_rank(),
                                 data_parallel_size=ps.get_data_parallel_world_size())
    generator = torch.Generator().manual_seed(seed)
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, generator=generator,
                           persistent_workers=num_workers > 0, worker_init_fn=worker_init_fn,
                           pin_memory=ps.get_device().type == "cuda"))


class NumericalFault(UserError):
    """An inf/NaN loss or gradient that loss scaling cannot absorb. Reported like a user error, one line
    and no traceback: the remedy (resume from the last checkpoint, lower the LR) is the user's."""


class Trainer:
    def __init__(self, config: RunConfig, model: torch.nn.Module, datasets, forward_step: ForwardStep,
                 signals: Optional[SignalRecorder] = None, deadline: Optional[Deadline] = None):
        c = self.config = config
        self.device = ps.get_device()
        # Megatron's Float16Module: the whole stage in the parameter dtype (bf16/fp16 weights feed the GEMMs)
        self.model = model = model.to(self.device, c.training.params_dtype)
        self.forward_step = forward_step
        self.train_ds, self.valid_ds, self.test_ds = datasets
        self.run, self.s, self.L = c.run, c.model.seq_length, c.model.num_layers
        self.G, self.mbs, self.num_micro = c.training.global_batch_size, c.training.micro_batch_size, \
            c.training.num_micro_batches
        dp, pp = c.parallel.data_parallel_size, c.parallel.pipeline_model_parallel_size
        per_stage = self.L // pp  # this stage holds global layers [offset, offset + per_stage)
        stage_layers = c.run.stage_ltd_layers(ps.get_pipeline_model_parallel_rank() * per_stage, per_stage)
        self.ltd = RandomLTDPlan(c.training.seed, self.s, c.run.curve.schedule, stage_layers, self.mbs,
                                 ps.get_data_parallel_rank(), dp,
                                 c.parallel.tensor_model_parallel_size if c.model.sequence_parallel else 1,
                                 ps.get_tensor_model_parallel_rank())
        self.signals, self.deadline = signals, deadline or Deadline(c.training.exit_duration_in_mins)
        self.sched_samples = 0  # LR schedule progress: successful optimizer steps only (Megatron's num_steps)
        self.sched_layer_tokens = 0
        self.last_saved: Optional[int] = None  # iteration this run last saved
        self.last_checkpoint: Optional[str] = None  # "iteration N in DIR": the newest loaded or saved
        self._stop_reason: list = []
        self._memory_reported = False  # CUDA: the memory line is printed once, after the first log
        self._ltd_ahead = None  # (t, the random-LTD states of iteration t) drawn ahead, or None
        d = c.ddp
        tied = self._tied_weight()
        self.timers = Timers(c.logging.timing_log_level, self.device)  # level 0: every timer a no-op
        self.grad_sync = DataParallelGradSync(
            model.parameters(), group=ps.get_data_parallel_group(),
            grad_dtype=torch.float32 if d.grad_reduce_in_fp32 else None, bucket_numel=d.bucket_size,
            overlap_grad_reduce=d.overlap_grad_reduce, distributed_optimizer=d.use_distributed_optimizer,
            overlap_param_gather=d.overlap_param_gather, own_bucket=[tied] if tied is not None else [],
            timers=self.timers)
        self.grad_sync.register_gather_hooks(model)
        self.forward_backward = get_forward_backward_func()
        # The activation passed between pipeline stages is the residual stream: the parameter dtype, or fp32
        # with --fp32-residual-connection.
        # Sequence parallel: each TP rank sends its chunk of the sequence.
        seq = self.s // c.parallel.tensor_model_parallel_size if c.model.sequence_parallel else self.s
        self.tensor_shape = (self.mbs, seq, c.model.hidden_size)
        self.tensor_dtype = torch.float32 if c.model.fp32_residual_connection else c.training.params_dtype
        self.optimizer = Optimizer(model, c.optimizer, self.grad_sync)
        self.pending_save = None  # an asynchronous save in flight (torch_dist.PendingSave)
        self.checkpoint_group = checkpoint.checkpoint_group() if (c.checkpoint.save or c.checkpoint.load) else None
        self.state = TrainState()
        logging = is_logging_rank()
        self.logger = RunLogger(c.logging.log_json if logging else None,
                                c.logging.tensorboard_dir if logging else None, enabled=logging)
        lg, rank = c.logging, dist.get_rank() if dist.is_initialized() else 0
        self.profiler = StepProfiler(lg.profile_step_start, lg.profile_step_end, lg.tensorboard_dir,
                                     lg.profile and rank in lg.profile_ranks, self.device)
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.peak_tflops = lg.peak_tflops or default_peak_tflops(gpu, c.training.precision)  # None: no MFU
        self._compiled = compile_stats() if c.model.torch_compile else None  # (graphs, seconds) reported so far

    # ---- checkpoints (megatron/checkpoint/training.py) ----------------------------------------------
    def save(self) -> None:
        c = self.config.checkpoint
        it, root = self.state.iteration, c.save
        self.wait_for_save()  # at most one asynchronous save in flight
        self.grad_sync.finish_param_sync()  # --overlap-param-gather: the weights of the last step
        common = checkpoint.common_state(
            self.config.args, self.config.as_dict(), self.config.lr.state_dict(self.sched_samples, self.sched_layer_tokens),
            self.state.state_dict(), self.run.kept_length(max(it - 1, 0)))
        self.last_saved = it
        if c.ckpt_format == "torch_dist":
            self.pending_save = checkpoint.save_torch_dist(root, it, common, self.model, self.optimizer,
                                                           self.checkpoint_group, c.async_save, print_rank_0)
            if self.pending_save is None:
                self.last_checkpoint = f"iteration {it} in {root}"
            return
        state = checkpoint.training_state(common, self.model, self.optimizer)
        extra = checkpoint.distrib_optim_files(self.optimizer)  # every DP rank takes part in the gather
        checkpoint.save(root, it, state, writer=ps.get_data_parallel_rank() == 0, report=print_rank_0,
                        extra_files=extra)
        self.last_checkpoint = f"iteration {it} in {root}"

    def wait_for_save(self) -> None:
        """Block until the asynchronous save in flight (if any) is committed; its error is raised here."""
        pending, self.pending_save = self.pending_save, None
        if pending is not None:
            pending.wait()
            self.last_checkpoint = f"iteration {pending.iteration} in {pending.root}"

    def load(self) -> None:
        """Resume from --load: the tracker's iteration, or with --load-fallback the newest loadable one."""
        c = self.config.checkpoint
        t0 = time.perf_counter()
        ckpt = checkpoint.load(c.load, self.config.args, self.model, self.optimizer, fallback=c.load_fallback,
                               finetune=c.finetune, load_optim=not c.no_load_optim, load_rng=not c.no_load_rng,
                               report=print_rank_0, group=self.checkpoint_group)
        if ckpt is None or c.finetune:
            return
        # an imported checkpoint may carry only Megatron's top-level counters
        self.state.load_state_dict(ckpt.get("train_state") or {k: ckpt[k] for k in (
            "iteration", "consumed_train_samples", "consumed_valid_samples") if k in ckpt})
        sched = ckpt.get("opt_param_scheduler") or {}
        self.sched_samples = int(sched.get("num_steps", self.state.consumed_train_samples))
        self.sched_layer_tokens = int(sched.get("num_layer_tokens", self.state.consumed_layer_tokens))
        self.last_checkpoint = f"iteration {self.state.iteration} in {c.load}"
        print_rank_0(f"  successfully loaded checkpoint from {c.load} at iteration {self.state.iteration} "
                     f"[ t {time.perf_counter() - t0:.2f}s ]")

    # ---- steps ------------------------------------------------------------------------------------
    def _micro_batches(self, data_iter, t: Optional[int]):
        """This rank's micro-batches of iteration t, on the device, each with its random-LTD state (None in
        evaluation, t None: the full sequence). The states of iteration t were usually drawn while the device
        ran step t - 1 (`train_step`)."""
        timers = self.timers if t is not None else NO_TIMERS  # evaluation is not timed
        states = [None] * self.num_micro if t is None else self._ltd_states(t)
        for m in range(self.num_micro):
            with timers("batch-generator"):
                batch = {k: v.to(self.device, non_blocking=True) for k, v in next(data_iter).items()}
            batch["ltd"] = states[m]
            yield batch

    def _ltd_states(self, t: int) -> list:
        """The random-LTD states of iteration t's micro-batches: those drawn ahead, or drawn now."""
        ahead, self._ltd_ahead = self._ltd_ahead, None
        if ahead is not None and ahead[0] == t:
            return ahead[1]
        with self.timers("random-ltd-draw"):
            return self.ltd.for_iteration(t, self.num_micro, self.device)

    def _tied_weight(self) -> Optional[torch.nn.Parameter]:
        """This stage's copy of word embeddings tied across the first and last stage, else None."""
        if ps.get_pipeline_model_parallel_world_size() == 1 or not ps.is_rank_in_embedding_group():
            return None
        if not getattr(self.model, "share_embeddings", False):
            return None
        if ps.is_pipeline_first_stage():
            return self.model.embedding.word_embeddings.weight
        if ps.is_pipeline_last_stage():
            return self.model.output_layer.weight
        return None

    def _sync_tied_embeddings(self) -> None:
        """First and last stage hold copies of the tied word embeddings: sum their gradients."""
        weight = self._tied_weight()
        if weight is not None:
            with self.timers("embedding-grads-all-reduce"):
                self.grad_sync.allreduce_in_group(weight, ps.get_embedding_group())

    def train_step(self, data_iter, t: int):
        """One iteration: the schedule runs every micro-batch forward and backward, then one optimizer step,
        then the iteration's one host read (`_read_step`). Returns (losses, StepResult, [stop, bad loss]),
        the flags agreed by all ranks."""
        self.profiler.before_step(t)
        self.model.train()
        self.optimizer.zero_grad()
        with self.timers("forward-backward"):
            metrics = self.forward_backward(
                self.forward_step, self._micro_batches(data_iter, t), self.model, self.num_micro, self.tensor_shape,
                self.tensor_dtype, forward_only=False, loss_scale=self.optimizer.loss_scale, grad_sync=self.grad_sync,
                timers=self.timers)
        self._sync_tied_embeddings()
        if self.config.model.sequence_parallel:  # norms and row-parallel biases saw only this rank's tokens
            with self.timers("layernorm-grads-all-reduce"):
                self.grad_sync.allreduce_sequence_parallel_grads(ps.get_tensor_model_parallel_group())
        with self.timers("optimizer"):
            pending = self.optimizer.launch_step()
        with self.timers("random-ltd-draw"):  # iteration t + 1's indices, on the host while the device works
            self._ltd_ahead = (t + 1, self.ltd.for_iteration(t + 1, self.num_micro, self.device))
        losses, result, agreed = self._read_step(metrics, pending)
        self.profiler.after_step(t + 1)
        self._report_compiles(f"iteration {t + 1}")  # the first step compiles the layers
        return losses, result, agreed

    def _report_compiles(self, during: str) -> None:
        """--torch-compile: a line for the graphs compiled since the last report (the first iteration, the
        first evaluation, and any recompilation, which a new kept length r should never cause)."""
        if self._compiled is None:
            return
        graphs, seconds = compile_stats()
        if graphs > self._compiled[0]:
            print_rank_0(f" torch.compile: {graphs - self._compiled[0]} graphs compiled in "
                         f"{seconds - self._compiled[1]:.1f} s during {during}")
        self._compiled = (graphs, seconds)

    def _read_step(self, metrics: list, pending):
        """The iteration's one host read, once the optimizer step is queued: the losses (reduced over DP), the
        gradient norm and inf/NaN verdict, and the stop flags with this rank's loss verdict (OR-ed over all
        ranks), in one device-to-host copy. Returns (losses, StepResult, [stop, bad loss])."""
        on_device = metrics_on_device(metrics)  # {name: tensor}
        bad = nonfinite_on_device(on_device) if self.config.training.check_for_nan_in_loss_and_grad else False
        flags = any_rank_on_device(self._stop_flags() + [bad])  # [3]
        step, agreed, *values = read_together([pending.values(), flags, *on_device.values()])
        return metrics_from_host(on_device, values), self.optimizer.finish_step(*step), self._agree(agreed)

    @torch.no_grad()
    def evaluate(self, dataset, consumed: int) -> dict:
        """Mean metrics ({"lm loss": ...}) over --eval-iters global batches, full sequence (no token
        dropping); {} off the last stage."""
        self.model.eval()
        self.grad_sync.finish_param_sync()
        it = _loader(dataset, consumed, self.mbs, self.config.training.seed, 0)
        values = []
        for _ in range(self.config.logging.eval_iters):
            values += self.forward_backward(self.forward_step, self._micro_batches(it, None), self.model,
                                            self.num_micro, self.tensor_shape, self.tensor_dtype, forward_only=True)
        self._report_compiles("evaluation")
        return mean_metrics(values)

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self) -> TrainState:
        c, st = self.config, self.state
        log, save_interval, exit_interval = c.logging, c.checkpoint.save_interval, c.training.exit_interval
        if c.checkpoint.load:
            self.load()
        if self._stop_requested([], deadline=False)[0]:  # signalled while starting up: nothing new to save
            print_rank_0(f" exiting before training: {self._stop_reason[0]}")
            return st
        data_iter = _loader(self.train_ds, st.consumed_train_samples, self.mbs, c.training.seed, c.data.num_workers,
                            ignore_stop_signals if self.signals is not None else None)
        print_rank_0(f" training for {self.run.train_iters} iterations ({self.run.describe()}) on {self.device}"
                     f"{self._layout()}")
        interval, stop = LogInterval(), False
        while st.iteration < self.run.train_iters and not self.run.budget_reached(st.consumed_layer_tokens):
            t = st.iteration
            lr = lr_at(c.lr, c.lr.progress(self.sched_samples, self.sched_layer_tokens, self.L, self.s))
            self.optimizer.set_lr(lr)
            t0 = time.perf_counter()
            losses, result, (stop, bad_loss_anywhere) = self.train_step(data_iter, t)
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
            interval.add(dt, losses, result.skipped, bad_loss)
            bad_loss = bad_loss_anywhere  # with --check-for-nan-in-loss-and-grad: any rank's, else False
            if bad_loss or result.nonfinite:
                self._log(interval, lr, t, result)
                self._fault(losses, result)
            if st.iteration % log.log_interval == 0:
                self._log(interval, lr, t, result)
                interval = LogInterval()
            if self.valid_ds is not None and log.eval_iters > 0 and st.iteration % log.eval_interval == 0:
                self._validate()
            if c.checkpoint.save and save_interval and st.iteration % save_interval == 0:
                self.save()
            if exit_interval and st.iteration % exit_interval == 0:
                stop, self._stop_reason = True, ["--exit-interval"]
            if stop:
                break
        if interval.iters:  # the iterations since the last log line, so the run's end is on record
            self._log(interval, lr, t, result)
        if c.checkpoint.save and self.last_saved != st.iteration:
            self.save()
        self.wait_for_save()
        if stop:  # Megatron's early exits skip the end-of-training evaluation
            print_rank_0(f" exiting at iteration {st.iteration}: {self._stop_reason[0]}")
        elif log.eval_iters > 0:
            if self.valid_ds is not None and st.iteration % log.eval_interval:
                self._validate()
            if self.test_ds is not None:
                self._report_eval(self.evaluate(self.test_ds, 0), "test")
        self.profiler.close()  # a run that stopped inside the --profile window
        self.logger.close()
        return st

    def _stop_requested(self, extra: list, deadline: bool = True) -> list:
        """[stop, *extra], each agreed by all ranks in one all-reduce: stop when any rank was signalled or
        ran past --exit-duration-in-mins; `extra` are further flags to agree on (an inf/NaN loss)."""
        return self._agree(any_rank(self._stop_flags(deadline) + list(extra)))

    def _stop_flags(self, deadline: bool = True) -> list:
        """This rank's [signalled, past --exit-duration-in-mins]."""
        signalled = self.signals is not None and self.signals.received is not None
        return [signalled, deadline and self.deadline.passed()]

    def _agree(self, flags: list) -> list:
        """[stop, *extra] from the flags OR-ed over all ranks; the reasons are kept for the exit line."""
        signalled = self.signals is not None and self.signals.received is not None
        reasons = []
        if flags[0]:
            reasons.append(f"received {self.signals.name} (--exit-signal-handler)" if signalled else
                           "another rank received a stop signal (--exit-signal-handler)")
        if flags[1]:
            reasons.append(f"ran {self.deadline.minutes:g} minutes (--exit-duration-in-mins)")
        self._stop_reason = reasons
        return [bool(reasons)] + [bool(f) for f in flags[2:]]

    def _fault(self, losses: dict, result) -> None:
        """Stop on an inf/NaN that loss scaling cannot absorb, before anything is saved. Every rank gets
        here on the same iteration (the loss verdict is all-reduced, the gradient norm is global) and
        raises the same line: the losses shown are those of the first rank whose loss is not finite."""
        it, precision = self.state.iteration, self.config.training.precision
        if result.nonfinite:
            what = f"the gradient norm is {result.grad_norm} ({precision}); the update was not applied"
        else:
            shown = ", ".join(f"{k} {v}" for k, v in first_nonfinite_losses(losses).items()) or "the loss on another rank"
            what = f"the loss is not finite ({shown}, {precision})"
        resume = (f"the last checkpoint is {self.last_checkpoint}: resume from it with --load (perhaps with a "
                  "lower --lr)" if self.last_checkpoint else "there is no checkpoint to resume from (try a lower --lr)")
        self.wait_for_save()  # the previous checkpoint, the one to resume from, must be complete
        self.logger.close()
        raise NumericalFault(f"iteration {it}: {what}; nothing was saved and {resume}; "
                             "--no-check-for-nan-in-loss-and-grad turns this check off")

    def _layout(self) -> str:
        p = self.config.parallel
        if p.world_size == 1:
            return ""
        sp = ", sequence parallel" if self.config.model.sequence_parallel else ""
        return (f" (tensor x pipeline x data parallel = {p.tensor_model_parallel_size} x "
                f"{p.pipeline_model_parallel_size} x {p.data_parallel_size}{sp})")

    def _validate(self) -> None:
        st = self.state
        losses = self.evaluate(self.valid_ds, st.consumed_valid_samples)
        st.consumed_valid_samples += self.config.logging.eval_iters * self.G
        self._report_eval(losses, "validation")

    def _report_eval(self, losses: dict, name: str) -> None:
        """The "lm loss" block and `{val,test}_loss/_ppl`; other metrics (BERT's "sop loss", ...) beside."""
        others = {k: v for k, v in losses.items() if k != "lm loss"}
        st = self.state
        where = {"consumed_tokens": st.consumed_train_samples * self.s, "consumed_layer_tokens": st.consumed_layer_tokens,
                 "train_time_s": st.train_time_ms / 1000}  # so a curve can be drawn against any of them
        self.logger.validation(st.iteration, st.consumed_train_samples, losses.get("lm loss"), name=name,
                               extra=where, metrics=others)

    def _log(self, interval: LogInterval, lr: float, t: int, result) -> None:
        """The log line and JSON record of the interval ending with iteration t (0-based)."""
        timing, timers_ms = self.timers.report(interval.iters)  # every rank: min and max across them
        if not self.logger.enabled:
            return
        st = self.state
        elapsed_ms = 1000.0 * interval.time / interval.iters
        m = {
            "iteration": st.iteration, "train_iters": self.run.train_iters,
            "consumed_samples": st.consumed_train_samples, "consumed_tokens": st.consumed_train_samples * self.s,
            "elapsed_ms_per_iteration": elapsed_ms, "tokens_per_sec": self.G * self.s / (elapsed_ms / 1000.0),
            "lr": lr, "global_batch_size": self.G,
            **interval.mean_losses(),  # lm_loss, sop_loss, ...
            "random_ltd": self.run.ltd_enabled,  # the log line prints the LTD fields
            "kept_length": self.run.kept_length(t),  # r_t, or s when random-LTD is off
            "consumed_layer_tokens": st.consumed_layer_tokens,
            "layer_token_saving": theoretical_saving(st.consumed_layer_tokens, self.L, self.s, st.consumed_train_samples),
            "loss_scale": result.loss_scale, "grad_norm": result.grad_norm,
            # in this interval (Megatron resets them after each log line); the run's totals are in TrainState
            "skipped_iterations": interval.skipped, "nan_iterations": interval.nan,
            "train_time_s": st.train_time_ms / 1000,
        }
        if self.config.logging.log_throughput:
            m.update(self._throughput(interval, t))
        if timers_ms:
            m["timers_ms"] = timers_ms  # {name: [min, max]} ms per iteration
        self.logger.train(m, metric_names=tuple(interval.losses))
        if timing:
            print(timing, flush=True)
        if self.device.type == "cuda" and not self._memory_reported:
            self._memory_reported = True
            mb, cuda = 2.0 ** 20, torch.cuda
            print(f"[Rank {dist.get_rank() if dist.is_initialized() else 0}] (after {st.iteration} iterations) "
                  f"memory (MB) | allocated: {cuda.memory_allocated() / mb:.1f} | max allocated: "
                  f"{cuda.max_memory_allocated() / mb:.1f} | reserved: {cuda.memory_reserved() / mb:.1f} | max "
                  f"reserved: {cuda.max_memory_reserved() / mb:.1f}", flush=True)

    def _throughput(self, interval: LogInterval, t: int) -> dict:
        """TFLOP/s per GPU over the interval's iterations t - iters + 1 .. t (flops.py): the FLOPs run (r_t
        tokens in the LTD layers) and the dense-equivalent ones, and MFU against the peak when known."""
        c = self.config
        its = range(t + 1 - interval.iters, t + 1)
        ran = sum(iteration_flops(c.model, self.G, self.run.ltd_layers, self.run.kept_length(i)) for i in its)
        dense = iteration_flops(c.model, self.G) * interval.iters
        per_gpu = 1e12 * interval.time * c.parallel.world_size
        out = {"throughput_tflops": ran / per_gpu, "dense_equivalent_tflops": dense / per_gpu}
        if self.peak_tflops:
            out.update(mfu=out["throughput_tflops"] / self.peak_tflops,
                       dense_equivalent_mfu=out["dense_equivalent_tflops"] / self.peak_tflops)
        return out
