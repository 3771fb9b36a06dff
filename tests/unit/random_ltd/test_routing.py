"""Gather -> layer -> scatter: kept rows equal the layer on the extracted sub-sequence, the others bypass."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.random_ltd import RandomLTDState, forward_layer, kept_indices, run_layer_on_kept
from tests.scripts import load_script


class ToyAttention(torch.nn.Module):
    """A one-head attention layer that depends on everything routing must get right: the order and
    positions of tokens (RoPE from position_ids), causality, and the per-sample key padding mask."""

    def __init__(self, h=8, causal=True):
        super().__init__()
        self.qkv = torch.nn.Linear(h, 3 * h)
        self.out = torch.nn.Linear(h, h)
        self.causal = causal
        self.calls = []

    @staticmethod
    def rope(x, pos):  # x [b, n, h], pos [b, n]
        half = x.shape[-1] // 2
        freq = 1.0 / (10.0 ** (torch.arange(half, dtype=x.dtype) / half))  # [h/2]
        ang = pos.to(x.dtype).unsqueeze(-1) * freq  # [b, n, h/2]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], dim=-1)

    def forward(self, x, position_ids=None, padding_mask=None):
        b, n, h = x.shape
        self.calls.append((position_ids, padding_mask))
        pos = torch.arange(n).expand(b, n) if position_ids is None else position_ids  # [b, n]
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [b, n, h] each
        q, k = self.rope(q, pos), self.rope(k, pos)
        allowed = torch.ones(b, n, n, dtype=torch.bool)  # [b, n(query), n(key)]
        if self.causal:
            allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
        if padding_mask is not None:
            allowed = allowed & ~padding_mask.unsqueeze(1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # [b, n, h]
        return x + self.out(y)


def loop_reference(layer, hidden, idx, position_ids, padding_mask):
    """Per-sample Python loop with index_copy: the slow, obvious way."""
    rows = []
    for i in range(hidden.shape[0]):
        keep = idx[i]
        pos = None if position_ids is None else position_ids[i, keep][None]
        pad = None if padding_mask is None else padding_mask[i, keep][None]
        if pos is None:
            pos = keep[None]  # default positions 0..s-1, gathered
        y = layer(hidden[i, keep][None], position_ids=pos, padding_mask=pad)[0]  # [r, h]
        rows.append(hidden[i].index_copy(0, keep, y))  # [s, h]
    return torch.stack(rows)  # [b, s, h]


def make_inputs(b=4, s=16, h=8, r=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, h, generator=g, requires_grad=True)
    idx = kept_indices(seed, 3, torch.arange(b), 1, s, r)  # [b, r]
    position_ids = (torch.arange(s) + 5 * torch.arange(b)[:, None]).contiguous()  # [b, s], per sample
    lengths = torch.tensor([s, s - 2, s - 4, s - 3])[:b]
    padding_mask = torch.arange(s)[None, :] >= lengths[:, None]  # [b, s], padding at the end
    return hidden, idx, position_ids, padding_mask


@pytest.mark.parametrize("causal, use_pos, use_pad", [(True, True, False), (True, False, False), (False, True, True)])
def test_matches_per_sample_loop(causal, use_pos, use_pad):
    torch.manual_seed(0)
    layer = ToyAttention(causal=causal)
    hidden, idx, pos, pad = make_inputs()
    pos = pos if use_pos else None
    pad = pad if use_pad else None
    out = run_layer_on_kept(layer, hidden, idx, pos, pad)  # [b, s, h]
    ref = loop_reference(layer, hidden, idx, pos, pad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    bypass = torch.ones(hidden.shape[:2], dtype=torch.bool).scatter(1, idx, False)  # [b, s]
    assert torch.equal(out[bypass], hidden[bypass]), "bypassed rows are bit-identical"
    assert not torch.allclose(out[~bypass], hidden[~bypass])


def test_layer_sees_gathered_positions_and_mask():
    layer = ToyAttention(causal=False)
    hidden, idx, pos, pad = make_inputs()
    run_layer_on_kept(layer, hidden, idx, pos, pad)
    got_pos, got_pad = layer.calls[-1]
    assert torch.equal(got_pos, torch.stack([pos[i, idx[i]] for i in range(4)]))
    assert torch.equal(got_pad, torch.stack([pad[i, idx[i]] for i in range(4)]))
    run_layer_on_kept(layer, hidden, idx)
    got_pos, got_pad = layer.calls[-1]
    assert torch.equal(got_pos, idx) and got_pad is None, "default positions are the original 0..s-1"


def test_gradients_match_dense_masked_reference():
    torch.manual_seed(0)
    layer = ToyAttention(causal=True)
    hidden, idx, pos, _ = make_inputs()
    upstream = torch.randn(hidden.shape)

    out = run_layer_on_kept(layer, hidden, idx, pos)
    (g_hidden, *g_params) = torch.autograd.grad((out * upstream).sum(), [hidden, *layer.parameters()])

    # dense reference: every row computed, then kept by a mask; the loop gives the kept rows' values
    kept = torch.zeros(hidden.shape[:2]).scatter(1, idx, 1.0).unsqueeze(-1)  # [b, s, 1]
    layer_rows = loop_reference(layer, hidden, idx, pos, None)  # kept rows = layer output
    ref = hidden * (1 - kept) + layer_rows * kept  # [b, s, h]
    (r_hidden, *r_params) = torch.autograd.grad((ref * upstream).sum(), [hidden, *layer.parameters()])

    torch.testing.assert_close(g_hidden, r_hidden, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_params, r_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    bypass = kept.squeeze(-1) == 0
    assert torch.equal(g_hidden[bypass], upstream[bypass]), "identity gradient on bypassed rows"


def test_state_decides_which_layers_drop():
    ids = torch.tensor([4, 9])
    state = RandomLTDState(seed=1, iteration=2, sample_ids=ids, kept_length=6, layers=frozenset({1, 2}))
    assert state.indices_for(0, 16) is None and state.indices_for(3, 16) is None
    assert torch.equal(state.indices_for(2, 16), kept_indices(1, 2, ids, 2, 16, 6))
    assert torch.equal(state.indices_for(1, 16), kept_indices(1, 2, ids, 1, 16, 6))
    assert state.indices_for(2, 16) is state.indices_for(2, 16), "drawn once, reused on recomputation"
    assert torch.equal(state.indices_for(2, 32), kept_indices(1, 2, ids, 2, 32, 6)), "per sequence length"
    assert state.indices_for(2, 6) is None, "r >= s runs the full sequence"


def test_forward_layer_dense_and_dropped_paths():
    torch.manual_seed(0)
    layer = ToyAttention(causal=True)
    hidden, _, pos, _ = make_inputs(b=2)
    dense = layer(hidden, position_ids=pos)
    assert torch.equal(forward_layer(layer, hidden, 1, None, pos), dense), "eval: no state, full sequence"
    state = RandomLTDState(seed=0, iteration=3, sample_ids=torch.arange(2), kept_length=10, layers=frozenset({1}))
    assert torch.equal(forward_layer(layer, hidden, 0, state, pos), dense), "layer outside the LTD set"
    idx = kept_indices(0, 3, torch.arange(2), 1, 16, 10)
    assert torch.equal(forward_layer(layer, hidden, 1, state, pos), run_layer_on_kept(layer, hidden, idx, pos))
    full = RandomLTDState(seed=0, iteration=3, sample_ids=torch.arange(2), kept_length=16, layers=frozenset({1}))
    assert torch.equal(forward_layer(layer, hidden, 1, full, pos), dense)


@pytest.mark.parametrize("pos_type", ["learned_absolute", "rope"])
@pytest.mark.parametrize("causal, padded", [(True, False), (True, True), (False, True)],
                         ids=["causal", "causal-padded", "bidirectional-padded"])
def test_real_layer_matches_dense_run_with_dropped_keys_masked(pos_type, causal, padded):
    """Dropping = the dense layer on all s tokens with the non-kept KEYS masked, its output kept only on the
    kept rows (the other rows pass through): forward and every gradient, in fp64, for megatron's own layer."""
    from megatron.core.transformer.config import TransformerConfig
    from megatron.core.transformer.layer import TransformerLayer

    torch.manual_seed(0)
    b, s, h, r = 3, 16, 32, 6
    cfg = TransformerConfig(num_layers=3, hidden_size=h, num_attention_heads=4, seq_length=s, vocab_size=64,
                            attention_dropout=0.0, hidden_dropout=0.0, position_embedding_type=pos_type,
                            causal=causal)
    layer = TransformerLayer(cfg, 1).double().train()
    for p in layer.parameters():  # larger than the init, so every term of the layer matters
        torch.nn.init.normal_(p, 0.0, 0.2)
    hidden = torch.randn(b, s, h, dtype=torch.float64, requires_grad=True)  # [b, s, h]
    pos = torch.arange(s) + 3 * torch.arange(b)[:, None]  # [b, s], per sample
    idx = kept_indices(5, 2, torch.arange(b), 1, s, r)  # [b, r]
    kept = torch.zeros(b, s, dtype=torch.bool).scatter(1, idx, True)  # [b, s]
    pad = (torch.arange(s)[None, :] >= torch.tensor([s, s - 3, s - 5])[:, None]) if padded else None  # [b, s]
    if pad is not None:
        assert (kept & ~pad).any(dim=1).all(), "every sample keeps a real key (no all-padding special case)"

    out = run_layer_on_kept(layer, hidden, idx, pos, pad)  # [b, s, h]
    masked_keys = ~kept if pad is None else ~kept | pad  # [b, s], True = key not attended
    ref = torch.where(kept[..., None], layer(hidden, position_ids=pos, padding_mask=masked_keys), hidden)

    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    upstream = torch.randn_like(out)
    wrt = [hidden, *layer.parameters()]
    got = torch.autograd.grad((out * upstream).sum(), wrt)
    want = torch.autograd.grad((ref * upstream).sum(), wrt)
    for (name, _), g, w in zip([("hidden", None), *layer.named_parameters()], got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10, msg=name)
    assert got[1].abs().sum() > 0 and not torch.allclose(out[kept], hidden[kept]), "the layer did act"


