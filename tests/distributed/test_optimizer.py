"""The optimizer's cross-rank verdicts on TP=2 x PP=2 (4 gloo ranks): overflow and gradient clipping.

Every rank holds one stage's shard of a tiny GPT. Gradients are set by hand: each parameter's full
gradient is a fixed random tensor keyed by its global name, and a rank takes its TP shard of it, so the
4 ranks together hold exactly the gradients of one single-process model. The truth comes from that
single-process model: its global gradient norm, computed in the parent over its own parameters (where
the tied embedding is one tensor).

- fp16 with initial loss scale 8 and hysteresis 1: an inf (later a NaN) in one gradient on ONE rank makes
  every rank skip the step and halve the scale (8 -> 4 -> 2); parameters do not move.
- a clean step: every rank reports the same norm, equal to the single-process norm (the last stage's copy
  of the tied embeddings counted once), and every gradient is clipped by the same coefficient.

The same again with the distributed optimizer at TP=2 x DP=2: the DP ranks hold disjoint shards of the
reduced gradients, an inf planted in an element only DP rank 1 owns makes all four ranks skip, and the
norm summed over the shards is the single-process norm on every rank.
"""

import math
import zlib

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.distributed import DataParallelGradSync
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer.optimizer import Optimizer, OptimizerConfig
from megatron.core.tensor_parallel import full_shape, shard_tensor
from megatron.core.transformer.config import TransformerConfig
from tests.distributed.launcher import run_distributed

CONFIG = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=64,
                           swiglu=True, hidden_dropout=0.0, attention_dropout=0.0)


