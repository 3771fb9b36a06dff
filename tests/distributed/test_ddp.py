"""Data-parallel gradients equal one process's gradients of the mean loss over every replica's data.

Every rank builds the same model from one seed, draws its own micro-batches (seeded by its DP rank), and
after `finish_grad_sync()` must hold in `main_grad` the gradients a single process computes on all ranks'
data; with the distributed optimizer's reduce-scatter, each rank's shard of every bucket must equal the
same slice of that all-reduced result, bit for bit.
"""

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state as ps
from megatron.core.distributed import DataParallelGradSync, ParamAndGradBuffer
from megatron.core.distributed.param_and_grad_buffer import PARAM_ALIGN
from megatron.core.pipeline_parallel.schedules import forward_backward_pipelining_1f1b
from tests.distributed.launcher import run_distributed
from tests.distributed.test_pipeline import B, H, L, S, forward_step, micro_batches, reference, this_stage


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
        assert p.grad is None, "the hook moves .grad into main_grad"
        torch.testing.assert_close(p.main_grad, g)


def _check_mean_loss(rank, world):
    assert ps.get_data_parallel_world_size() == world
    expected = reference_grads(world, 1)
    results = {}
    for overlap in (True, False):
        model = mlp()
        sync = DataParallelGradSync(model.parameters(), overlap_grad_reduce=overlap)
        assert len(sync.buckets) == 1  # no bucket size: one bucket per buffer
        train_step(model, sync, rank, 1)
        sync.finish_grad_sync()
        assert_grads(model, expected)
        results[overlap] = [p.main_grad.clone() for p in model.parameters()]
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("world", [2, 4])
def test_grads_are_the_mean_over_replicas_with_and_without_overlap(world):
    run_distributed(_check_mean_loss, world_size=world)


def _check_accumulation(rank, world):
    m = 3
    model = mlp()
    sync = DataParallelGradSync(model.parameters(), bucket_numel=1, overlap_grad_reduce=True)  # a bucket per param
    assert len(sync.buckets) == len(list(model.parameters()))
    assert sync.buckets[0].params[0] is model[-1].bias  # reverse registration order: last layer first
    # one contiguous buffer: every main_grad is a view of it
    assert all(p.main_grad.untyped_storage().data_ptr() == sync.buffers[0].grad_data.untyped_storage().data_ptr()
               for p in model.parameters())

    # Inside no_sync nothing is communicated: main_grad is this rank's own sum so far, in fp32 as autograd sums.
    for i in range(m - 1):
        x, y = batch(rank, i)
        with sync.no_sync():
            (F.mse_loss(model(x), y) / m).backward()
    local = mlp()
    for i in range(m - 1):
        x, y = batch(rank, i)
        (F.mse_loss(local(x), y) / m).backward()
    for p, q in zip(model.parameters(), local.parameters()):
        assert torch.equal(p.main_grad, q.grad)
    assert all(b.work is None for b in sync.buckets)

    # The synced backward launches every bucket from the hooks, before finish_grad_sync is called.
    x, y = batch(rank, m - 1)
    (F.mse_loss(model(x), y) / m).backward()
    assert all(b.work is not None for b in sync.buckets)
    sync.finish_grad_sync()
    assert_grads(model, reference_grads(world, m))

    # A second step after zero_grad_buffer works the same way (hook state was reset).
    sync.zero_grad_buffer()
    train_step(model, sync, rank, m)
    sync.finish_grad_sync()
    assert_grads(model, reference_grads(world, m))


def test_no_sync_accumulates_micro_batches_in_small_overlapped_buckets():
    run_distributed(_check_accumulation, world_size=4)


def _check_reduce_scatter(rank, world):
    """The distributed optimizer's reduce-scatter: each rank's shard equals the all-reduce's slice."""
    for bucket_numel in (None, 100):
        plain, sharded = mlp(), mlp()
        a = DataParallelGradSync(plain.parameters(), bucket_numel=bucket_numel)
        b = DataParallelGradSync(sharded.parameters(), bucket_numel=bucket_numel, distributed_optimizer=True,
                                 overlap_grad_reduce=True)
        for model, sync in ((plain, a), (sharded, b)):
            train_step(model, sync, rank, 2)
            sync.finish_grad_sync()
        # the parameters now live in the flat param buffer, values unchanged
        for p, q in zip(plain.parameters(), sharded.parameters()):
            assert torch.equal(p, q)
            off = b.buffer_of(q).offset_of[id(q)]
            assert off % PARAM_ALIGN == 0
            assert q.untyped_storage().data_ptr() == b.buffers[0].param_data.untyped_storage().data_ptr()
        owned = 0
        for bucket in b.buckets:
            lo, hi = b.shard_in_buffer(bucket)
            assert bucket.numel % world == 0 and hi - lo == bucket.numel // world
            for p, q in zip(plain.parameters(), sharded.parameters()):
                off = b.buffer_of(q).offset_of[id(q)]
                a_lo, a_hi = max(off, lo), min(off + q.numel(), hi)
                if any(x is q for x in bucket.params) and a_lo < a_hi:  # the part of q this rank owns
                    assert torch.equal(b.buffers[0].grad_data[a_lo:a_hi], p.main_grad.view(-1)[a_lo - off:a_hi - off])
                    owned += a_hi - a_lo
        assert owned > 0
        # the all-gather puts every rank's shard back: write rank-tagged values into the owned shards
        for bucket in b.buckets:
            lo, hi = b.shard(bucket)
            bucket.param_data[lo:hi] = float(rank + 1)
        b.start_param_sync()
        for bucket in b.buckets:
            n = bucket.numel // world
            expected = torch.arange(1, world + 1, dtype=torch.float32).repeat_interleave(n)
            assert torch.equal(bucket.param_data, expected)


