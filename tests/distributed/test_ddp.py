"""Data-parallel gradients equal one process's gradients of the mean loss over every replica's data.

Every rank builds the same model from one seed, draws its own micro-batches (seeded by its DP rank), and
after `finish_grad_sync()` must hold the gradients a single process computes on all ranks' data.
"""

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state as ps
from megatron.core.distributed import DataParallelGradSync, allreduce_grads_in_group
from megatron.core.pipeline_parallel.schedules import forward_backward_pipelining_1f1b
from tests.distributed.launcher import run_distributed
from tests.distributed.test_pipeline import (B, H, S, assert_stage_grads_match, forward_step, micro_batches,
                                             reference, this_stage)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def batch(dp_rank: int, micro: int):
    g = torch.Generator().manual_seed(100 * dp_rank + micro)
    return torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)  # [n, in], [n, out]


def reference_grads(dp: int, m: int, ranks=None):
    """Grads of mean over (ranks, micro-batches) of the MSE loss, in one process."""
    model = mlp()
    ranks = range(dp) if ranks is None else ranks
    for r in ranks:
        for i in range(m):
            x, y = batch(r, i)
            (F.mse_loss(model(x), y) / (m * len(ranks))).backward()
    return [p.grad for p in model.parameters()]


def train_step(model, sync, rank, m, use_no_sync=True):
    """m micro-batches; all backwards but the last inside no_sync (as the schedules do)."""
    for i in range(m):
        x, y = batch(rank, i)
        loss = F.mse_loss(model(x), y) / m
        with sync.no_sync() if use_no_sync and i < m - 1 else nullcontext():
            loss.backward()


def assert_grads(model, expected):
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


def _check_mean_loss(rank, world):
    dp = ps.get_data_parallel_world_size()
    assert dp == world
    expected = reference_grads(dp, 1)
    results = {}
    for overlap in (True, False):
        model = mlp()
        sync = DataParallelGradSync(model.parameters(), overlap=overlap)
        assert len(sync.buckets) == 1  # 25 MB holds everything
        train_step(model, sync, rank, 1)
        sync.finish_grad_sync()
        assert_grads(model, expected)
        results[overlap] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("world", [2, 4])
def test_grads_are_the_mean_over_replicas_with_and_without_overlap(world):
    run_distributed(_check_mean_loss, world_size=world)


def _check_accumulation(rank, world):
    m = 3
    model = mlp()
    sync = DataParallelGradSync(model.parameters(), bucket_size_mb=1e-6, overlap=True)  # 1 byte: a bucket per param
    assert len(sync.buckets) == len(list(model.parameters()))
    assert sync.buckets[0].params[0] is model[-1].bias  # reverse registration order: last layer first

    # Inside no_sync nothing is communicated: grads are this rank's own sum so far.
    for i in range(m - 1):
        x, y = batch(rank, i)
        with sync.no_sync():
            (F.mse_loss(model(x), y) / m).backward()
    local = mlp()
    for i in range(m - 1):
        x, y = batch(rank, i)
        (F.mse_loss(local(x), y) / m).backward()
    assert_grads(model, [p.grad for p in local.parameters()])
    assert all(b.work is None for b in sync.buckets)

    # The synced backward launches every bucket from the hooks, before finish_grad_sync is called.
    x, y = batch(rank, m - 1)
    (F.mse_loss(model(x), y) / m).backward()
    assert all(b.work is not None for b in sync.buckets)
    sync.finish_grad_sync()
    assert_grads(model, reference_grads(world, m))

    # A second step after zero_grad works the same way (hook state was reset).
    model.zero_grad(set_to_none=True)
    train_step(model, sync, rank, m)
    sync.finish_grad_sync()
    assert_grads(model, reference_grads(world, m))


def test_no_sync_accumulates_micro_batches_in_small_overlapped_buckets():
    run_distributed(_check_accumulation, world_size=4)


def _check_unused_and_misuse(rank, world):
    # Rank 0 skips the last layer: its grads stay None there and count as zero in the mean, and the
    # bucket waiting for them on rank 0 is reduced by finish_grad_sync in the same order on every rank.
    for overlap in (True, False):
        model = mlp()
        sync = DataParallelGradSync(model.parameters(), bucket_size_mb=1e-4, overlap=overlap)
        x, y = batch(rank, 0)
        out = model[:4](x) if rank == 0 else model(x)  # [n, 16] or [n, 4]
        F.mse_loss(out, torch.zeros_like(out)).backward()
        sync.finish_grad_sync()
        ref = mlp()
        for r in range(world):
            x, y = batch(r, 0)
            out = ref[:4](x) if r == 0 else ref(x)
            (F.mse_loss(out, torch.zeros_like(out)) / world).backward()
        assert_grads(model, [p.grad for p in ref.parameters()])

    # Two synced backwards in one step would reduce a partial sum: refused with a clear message.
    model = mlp()
    sync = DataParallelGradSync(model.parameters(), overlap=True)
    x, y = batch(rank, 0)
    F.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="no_sync"):
        F.mse_loss(model(x), y).backward()
    sync.finish_grad_sync()  # the in-flight bucket still completes on every rank


def test_unused_params_count_as_zero_and_double_backward_is_refused():
    run_distributed(_check_unused_and_misuse, world_size=2)


def test_data_parallel_size_one_is_a_no_op():
    ps.destroy_model_parallel()
    model = mlp()
    sync = DataParallelGradSync(model.parameters())
    assert sync.dp == 1 and sync.buckets == []
    train_step(model, sync, 0, 2)
    sync.finish_grad_sync()
    assert_grads(model, reference_grads(1, 2))


def _check_tied_allreduce(rank, world):
    group = ps.get_embedding_group()  # first and last stage
    shared, other = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(4))
    shared.grad = torch.full((3, 2), float(rank + 1))
    if rank == 1:
        other.grad = torch.arange(4.0)  # rank 0 has no grad: contributes zeros, receives the sum
    allreduce_grads_in_group([shared, other], group)
    assert torch.equal(shared.grad, torch.full((3, 2), 3.0))
    assert torch.equal(other.grad, torch.arange(4.0))


def test_allreduce_grads_in_group_sums_tied_embedding_grads():
    run_distributed(_check_tied_allreduce, world_size=2, pp=2)


def _check_pp_dp(rank, world):
    pp, k = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    dp, d = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    assert (pp, dp) == (2, 2)
    m = 3
    data = [micro_batches(m, seed=10 + r) for r in range(dp)]  # each replica its own micro-batches
    for overlap in (True, False):
        stage = this_stage(pp, k)
        sync = DataParallelGradSync(stage.parameters(), bucket_size_mb=1e-4, overlap=overlap)
        assert dist.get_process_group_ranks(sync.group) == [k * 2, k * 2 + 1]
        metrics = forward_backward_pipelining_1f1b(forward_step, iter(data[d]), stage, m, (B, S, H),
                                                   torch.float32, grad_sync=sync)
        ref_losses, ref_layers = reference(data)
        if k == pp - 1:
            assert [x["loss"] for x in metrics] == ref_losses[d]
        assert_stage_grads_match(stage, ref_layers, pp, k)


def test_pipeline_times_data_parallel_with_grad_sync_in_the_schedule():
    run_distributed(_check_pp_dp, world_size=4, pp=2)
