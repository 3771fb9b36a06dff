"""GPT: embeddings -> transformer block -> final norm -> LM head (tied to the word embeddings by default).

One `GPTModel` is one pipeline stage (see `language_module.py` for the stage structure and the tied
output weight across stages). Under tensor parallelism the vocabulary is split across ranks
(vocab-parallel embedding, column-parallel logits, vocab-parallel cross entropy): the full logits are
never gathered for the loss.

Parameter names follow megatron-core (`embedding.word_embeddings.weight`,
`decoder.layers.0.self_attention.linear_qkv.weight`, `output_layer.weight`, ...); layer indices in a
stage's state dict are local to the stage, as in Megatron.
"""

from typing import Optional

import torch

from megatron.core.models.embedding import Embedding
from megatron.core.models.language_module import LanguageModule
from megatron.core.tensor_parallel import (
    column_parallel_linear, gather_from_tensor_model_parallel_region, vocab_parallel_cross_entropy,
)
from megatron.core.transformer.block import TransformerBlock
from megatron.core.transformer.config import TransformerConfig


class GPTModel(LanguageModule):
    def __init__(self, config: TransformerConfig, pre_process: bool = True, post_process: bool = True,
                 layer_offset: int = 0, num_local_layers: Optional[int] = None, seed: int = 1234):
        super().__init__(config, pre_process, post_process, layer_offset, block_name="decoder")
        self.embedding = Embedding(config) if pre_process else None
        self.decoder = TransformerBlock(config, layer_offset, num_local_layers, post_process=post_process)
        self.output_layer = self.make_output_layer()
        self.reset_parameters(seed)

    def forward(
        self,
        tokens: Optional[torch.Tensor],  # [b, s]
        position_ids: Optional[torch.Tensor] = None,  # [b, s]
        labels: Optional[torch.Tensor] = None,  # [b, s]
        ltd=None,
    ) -> torch.Tensor:
        """Last stage: per-token loss `[b, s]` (fp32) with labels, else logits `[b, s, V]`. Other stages:
        hidden states `[b, s, h]` for the next stage."""
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)  # [b, s]
        if self.pre_process:
            hidden = self.embedding(tokens, position_ids)  # [b, s, h]
        else:
            hidden = self.input_tensor  # [b, s, h]
        hidden = self.decoder(hidden, position_ids=position_ids, ltd=ltd)  # [b, s, h] ([b, s/tp, h] seq. parallel)
        if not self.post_process:
            return hidden
        # [b, s, V/tp]; sequence parallel: the [b, s/tp, h] chunks are gathered inside
        logits = column_parallel_linear(hidden, self.output_weight(), sequence_parallel=self.config.sequence_parallel)
        if labels is None:
            return gather_from_tensor_model_parallel_region(logits)  # [b, s, V]
        return vocab_parallel_cross_entropy(logits.float(), labels)  # [b, s]
