"""Attention against a naive softmax(QK^T/sqrt(d)) implementation written out by hand."""

import math

import pytest
import torch

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.rope import apply_rope, rope_cos_sin


def cfg(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=64,
                attention_dropout=0.0, hidden_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def naive_attention(attn: SelfAttention, x, position_ids=None, padding_mask=None):
    c = attn.config
    b, n, h = x.shape
    nh, hd = c.num_attention_heads, c.head_dim
    qkv = x @ attn.linear_qkv.weight.T + attn.linear_qkv.bias
    qkv = qkv.view(b, n, nh, 3, hd)
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # [b, n, nh, hd]
    if c.position_embedding_type == "rope":
        # Independent RoPE: rotate pairs (i, i + hd/2) by angle pos * base^(-2i/hd), via complex numbers.
        half = hd // 2
        freqs = c.rotary_base ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
        ang = position_ids.double()[..., None] * freqs  # [b, n, half]
        rot = torch.polar(torch.ones_like(ang), ang)[:, :, None, :]  # [b, n, 1, half]

        def rope(t):
            z = torch.complex(t[..., :half].double(), t[..., half:].double()) * rot
            return torch.cat([z.real, z.imag], dim=-1).to(t.dtype)

        q, k = rope(q), rope(k)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    allowed = torch.ones(n, n, dtype=torch.bool)
    if c.causal:
        allowed = allowed.tril()
    allowed = allowed[None, None].expand(b, 1, n, n)
    if padding_mask is not None:
        allowed = allowed & ~padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, n, h)
    return out @ attn.linear_proj.weight.T + attn.linear_proj.bias


@pytest.mark.parametrize("pos_type", ["learned_absolute", "rope"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_naive(pos_type, causal):
    torch.manual_seed(0)
    c = cfg(position_embedding_type=pos_type, causal=causal)
    attn = SelfAttention(c).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    x = torch.randn(3, 10, 32)
    pos = torch.randint(0, 100, (3, 10)).sort(dim=1).values
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 7:] = True
    for padding in (None, pad):
        got = attn(x, pos, padding)
        want = naive_attention(attn, x, pos, padding)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hd = 16
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), hd, 10000, torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), hd, 10000, torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(103, 100), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(score(0, 0), (q * k).sum(), atol=1e-6, rtol=1e-6)
