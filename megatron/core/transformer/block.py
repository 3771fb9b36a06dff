"""The stack of transformer layers, and the one place where random-LTD acts on the model.

For a layer in the LTD set, in training, when fewer than `s` tokens are kept, the block asks
`random_ltd` for this sample's kept indices at this layer and runs the layer on those tokens only; every
other layer (and every eval forward) runs on the full sequence.

Full activation recomputation (`recompute_granularity="full"`) wraps runs of layers in
`tensor_parallel.checkpoint`: only each run's input `[b, s, h]` is kept, the layers are rerun in backward
with the RNG restored. A recomputed LTD layer runs on the same kept tokens: `ltd` passes through
untouched and its indices, a pure function of (seed, iteration, sample, layer), are cached on it.
"""

from typing import Optional

import torch
from torch import nn

from megatron.core.random_ltd import RandomLTDState, forward_layer
from megatron.core.tensor_parallel import checkpoint
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.layer import TransformerLayer
from megatron.core.transformer.norm import build_norm


class TransformerBlock(nn.Module):
    def __init__(self, config: TransformerConfig, layer_offset: int = 0, num_local_layers: Optional[int] = None,
                 post_process: bool = True):
        super().__init__()
        self.config = config
        n = config.num_layers if num_local_layers is None else num_local_layers
        self.layers = nn.ModuleList(TransformerLayer(config, layer_offset + i) for i in range(n))
        self.final_layernorm = build_norm(config) if post_process else None

    def _run(self, start: int, end: int):
        """Layers [start, end) as one function of (hidden, position_ids, padding_mask, ltd)."""
        def run(hidden, position_ids, padding_mask, ltd):
            for layer in self.layers[start:end]:
                hidden = forward_layer(layer, hidden, layer.layer_number, ltd, position_ids, padding_mask,
                                       self.config.sequence_parallel)  # [b, s, h] ([b, s/tp, h] seq. parallel)
            return hidden
        return run

    def _chunks(self, recompute: bool):
        """(start, end, recomputed) runs of local layers covering the stage in order."""
        L, n = len(self.layers), self.config.recompute_num_layers
        if not recompute:
            return [(0, L, False)]
        if self.config.recompute_method == "uniform":  # chunks of n layers; the last may be shorter
            return [(i, min(i + n, L), True) for i in range(0, L, n)]
        n = min(n, L)  # "block": the first n layers of this stage one by one, the rest as usual
        return [(i, i + 1, True) for i in range(n)] + ([(n, L, False)] if n < L else [])

    def forward(
        self,
        hidden: torch.Tensor,  # [b, s, h]
        position_ids: Optional[torch.Tensor] = None,  # [b, s]
        padding_mask: Optional[torch.Tensor] = None,  # [b, s]
        ltd: Optional[RandomLTDState] = None,  # this micro-batch's dropping plan; None = full sequence
    ) -> torch.Tensor:
        ltd = ltd if self.training else None  # evaluation always sees every token
        # the checkpoint is reentrant: parameter grads reach it only through an input that requires grad
        recompute = (self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
                     and hidden.requires_grad)
        for start, end, recomputed in self._chunks(recompute):
            run = self._run(start, end)
            if recomputed:
                hidden = checkpoint(run, hidden, others=(position_ids, padding_mask, ltd))  # [b, s, h]
            else:
                hidden = run(hidden, position_ids, padding_mask, ltd)  # [b, s, h]
        if self.final_layernorm is not None:
            hidden = self.final_layernorm(hidden)
        return hidden
