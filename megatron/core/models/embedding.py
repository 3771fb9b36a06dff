"""The input embedding shared by GPT and BERT: word (vocab-parallel) + learned position + token type.

Positions are added here, before layer 0, so tokens that random-LTD later drops still carry their true
positions. BERT adds a token-type embedding (segment A = 0, B = 1); GPT has none (`num_tokentypes=0`
creates no parameter, so GPT checkpoints are unchanged).

Under sequence parallelism the sum is split along the sequence (each TP rank keeps its chunk `[b, s/tp,
h]`, Megatron's order with learned positions) and the dropout on the chunk draws from the tracker's
per-rank stream.

Parameter names follow megatron-core: `embedding.word_embeddings.weight`,
`embedding.position_embeddings.weight`, `embedding.tokentype_embeddings.weight`.
"""

from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

from megatron.core.tensor_parallel import (
    VocabParallelEmbedding, get_rng_tracker, scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.config import TransformerConfig


class Embedding(nn.Module):
    def __init__(self, config: TransformerConfig, num_tokentypes: int = 0):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding_type == "learned_absolute" else None
        )
        self.tokentype_embeddings = nn.Embedding(num_tokentypes, config.hidden_size) if num_tokentypes else None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.fp32_residual = config.fp32_residual_connection
        self.sequence_parallel = config.sequence_parallel

    def forward(
        self,
        tokens: torch.Tensor,  # [b, s]
        position_ids: torch.Tensor,  # [b, s]
        token_types: Optional[torch.Tensor] = None,  # [b, s], ignored without a token-type table
    ) -> torch.Tensor:
        x = self.word_embeddings(tokens)  # [b, s, h]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)  # [b, s, h]
        if self.tokentype_embeddings is not None:
            assert token_types is not None, "a model with token types needs token_types [b, s]"
            x = x + self.tokentype_embeddings(token_types)  # [b, s, h]
        if self.fp32_residual:
            x = x.float()  # [b, s, h] fp32: the residual stream starts here
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)  # [b, s/tp, h]
        with get_rng_tracker().fork() if self.sequence_parallel else nullcontext():
            return self.dropout(x)  # [b, s, h], or [b, s/tp, h]
