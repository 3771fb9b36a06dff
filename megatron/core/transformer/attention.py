"""Multi-head self-attention through `scaled_dot_product_attention`.

The layer sees whatever tokens it is given (`n` of them: all `s`, or the `r` kept by random-LTD) plus
their position ids and an optional key padding mask, so nothing here knows about token dropping. Kept
tokens are in original order, so causal attention over the subset is the plain lower-triangular mask and
the fused `is_causal` path applies.

QKV weight rows are grouped per head (`[nh, 3, hd]`), as in Megatron, so a later tensor-parallel split
by heads is a contiguous slice of rows.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.rope import apply_rope, rope_cos_sin


class SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.linear_qkv = nn.Linear(h, 3 * h, bias=config.add_bias_linear)
        self.linear_proj = nn.Linear(h, h, bias=config.add_bias_linear)

    def forward(
        self,
        x: torch.Tensor,  # [b, n, h]
        position_ids: Optional[torch.Tensor] = None,  # [b, n]
        padding_mask: Optional[torch.Tensor] = None,  # [b, n], True = padded key
    ) -> torch.Tensor:
        cfg = self.config
        b, n, _ = x.shape
        nh, hd = cfg.num_attention_heads, cfg.head_dim
        qkv = self.linear_qkv(x).view(b, n, nh, 3, hd)  # [b, n, nh, 3, hd]
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [b, nh, n, hd]
        if cfg.position_embedding_type == "rope":
            assert position_ids is not None, "RoPE needs position ids"
            cos, sin = rope_cos_sin(position_ids, hd, cfg.rotary_base, q.dtype)  # [b, 1, n, hd]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dropout = cfg.attention_dropout if self.training else 0.0
        if padding_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=cfg.causal)
        else:
            allowed = ~padding_mask[:, None, None, :]  # [b, 1, 1, n], True = may attend
            if cfg.causal:
                allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # [b, 1, n, n]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(b, n, nh * hd)  # [b, n, h]
        return self.linear_proj(out)  # [b, n, h]


def scaled_init_std(config: TransformerConfig) -> float:
    """Output projections get std / sqrt(2L) (GPT-2 / Megatron), so the residual stream does not grow with depth."""
    return config.init_method_std / math.sqrt(2.0 * config.num_layers)
