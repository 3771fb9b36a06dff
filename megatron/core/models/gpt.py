"""GPT: embeddings -> transformer block -> final norm -> LM head (tied to the word embeddings by default).

Parameter names follow megatron-core (`embedding.word_embeddings.weight`,
`decoder.layers.0.self_attention.linear_qkv.weight`, `output_layer.weight`, ...) so checkpoints read
familiarly to Megatron users.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.transformer.attention import scaled_init_std
from megatron.core.transformer.block import TransformerBlock
from megatron.core.transformer.config import TransformerConfig


class Embedding(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
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
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embedding = Embedding(config)
        self.decoder = TransformerBlock(config)
        self.output_layer = (
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            if config.untie_embeddings_and_output_weights else None
        )
        self.reset_parameters()

    def reset_parameters(self):
        """Megatron's init: N(0, std) weights, output projections N(0, std/sqrt(2L)), zero biases, unit norms."""
        std, out_std = self.config.init_method_std, scaled_init_std(self.config)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("layernorm.weight") else nn.init.zeros_(p)
            elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def output_weight(self) -> torch.Tensor:
        return self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight

    def forward(
        self,
        tokens: torch.Tensor,  # [b, s]
        position_ids: Optional[torch.Tensor] = None,  # [b, s]
        labels: Optional[torch.Tensor] = None,  # [b, s]
        ltd=None,
    ) -> torch.Tensor:
        """Per-token loss `[b, s]` (fp32) when labels are given, else logits `[b, s, V]`."""
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)  # [b, s]
        hidden = self.embedding(tokens, position_ids)  # [b, s, h]
        hidden = self.decoder(hidden, position_ids=position_ids, ltd=ltd)  # [b, s, h]
        logits = F.linear(hidden, self.output_weight())  # [b, s, V]
        if labels is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")  # [b*s]
        return loss.view_as(labels)  # [b, s]
