"""Tensor parallelism on 2 and 4 gloo ranks equals the unsplit single-process computation.

Every rank builds the same full tensors from one seed, runs the reference itself, and compares what the
TP pieces produce with the matching slice of the reference: values, gradients of the inputs and
gradients of the weight shards. Several checks share one `run_distributed` call to keep start-up cheap.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state as ps
from megatron.core.errors import UserError
from megatron.core.tensor_parallel import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region, get_rng_tracker, model_parallel_manual_seed,
    reduce_from_tensor_model_parallel_region, scatter_to_tensor_model_parallel_region, shard_tensor,
    vocab_parallel_cross_entropy,
)
from tests.distributed.launcher import run_distributed

WORLDS = [2, 4]
close = torch.testing.assert_close


def _all_gather(x: torch.Tensor) -> list:
    parts = [torch.empty_like(x) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
    return parts


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_()


# --- mappings -------------------------------------------------------------------------------------------

def _check_mappings(rank, world):
    tp, r = world, ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(100 + r)  # rank-dependent tensors
    mine = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    torch.manual_seed(0)  # rank-independent tensors

    # copy_to: forward identity, backward sums every rank's gradient.
    x, grad = _leaf(mine(2, 3, 4)), mine(2, 3, 4)
    y = copy_to_tensor_model_parallel_region(x)
    close(y, x.detach())
    y.backward(grad)
    close(x.grad, torch.stack(_all_gather(grad)).sum(0))

    # reduce_from: forward sums every rank's input, backward passes the gradient unchanged.
    x, grad = _leaf(mine(2, 3, 4)), mine(2, 3, 4)
    y = reduce_from_tensor_model_parallel_region(x)
    close(y, torch.stack(_all_gather(x.detach())).sum(0))
    y.backward(grad)
    close(x.grad, grad)

    # scatter_to: forward keeps this rank's last-dim slice, backward all-gathers the gradient slices.
    x, grad = _leaf(torch.randn(2, 3, 4 * tp)), mine(2, 3, 4)
    y = scatter_to_tensor_model_parallel_region(x)
    close(y, x.detach()[..., 4 * r:4 * (r + 1)])
    y.backward(grad)
    close(x.grad, torch.cat(_all_gather(grad), dim=-1))

    # gather_from: forward concatenates every rank's slice in rank order, backward keeps this rank's slice.
    x, grad = _leaf(mine(2, 3, 4)), torch.randn(2, 3, 4 * tp)
    y = gather_from_tensor_model_parallel_region(x)
    close(y, torch.cat(_all_gather(x.detach()), dim=-1))
    close(y[..., 4 * r:4 * (r + 1)], x.detach())
    y.backward(grad)
    close(x.grad, grad[..., 4 * r:4 * (r + 1)])


@pytest.mark.parametrize("world", WORLDS)
def test_mappings_forward_and_backward(world):
    run_distributed(_check_mappings, world, tp=world)


# --- layers ---------------------------------------------------------------------------------------------

def _load(mine, ref):
    """Give each TP parameter of `mine` this rank's shard of the matching full parameter of `ref`."""
    r, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, full in ref.named_parameters():
            p = getattr(mine, name)
            local = shard_tensor(full, p.partition_dim, p.partition_stride, r, tp) if p.tensor_model_parallel else full
            p.copy_(local)


def _check_grads(mine, ref):
    r, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for name, full in ref.named_parameters():
        p = getattr(mine, name)
        expected = (shard_tensor(full.grad, p.partition_dim, p.partition_stride, r, tp)
                    if p.tensor_model_parallel else full.grad)
        close(p.grad, expected, msg=lambda m: f"grad of {name}: {m}")