# ---- the routing pair against the routing it replaced --------------------------------------------------

# The routing before issue 15, kept as the reference (bench/ltd_step_time.py runs it beside the new one):
# `torch.gather`, which saves its whole [b, s, h] input for backward, and an out-of-place `Tensor.scatter`,
# a full copy forward and backward.
old_run_layer_on_kept = load_script("bench/ltd_step_time.py").old_run_layer_on_kept


def _block(recompute=None, pos_type="rope", dropout=0.1):
    from megatron.core.transformer.block import TransformerBlock
    from megatron.core.transformer.config import TransformerConfig

    cfg = TransformerConfig(num_layers=5, hidden_size=32, num_attention_heads=4, seq_length=24, vocab_size=64,
                            hidden_dropout=dropout, attention_dropout=0.0, position_embedding_type=pos_type,
                            recompute_granularity="full" if recompute else None,
                            recompute_method=recompute and recompute[0],
                            recompute_num_layers=recompute and recompute[1])
    torch.manual_seed(0)
    block = TransformerBlock(cfg).train()
    for p in block.parameters():  # the model initialises them; a bare block does not
        torch.nn.init.normal_(p, 0.0, 0.2)
    return block


def _block_step(block, seed_input=1):
    """Forward and backward of a block whose layers 1-3 drop tokens: (output, grads of input and params)."""
    g = torch.Generator().manual_seed(seed_input)
    emb = torch.randn(3, 24, 32, generator=g, requires_grad=True)
    hidden = emb * 1.0  # [b, s, h], a non-leaf like an embedding's output
    pos = torch.arange(24).expand(3, 24)  # [b, s]
    pad = torch.arange(24)[None, :] >= torch.tensor([24, 20, 17])[:, None]  # [b, s]
    ltd = RandomLTDState(seed=3, iteration=5, sample_ids=torch.arange(3), kept_length=8, layers=frozenset({1, 2, 3}))
    torch.manual_seed(7)  # dropout masks: the same draws in both routings
    out = block(hidden, pos, pad, ltd=ltd)  # [b, s, h]
    upstream = torch.randn(out.shape, generator=g)
    block.zero_grad(set_to_none=True)
    (out * upstream).sum().backward()  # .backward: the reentrant checkpoint hands parameters no grad_fn edge
    return out.detach(), [emb.grad, *(p.grad for p in block.parameters())]


