"""The training loop: Megatron's `pretrain()` with random-LTD accounting, on one process.

    pretrain(args, model_provider, datasets_provider, forward_step)

Per iteration t (0-based): r_t from the MSLG schedule; LR from the progress before t (samples, or
layer-tokens with --layer-token-lr-schedule); `num_microbatches` forward/backward passes with gradient
accumulation, each micro-batch carrying the global index of its samples (the random-LTD key); one
optimizer step; counters advance; log, evaluate, checkpoint.
"""

import math
import random
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from megatron.core import parallel_state
from megatron.core.datasets.samplers import PretrainingSampler, global_sample_offsets
from megatron.core.errors import UserError
from megatron.core.optimizer.optimizer import Optimizer, OptimizerConfig
from megatron.core.random_ltd import RandomLTDState, theoretical_saving
from megatron.training import checkpointing
from megatron.training.arguments import print_args
from megatron.training.logging import RunLogger
from megatron.training.lr_schedule import LRScheduleConfig, lr_at, progress_samples, schedule_lengths
from megatron.training.run_length import RunLength, resolve_run_length
from megatron.training.state import TrainState

# forward_step(model, batch, ltd) -> (loss to backprop, {metric name: float})
ForwardStep = Callable[[torch.nn.Module, dict, Optional[RandomLTDState]], tuple]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _loader(dataset, consumed: int, mbs: int, seed: int, num_workers: int):
    """Micro-batches from `consumed` on, in Megatron's order; never touches the global RNG."""
    sampler = PretrainingSampler(total_samples=len(dataset), consumed_samples=consumed, micro_batch_size=mbs,
                                 data_parallel_rank=0, data_parallel_size=1)
    generator = torch.Generator().manual_seed(seed)
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, generator=generator,
                           persistent_workers=num_workers > 0))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    def __init__(self, args, model: torch.nn.Module, datasets, forward_step: ForwardStep, num_layers: int,
                 run: RunLength):
        self.args = args
        self.device = parallel_state.device_for_backend(args.distributed_backend)
        self.model = model.to(self.device)
        self.forward_step = forward_step
        self.train_ds, self.valid_ds, self.test_ds = datasets
        self.num_layers = num_layers
        self.s = args.seq_length
        self.G = args.global_batch_size
        self.num_micro = args.global_batch_size // args.micro_batch_size
        self.run = run
        self.optimizer = Optimizer(model, OptimizerConfig(
            lr=args.lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps, clip_grad=args.clip_grad, fp16=args.fp16, loss_scale=args.loss_scale,
            initial_loss_scale=args.initial_loss_scale, min_loss_scale=args.min_loss_scale,
            loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis))
        self.lr_cfg = LRScheduleConfig(args.lr, args.min_lr, args.lr_decay_style, *schedule_lengths(
            global_batch_size=self.G, seq_length=self.s, train_samples=self.run.decay_default_samples,
            warmup_iters=args.lr_warmup_iters, warmup_samples=args.lr_warmup_samples,
            warmup_tokens=args.lr_warmup_tokens, warmup_fraction=args.lr_warmup_fraction,
            decay_iters=args.lr_decay_iters, decay_samples=args.lr_decay_samples, decay_tokens=args.lr_decay_tokens))
        self.state = TrainState()
        self.autocast_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        self.logger = RunLogger(args.log_json, args.tensorboard_dir)

    # ---- schedule ---------------------------------------------------------------------------------
    def lr_for_next_iteration(self) -> float:
        progress = progress_samples(self.state.consumed_train_samples, self.state.consumed_layer_tokens,
                                    self.num_layers, self.s, self.args.layer_token_lr_schedule)
        return lr_at(self.lr_cfg, progress)

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {
            "args": {k: v for k, v in vars(self.args).items()},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "opt_param_scheduler": {"max_lr": self.lr_cfg.max_lr, "min_lr": self.lr_cfg.min_lr,
                                    "lr_warmup_steps": self.lr_cfg.warmup_samples,
                                    "lr_decay_steps": self.lr_cfg.decay_samples,
                                    "lr_decay_style": self.lr_cfg.decay_style,
                                    "num_steps": self.state.consumed_train_samples},
            "rng_state": checkpointing.get_rng_state(),
            "train_state": self.state.state_dict(),
            "consumed_train_samples": self.state.consumed_train_samples,
            "consumed_valid_samples": self.state.consumed_valid_samples,
            "random_ltd": {"consumed_layer_tokens": self.state.consumed_layer_tokens,
                           "current_value": self.run.keep_at(max(self.state.iteration - 1, 0))},
        }

    def save(self) -> None:
        t0 = time.perf_counter()
        print(f"saving checkpoint at iteration {self.state.iteration:7d} to {self.args.save} in torch format",
              flush=True)
        checkpointing.save_checkpoint(self.args.save, self.state.iteration, self.checkpoint_state())
        print(f"  successfully saved checkpoint at iteration {self.state.iteration:7d} to {self.args.save} "
              f"[ t {time.perf_counter() - t0:.2f}s ]", flush=True)

    def load(self) -> None:
        ckpt = checkpointing.load_checkpoint(self.args.load)
        if ckpt is None:
            print(f"WARNING: no checkpoint found at {self.args.load}; training from scratch", flush=True)
            return
        saved = ckpt.get("args", {})
        for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "position_embedding_type",
                    "normalization", "swiglu", "untie_embeddings_and_output_weights"):
            if key in saved and saved[key] != getattr(self.args, key):
                raise UserError(f"checkpoint in {self.args.load} has {key}={saved[key]!r} but this run has "
                                f"{getattr(self.args, key)!r}; use matching model flags")
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise UserError(f"checkpoint in {self.args.load} does not fit this model: {str(e).splitlines()[0]}")
        if self.args.finetune:
            print(f" loaded weights from {self.args.load} at iteration {ckpt['iteration']} (finetune: "
                  "iteration, optimizer and counters reset)", flush=True)
            return
        self.state.load_state_dict(ckpt["train_state"])
        if not self.args.no_load_optim:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if not self.args.no_load_rng:
            checkpointing.set_rng_state(ckpt["rng_state"])
        print(f"  successfully loaded checkpoint from {self.args.load} at iteration {self.state.iteration}",
              flush=True)

    # ---- steps ------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def train_step(self, data_iter, t: int):
        """One iteration: accumulate gradients over the micro-batches, then one optimizer step."""
        self.model.train()
        keep = self.run.keep_at(t)
        self.optimizer.zero_grad()
        scale = self.optimizer.loss_scale
        metrics_sum, nan = {}, False
        mbs = self.args.micro_batch_size
        for m in range(self.num_micro):
            batch = _to_device(next(data_iter), self.device)
            sample_ids = torch.from_numpy(global_sample_offsets(m, mbs, 0, 1)).to(self.device)  # [b] index in batch
            ltd = (RandomLTDState(self.args.seed, t, sample_ids, keep, self.run.ltd_layers)
                   if self.run.ltd_enabled else None)
            with self._autocast():
                loss, metrics = self.forward_step(self.model, batch, ltd)
            (loss * (scale / self.num_micro)).backward()
            for k, v in metrics.items():
                metrics_sum[k] = metrics_sum.get(k, 0.0) + v / self.num_micro
        if any(not math.isfinite(v) for v in metrics_sum.values()):
            nan = True
        result = self.optimizer.step()
        return metrics_sum, result, keep, nan

    @torch.no_grad()
    def evaluate(self, dataset, consumed: int) -> float:
        """Mean loss over --eval-iters global batches, full sequence (no token dropping)."""
        self.model.eval()
        it = _loader(dataset, consumed, self.args.micro_batch_size, self.args.seed, 0)
        total = 0.0
        n = self.args.eval_iters * self.num_micro
        for _ in range(n):
            batch = _to_device(next(it), self.device)
            with self._autocast():
                _, metrics = self.forward_step(self.model, batch, None)
            total += metrics["lm loss"]
        return total / n

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self) -> TrainState:
        args, st = self.args, self.state
        if args.load:
            self.load()
        train_iters = self.run.train_iters
        data_iter = _loader(self.train_ds, st.consumed_train_samples, args.micro_batch_size, args.seed,
                            args.num_workers)
        print(f" training for {train_iters} iterations ({self.run.describe()}) on {self.device}", flush=True)
        interval = {"time": 0.0, "iters": 0, "metrics": {}}
        while st.iteration < train_iters and not self.run.budget_reached(st.consumed_layer_tokens):
            t = st.iteration
            lr = self.lr_for_next_iteration()
            self.optimizer.set_lr(lr)
            t0 = time.perf_counter()
            metrics, result, keep, nan = self.train_step(data_iter, t)
            dt = time.perf_counter() - t0
            st.iteration += 1
            st.consumed_train_samples += self.G
            st.consumed_layer_tokens += self.run.curve.at(t)
            st.skipped_iterations += int(result.skipped)
            st.nan_iterations += int(nan)
            interval["time"] += dt
            interval["iters"] += 1
            for k, v in metrics.items():
                interval["metrics"][k] = interval["metrics"].get(k, 0.0) + v
            if st.iteration % args.log_interval == 0:
                self._log(interval, lr, keep, result)
                interval = {"time": 0.0, "iters": 0, "metrics": {}}
            if self.valid_ds is not None and args.eval_iters > 0 and st.iteration % args.eval_interval == 0:
                self._validate()
            if args.save and args.save_interval and st.iteration % args.save_interval == 0:
                self.save()
            if args.exit_interval and st.iteration % args.exit_interval == 0:
                print(f" exiting at iteration {st.iteration} (--exit-interval)", flush=True)
                break
        if args.save and (not args.save_interval or st.iteration % args.save_interval):
            self.save()
        if args.eval_iters > 0:
            if self.valid_ds is not None and st.iteration % args.eval_interval:
                self._validate()
            if self.test_ds is not None:
                loss = self.evaluate(self.test_ds, 0)
                self.logger.validation(st.iteration, st.consumed_train_samples, loss, name="test")
        self.logger.close()
        return st

    def _validate(self) -> None:
        st = self.state
        loss = self.evaluate(self.valid_ds, st.consumed_valid_samples)
        st.consumed_valid_samples += self.args.eval_iters * self.G
        self.logger.validation(st.iteration, st.consumed_train_samples, loss)

    def _log(self, interval: dict, lr: float, keep: int, result) -> None:
        st, n = self.state, interval["iters"]
        elapsed_ms = 1000.0 * interval["time"] / n
        m = {
            "iteration": st.iteration, "train_iters": self.run.train_iters,
            "consumed_samples": st.consumed_train_samples,
            "consumed_tokens": st.consumed_train_samples * self.s,
            "elapsed_ms_per_iteration": elapsed_ms,
            "tokens_per_sec": self.G * self.s / (elapsed_ms / 1000.0),
            "lr": lr, "global_batch_size": self.G,
            **{k.replace(" ", "_"): v / n for k, v in interval["metrics"].items()},
            "loss_scale": result.loss_scale, "grad_norm": result.grad_norm,
            "skipped_iterations": st.skipped_iterations, "nan_iterations": st.nan_iterations,
        }
        m["ltd_seq_length"] = keep  # r_t, or s when random-LTD is off
        m["consumed_layer_tokens"] = st.consumed_layer_tokens
        m["layer_token_saving"] = theoretical_saving(st.consumed_layer_tokens, self.num_layers, self.s,
                                                     st.consumed_train_samples)
        self.logger.train(m)


def pretrain(args, model_provider, datasets_provider, forward_step: ForwardStep) -> TrainState:
    """Megatron's pretrain(): seed, build model and data, train, evaluate, checkpoint."""
    print_args(args)
    if parallel_state.world_size_from_env() > 1:
        raise UserError("launched with WORLD_SIZE > 1, but tensor/pipeline/data parallelism is not built yet; "
                        "run a single process")
    set_seed(args.seed)
    model, num_layers = model_provider(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f" > number of parameters: {n_params}", flush=True)
    run = resolve_run_length(args, num_layers)
    datasets = datasets_provider(args, run.num_samples(args.eval_interval, args.eval_iters))
    return Trainer(args, model, datasets, forward_step, num_layers, run).train()
