"""BERT: embeddings (word + position + token type) -> bidirectional encoder -> MLM head and SOP head.

    hidden = encoder(embedding(tokens, positions, types), padding_mask)     # [b, s, h], final norm applied
    mlm    = layer_norm(gelu(dense(hidden))) @ word_embeddings^T + bias      # [b, s, V/tp], tied to the input
    sop    = binary_head(tanh(pooler.dense(hidden[:, 0])))                  # [b, 2], on the first token

The encoder is the GPT block with `causal=False` plus a key padding mask (`[b, s]` bool, True = padded).
Random-LTD needs nothing BERT-specific: in a dropping layer the block gathers each sample's padding mask
with that sample's kept indices (`random_ltd.routing`), so attention among the kept tokens sees exactly
their own padding. No token is special ([CLS], [SEP], [MASK] and [PAD] drop like any other), and the first
and last layers always run on all tokens, so the SOP head reads a [CLS] that went through the last layer.

Stages, tied embeddings across pipeline stages and layout-free init come from `LanguageModule`, as for
GPT. Tensor parallel: the MLM logits are column-parallel over the vocabulary (the tied embedding shard
plus a vocab-parallel bias) and go straight into the vocab-parallel cross entropy; the small heads
(`lm_head.dense`, `pooler`, `binary_head`) are replicated on every TP rank.

Parameter names follow megatron-core's BertModel: `embedding.tokentype_embeddings.weight`,
`encoder.layers.0.…`, `encoder.final_layernorm.…`, `lm_head.dense.…`, `lm_head.layer_norm.…`,
`output_layer.bias` (and `output_layer.weight` on a last stage that keeps its own copy), `pooler.dense.…`,
`binary_head.…`.
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.models.embedding import Embedding
from megatron.core.models.language_module import LanguageModule
from megatron.core.tensor_parallel import (
    column_parallel_linear, gather_from_sequence_parallel_region, gather_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy, vocab_parallel_top1_correct,
)
from megatron.core.transformer.block import TransformerBlock
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.norm import build_norm


class BertOutput(NamedTuple):
    """What the last stage returns. With labels: `lm_loss` [b, s] fp32 per token and `mlm_correct` [b, s]
    bool (top-1 prediction equals the label); without: `lm_logits` [b, s, V]. `binary_logits` [b, 2] when
    the model has the SOP head. Fields that do not apply are None."""

    lm_loss: Optional[torch.Tensor] = None
    mlm_correct: Optional[torch.Tensor] = None
    lm_logits: Optional[torch.Tensor] = None
    binary_logits: Optional[torch.Tensor] = None


class BertLMHead(nn.Module):
    """The transform before the tied output projection: dense h -> h, GELU, norm (`--normalization`)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = build_norm(config)
        for p in self.layer_norm.parameters():  # the heads see the gathered sequence: complete gradients
            p.sequence_parallel = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [b, s, h]
        return self.layer_norm(F.gelu(self.dense(hidden)))  # [b, s, h]


class Pooler(nn.Module):
    """tanh(dense(first token)): the sequence summary the SOP head and fine-tuning classifiers read."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [b, s, h]
        return torch.tanh(self.dense(hidden[:, 0]))  # [b, h]


class BertModel(LanguageModule):
    """One pipeline stage of BERT (the whole model with the defaults).

    `add_binary_head` adds the pooler and the 2-way SOP head (`--bert-no-binary-head` drops both, and the
    token-type table with them, as Megatron does); `add_lm_head=False` leaves only the encoder and the
    pooler, for fine-tuning (`encode`).
    """

    def __init__(self, config: TransformerConfig, pre_process: bool = True, post_process: bool = True,
                 layer_offset: int = 0, num_local_layers: Optional[int] = None, seed: int = 1234,
                 add_binary_head: bool = True, add_lm_head: bool = True, add_pooler: Optional[bool] = None,
                 num_tokentypes: Optional[int] = None):
        assert not config.causal, "BERT is bidirectional: build its TransformerConfig with causal=False"
        super().__init__(config, pre_process, post_process, layer_offset, block_name="encoder")
        add_pooler = add_binary_head if add_pooler is None else add_pooler
        num_tokentypes = (2 if add_binary_head else 0) if num_tokentypes is None else num_tokentypes
        self.embedding = Embedding(config, num_tokentypes) if pre_process else None
        self.encoder = TransformerBlock(config, layer_offset, num_local_layers, post_process=post_process)
        last = post_process  # the heads live on the last stage only
        self.lm_head = BertLMHead(config) if last and add_lm_head else None
        self.output_layer = self.make_output_layer(bias=True) if last and add_lm_head else None
        self.pooler = Pooler(config.hidden_size) if last and (add_pooler or add_binary_head) else None
        self.binary_head = nn.Linear(config.hidden_size, 2) if last and add_binary_head else None
        self.reset_parameters(seed)

    def encode(
        self,
        tokens: torch.Tensor,  # [b, s]
        token_types: Optional[torch.Tensor] = None,  # [b, s]
        padding_mask: Optional[torch.Tensor] = None,  # [b, s] bool, True = padded
        position_ids: Optional[torch.Tensor] = None,  # [b, s]
        ltd=None,
    ) -> torch.Tensor:
        """This stage's encoder output: [b, s, h] (after the final norm on the last stage; sequence parallel:
        this rank's chunk [b, s/tp, h] on the other stages, the gathered sequence on the last, whose heads
        are replicated)."""
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)  # [b, s]
        if self.pre_process:
            hidden = self.embedding(tokens, position_ids, token_types)  # [b, s, h]
        else:
            hidden = self.input_tensor  # [b, s, h]
        hidden = self.encoder(hidden, position_ids=position_ids, padding_mask=padding_mask, ltd=ltd)  # [b, s, h]
        if self.post_process and self.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)  # [b, s, h]
        return hidden

    def forward(
        self,
        tokens: torch.Tensor,  # [b, s]
        token_types: Optional[torch.Tensor] = None,  # [b, s]
        padding_mask: Optional[torch.Tensor] = None,  # [b, s] bool, True = padded
        labels: Optional[torch.Tensor] = None,  # [b, s], any value (e.g. -1) where not predicted
        position_ids: Optional[torch.Tensor] = None,  # [b, s]
        ltd=None,
    ):
        """Other stages: hidden states [b, s, h] for the next stage. Last stage: a `BertOutput`."""
        hidden = self.encode(tokens, token_types, padding_mask, position_ids, ltd)  # [b, s, h]
        if not self.post_process:
            return hidden
        out = {}
        if self.binary_head is not None:
            out["binary_logits"] = self.binary_head(self.pooler(hidden))  # [b, 2]
        if self.lm_head is not None:
            x = self.lm_head(hidden)  # [b, s, h]
            logits = column_parallel_linear(x, self.output_weight(), self.output_layer.bias)  # [b, s, V/tp]
            if labels is None:
                out["lm_logits"] = gather_from_tensor_model_parallel_region(logits)  # [b, s, V]
            else:
                target = labels.clamp(min=0)  # [b, s]; unmasked positions are zeroed by the loss mask
                out["lm_loss"] = vocab_parallel_cross_entropy(logits.float(), target)  # [b, s]
                out["mlm_correct"] = vocab_parallel_top1_correct(logits.detach(), target)  # [b, s]
        return BertOutput(**out)
