"""Pipeline schedules equal one process running the whole model: same losses, same gradients.

The toy model is L Linear+tanh layers on `[b, s, h]` activations. Every rank builds the full model from
the same seed and keeps its stage's slice, so a single-process run of the full model on the same
micro-batches is the oracle each stage checks its parameter gradients against.
"""

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import p2p
from megatron.core.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_1f1b,
    get_forward_backward_func,
)
from tests.distributed.launcher import run_distributed

B, S, H, L = 2, 3, 8, 4  # micro-batch, sequence, hidden, layers of the whole toy model


def full_layers(num_layers: int = L, seed: int = 0):
    torch.manual_seed(seed)
    return [nn.Linear(H, H) for _ in range(num_layers)]


class Stage(nn.Module):
    """Some consecutive layers of the toy model. The first stage reads the micro-batch; the others read
    the activation the schedule hands over through `set_input_tensor`.

    Counts micro-batches forwarded but not yet backwarded (a hook on the output fires when its backward
    starts), to check the 1F1B memory bound.
    """

    def __init__(self, layers, is_first: bool):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.is_first = is_first
        self.input_tensor = None
        self.in_flight = self.max_in_flight = 0

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor

    def forward(self, x):  # [b, s, h] -> [b, s, h]
        h = x if self.is_first else self.input_tensor
        for layer in self.layers:
            h = torch.tanh(layer(h))
        if h.requires_grad:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            h.register_hook(self._backward_started)
        return h

    def _backward_started(self, grad):
        self.in_flight -= 1


def this_stage(pp: int, k: int, seed: int = 0) -> Stage:
    per = L // pp
    return Stage(full_layers(seed=seed)[k * per:(k + 1) * per], is_first=k == 0)


def micro_batches(m: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, S, H, generator=g), torch.randn(B, S, H, generator=g)) for _ in range(m)]


def forward_step(data_iterator, model):
    x, y = next(data_iterator)  # every stage draws, so all stages stay on the same micro-batch
    output = model(x)

    def loss_fn(out):
        loss = F.mse_loss(out, y)
        return loss, {"loss": loss.detach()}

    return output, loss_fn


def reference(batches_per_replica, loss_scale=1.0, seed=0):
    """Whole model, one process: backprop loss_scale * mean over replicas and micro-batches.

    Returns (losses of each replica's micro-batches, the layers with their grads)."""
    layers = full_layers(seed=seed)
    model = Stage(layers, is_first=True)
    losses = []
    for batches in batches_per_replica:
        losses.append([])
        for x, y in batches:
            loss = F.mse_loss(model(x), y)
            losses[-1].append(loss.detach())
            (loss * loss_scale / (len(batches) * len(batches_per_replica))).backward()
    return losses, layers


def assert_stage_grads_match(stage: Stage, ref_layers, pp: int, k: int):
    per = L // pp
    for mine, ref in zip(stage.layers, ref_layers[k * per:(k + 1) * per]):
        torch.testing.assert_close(mine.weight.grad, ref.weight.grad)
        torch.testing.assert_close(mine.bias.grad, ref.bias.grad)


