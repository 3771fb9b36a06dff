"""Activation recomputation: bit-identical loss and gradients, the same kept tokens, fewer saved bytes.

Single process on CPU, dropout on (hidden and attention) and random-LTD mid-ramp (r < s), so a
recomputation that drew other masks or other kept tokens would show in the gradients.
"""

import pytest
import torch

import megatron.core.random_ltd.routing as routing
from megatron.core.models.gpt import GPTModel
from megatron.core.random_ltd import RandomLTDState
from megatron.core.tensor_parallel import get_rng_tracker
from megatron.core.transformer.block import TransformerBlock
from megatron.core.transformer.config import TransformerConfig

B, S, H, L, V = 2, 32, 32, 4, 128
LTD_LAYERS = frozenset({1, 2})
KEPT = 12  # r < s: layers 1 and 2 run on 12 of 32 tokens


def config(**recompute):
    return TransformerConfig(num_layers=L, hidden_size=H, num_attention_heads=4, seq_length=S, vocab_size=V,
                             hidden_dropout=0.1, attention_dropout=0.1, **recompute)


def ltd_state():
    return RandomLTDState(seed=3, iteration=5, sample_ids=torch.arange(B), kept_length=KEPT, layers=LTD_LAYERS)


def run(recompute, seed=0):
    """Loss, parameter grads and the RNG states after backward, for one training forward/backward."""
    torch.manual_seed(0)
    model = GPTModel(config(**recompute)).train()  # same init for every variant
    tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    get_rng_tracker().reset()  # tp = 1: attention dropout draws from the default generator
    loss = model(tokens, labels=tokens.roll(-1, 1), ltd=ltd_state()).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, torch.get_rng_state()


VARIANTS = {
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-uniform-3": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3),
    "full-block-1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "full-block-2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    "selective": dict(recompute_granularity="selective"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_loss_and_every_gradient_bit_identical(name):
    loss0, grads0, rng0 = run({})
    loss1, grads1, rng1 = run(VARIANTS[name])
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys()
    for n in grads0:
        assert grads0[n] is not None and torch.equal(grads0[n], grads1[n]), n
    assert torch.equal(rng0, rng1)  # recomputation leaves the generator where the plain run leaves it


def test_dropout_is_on_so_the_comparison_means_something():
    loss_a, grads_a, _ = run({}, seed=0)
    loss_b, _, _ = run({}, seed=1)
    assert not torch.equal(loss_a, loss_b)


def test_tracker_stream_restored_for_recomputed_attention_dropout():
    """With a seeded tracker (as at tp > 1) attention dropout draws from 'model-parallel-rng': the rerun must
    draw the forward's masks and leave the stream where the plain run leaves it."""
    def with_tracker(recompute):
        torch.manual_seed(0)
        model = GPTModel(config(**recompute)).train()
        tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
        get_rng_tracker().reset()
        get_rng_tracker().add("model-parallel-rng", 4321)
        try:
            model(tokens, labels=tokens, ltd=ltd_state()).mean().backward()
            return [p.grad for p in model.parameters()], get_rng_tracker().get_states()
        finally:
            get_rng_tracker().reset()

    grads0, states0 = with_tracker({})
    for recompute in (VARIANTS["full-uniform-1"], VARIANTS["selective"]):
        grads1, states1 = with_tracker(recompute)
        assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
        assert torch.equal(states0["model-parallel-rng"], states1["model-parallel-rng"])


def test_recomputed_ltd_layers_run_on_the_same_kept_tokens(monkeypatch):
    """Every LTD layer runs twice (forward, recompute) on equal indices, drawn once per micro-batch."""
    seen, draws = [], []
    run_on_kept, draw = routing.run_layer_on_kept, routing.kept_indices_for_layers

    def recording_run(layer, hidden, idx, *args):
        seen.append((layer.layer_number, torch.is_grad_enabled(), idx.clone()))
        return run_on_kept(layer, hidden, idx, *args)

    def counting_draw(*args):
        draws.append(args)
        return draw(*args)

    monkeypatch.setattr(routing, "run_layer_on_kept", recording_run)
    monkeypatch.setattr(routing, "kept_indices_for_layers", counting_draw)
    run(VARIANTS["full-uniform-1"])
    assert len(draws) == 1  # cached on the RandomLTDState: the rerun draws nothing
    forward = {n: idx for n, grad, idx in seen if not grad}  # the checkpoint's forward runs under no_grad
    rerun = {n: idx for n, grad, idx in seen if grad}
    assert forward.keys() == rerun.keys() == LTD_LAYERS and len(seen) == 2 * len(LTD_LAYERS)
    for n in LTD_LAYERS:
        assert forward[n].shape == (B, KEPT) and torch.equal(forward[n], rerun[n])
    # and a fresh state for the same (seed, iteration, samples) redraws the same tokens: nothing else to keep
    fresh = ltd_state()
    assert all(torch.equal(fresh.indices_for(n, S), forward[n]) for n in LTD_LAYERS)


def saved_bytes(recompute):
    """Bytes of the storages autograd keeps for backward in one training forward of a 4-layer block (each
    storage once, parameters excluded): what its activations cost."""
    torch.manual_seed(0)
    block = TransformerBlock(config(**recompute), post_process=False).train()
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    hidden = torch.randn(B, S, H, requires_grad=True)  # [b, s, h]
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(hidden)
    return sum(storages.values())


WORD = B * S * H * 4  # one fp32 [b, s, h]


def test_full_uniform_keeps_the_layer_inputs_only():
    """Korthikanti et al. (arXiv 2205.05198): a layer keeps sbh(34 + 5as/h) bytes at 16 bit, of which the
    dropout masks (2sbh + as^2b) are 1 byte per element. In fp32 that is 16.5 + 2.25as/h = 25.5 fp32
    [b, s, h] tensors per layer at a = 4, s = h = 32; full recompute keeps 1 (the layer input). Expected
    factor 25.5; measured ~30 (the CPU kernels keep a few extra copies), so allow 25.5 x [0.75, 1.3]."""
    plain, full = saved_bytes({}), saved_bytes(VARIANTS["full-uniform-1"])
    assert full == L * WORD  # exactly each layer's input [b, s, h], nothing else
    assert 0.75 * 25.5 <= plain / full <= 1.3 * 25.5, plain / full
    # block N=2 keeps the inputs of layers 0 and 1 and every activation of layers 2 and 3
    block2 = saved_bytes(VARIANTS["full-block-2"])
    assert block2 == 2 * WORD + plain // 2, (block2, plain)
    # uniform N=2: two chunks, two inputs
    assert saved_bytes(dict(VARIANTS["full-uniform-1"], recompute_num_layers=2)) == 2 * WORD


def test_selective_drops_the_attention_scores():
    """Selective keeps no [b, a, s, s] tensor: the paper's 5as^2b (softmax, dropout mask, dropout output) go.
    On this CPU math path of SDPA all three are fp32 [b, a, s, s] per layer; q, k, v stay (the checkpoint
    saves them where SDPA saved its own copies). With SDPA's flash/memory-efficient kernels (CUDA) none
    of the three is kept in the first place, so there selective saves ~nothing (docs/training.md)."""
    plain, selective = saved_bytes({}), saved_bytes(VARIANTS["selective"])
    assert plain - selective == L * 3 * B * 4 * S * S * 4, (plain - selective) / WORD