def _check_layers(rank, world):
    tp, r = world, ps.get_tensor_model_parallel_rank()
    torch.manual_seed(0)  # same full weights and inputs on every rank
    b, s, h, f, V = 2, 3, 8, 4 * world, 8 * world
    x_full = torch.randn(b, s, h)

    # ColumnParallelLinear: local output = this rank's output features, gathered = the full output.
    for gather in (False, True):
        ref, col = torch.nn.Linear(h, f), ColumnParallelLinear(h, f, gather_output=gather)
        assert col.weight.shape == (f // tp, h) and col.bias.shape == (f // tp,)
        assert (col.weight.partition_dim, col.weight.partition_stride) == (0, 1)
        _load(col, ref)
        x, x_ref = _leaf(x_full), _leaf(x_full)
        y, y_ref = col(x), ref(x_ref)
        grad = torch.randn(b, s, f)
        close(y, y_ref if gather else shard_tensor(y_ref, -1, 1, r, tp))
        y.backward(grad if gather else shard_tensor(grad, -1, 1, r, tp))
        y_ref.backward(grad)
        close(x.grad, x_ref.grad)
        _check_grads(col, ref)

    # RowParallelLinear, with a split input (input_is_parallel) and with a full one it splits itself.
    for parallel in (True, False):
        ref, row = torch.nn.Linear(f, h), RowParallelLinear(f, h, input_is_parallel=parallel)
        assert row.weight.shape == (h, f // tp) and row.weight.partition_dim == 1
        assert row.bias.shape == (h,) and row.bias.tensor_model_parallel is False
        _load(row, ref)
        z_full = torch.randn(b, s, f)
        z, z_ref = _leaf(shard_tensor(z_full, -1, 1, r, tp) if parallel else z_full), _leaf(z_full)
        y, y_ref = row(z), ref(z_ref)
        close(y, y_ref)
        grad = torch.randn(b, s, h)
        y.backward(grad)
        y_ref.backward(grad)
        close(z.grad, shard_tensor(z_ref.grad, -1, 1, r, tp) if parallel else z_ref.grad)
        _check_grads(row, ref)

    # VocabParallelEmbedding: every id, whichever rank owns it, gets its full row.
    ref, emb = torch.nn.Embedding(V, h), VocabParallelEmbedding(V, h)
    assert emb.weight.shape == (V // tp, h) and (emb.vocab_start_index, emb.vocab_end_index) == (r * 8, r * 8 + 8)
    _load(emb, ref)
    ids = torch.cat([torch.arange(V), torch.randint(0, V, (V,))]).view(4, -1)  # [4, V/2]
    y, y_ref = emb(ids), ref(ids)
    close(y, y_ref)
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    _check_grads(emb, ref)

    # Column -> Row chains: GELU MLP, and SwiGLU whose fc1 shard is [gate_r; up_r] (stride 2).
    for swiglu in (False, True):
        out1 = 2 * f if swiglu else f
        fc1_ref, fc2_ref = torch.nn.Linear(h, out1), torch.nn.Linear(f, h)
        fc1, fc2 = ColumnParallelLinear(h, out1, stride=2 if swiglu else 1), RowParallelLinear(f, h)
        _load(fc1, fc1_ref)
        _load(fc2, fc2_ref)

        def mlp(x, fc1, fc2):
            u = fc1(x)  # [b, s, f/tp] or [b, s, 2f/tp]
            if swiglu:
                gate, up = u.chunk(2, dim=-1)
                return fc2(F.silu(gate) * up)
            return fc2(F.gelu(u))

        x, x_ref = _leaf(x_full), _leaf(x_full)
        y, y_ref = mlp(x, fc1, fc2), mlp(x_ref, fc1_ref, fc2_ref)
        close(y, y_ref)
        grad = torch.randn(b, s, h)
        y.backward(grad)
        y_ref.backward(grad)
        close(x.grad, x_ref.grad)
        _check_grads(fc1, fc1_ref)
        _check_grads(fc2, fc2_ref)

    # A size that does not split raises a UserError naming the flag, identically on every rank.
    with pytest.raises(UserError, match=f"--ffn-hidden-size 5 is not divisible by --tensor-model-parallel-size {tp}"):
        ColumnParallelLinear(h, 10, stride=2, name="--ffn-hidden-size")  # [gate; up] of 5 each
    with pytest.raises(UserError, match="padded vocabulary size"):
        VocabParallelEmbedding(V + 1, h)


@pytest.mark.parametrize("world", WORLDS)
def test_layers_equal_unsplit_modules(world):
    run_distributed(_check_layers, world, tp=world)


# --- cross entropy --------------------------------------------------------------------------------------

def _check_cross_entropy(rank, world):
    tp, r = world, ps.get_tensor_model_parallel_rank()
    torch.manual_seed(0)
    b, s, V = 3, 5, 8 * world
    full = torch.randn(b, s, V) * 5
    full[0, 0, V - 1] = 60.0  # a dominant logit in the last rank's shard: the global max matters
    target = torch.randint(0, V, (b, s))
    target[0, :tp] = torch.arange(tp) * (V // tp)  # a target in every shard
    w = torch.rand(b, s)
    for offset, dtype in ((0.0, torch.float32), (1e4, torch.float32), (0.0, torch.bfloat16)):
        logits_full = (full + offset).to(dtype)
        local = _leaf(shard_tensor(logits_full, -1, 1, r, tp))  # [b, s, V/tp]
        ref_logits = _leaf(logits_full)
        loss = vocab_parallel_cross_entropy(local, target)
        ref = F.cross_entropy(ref_logits.float().view(-1, V), target.view(-1), reduction="none").view(b, s)
        assert loss.dtype == torch.float32 and loss.shape == (b, s)
        close(loss, ref)
        (loss * w).sum().backward()
        (ref * w).sum().backward()
        close(local.grad, shard_tensor(ref_logits.grad, -1, 1, r, tp))


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_cross_entropy_equals_torch(world):
    run_distributed(_check_cross_entropy, world, tp=world)


# --- RNG ------------------------------------------------------------------------------------------------

def _check_rng(rank, world, tp, pp):
    ps.init_distributed("gloo")  # gloo ranks live on the CPU, so the tracker swaps the CPU generator
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    model_parallel_manual_seed(1234)
    ones = torch.ones(4096)

    # Replicated activations: the default generator agrees across TP ranks.
    masks = _all_gather(F.dropout(ones, 0.5))
    assert all(torch.equal(m, masks[0]) for m in masks)
    # Partitioned activations: under fork() every TP rank draws a different mask.
    with get_rng_tracker().fork():
        forked = F.dropout(ones, 0.5)
    masks = _all_gather(forked)
    assert all(not torch.equal(masks[i], masks[j]) for i in range(tp) for j in range(i + 1, tp))
    # ... from the documented seed, and the default stream is left as it was.
    default = torch.get_rng_state()
    torch.manual_seed(1234 + 100 * pp_rank + 2718 + tp_rank)
    close(forked, F.dropout(ones, 0.5))
    torch.set_rng_state(default)
    masks = _all_gather(F.dropout(ones, 0.5))
    assert all(torch.equal(m, masks[0]) for m in masks)
    # Pipeline stages get different default streams.
    if pp > 1:
        x = torch.rand(64)
        parts = [torch.empty_like(x) for _ in range(pp)]
        dist.all_gather(parts, x, group=ps.get_pipeline_model_parallel_group())
        assert not torch.equal(parts[0], parts[1])

    # States round-trip: restoring them replays the same draws.
    saved = get_rng_tracker().get_states()
    with get_rng_tracker().fork():
        a = torch.rand(8)
    get_rng_tracker().set_states(saved)
    with get_rng_tracker().fork():
        b = torch.rand(8)
    close(a, b)


@pytest.mark.parametrize("world,tp,pp", [(2, 2, 1), (4, 4, 1), (4, 2, 2)])
def test_rng_tracker(world, tp, pp):
    run_distributed(_check_rng, world, tp=tp, pp=pp, args=(tp, pp))


def _check_model_rng(rank, world):
    """Inside a TP=2 GPTModel with hidden and attention dropout 0.5: the hidden states after each layer
    (dropout after the row-parallel all-reduce, replicated) are identical on both ranks, while each
    rank's attention-probability dropout (its own heads, split) draws from its own stream, with masks
    that differ between the ranks."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.config import TransformerConfig

    tp_rank = ps.get_tensor_model_parallel_rank()
    model_parallel_manual_seed(1234)
    tracker_start = get_rng_tracker().get_states()["model-parallel-rng"]
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=64,
                               hidden_dropout=0.5, attention_dropout=0.5)
    model = GPTModel(config)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))  # [b, s], same on all ranks

    layer_out, calls, real_sdpa = [], [], F.scaled_dot_product_attention
    for layer in model.decoder.layers:
        layer.register_forward_hook(lambda mod, inp, out: layer_out.append(out.detach()))

    def recording_sdpa(q, k, v, **kw):  # q, k, v: [b, nh/tp, s, hd], this rank's heads
        state = torch.get_rng_state()  # the stream the dropout mask is drawn from
        out = real_sdpa(q, k, v, **kw)
        calls.append((q, k, v, kw, state, out))
        return out

    F.scaled_dot_product_attention = recording_sdpa
    try:
        with torch.no_grad():
            model.train()
            model(tokens)
            dropped = list(layer_out)
            layer_out.clear()
            model.eval()
            model(tokens)
    finally:
        F.scaled_dot_product_attention = real_sdpa
    assert len(dropped) == 2 and len(calls) == 4 and all(c[3]["dropout_p"] == 0.5 for c in calls[:2])
    for mine, plain in zip(dropped, layer_out):
        assert not torch.equal(mine, plain)  # the hidden dropout did act
        assert all(torch.equal(x, mine) for x in _all_gather(mine))  # and identically on both TP ranks
    # Attention dropout: the first call draws from the documented per-rank stream, seed + 2718 + tp_rank ...
    assert torch.equal(calls[0][4], tracker_start)
    states = _all_gather(calls[0][4])
    assert not torch.equal(states[0], states[1])
    # ... and the mask is what differs: rank 0's own call replayed under its own state gives its output
    # exactly, under rank 1's state (the same q, k, v) another output.
    q, k, v, kw, _, out = calls[0]
    default = torch.get_rng_state()
    for r, state in enumerate(states):
        torch.set_rng_state(state)
        replay = real_sdpa(q, k, v, **kw)
        assert torch.equal(replay, out) == (r == tp_rank), r
    torch.set_rng_state(default)


def test_dropout_in_the_tp_model_agrees_outside_and_differs_inside_split_regions():
    run_distributed(_check_model_rng, 2, tp=2)
