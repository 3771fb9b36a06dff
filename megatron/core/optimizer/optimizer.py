"""AdamW over fp32 main parameters, with Megatron's parameter groups, loss scaling and global-norm clipping.

The model's parameters may be bf16/fp16; the optimizer steps fp32 main parameters (`main_params.py`) whose
gradients are the data-parallel-reduced `main_grad` buffers (`distributed/ddp.py`). With
`--use-distributed-optimizer` each data-parallel rank holds and steps only its shard of every bucket
(ZeRO-1), and the updated parameters are all-gathered.

A step is queued on the device without reading anything back (`launch_step`), then finished from the
values the trainer reads once per iteration together with the loss and the stop flags (`finish_step`);
`step()` does both, with its own single read, for callers that have nothing else to read.

`launch_step` does, in order: read the gradients (an fp32 copy of 16-bit ones), unscale them and look for
inf/NaN (fp16: one foreach kernel), clip by the global L2 norm (the coefficient computed and applied on
the device), step, write the fp32 values back into the model and start the parameter all-gather. The
inf/NaN verdict and the norm are reduced over the ranks that hold different gradients: the model-parallel
group, or every rank with the distributed optimizer (the DP ranks then hold disjoint shards), so all ranks
agree. A step that must not be applied (an fp16 overflow; without a scaler, a non-finite norm under
`check_for_nan`) is skipped on the device: the verdict goes to torch's fused AdamW as `found_inf`, which
then leaves parameters, moments and step count untouched (and the unchanged values are what is written
back and gathered). Torch's unfused AdamW (devices other than CPU and CUDA) cannot do that: there the
verdict is read before the step, a second host read.

`finish_step(norm, found_inf)` updates the loss scale (so the next iteration's loss uses it, as before)
and returns what the log line needs. Without a loss scaler (bf16, fp32) an inf/NaN gradient is a fault, not
an overflow to retry: with `check_for_nan` the step was not applied and the result says `nonfinite`, so
the trainer can stop before the weights or a checkpoint are corrupted.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import parallel_state
from megatron.core.distributed import DataParallelGradSync
from megatron.core.errors import UserError
from megatron.core.optimizer.clip_grads import any_rank_found_inf, clip_grads_by_norm
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron.core.optimizer.main_params import MainParam, build_main_params

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    fp16: bool = False
    loss_scale: Optional[float] = None  # constant scale; None = dynamic (fp16 only)
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    check_for_nan: bool = False  # without a scaler: refuse to step on an inf/NaN gradient norm
    use_distributed_optimizer: bool = False


@dataclass
class StepResult:
    grad_norm: float  # before clipping; nan when the step was skipped
    skipped: bool
    loss_scale: float
    nonfinite: bool = False  # no scaler, check_for_nan, and an inf/NaN gradient: the step was not applied


@dataclass(frozen=True)
class PendingStep:
    """A queued step's numbers, still on the device: what `finish_step` needs, read with the loss."""
    grad_sq: torch.Tensor  # [] fp32, the squared gradient norm before clipping
    found_inf: Optional[torch.Tensor]  # [] fp32, 1.0: the update was skipped; None: nothing was checked

    def values(self) -> torch.Tensor:
        """[2] float64: (squared norm, verdict), to be read in the caller's one device-to-host copy."""
        found = torch.zeros_like(self.grad_sq) if self.found_inf is None else self.found_inf
        return torch.stack([self.grad_sq, found]).double()  # [2]


