"""AdamW with Megatron's parameter groups, loss-scale handling and global-norm clipping.

`step()` does, in order: unscale the gradients (fp16), look for inf/nan on every model-parallel rank,
update the loss scale, skip the step on overflow, clip by the global L2 norm over the model-parallel
group, step. Data-parallel gradients are already averaged when it runs, so all DP replicas agree. It
returns what the log line needs.

Without a loss scaler (bf16, fp32) an inf/NaN gradient is a fault, not an overflow to retry: with
`check_for_nan` the step is not applied and the result says `nonfinite`, so the trainer can stop before
the weights or a checkpoint are corrupted. The global norm it tests is already summed over the
model-parallel group, so every rank reaches the same verdict at no extra cost.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from megatron.core import parallel_state
from megatron.core.optimizer.clip_grads import any_rank_found_inf, clip_grad_norm
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler


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


@dataclass
class StepResult:
    grad_norm: float  # before clipping; nan when the step was skipped
    skipped: bool
    loss_scale: float
    nonfinite: bool = False  # no scaler, check_for_nan, and an inf/NaN gradient: the step was not applied


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """No weight decay on biases and norm weights (every 1-D parameter), as in Megatron."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() == 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_adamw_ok(params) -> bool:
    """torch's fused AdamW (one kernel over all parameters, CPU and CUDA) where it applies: it is the
    default here because the per-parameter loop of plain AdamW is a visible share of a small model's step.
    Other devices fall back to torch's default implementation."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)


class Optimizer:
    def __init__(self, model: nn.Module, config: OptimizerConfig):
        self.config = config
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.adam = torch.optim.AdamW(
            param_groups(model, config.weight_decay), lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, fused=fused_adamw_ok(self.params),
        )
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

    def set_lr(self, lr: float) -> None:
        for group in self.adam.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        self.adam.zero_grad(set_to_none=True)

    def step(self) -> StepResult:
        grads = [p.grad for p in self.params if p.grad is not None]
        group = parallel_state.get_model_parallel_group()
        if self.scaler is not None:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
            found_inf = any_rank_found_inf(grads, group)
            self.scaler.update(found_inf)
            if found_inf:
                return StepResult(float("nan"), True, self.loss_scale)
        norm = clip_grad_norm(self.params, self.config.clip_grad, group)
        if self.scaler is None and self.config.check_for_nan and not math.isfinite(norm):
            return StepResult(norm, True, self.loss_scale, nonfinite=True)
        self.adam.step()
        return StepResult(norm, False, self.loss_scale)

    def state_dict(self) -> dict:
        return {"adam": self.adam.state_dict(),
                "grad_scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.adam.load_state_dict(state["adam"])
        if self.scaler is not None and state.get("grad_scaler") is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