def test_reduce_scatter_shards_equal_the_all_reduce_and_all_gather_restores_them():
    run_distributed(_check_reduce_scatter, world_size=2)


def test_distributed_layout_pads_param_starts_and_bucket_ends():
    model = mlp()
    buf = ParamAndGradBuffer(list(model.parameters()), torch.float32, bucket_numel=200, dp=4, distributed=True)
    assert all(b.numel % 128 == 0 for b in buf.buckets)
    assert all(o % PARAM_ALIGN == 0 for b in buf.buckets for o in b.offsets)
    assert buf.param_data.numel() == buf.numel and buf.grad_data.dtype == torch.float32
    # padding is zero and no parameter overlaps another
    spans = sorted((buf.offset_of[id(p)], buf.offset_of[id(p)] + p.numel()) for p in model.parameters())
    assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:]))
    bf = mlp().to(torch.bfloat16)
    buf = ParamAndGradBuffer(list(bf.parameters()), torch.float32, None, dp=1, distributed=False)
    assert buf.grad_data.dtype == torch.float32 and all(p.main_grad.dtype == torch.float32 for p in bf.parameters())


def _check_unused_and_misuse(rank, world):
    # Rank 0 skips the last layer: its grads stay zero there and count as zero in the mean, and the
    # bucket waiting for them on rank 0 is reduced by finish_grad_sync in the same order on every rank.
    for overlap in (True, False):
        model = mlp()
        sync = DataParallelGradSync(model.parameters(), bucket_numel=50, overlap_grad_reduce=overlap)
        x, y = batch(rank, 0)
        out = model[:4](x) if rank == 0 else model(x)  # [n, 16] or [n, 4]
        F.mse_loss(out, torch.zeros_like(out)).backward()
        sync.finish_grad_sync()
        ref = mlp()
        for r in range(world):
            x, y = batch(r, 0)
            out = ref[:4](x) if r == 0 else ref(x)
            (F.mse_loss(out, torch.zeros_like(out)) / world).backward()
        assert_grads(model, [p.grad if p.grad is not None else torch.zeros_like(p) for p in ref.parameters()])

    # Two synced backwards in one step would reduce a partial sum: refused with a clear message.
    model = mlp()
    sync = DataParallelGradSync(model.parameters(), overlap_grad_reduce=True)
    x, y = batch(rank, 0)
    F.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="no_sync"):
        F.mse_loss(model(x), y).backward()
    sync.finish_grad_sync()  # the in-flight bucket still completes on every rank


def test_unused_params_count_as_zero_and_double_backward_is_refused():
    run_distributed(_check_unused_and_misuse, world_size=2)


def test_data_parallel_size_one_accumulates_without_communicating():
    ps.destroy_model_parallel()
    model = mlp()
    sync = DataParallelGradSync(model.parameters())
    assert sync.dp == 1 and len(sync.buckets) == 1
    train_step(model, sync, 0, 2)
    sync.finish_grad_sync()
    assert_grads(model, reference_grads(1, 2))


def _check_tied_allreduce(rank, world):
    group = ps.get_embedding_group()  # first and last stage
    for distributed in (False, True):
        shared = nn.Parameter(torch.zeros(3, 2))
        sync = DataParallelGradSync([shared], distributed_optimizer=distributed, own_bucket=[shared])
        shared.main_grad.fill_(float(rank + 1))
        sync.allreduce_in_group(shared, group)
        assert torch.equal(shared.main_grad, torch.full((3, 2), 3.0))


def test_tied_embedding_grads_are_summed_over_the_embedding_group():
    run_distributed(_check_tied_allreduce, world_size=2, pp=2)


def _check_pp_dp(rank, world):
    pp, k = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    dp, d = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    assert (pp, dp) == (2, 2)
    m = 3
    data = [micro_batches(m, seed=10 + r) for r in range(dp)]  # each replica its own micro-batches
    for overlap in (True, False):
        stage = this_stage(pp, k)
        sync = DataParallelGradSync(stage.parameters(), bucket_numel=40, overlap_grad_reduce=overlap)
        assert dist.get_process_group_ranks(sync.group) == [k * 2, k * 2 + 1]
        metrics = forward_backward_pipelining_1f1b(forward_step, iter(data[d]), stage, m, (B, S, H),
                                                   torch.float32, grad_sync=sync)
        ref_losses, ref_layers = reference(data)
        if k == pp - 1:
            assert [x["loss"] for x in metrics] == ref_losses[d]
        per = L // pp
        for mine, ref in zip(stage.layers, ref_layers[k * per:(k + 1) * per]):
            torch.testing.assert_close(mine.weight.main_grad, ref.weight.grad)
            torch.testing.assert_close(mine.bias.main_grad, ref.bias.grad)


def test_pipeline_times_data_parallel_with_grad_sync_in_the_schedule():
    run_distributed(_check_pp_dp, world_size=4, pp=2)