@pytest.mark.parametrize("recompute", [None, ("uniform", 1), ("uniform", 2), ("block", 2)],
                         ids=["no-recompute", "uniform-1", "uniform-2", "block-2"])
def test_pair_is_bit_identical_to_gather_and_scatter(monkeypatch, recompute):
    """fp32 outputs and every gradient equal the old routing's bit for bit, chained through three LTD
    layers (the kept rows written in place into the previous layer's output), with dropout, padding and
    RoPE, with and without full recompute (a checkpoint's input must not be overwritten)."""
    from megatron.core.random_ltd import routing

    block = _block(recompute)
    new_out, new_grads = _block_step(block)
    monkeypatch.setattr(routing, "run_layer_on_kept", old_run_layer_on_kept)
    old_out, old_grads = _block_step(block)
    assert torch.equal(new_out, old_out)
    for new, old in zip(new_grads, old_grads, strict=True):
        assert torch.equal(new, old)


def test_kept_rows_written_in_place_only_into_what_the_pass_owns():
    """The block's input and a checkpoint's input are copied; a previous layer's output is written."""
    layer = ToyAttention(causal=True)
    hidden, _, pos, _ = make_inputs(b=2)
    before = hidden.detach().clone()
    state = RandomLTDState(seed=0, iteration=3, sample_ids=torch.arange(2), kept_length=6, layers=frozenset({1, 2}))
    first = forward_layer(layer, hidden, 1, state, pos)  # [b, s, h]
    assert first.data_ptr() != hidden.data_ptr() and torch.equal(hidden.detach(), before), "caller's input kept"
    second = forward_layer(layer, first, 2, state, pos)
    assert second.data_ptr() == first.data_ptr(), "the previous layer's output is written in place"
    with torch.no_grad():  # a checkpoint's first run: its saved input requires grad
        third = forward_layer(layer, second, 2, state, pos)
    assert third.data_ptr() != second.data_ptr()
    second.sum().backward()  # an expanded incoming gradient works (it is copied before being written)
    assert hidden.grad is not None