def fused_adamw_ok(params) -> bool:
    """torch's fused AdamW (one kernel over all parameters, CPU and CUDA) where it applies: it is the
    default here because the per-parameter loop of plain AdamW is a visible share of a small model's step.
    Other devices fall back to torch's default implementation."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)


class Optimizer:
    """AdamW for `model`, whose gradients `sync` reduces (and, distributed, whose shards it owns)."""

    def __init__(self, model: nn.Module, config: OptimizerConfig, sync: DataParallelGradSync):
        assert sync.distributed == config.use_distributed_optimizer, "the buffers and the optimizer disagree"
        self.config, self.sync = config, sync
        self.names: Dict[int, str] = {id(p): n for n, p in model.named_parameters()}
        self.mains: List[MainParam] = build_main_params(sync)
        # Megatron's groups: no weight decay on biases and norm weights (every 1-D parameter)
        decay = [m.main for m in self.mains if m.model.dim() != 1]
        no_decay = [m.main for m in self.mains if m.model.dim() == 1]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if not decay and not no_decay:  # a distributed shard of nothing but padding
            groups[0]["params"] = [torch.zeros(0, device=parallel_state.get_device())]
        self.adam = torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                      eps=config.adam_eps, fused=fused_adamw_ok(decay + no_decay))
        if config.loss_scale is not None:
            self.scaler = ConstantGradScaler(config.loss_scale)
        elif config.fp16:
            self.scaler = DynamicGradScaler(config.initial_loss_scale, config.min_loss_scale,
                                            config.loss_scale_window, config.hysteresis)
        else:
            self.scaler = None

    @property
    def loss_scale(self) -> float:
        return 1.0 if self.scaler is None else self.scaler.scale

    @property
    def distributed(self) -> bool:
        return self.config.use_distributed_optimizer

    def set_lr(self, lr: float) -> None:
        for group in self.adam.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        """Zero the gradient buffers for the next iteration."""
        self.sync.zero_grad_buffer()
        for m in self.mains:
            m.main.grad = None

    def _stats_group(self):
        """The ranks whose gradients differ: model-parallel, or every rank when DP ranks hold shards."""
        if self.distributed and dist.is_initialized():
            return dist.group.WORLD
        return parallel_state.get_model_parallel_group()

    def step(self) -> StepResult:
        """`launch_step`, its one read, `finish_step`."""
        return self.finish_step(*self.launch_step().values().tolist())

    def launch_step(self) -> PendingStep:
        """Queue the whole step on the device (module docstring); nothing is read back."""
        for m in self.mains:  # fp32 grads are read in place; 16-bit ones through an fp32 copy
            m.main.grad = m.grad.view_as(m.main) if m.grad.dtype == torch.float32 else m.grad.float().view_as(m.main)
        grads = [m.main.grad for m in self.mains]
        group = self._stats_group()
        found_inf = None
        if self.scaler is not None:  # unscaled and checked in one foreach kernel
            found_inf = any_rank_found_inf(grads, group, unscale=1.0 / self.scaler.scale)  # []
        sq = clip_grads_by_norm([m.main for m in self.mains], self.config.clip_grad, group)  # [] fp32
        if self.scaler is None and self.config.check_for_nan:
            found_inf = (~torch.isfinite(sq)).float()  # []
        if found_inf is not None and not self.adam.defaults["fused"] and bool(found_inf):  # unfused: a host read
            self._drop_grad_copies()
            return PendingStep(sq, found_inf)
        self.adam.found_inf = found_inf if self.adam.defaults["fused"] else None  # fused AdamW skips on 1.0
        self.adam.step()
        self._drop_grad_copies()
        self._copy_main_to_model()
        self.sync.start_param_sync()
        return PendingStep(sq, found_inf)

    def finish_step(self, grad_sq: float, found_inf: float) -> StepResult:
        """The step's outcome from its two numbers read on the host: updates the loss scale."""
        grad_norm = math.sqrt(grad_sq)  # correctly rounded, as the log always had it (clip_grads.py)
        if self.scaler is not None:
            self.scaler.update(bool(found_inf))
            return StepResult(float("nan") if found_inf else grad_norm, bool(found_inf), self.loss_scale)
        return StepResult(grad_norm, bool(found_inf), self.loss_scale, nonfinite=bool(found_inf))

    def _drop_grad_copies(self) -> None:
        """Free the fp32 copies of 16-bit gradients now rather than at the next zero_grad: evaluation and
        checkpoint saves between steps would otherwise carry 4 extra bytes per parameter."""
        for m in self.mains:
            if m.grad.dtype != torch.float32:
                m.main.grad = None

    @torch.no_grad()
    def _copy_main_to_model(self) -> None:
        for m in self.mains:
            if not m.aliased:
                m.model_slice().copy_(m.main.view(-1))  # fp32 -> bf16/fp16, rounded to nearest

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Main parameters from the model's weights: after a weights-only load (--finetune, --no-load-optim),
        or the first step would write the stale initial values back over the loaded weights."""
        for m in self.mains:
            if not m.aliased:
                m.main.view(-1).copy_(m.model_slice())

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What model_optim_rng.pt holds. Plain: the Adam state (moments per main parameter) and, for
        16-bit models, the fp32 main parameters (Megatron's `fp32_from_fp16_params`). Distributed: only the
        scaler and hyperparameters; the sharded state goes to distrib_optim.pt (`gather_state`)."""
        scaler = None if self.scaler is None else self.scaler.state_dict()
        if self.distributed:
            return {"distributed": True, "param_groups": self.adam.state_dict()["param_groups"], "grad_scaler": scaler}
        state = {"adam": self.adam.state_dict(), "grad_scaler": scaler}
        if any(not m.aliased for m in self.mains):
            state["fp32_from_fp16_params"] = [m.main.detach().clone() for m in self.mains]
        return state

    def load_state_dict(self, state: dict) -> None:
        if bool(state.get("distributed")) != self.distributed:
            saved = "with" if state.get("distributed") else "without"
            raise UserError(f"the checkpoint's optimizer state was saved {saved} --use-distributed-optimizer "
                            f"and this run is {'with' if self.distributed else 'without'} it; use the same "
                            "setting, or --no-load-optim")
        if self.scaler is not None and state.get("grad_scaler") is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
        if self.distributed:
            return  # the sharded state comes through load_gathered_state
        self.adam.load_state_dict(state["adam"])
        saved = state.get("fp32_from_fp16_params")
        with torch.no_grad():
            if saved is None:  # a checkpoint of an fp32 run: its weights are the main parameters
                self.reload_model_params()
            else:
                for m, value in zip(self.mains, saved, strict=True):
                    m.main.copy_(value)

    @torch.no_grad()
    def gather_state(self) -> Optional[dict]:
        """Distributed: every DP rank's shards put together, per parameter and in model space:
        {"param"|"exp_avg"|"exp_avg_sq": {local parameter name: fp32 tensor shaped like it}, "step": n}.
        Every DP rank calls it (one all-gather per bucket and quantity); DP rank 0 gets the dict, the
        others None. Model space makes the file independent of the DP size and bucket layout, and lets
        tools/checkpoint_util.py re-split it for another TP/PP like the weights."""
        sync = self.sync
        out = {key: {} for key in ("param",) + ADAM_KEYS}
        steps = [int(s["step"]) for s in self.adam.state.values() if "step" in s]
        out["step"] = max(steps, default=0)
        for buf in sync.buffers:
            for bucket in buf.buckets:
                lo, hi = sync.shard_in_buffer(bucket)
                mine = [m for m in self.mains if m.bucket is bucket]
                for key in out:
                    if key == "step":
                        continue
                    local = torch.zeros(hi - lo, dtype=torch.float32, device=buf.grad_data.device)  # [n_b/dp]
                    for m in mine:
                        value = m.main if key == "param" else self.adam.state.get(m.main, {}).get(key)
                        if value is not None:
                            local[m.buffer_start - lo:m.buffer_start - lo + m.hi - m.lo] = value.view(-1)
                    full = torch.empty(bucket.numel, dtype=torch.float32, device=local.device)  # [n_b]
                    if sync.dp > 1:
                        dist.all_gather_into_tensor(full, local, group=sync.group)
                    else:
                        full.copy_(local)
                    if sync.rank == 0:
                        for p, off in zip(bucket.params, bucket.offsets):
                            start = off - bucket.start
                            out[key][self.names[id(p)]] = full[start:start + p.numel()].view(p.shape).cpu().clone()
        return out if sync.rank == 0 else None

    @torch.no_grad()
    def load_gathered_state(self, state: dict, where: str) -> None:
        """Distributed: take this rank's slices of a `gather_state` dict (saved at any DP size)."""
        missing = sorted({self.names[id(m.model)] for m in self.mains} - set(state.get("param", {})))
        if missing:
            raise UserError(f"{where}: distrib_optim.pt has no state for {', '.join(missing[:3])}")
        index = {id(t): i for i, t in enumerate(p for g in self.adam.param_groups for p in g["params"])}
        adam_state = {}
        for m in self.mains:
            name = self.names[id(m.model)]
            m.main.view(-1).copy_(state["param"][name].view(-1)[m.lo:m.hi])
            if state["step"] > 0:
                adam_state[index[id(m.main)]] = {
                    "step": torch.tensor(float(state["step"])),
                    **{k: state[k][name].view(-1)[m.lo:m.hi].clone() for k in ADAM_KEYS}}
        self.adam.load_state_dict({"state": adam_state, "param_groups": self.adam.state_dict()["param_groups"]})
        self._copy_main_to_model()
        self.sync.start_param_sync()
        self.sync.finish_param_sync()
