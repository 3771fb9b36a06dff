"""One pre-norm transformer layer: x + drop(attn(norm(x))), then + drop(mlp(norm(.))).

The contract random-LTD relies on: `layer(hidden [b, n, h], position_ids=[b, n], padding_mask=[b, n])`
works for any n and treats the n tokens as an ordered sequence, nothing more. Under sequence parallelism
`hidden` is this rank's chunk `[b, n/tp, h]` of the n tokens (position ids and mask still cover all n),
and the hidden dropouts, which then act on different tokens on each TP rank, draw from the tracker's
per-rank stream.
"""

from contextlib import nullcontext

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import get_rng_tracker
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.norm import build_norm


class TransformerLayer(nn.Module):
    def __init__(self, config: TransformerConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number  # global, 0-based: the LTD set is defined on these
        self.hidden_dropout = config.hidden_dropout
        self.sequence_parallel = config.sequence_parallel
        self.input_layernorm = build_norm(config)
        self.self_attention = SelfAttention(config)
        self.pre_mlp_layernorm = build_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        hidden: torch.Tensor,  # [b, n, h]
        position_ids: Optional[torch.Tensor] = None,  # [b, n]
        padding_mask: Optional[torch.Tensor] = None,  # [b, n]
    ) -> torch.Tensor:
        p = self.hidden_dropout if self.training else 0.0
        own_tokens = get_rng_tracker().fork if self.sequence_parallel else nullcontext
        attn = self.self_attention(self.input_layernorm(hidden), position_ids, padding_mask)  # [b, n, h]
        with own_tokens():
            hidden = hidden + F.dropout(attn, p, self.training)
        mlp = self.mlp(self.pre_mlp_layernorm(hidden))  # [b, n, h]
        with own_tokens():
            return hidden + F.dropout(mlp, p, self.training)  # [b, n, h]