def test_int32_and_int64_indices_route_alike():
    layer = ToyAttention(causal=False)
    hidden, idx, pos, pad = make_inputs()
    upstream = torch.randn(hidden.shape)
    results = []
    for index in (idx, idx.int()):
        out = run_layer_on_kept(layer, hidden, index, pos, pad)
        results.append((out, *torch.autograd.grad((out * upstream).sum(), [hidden, *layer.parameters()])))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while fn runs, a storage once (bench/saved_bytes.py's rule);
    the caller's parameters are excluded by the caller."""
    seen = {}

    def pack(x):
        st = x.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return seen, out


@pytest.mark.parametrize("pos_type", ["learned_absolute", "rope"])
def test_ltd_layer_saves_at_most_its_share_of_a_dense_layer_plus_the_indices(pos_type):
    """Saved for backward by one LTD layer at r/s = 1/4 <= (r/s) x the dense layer + the int32 row numbers;
    the old routing also kept the whole [b, s, h] input."""
    from megatron.core.transformer.config import TransformerConfig
    from megatron.core.transformer.layer import TransformerLayer

    b, s, h, r = 2, 64, 32, 16
    cfg = TransformerConfig(num_layers=3, hidden_size=h, num_attention_heads=4, seq_length=s, vocab_size=64,
                            hidden_dropout=0.1, attention_dropout=0.0, position_embedding_type=pos_type)
    layer = TransformerLayer(cfg, 1).train()
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    hidden = torch.randn(b, s, h, requires_grad=True) * 1.0  # [b, s, h]
    pos = torch.arange(s).expand(b, s)
    idx = kept_indices(1, 2, torch.arange(b), 1, s, r).int()  # [b, r], as the plan delivers them

    def measured(fn):
        seen, _ = _saved_bytes(fn)
        return sum(v for k, v in seen.items() if k not in params)

    dense = measured(lambda: layer(hidden, position_ids=pos))
    ltd = measured(lambda: run_layer_on_kept(layer, hidden, idx, pos))
    old = measured(lambda: old_run_layer_on_kept(layer, hidden, idx, pos))
    index_bytes = 4 * b * r  # the flat int32 row numbers, saved once for both routing functions
    assert ltd <= dense * r // s + index_bytes, (ltd, dense)
    assert old >= dense * r // s + 4 * b * s * h, "the old gather pinned the whole input"
