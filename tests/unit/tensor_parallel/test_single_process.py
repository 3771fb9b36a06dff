"""tp == 1 (no process group at all): every TP piece reduces to its plain PyTorch counterpart."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.tensor_parallel.cross_entropy import _VocabParallelCrossEntropy
from megatron.core.tensor_parallel import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region, get_rng_tracker, model_parallel_manual_seed,
    reduce_from_tensor_model_parallel_region, scatter_to_tensor_model_parallel_region, vocab_parallel_cross_entropy,
)


@pytest.fixture(autouse=True)
def _plain_process():
    assert not dist.is_initialized() and parallel_state.get_tensor_model_parallel_world_size() == 1
    with torch.random.fork_rng(devices=[parallel_state.get_device()] if torch.cuda.is_available() else []):
        yield
    get_rng_tracker().reset()


def test_mappings_are_the_identity_without_a_collective():
    x = torch.randn(2, 3, 4)
    for fn in (copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
               scatter_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region):
        assert fn(x) is x  # a collective would fail here: no process group exists


def test_layers_equal_torch_modules():
    torch.manual_seed(0)
    ref1, ref2, emb = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8), torch.nn.Embedding(32, 8)
    col, row, vemb = ColumnParallelLinear(8, 16), RowParallelLinear(16, 8), VocabParallelEmbedding(32, 8)
    with torch.no_grad():
        for mine, ref in ((col, ref1), (row, ref2), (vemb, emb)):
            for name, p in ref.named_parameters():
                getattr(mine, name).copy_(p)
    assert col.weight.tensor_model_parallel and col.weight.partition_dim == 0
    assert row.weight.partition_dim == 1 and row.bias.tensor_model_parallel is False
    ids = torch.randint(0, 32, (2, 5))
    torch.testing.assert_close(row(col(vemb(ids))), ref2(ref1(emb(ids))))


@pytest.mark.parametrize("path", ["entry point (torch's fused path at tp=1)", "the vocab-parallel function"])
def test_cross_entropy_equals_torch(path):
    logits = (torch.randn(3, 5, 11) * 4).requires_grad_()
    target = torch.randint(0, 11, (3, 5))
    if path.startswith("entry"):
        loss = vocab_parallel_cross_entropy(logits, target)
    else:  # what tp > 1 runs, with its three all-reduces skipped (one rank owns the whole vocabulary)
        loss = _VocabParallelCrossEntropy.apply(logits, target)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, 11), target.view(-1), reduction="none").view(3, 5)
    torch.testing.assert_close(loss, ref)
    w = torch.rand(3, 5)
    (loss * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_cross_entropy_is_fp32_and_stable_for_bf16_and_large_logits():
    logits = (torch.randn(4, 7) * 3 + 1e4).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 7, (4,))
    loss = vocab_parallel_cross_entropy(logits, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), target, reduction="none"))
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_fork_without_seeding_runs_on_the_default_generator():
    dev = parallel_state.get_device()  # the tracker follows this device: CPU here, the GPU on a CUDA machine
    torch.manual_seed(5)
    a = torch.rand(4, device=dev)
    torch.manual_seed(5)
    with get_rng_tracker().fork():
        b = torch.rand(4, device=dev)
    assert torch.equal(a, b)


def test_seeds_and_fork_state_handling():
    dev = parallel_state.get_device()

    def draws(seed, *sizes):  # consecutive draws of a fresh generator (CUDA's philox offsets make 3 + 3 != 6)
        g = torch.Generator(dev).manual_seed(seed)
        return torch.cat([torch.rand(n, device=dev, generator=g) for n in sizes])

    model_parallel_manual_seed(1234)
    with get_rng_tracker().fork():
        first = torch.rand(3, device=dev)
    assert torch.equal(torch.rand(5, device=dev), draws(1234, 5))  # the default stream did not move
    saved = get_rng_tracker().get_states()
    with get_rng_tracker().fork():
        second = torch.rand(3, device=dev)
    assert torch.equal(torch.cat([first, second]), draws(1234 + 2718, 3, 3))  # the stream resumes where it stopped
    get_rng_tracker().set_states(saved)
    with get_rng_tracker().fork():
        assert torch.equal(torch.rand(3, device=dev), second)  # restored states replay the same draws
    with pytest.raises(AssertionError):
        get_rng_tracker().add("model-parallel-rng", 1)
