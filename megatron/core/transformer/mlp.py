"""The feed-forward block: h -> ffn -> h with GELU (exact, or tanh-approximated with --openai-gelu as
GPT-2's `gelu_new`), or SwiGLU (fc1 produces gate and up halves).

Tensor parallel: fc1 is column-parallel (each rank holds ffn/tp units; for SwiGLU its shard is
[gate_r; up_r], a stride-2 split), fc2 row-parallel with one all-reduce.
"""

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state
from megatron.core.errors import UserError
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.config import TransformerConfig


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.swiglu = config.swiglu
        self.gelu_approximate = "tanh" if config.openai_gelu else "none"  # GPT-2's `gelu_new`, or exact
        f, tp = config.ffn_hidden_size, parallel_state.get_tensor_model_parallel_world_size()
        if f % tp:
            raise UserError(f"--ffn-hidden-size {f} is not divisible by --tensor-model-parallel-size {tp}")
        sp = config.sequence_parallel
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, 2 * f if self.swiglu else f,
                                               bias=config.add_bias_linear, stride=2 if self.swiglu else 1,
                                               sequence_parallel=sp)
        self.linear_fc2 = RowParallelLinear(f, config.hidden_size, bias=config.add_bias_linear, sequence_parallel=sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, n, h], or [b, n/tp, h] sequence parallel
        y = self.linear_fc1(x)  # [b, n, f/tp] or [b, n, 2f/tp]
        if self.swiglu:
            gate, up = y.chunk(2, dim=-1)  # [b, n, f/tp] each
            y = F.silu(gate) * up
        else:
            y = F.gelu(y, approximate=self.gelu_approximate)
        return self.linear_fc2(y)  # [b, n, h], or [b, n/tp, h] sequence parallel
