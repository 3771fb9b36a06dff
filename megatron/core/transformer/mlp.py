"""The feed-forward block: h -> ffn -> h with GELU, or SwiGLU (fc1 produces gate and up halves)."""

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.transformer.config import TransformerConfig


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.swiglu = config.swiglu
        f = config.ffn_hidden_size
        self.linear_fc1 = nn.Linear(config.hidden_size, 2 * f if self.swiglu else f, bias=config.add_bias_linear)
        self.linear_fc2 = nn.Linear(f, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, n, h]
        y = self.linear_fc1(x)  # [b, n, f] or [b, n, 2f]
        if self.swiglu:
            gate, up = y.chunk(2, dim=-1)  # [b, n, f] each
            y = F.silu(gate) * up
        else:
            y = F.gelu(y)
        return self.linear_fc2(y)  # [b, n, h]
