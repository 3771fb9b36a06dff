"""LayerNorm or RMSNorm, chosen by `--normalization`.

Both return the dtype of their weight: with bf16/fp16 parameters and `--fp32-residual-connection` the
residual stream they read is fp32, the linear after them wants the parameter dtype. That mixed case is
computed in fp32 (as Megatron's mixed-dtype fused LayerNorm does); same-dtype inputs take torch's kernel,
which accumulates in fp32 internally.
"""

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(self.weight.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 for stability in any parameter dtype."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(self.weight.dtype)


def build_norm(config) -> nn.Module:
    """The norm; under sequence parallelism its parameters see only this rank's tokens, so they are tagged
    `sequence_parallel` and their gradients summed over the TP group."""
    norm = (RMSNorm(config.hidden_size, config.layernorm_epsilon) if config.normalization == "RMSNorm"
            else LayerNorm(config.hidden_size, eps=config.layernorm_epsilon))
    for p in norm.parameters():
        p.sequence_parallel = config.sequence_parallel
    return norm
