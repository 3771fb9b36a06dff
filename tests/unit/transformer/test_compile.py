"""--torch-compile: compiled layers compute what eager layers compute, draw the same dropout masks, keep
working under activation recomputation and random-LTD, and do not recompile when the kept length r changes.

Most checks use the "aot_eager" backend (dynamo's capture and AOT autograd without code generation: the
graph breaks, guards and dynamic shapes are inductor's, in a second instead of ~20 s on 2 cores); one
check runs inductor itself, the backend --torch-compile uses. Tolerance: 1e-5 absolute on the loss and
every gradient (measured: 0 with aot_eager, < 1e-6 with inductor, whose fused kernels reorder sums).
"""

import pytest
import torch
from torch._dynamo.utils import counters

from megatron.core.models.gpt import GPTModel
from megatron.core.random_ltd import RandomLTDState
from megatron.core.tensor_parallel import model_parallel_manual_seed
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.layer import compile_stats

B, S, H, L, V = 2, 32, 32, 4, 128
LTD_LAYERS = frozenset({1, 2})
TOL = 1e-5
RECOMPUTE = {
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective"),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def build(backend, num_layers=L, dropout=0.1, **kw):
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=num_layers, hidden_size=H, num_attention_heads=4, seq_length=S,
                            vocab_size=V, hidden_dropout=dropout, attention_dropout=dropout, torch_compile=backend,
                            **kw)
    return GPTModel(cfg).train()


def step(model, kept, iteration):
    """Loss and gradients of one training forward/backward with r = kept on layers 1 and 2."""
    tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(iteration))
    ltd = RandomLTDState(seed=3, iteration=iteration, sample_ids=torch.arange(B), kept_length=kept,
                         layers=LTD_LAYERS)
    model_parallel_manual_seed(100 + iteration)  # the same streams for the eager and the compiled step
    loss = model(tokens, labels=tokens.roll(-1, 1), ltd=ltd).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return loss.detach(), grads


def assert_close(eager, compiled):
    (le, ge), (lc, gc) = eager, compiled
    assert abs(le - lc) <= TOL, (le, lc)
    for name in ge:
        assert (ge[name] - gc[name]).abs().max() <= TOL, name


@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_compiled_equals_eager_with_dropout_and_changing_r(recompute):
    eager, compiled = build(None, **RECOMPUTE[recompute]), build("aot_eager", **RECOMPUTE[recompute])
    for iteration, kept in enumerate((12, 16, 20, 32)):  # r grows as under MSLG, then the full sequence
        assert_close(step(eager, kept, iteration), step(compiled, kept, iteration))
    graphs, _ = compile_stats()
    assert graphs > 0  # the layers did run compiled


def test_a_new_kept_length_does_not_recompile():
    model = build("aot_eager")
    step(model, 12, 0)  # the first step compiles: dense layers on s, LTD layers on r, one dynamic graph
    graphs = counters["stats"]["unique_graphs"]
    for iteration, kept in enumerate((16, 20, 24, 28), start=1):
        step(model, kept, iteration)
    assert counters["stats"]["unique_graphs"] == graphs


def test_evaluation_and_training_compile_once_each_for_all_layers():
    """The layers share one compiled forward (parameters are graph inputs), so four layers cost what one
    does; evaluation (no dropout, no grad) adds its own graph once."""
    model = build("aot_eager", dropout=0.0)  # no fork: each layer is one graph
    step(model, 12, 0)
    assert counters["stats"]["unique_graphs"] <= 2  # at most: expanded and gathered position ids
    model.eval()
    with torch.no_grad():
        model(torch.zeros(B, S, dtype=torch.long))
    assert counters["stats"]["unique_graphs"] <= 3


def test_inductor_matches_eager():
    """The backend --torch-compile uses: fused kernels, the same dropout masks (fallback_random), r
    changing without a recompile. The slowest test here: ~5 s with inductor's cache warm, 15-30 s cold on 2
    CPU cores (the compile does not shrink with fewer layers: they all share one graph)."""
    eager, compiled = build(None, num_layers=2), build("inductor", num_layers=2)
    assert_close(step(eager, 12, 0), step(compiled, 12, 0))
    graphs = counters["stats"]["unique_graphs"]
    assert_close(step(eager, 20, 1), step(compiled, 20, 1))
    assert counters["stats"]["unique_graphs"] == graphs
