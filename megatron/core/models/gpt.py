"""GPT: embeddings -> transformer block -> final norm -> LM head (tied to the word embeddings by default).

One `GPTModel` is one pipeline stage: the first stage (`pre_process`) owns the embeddings, the last
(`post_process`) the final norm, LM head and loss; a middle stage receives its input through
`set_input_tensor`. With one stage it is the whole model. Under tensor parallelism the vocabulary is
split across ranks (vocab-parallel embedding, column-parallel logits, vocab-parallel cross entropy): the
full logits are never gathered for the loss.

Tied embeddings across stages: the last stage keeps its own copy of the word-embedding matrix as
`output_layer.weight`, initialized from the same key as `embedding.word_embeddings.weight` (so the two
start equal) and marked `shared_embedding`; the trainer all-reduces their gradients over the embedding
group every step, so they stay equal.

Parameter names follow megatron-core (`embedding.word_embeddings.weight`,
`decoder.layers.0.self_attention.linear_qkv.weight`, `output_layer.weight`, ...); layer indices in a
stage's state dict are local to the stage, as in Megatron.
"""

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state
from megatron.core.models.init import init_parameters
from megatron.core.tensor_parallel import (
    VocabParallelEmbedding, copy_to_tensor_model_parallel_region, divide, gather_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.transformer.block import TransformerBlock
from megatron.core.transformer.config import TransformerConfig


class Embedding(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding_type == "learned_absolute" else None
        )
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens)  # [b, s, h]
        if self.position_embeddings is not None:
            # Added before layer 0, so tokens dropped later still carry their true positions.
            x = x + self.position_embeddings(position_ids)  # [b, s, h]
        return self.dropout(x)


class GPTModel(nn.Module):
    def __init__(self, config: TransformerConfig, pre_process: bool = True, post_process: bool = True,
                 layer_offset: int = 0, num_local_layers: Optional[int] = None, seed: int = 1234):
        super().__init__()
        self.config = config
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_offset = layer_offset
        self.embedding = Embedding(config) if pre_process else None
        self.decoder = TransformerBlock(config, layer_offset, num_local_layers, post_process=post_process)
        self.share_embeddings = not config.untie_embeddings_and_output_weights
        self.output_layer = None
        if post_process and (not self.share_embeddings or not pre_process):
            tp = parallel_state.get_tensor_model_parallel_world_size()
            rows = divide(config.vocab_size, tp, "the padded vocabulary (see --make-vocab-size-divisible-by)")
            weight = nn.Parameter(torch.empty(rows, config.hidden_size))
            weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride = True, 0, 1
            weight.shared_embedding = self.share_embeddings  # a copy of the first stage's embedding
            self.output_layer = nn.Module()
            self.output_layer.weight = weight
        self.input_tensor = None
        self.reset_parameters(seed)

    def global_param_name(self, name: str) -> str:
        """The layout-free name: global layer numbers; a tied output copy shares the embedding's key."""
        name = re.sub(r"^decoder\.layers\.(\d+)\.",
                      lambda m: f"decoder.layers.{int(m.group(1)) + self.layer_offset}.", name)
        if name == "output_layer.weight" and self.share_embeddings:
            return "embedding.word_embeddings.weight"
        return name

    def reset_parameters(self, seed: int = 1234) -> None:
        init_parameters(self, self.global_param_name, self.config.init_method_std, self.config.num_layers, seed)

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        """The hidden states a middle or last stage receives from the previous stage: [b, s, h]."""
        self.input_tensor = tensor

    def output_weight(self) -> torch.Tensor:
        return self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight

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
        hidden = self.decoder(hidden, position_ids=position_ids, ltd=ltd)  # [b, s, h]
        if not self.post_process:
            return hidden
        hidden = copy_to_tensor_model_parallel_region(hidden)  # [b, s, h]
        logits = F.linear(hidden, self.output_weight())  # [b, s, V/tp]
        if labels is None:
            return gather_from_tensor_model_parallel_region(logits)  # [b, s, V]
        return vocab_parallel_cross_entropy(logits.float(), labels)  # [b, s]