class RecordingGradSync:
    """Stands in for DataParallelGradSync: logs whether each backward ran inside no_sync, and finish."""

    def __init__(self, param):
        self.inside, self.events = False, []
        param.register_post_accumulate_grad_hook(lambda p: self.events.append("no_sync" if self.inside else "sync"))

    @contextmanager
    def no_sync(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def finish_grad_sync(self):
        self.events.append("finish")


# --- p2p ------------------------------------------------------------------------------------------------

def _p2p_chain(rank, world):
    """Each stage receives k from its predecessor's activation, sends k+1 on; gradients come back -k."""
    pp, k = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    first, last = k == 0, k == pp - 1
    shape, dtype = (2, 3, 4), torch.bfloat16  # [b, s, h], a dtype other than the default

    x = p2p.recv_forward(shape, dtype)
    if first:
        assert x is None
    else:
        assert x.shape == shape and x.dtype == dtype and x.requires_grad
        assert torch.equal(x, torch.full(shape, float(k - 1), dtype=dtype))
    p2p.send_forward(torch.full(shape, float(k), dtype=dtype))  # a no-op on the last stage

    dy = p2p.recv_backward(shape, dtype)
    if last:
        assert dy is None
    else:
        assert dy.dtype == dtype and torch.equal(dy, torch.full(shape, -float(k + 1), dtype=dtype))
    p2p.send_backward(torch.full(shape, -float(k), dtype=dtype))  # a no-op on the first stage

    # Both-direction exchanges, as in a steady 1F1B round: k sends forward and receives backward from
    # k+1 while k+1 sends backward and receives forward from k.
    shape, dtype = (3, 5, 2), torch.float32
    dy = p2p.send_forward_recv_backward(torch.full(shape, 10.0 + k), shape, dtype)
    x = p2p.send_backward_recv_forward(torch.full(shape, -10.0 - k), shape, dtype)
    assert dy is None if last else torch.equal(dy, torch.full(shape, -11.0 - k))
    assert x is None if first else (x.requires_grad and torch.equal(x.detach(), torch.full(shape, 9.0 + k)))


@pytest.mark.parametrize("world,pp", [(4, 4), (4, 2)], ids=["pp4", "pp2xdp2"])
def test_p2p_moves_static_shapes_between_neighbours(world, pp):
    # pp2xdp2: PP groups [0,2] and [1,3], so peers must be named by global rank within the group.
    run_distributed(_p2p_chain, world_size=world, pp=pp)


# --- 1F1B -----------------------------------------------------------------------------------------------

def _check_1f1b(rank, world, num_microbatches_list):
    pp, k = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    assert get_forward_backward_func() is forward_backward_pipelining_1f1b
    for m in num_microbatches_list:
        batches = micro_batches(m)
        stage = this_stage(pp, k)
        recorder = RecordingGradSync(stage.layers[0].weight)
        metrics = forward_backward_pipelining_1f1b(forward_step, iter(batches), stage, m, (B, S, H),
                                                   torch.float32, loss_scale=2.0, grad_sync=recorder)
        ref_losses, ref_layers = reference([batches], loss_scale=2.0)
        if k == pp - 1:
            assert [d["loss"] for d in metrics] == ref_losses[0]
        else:
            assert metrics == []
        assert_stage_grads_match(stage, ref_layers, pp, k)
        assert stage.max_in_flight == min(m, pp - k), (m, stage.max_in_flight)
        assert stage.in_flight == 0
        assert recorder.events == ["no_sync"] * (m - 1) + ["sync", "finish"]


@pytest.mark.parametrize("pp,num_microbatches", [(2, [1, 2, 5]), (4, [2, 4, 7])], ids=["pp2", "pp4"])
def test_1f1b_equals_single_process(pp, num_microbatches):
    """M < pp, M = pp and M > pp: losses and every stage's gradients match the whole model's."""
    run_distributed(_check_1f1b, world_size=pp, pp=pp, args=(num_microbatches,))


def _check_forward_only(rank, world):
    pp, k = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    batches = micro_batches(3)
    stage = this_stage(pp, k)
    metrics = forward_backward_pipelining_1f1b(forward_step, iter(batches), stage, 3, (B, S, H), torch.float32,
                                               forward_only=True)
    ref_losses, _ = reference([batches])
    assert ([d["loss"] for d in metrics] == ref_losses[0]) if k == pp - 1 else metrics == []
    assert all(p.grad is None for p in stage.parameters())
    assert stage.max_in_flight == 0  # no graph was built


def test_forward_only_relays_activations_without_graphs():
    run_distributed(_check_forward_only, world_size=4, pp=4)


# --- pp = 1 ---------------------------------------------------------------------------------------------

def test_no_pipelining_equals_single_process():
    ps.destroy_model_parallel()  # one plain process: pp = 1, first and last stage at once
    assert get_forward_backward_func() is forward_backward_no_pipelining
    batches = micro_batches(3)
    stage = this_stage(1, 0)
    recorder = RecordingGradSync(stage.layers[-1].bias)
    metrics = forward_backward_no_pipelining(forward_step, iter(batches), stage, 3, (B, S, H), torch.float32,
                                             loss_scale=4.0, grad_sync=recorder)
    ref_losses, ref_layers = reference([batches], loss_scale=4.0)
    assert [d["loss"] for d in metrics] == ref_losses[0]
    assert_stage_grads_match(stage, ref_layers, 1, 0)
    assert stage.max_in_flight == 1
    assert recorder.events == ["no_sync", "no_sync", "sync", "finish"]

    stage.zero_grad(set_to_none=True)
    events_before = list(recorder.events)
    metrics = forward_backward_no_pipelining(forward_step, iter(batches), stage, 3, (B, S, H), torch.float32,
                                             forward_only=True, grad_sync=recorder)
    assert [d["loss"] for d in metrics] == ref_losses[0]
    assert all(p.grad is None for p in stage.parameters())
    assert recorder.events == events_before  # evaluation neither backprops nor syncs
