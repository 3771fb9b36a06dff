"""Grouped-query attention and partial rotary embeddings against references computed another way:
key/value heads expanded per group and run as plain multi-head attention, and RoPE on a slice."""

import re

import pytest
import torch
import torch.nn.functional as F

from megatron.checkpoint.model_args import args_from_transformer_config, transformer_config_from_args
from megatron.core.errors import UserError
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.rope import apply_rope, rope_cos_sin


def cfg(**kw):
    base = dict(num_layers=2, hidden_size=48, num_attention_heads=6, seq_length=16, vocab_size=64,
                attention_dropout=0.0, hidden_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def perturbed(c):
    torch.manual_seed(0)
    attn = SelfAttention(c).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
    return attn


def reference(attn, x, position_ids):
    """Megatron's grouped rows [G, nh/G + 2, hd] read group by group, k/v repeated for each group's
    query heads, then plain SDPA over nh heads."""
    c = attn.config
    b, n, _ = x.shape
    nh, G, hd = c.num_attention_heads, c.num_query_groups, c.head_dim
    nq = nh // G
    qkv = F.linear(x, attn.linear_qkv.weight, attn.linear_qkv.bias)  # [b, n, G*(nq+2)*hd]
    rows = qkv.view(b, n, G, nq + 2, hd)
    q = torch.stack([rows[:, :, g, j] for g in range(G) for j in range(nq)], dim=1)  # [b, nh, n, hd]
    k = torch.stack([rows[:, :, g, nq] for g in range(G) for _ in range(nq)], dim=1)  # [b, nh, n, hd]
    v = torch.stack([rows[:, :, g, nq + 1] for g in range(G) for _ in range(nq)], dim=1)
    if c.position_embedding_type == "rope":
        rd = c.rotary_dim
        cos, sin = rope_cos_sin(position_ids, rd, c.rotary_base, q.dtype)
        q = torch.cat([apply_rope(q[..., :rd], cos, sin), q[..., rd:]], dim=-1)
        k = torch.cat([apply_rope(k[..., :rd], cos, sin), k[..., rd:]], dim=-1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, nh * hd)
    return F.linear(out, attn.linear_proj.weight, attn.linear_proj.bias)


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("pos_type", ["learned_absolute", "rope"])
def test_gqa_matches_expanded_mha(groups, pos_type):
    c = cfg(num_query_groups=groups, position_embedding_type=pos_type)
    attn = perturbed(c)
    hd = c.head_dim
    assert attn.linear_qkv.weight.shape == ((6 + 2 * groups) * hd, 48)  # rows [G, nh/G + 2, hd]
    x = torch.randn(2, 10, 48)
    pos = torch.arange(10).expand(2, 10) * 3
    torch.testing.assert_close(attn(x, pos), reference(attn, x, pos), atol=1e-5, rtol=1e-5)


def test_one_group_per_head_is_the_mha_layout_exactly():
    x, pos = torch.randn(2, 10, 48), torch.arange(10).expand(2, 10)
    mha, gqa = perturbed(cfg(position_embedding_type="rope")), perturbed(cfg(position_embedding_type="rope",
                                                                             num_query_groups=6))
    assert mha.config.num_query_groups == 6 and mha.linear_qkv.weight.shape == (3 * 48, 48)
    for a, b in zip(mha.state_dict().values(), gqa.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(mha(x, pos), gqa(x, pos))
    torch.testing.assert_close(mha(x, pos), reference(mha, x, pos), atol=1e-5, rtol=1e-5)


def test_partial_rotary_rotates_only_the_leading_dims():
    c = cfg(position_embedding_type="rope", rotary_percent=0.5)
    assert c.rotary_dim == 4  # head_dim 8
    q = torch.randn(2, 3, 5, 8)
    pos = torch.arange(5).expand(2, 5)
    cos, sin = rope_cos_sin(pos, c.rotary_dim, c.rotary_base, q.dtype)  # [b, 1, n, 4]
    out = apply_rope(q, cos, sin)
    assert torch.equal(out[..., 4:], q[..., 4:])
    # the leading 4 dims: RoPE with a 4-dim frequency table (Megatron's rotary dim), as complex rotation
    freqs = 10000 ** (-torch.arange(2, dtype=torch.float64) * 2 / 4)
    rot = torch.polar(torch.ones(2, 5, 2, dtype=torch.float64), pos.double()[..., None] * freqs)[:, None]
    z = torch.complex(q[..., :2].double(), q[..., 2:4].double()) * rot
    torch.testing.assert_close(out[..., :4], torch.cat([z.real, z.imag], -1).float(), atol=1e-5, rtol=1e-5)
    attn = perturbed(cfg(position_embedding_type="rope", rotary_percent=0.5, num_query_groups=2))
    x = torch.randn(2, 10, 48)
    pos = torch.arange(10).expand(2, 10)
    torch.testing.assert_close(attn(x, pos), reference(attn, x, pos), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw, needle", [
    (dict(num_query_groups=4), "--num-attention-heads 6 is not divisible by --num-query-groups 4"),
    (dict(num_query_groups=0), "--num-query-groups must be a positive integer"),
    (dict(rotary_percent=0.0), "--rotary-percent must be in (0, 1]"),
    (dict(position_embedding_type="rope", rotary_percent=0.4), "even, nonzero rotated dimension"),
])
def test_config_refuses(kw, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        cfg(**kw)


def test_checkpoint_args_round_trip():
    c = cfg(num_query_groups=2, rotary_percent=0.5, position_embedding_type="rope")
    args = args_from_transformer_config(c)
    assert args["group_query_attention"] and args["num_query_groups"] == 2 and args["rotary_percent"] == 0.5
    assert transformer_config_from_args({**args, "padded_vocab_size": 64}) == c
    mha = args_from_transformer_config(cfg())
    assert not mha["group_query_attention"]
    # Megatron saves num_query_groups (default 1) without GQA too: it does not count then
    assert transformer_config_from_args({**mha, "num_query_groups": 1, "padded_vocab_size": 64}).num_query_groups == 6


def test_checkpoint_with_other_groups_does_not_fit():
    from megatron.checkpoint.model_args import check_model_flags

    gqa = {"group_query_attention": True, "num_query_groups": 2}
    with pytest.raises(UserError, match="--num-query-groups 2 in the checkpoint, 1 here"):
        check_model_flags(gqa, {**gqa, "num_query_groups": 1}, "ckpt")
    with pytest.raises(UserError, match="--group-query-attention True in the checkpoint, False here"):
        check_model_flags(gqa, {"group_query_attention": False, "num_query_groups": None}, "ckpt")
    check_model_flags({"group_query_attention": False, "num_query_groups": 1},  # Megatron's unused default
                      {"group_query_attention": False, "num_query_groups": None}, "ckpt")
