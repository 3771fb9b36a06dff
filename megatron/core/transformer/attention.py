"""Multi-head self-attention through `scaled_dot_product_attention`.

The layer sees whatever tokens it is given (`n` of them: all `s`, or the `r` kept by random-LTD) plus
their position ids and an optional key padding mask, so nothing here knows about token dropping. Kept
tokens are in original order, so causal attention over the subset is the plain lower-triangular mask and
the fused `is_causal` path applies.

Selective recomputation (`recompute_granularity="selective"`) recomputes only the core attention,
softmax(QK^T)V with its dropout, in backward; see docs/training.md for why that saves little with SDPA.

QKV weight rows are grouped per head (`[nh, 3, hd]`), as in Megatron, so the tensor-parallel split by
heads is a contiguous slice of rows: each TP rank holds `nh/tp` whole heads (column-parallel QKV, local
attention, row-parallel output projection with one all-reduce).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state
from megatron.core.errors import UserError
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, checkpoint, get_rng_tracker
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.rope import apply_rope, rope_cos_sin


def core_attention(q, k, v, mask, dropout: float, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v with dropout on the probabilities; q, k, v `[b, nh, n, hd]`."""
    # Attention probabilities are split by heads across TP ranks: their dropout must differ per rank.
    with get_rng_tracker().fork():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


class SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        h, tp = config.hidden_size, parallel_state.get_tensor_model_parallel_world_size()
        if config.num_attention_heads % tp:
            raise UserError(f"--num-attention-heads {config.num_attention_heads} is not divisible by "
                            f"--tensor-model-parallel-size {tp}")
        self.local_heads = config.num_attention_heads // tp
        self.linear_qkv = ColumnParallelLinear(h, 3 * h, bias=config.add_bias_linear)
        self.linear_proj = RowParallelLinear(h, h, bias=config.add_bias_linear)

    def forward(
        self,
        x: torch.Tensor,  # [b, n, h]
        position_ids: Optional[torch.Tensor] = None,  # [b, n]
        padding_mask: Optional[torch.Tensor] = None,  # [b, n], True = padded key
    ) -> torch.Tensor:
        cfg = self.config
        b, n, _ = x.shape
        nh, hd = self.local_heads, cfg.head_dim  # nh: heads on this tensor-parallel rank
        qkv = self.linear_qkv(x).view(b, n, nh, 3, hd)  # [b, n, nh, 3, hd]
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [b, nh, n, hd]
        if cfg.position_embedding_type == "rope":
            assert position_ids is not None, "RoPE needs position ids"
            cos, sin = rope_cos_sin(position_ids, hd, cfg.rotary_base, q.dtype)  # [b, 1, n, hd]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dropout = cfg.attention_dropout if self.training else 0.0
        mask, causal = None, cfg.causal
        if padding_mask is not None:
            # A sample whose n keys are all padding (random-LTD can keep only the padding of a short
            # sample) would softmax over nothing: NaN in older torch releases (newer kernels return
            # zeros or, with cuDNN, other finite values), and a NaN spreads to the whole batch. Let it
            # attend to all of them instead: its queries are then all padding too, whose outputs nothing
            # reads.
            attend = ~padding_mask | padding_mask.all(dim=-1, keepdim=True)  # [b, n]
            mask = attend[:, None, None, :]  # [b, 1, 1, n], True = may attend
            if causal:
                mask = mask & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # [b, 1, n, n]
            causal = False
        if cfg.recompute_granularity == "selective" and self.training and torch.is_grad_enabled():
            out = checkpoint(core_attention, q, k, v, others=(mask, dropout, causal))  # [b, nh, n, hd]
        else:
            out = core_attention(q, k, v, mask, dropout, causal)  # [b, nh, n, hd]
        out = out.transpose(1, 2).reshape(b, n, nh * hd)  # [b, n, h/tp]
        return self.linear_proj(out)  # [b, n, h]

