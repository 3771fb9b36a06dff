"""The stack of transformer layers, and the one place where random-LTD acts on the model.

For a layer in the LTD set, in training, when fewer than `s` tokens are kept, the block asks
`random_ltd` for this sample's kept indices at this layer and runs the layer on those tokens only; every
other layer (and every eval forward) runs on the full sequence.
"""

from typing import Optional

import torch
from torch import nn

from megatron.core.random_ltd import RandomLTDState, forward_layer
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.layer import TransformerLayer
from megatron.core.transformer.norm import build_norm


class TransformerBlock(nn.Module):
    def __init__(self, config: TransformerConfig, layer_offset: int = 0, num_local_layers: Optional[int] = None,
                 post_process: bool = True):
        super().__init__()
        n = config.num_layers if num_local_layers is None else num_local_layers
        self.layers = nn.ModuleList(TransformerLayer(config, layer_offset + i) for i in range(n))
        self.final_layernorm = build_norm(config) if post_process else None

    def forward(
        self,
        hidden: torch.Tensor,  # [b, s, h]
        position_ids: Optional[torch.Tensor] = None,  # [b, s]
        padding_mask: Optional[torch.Tensor] = None,  # [b, s]
        ltd: Optional[RandomLTDState] = None,  # this micro-batch's dropping plan; None = full sequence
    ) -> torch.Tensor:
        ltd = ltd if self.training else None  # evaluation always sees every token
        for layer in self.layers:
            hidden = forward_layer(layer, hidden, layer.layer_number, ltd, position_ids, padding_mask)  # [b, s, h]
        if self.final_layernorm is not None:
            hidden = self.final_layernorm(hidden)
        return hidden
