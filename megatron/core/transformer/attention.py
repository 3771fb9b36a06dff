"""Multi-head self-attention through `scaled_dot_product_attention`.

The layer sees whatever tokens it is given (`n` of them: all `s`, or the `r` kept by random-LTD) plus
their position ids and an optional key padding mask, so nothing here knows about token dropping. Kept
tokens are in original order, so causal attention over the subset is the plain lower-triangular mask and
the fused `is_causal` path applies.

Selective recomputation (`recompute_granularity="selective"`) recomputes only the core attention,
softmax(QK^T)V with its dropout, in backward; see docs/training.md for why that saves little with SDPA.

Attention dropout draws from the tracker's 'model-parallel-rng' stream (each TP rank its own heads' masks),
so it runs under `get_rng_tracker().fork()`; without a draw (dropout 0, evaluation) nothing is forked. The
fork and the recomputation swap generator states, so under `--torch-compile` that core attention runs
outside the compiled graph (a graph break); attention without dropout stays inside it.

QKV weight rows are grouped per query group, as in Megatron: `[G, nh/G + 2, hd]` x h, i.e. each group's
nh/G query heads, then its one key head, then its one value head. Without grouped-query attention G = nh
and this is `[nh, 3, hd]` (q, k, v per head). The tensor-parallel split is a contiguous slice of rows:
each TP rank holds `G/tp` whole groups (column-parallel QKV, local attention, row-parallel output
projection with one all-reduce).

Glossary: `nh` query heads and `ng` query groups (key/value heads) on this TP rank, `nq = nh/ng` query
heads per group, `hd` head dimension, `n` tokens the layer sees, `b` micro batch, `h` hidden.
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
    if dropout == 0:  # nothing drawn: nothing to fork (and nothing a compiled graph must break on)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    # Attention probabilities are split by heads across TP ranks: their dropout must differ per rank.
    with get_rng_tracker().fork():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


@torch.compiler.disable
def core_attention_outside_graph(q, k, v, mask, dropout: float, causal: bool, recompute: bool) -> torch.Tensor:
    """`core_attention` (recomputed in backward if asked) where it swaps RNG states: never inside a
    compiled graph."""
    if recompute:
        out = checkpoint(core_attention, q, k, v, others=(mask, dropout, causal))  # [b, nh, n, hd]
    else:
        out = core_attention(q, k, v, mask, dropout, causal)  # [b, nh, n, hd]
    torch._dynamo.maybe_mark_dynamic(out, 2)  # the graph resuming after this call: any n
    return out


class SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        h, tp = config.hidden_size, parallel_state.get_tensor_model_parallel_world_size()
        if config.num_attention_heads % tp:
            raise UserError(f"--num-attention-heads {config.num_attention_heads} is not divisible by "
                            f"--tensor-model-parallel-size {tp}")
        if config.num_query_groups % tp:
            raise UserError(f"--num-query-groups {config.num_query_groups} is not divisible by "
                            f"--tensor-model-parallel-size {tp}; each rank holds whole query groups")
        self.local_heads = config.num_attention_heads // tp
        self.local_groups = config.num_query_groups // tp
        qkv_size = (config.num_attention_heads + 2 * config.num_query_groups) * config.head_dim  # 3h for MHA
        sp = config.sequence_parallel
        self.linear_qkv = ColumnParallelLinear(h, qkv_size, bias=config.add_bias_linear, sequence_parallel=sp)
        self.linear_proj = RowParallelLinear(h, h, bias=config.add_bias_linear, sequence_parallel=sp)

    def forward(
        self,
        x: torch.Tensor,  # [b, n, h]; sequence parallel: this rank's chunk [b, n/tp, h]
        position_ids: Optional[torch.Tensor] = None,  # [b, n], all n tokens
        padding_mask: Optional[torch.Tensor] = None,  # [b, n], True = padded key
    ) -> torch.Tensor:
        cfg = self.config
        nh, ng, hd = self.local_heads, self.local_groups, cfg.head_dim  # on this tensor-parallel rank
        nq = nh // ng  # query heads per group
        qkv = self.linear_qkv(x)  # [b, n, ng * (nq + 2) * hd]: the whole sequence (gathered if sequence parallel)
        b, n = qkv.shape[:2]
        qkv = qkv.view(b, n, ng, nq + 2, hd)  # [b, n, ng, nq + 2, hd]
        q, k, v = qkv.split([nq, 1, 1], dim=3)  # [b, n, ng, nq, hd], [b, n, ng, 1, hd] x 2
        q = q.reshape(b, n, nh, hd).transpose(1, 2)  # [b, nh, n, hd]
        k, v = k.squeeze(3).transpose(1, 2), v.squeeze(3).transpose(1, 2)  # each [b, ng, n, hd]
        if cfg.position_embedding_type == "rope":
            assert position_ids is not None, "RoPE needs position ids"
            cos, sin = rope_cos_sin(position_ids, cfg.rotary_dim, cfg.rotary_base, q.dtype)  # [b, 1, n, rd]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if nq > 1:  # grouped-query attention: each key/value head serves its group's nq query heads
            k, v = k.repeat_interleave(nq, dim=1), v.repeat_interleave(nq, dim=1)  # each [b, nh, n, hd]
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
        recompute = cfg.recompute_granularity == "selective" and self.training and torch.is_grad_enabled()
        if recompute or dropout > 0:  # RNG states are swapped: the fork, the recompute's snapshot
            out = core_attention_outside_graph(q, k, v, mask, dropout, causal, recompute)  # [b, nh, n, hd]
        else:  # no draw: inside the compiled graph
            out = core_attention(q, k, v, mask, 0.0, causal)  # [b, nh, n, hd]
        out = out.transpose(1, 2).flatten(2)  # [b, n, h/tp]
        return self.linear_proj(out)  # [b, n, h], or [b, n/tp, h] sequence parallel