def full_grad(name: str, shape) -> torch.Tensor:
    """The single-process model's gradient of parameter `name`: the same on every rank."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))


def local_grad(model, name, p) -> torch.Tensor:
    g = full_grad(model.global_param_name(name), full_shape(p, ps.get_tensor_model_parallel_world_size()))
    if getattr(p, "tensor_model_parallel", False):
        g = shard_tensor(g, p.partition_dim, p.partition_stride, ps.get_tensor_model_parallel_rank(),
                         ps.get_tensor_model_parallel_world_size())
    return g


def single_process_norm() -> float:
    model = GPTModel(CONFIG)  # no parallel state in the parent: the whole model, one embedding matrix
    return math.sqrt(sum(full_grad(n, p.shape).double().pow(2).sum().item() for n, p in model.named_parameters()))


def _all(x: float) -> list:
    t = torch.tensor([x], dtype=torch.float64)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return [float(v) for v in parts]


def _check(rank, world, ref_norm):
    stage, layers = ps.get_pipeline_model_parallel_rank(), CONFIG.num_layers // 2
    model = GPTModel(CONFIG, pre_process=stage == 0, post_process=stage == 1, layer_offset=stage * layers,
                     num_local_layers=layers)
    assert (stage == 1) == any(getattr(p, "shared_embedding", False) for p in model.parameters())
    sync = DataParallelGradSync(model.parameters())
    opt = Optimizer(model, OptimizerConfig(lr=1e-2, fp16=True, initial_loss_scale=8, hysteresis=1, clip_grad=1.0),
                    sync)
    named = list(model.named_parameters())

    def set_grads(scale, bad_rank=None, bad=float("inf")):
        opt.zero_grad()
        for i, (name, p) in enumerate(named):
            p.main_grad.copy_(local_grad(model, name, p) * scale)  # what backward of (loss x scale) leaves
            if rank == bad_rank and i == len(named) // 2:
                p.main_grad.view(-1)[3] = bad

    before = [p.detach().clone() for _, p in named]
    for bad_rank, bad, scale_after in ((3, float("inf"), 4.0), (0, float("nan"), 2.0)):
        set_grads(opt.loss_scale, bad_rank, bad)
        result = opt.step()
        assert result.skipped and result.loss_scale == scale_after == opt.loss_scale, (rank, bad_rank, result)
        assert _all(opt.loss_scale) == [scale_after] * world
        assert all(torch.equal(p, b) for (_, p), b in zip(named, before)), "a skipped step moved the weights"

    set_grads(opt.loss_scale)
    result = opt.step()
    assert not result.skipped and result.loss_scale == 2.0
    norms = _all(result.grad_norm)
    assert norms == [norms[0]] * world, norms  # the same value on every rank, not merely close
    assert math.isclose(result.grad_norm, ref_norm, rel_tol=1e-5), (result.grad_norm, ref_norm)
    coeff = 1.0 / (ref_norm + 1e-6)  # clip_grad 1.0: every gradient scaled by max_norm / (norm + eps)
    for name, p in named:
        torch.testing.assert_close(p.grad, local_grad(model, name, p) * coeff, rtol=1e-5, atol=1e-7, msg=name)
    assert not all(torch.equal(p, b) for (_, p), b in zip(named, before)), "the clean step did not move the weights"


def test_overflow_skip_and_clip_norm_agree_across_tp2_pp2():
    ref = single_process_norm()
    assert ref > 1.0  # so clipping applies
    run_distributed(_check, world_size=4, tp=2, pp=2, args=(ref,), hang_after_s=120)  # disagreeing ranks would hang


def _check_distributed(rank, world, ref_norm):
    """TP=2 x DP=2: every DP rank holds the same reduced gradients (as after the reduce-scatter, whose
    owned slices are what the optimizer reads); the optimizer sees only its shard of them."""
    model = GPTModel(CONFIG)
    sync = DataParallelGradSync(model.parameters(), distributed_optimizer=True)
    opt = Optimizer(model, OptimizerConfig(lr=1e-2, fp16=True, initial_loss_scale=8, hysteresis=1, clip_grad=1.0,
                                           use_distributed_optimizer=True), sync)
    dp_rank, named = ps.get_data_parallel_rank(), list(model.named_parameters())
    # an element that DP rank 1 owns: the last element of the last main parameter it steps
    owned_by_1 = opt.mains[-1] if dp_rank == 1 else None

    def set_grads(scale, plant=False):
        opt.zero_grad()
        for name, p in named:
            p.main_grad.copy_(local_grad(model, name, p) * scale)
        if plant and owned_by_1 is not None and ps.get_tensor_model_parallel_rank() == 0:
            owned_by_1.grad.view(-1)[-1] = float("inf")

    before = [p.detach().clone() for _, p in named]
    set_grads(opt.loss_scale, plant=True)
    result = opt.step()
    assert result.skipped and opt.loss_scale == 4.0, (rank, result)
    assert _all(opt.loss_scale) == [4.0] * world
    assert all(torch.equal(p, b) for (_, p), b in zip(named, before)), "a skipped step moved the weights"
    set_grads(opt.loss_scale)
    result = opt.step()
    assert not result.skipped
    norms = _all(result.grad_norm)
    assert norms == [norms[0]] * world, norms
    assert math.isclose(result.grad_norm, ref_norm, rel_tol=1e-5), (result.grad_norm, ref_norm)
    # the all-gather left every DP replica with the same, updated weights
    for name, p in named:
        mine = p.detach().clone()
        other = mine.clone()
        dist.broadcast(other, src=dist.get_process_group_ranks(ps.get_data_parallel_group())[0],
                       group=ps.get_data_parallel_group())
        assert torch.equal(mine, other), name
    assert not all(torch.equal(p, b) for (_, p), b in zip(named, before))


def test_distributed_optimizer_overflow_and_norm_agree_across_dp_shards():
    model = GPTModel(CONFIG)
    ref = math.sqrt(sum(full_grad(n, p.shape).double().pow(2).sum().item() for n, p in model.named_parameters()))
    run_distributed(_check_distributed, world_size=4, tp=2, args=(ref,), hang_after_s=120)
