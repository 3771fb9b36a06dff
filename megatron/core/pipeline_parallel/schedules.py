"""Forward and backward over the micro-batches of one step: without a pipeline, and 1F1B across stages.

Both schedules share one signature, so the trainer asks `get_forward_backward_func()` and calls it:

    metrics = fn(forward_step, data_iterator, model, num_microbatches, tensor_shape, dtype,
                 forward_only=False, loss_scale=1.0, grad_sync=None, timers=NO_TIMERS)

- `forward_step` (`ForwardStep` below) runs this stage's part of the model on the next micro-batch. On
  non-first stages the schedule has already called `model.set_input_tensor(x)` with the activation
  received from the previous stage.
- its `loss_fn` (`LossFn`) is called on the last stage only. The schedule backprops
  `loss * loss_scale / num_microbatches`, so gradients are the mean over micro-batches (times the scale).
- `tensor_shape`/`dtype` describe the activation passed between stages (`[b, s, h]`); outputs must match.
- `grad_sync` (see `megatron.core.distributed.ddp`): every backward except the last runs inside
  `grad_sync.no_sync()`, then `grad_sync.finish_grad_sync()` is called, so the data-parallel all-reduce
  happens once per step and its buckets can start while the last backward is still running.
- `timers` (`megatron/core/timers.py`, default none on): `timers(name)` is a context manager; the schedule
  times "forward-compute", "backward-compute" and, through `p2p`, each pipeline message.

Returns the metrics dicts of the micro-batches, in order, on the last stage and [] on the others.

1F1B on stage k of pp with M micro-batches (F = forward, B = backward):

    warmup    = min(pp - k - 1, M) forwards       recv x -> F -> send y
    steady    = M - warmup rounds                 F, send y + recv dy, B, send dx + recv next x
    cooldown  = warmup backwards                  recv dy -> B -> send dx

A stage keeps the graphs of at most pp - k micro-batches alive (the first stage the most), instead of all
M as in "all forwards, then all backwards".
"""

from collections import deque
from contextlib import nullcontext
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import torch
from torch import nn

from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import p2p
from megatron.core.timers import NO_TIMERS, Timers


Metric = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]  # a mean, or (numerator, denominator)


class LossFn(Protocol):
    def __call__(self, output: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Metric]]:
        """Last stage: the stage's output -> (the loss to backprop, {metric name: value}). A tensor metric is
        averaged over micro-batches and data-parallel ranks; a (numerator, denominator) pair is a ratio of
        totals (training/metrics.py)."""


class ForwardStep(Protocol):
    def __call__(self, data_iterator: Iterator[dict], model: nn.Module) -> Tuple[torch.Tensor, LossFn]:
        """Take the next micro-batch (a dict of tensors on the device; its "ltd" entry is the random-LTD
        state to pass to the model, None in evaluation) and run this stage on it. Returns the stage's output
        (the activation for the next stage, or what `loss_fn` reads on the last stage) and the `loss_fn`."""


class _Step:
    """What both schedules need per micro-batch: run the forward, run the backward, count backwards."""

    def __init__(self, forward_step: ForwardStep, data_iterator: Iterator, model: nn.Module, num_microbatches: int,
                 tensor_shape: Sequence[int], dtype: torch.dtype, forward_only: bool, loss_scale: float,
                 grad_sync, timers):
        assert num_microbatches >= 1, "need at least one micro-batch"
        self.forward_step, self.data_iterator, self.model = forward_step, data_iterator, model
        self.M, self.shape, self.dtype = num_microbatches, tuple(tensor_shape), dtype
        self.forward_only, self.loss_scale, self.grad_sync = forward_only, loss_scale, grad_sync
        self.timers = timers
        self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.metrics: List[dict] = []
        self.backwards_done = 0

    def forward(self, input_tensor: Optional[torch.Tensor]) -> torch.Tensor:
        """One micro-batch through this stage. Returns the activation to send on or, on the last stage,
        the scaled loss to backprop."""
        if not self.first:
            self.model.set_input_tensor(input_tensor)
        with self.timers("forward-compute"):
            output, loss_fn = self.forward_step(self.data_iterator, self.model)
            if self.last:
                loss, metrics = loss_fn(output)
                self.metrics.append(metrics)
                return loss * (self.loss_scale / self.M)
        assert tuple(output.shape) == self.shape and output.dtype == self.dtype, (
            f"stage output {tuple(output.shape)} {output.dtype} differs from the pipeline's static "
            f"tensor_shape {self.shape} {self.dtype}")
        return output

    def backward(self, input_tensor: Optional[torch.Tensor], output: torch.Tensor,
                 output_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Backprop one micro-batch; returns d loss / d input to send to the previous stage.

        Every backward but the step's last runs with the data-parallel all-reduce switched off.
        """
        self.backwards_done += 1
        is_last_backward = self.backwards_done == self.M
        no_sync = self.grad_sync.no_sync() if self.grad_sync is not None and not is_last_backward else nullcontext()
        with no_sync, self.timers("backward-compute"):
            # Last stage: output is the scaled loss (grad None means 1). Elsewhere: the received gradient.
            torch.autograd.backward(output, grad_tensors=output_grad)
        if input_tensor is None:
            return None
        # A stage whose output ignores its input still owes the previous stage a gradient: zeros.
        return input_tensor.grad if input_tensor.grad is not None else torch.zeros_like(input_tensor)

    def finish(self) -> List[dict]:
        if not self.forward_only and self.grad_sync is not None:
            self.grad_sync.finish_grad_sync()
        return self.metrics if self.last else []


def forward_backward_no_pipelining(forward_step: ForwardStep, data_iterator: Iterator, model: nn.Module,
                                   num_microbatches: int, tensor_shape: Sequence[int], dtype: torch.dtype,
                                   forward_only: bool = False, loss_scale: float = 1.0,
                                   grad_sync=None, timers: Timers = NO_TIMERS) -> List[dict]:
    """pp = 1: forward and backward each micro-batch in turn (only one graph alive at a time)."""
    step = _Step(forward_step, data_iterator, model, num_microbatches, tensor_shape, dtype,
                 forward_only, loss_scale, grad_sync, timers)
    for _ in range(num_microbatches):
        if forward_only:
            with torch.no_grad():
                step.forward(None)
        else:
            step.backward(None, step.forward(None), None)
    return step.finish()


def forward_backward_pipelining_1f1b(forward_step: ForwardStep, data_iterator: Iterator, model: nn.Module,
                                     num_microbatches: int, tensor_shape: Sequence[int], dtype: torch.dtype,
                                     forward_only: bool = False, loss_scale: float = 1.0,
                                     grad_sync=None, timers: Timers = NO_TIMERS) -> List[dict]:
    """pp > 1: one-forward-one-backward; see the module docstring for the three phases."""
    step = _Step(forward_step, data_iterator, model, num_microbatches, tensor_shape, dtype,
                 forward_only, loss_scale, grad_sync, timers)
    shape, dtype, M = step.shape, step.dtype, num_microbatches

    if forward_only:  # evaluation: a plain relay of forwards, no graphs kept
        with torch.no_grad():
            for _ in range(M):
                p2p.send_forward(step.forward(p2p.recv_forward(shape, dtype, timers)), timers)
        return step.finish()

    pp, k = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    warmup = min(pp - k - 1, M)
    steady = M - warmup
    inputs, outputs = deque(), deque()  # micro-batches forwarded but not yet backwarded, oldest first

    for _ in range(warmup):
        x = p2p.recv_forward(shape, dtype, timers)
        y = step.forward(x)
        p2p.send_forward(y, timers)
        inputs.append(x)
        outputs.append(y)

    x = p2p.recv_forward(shape, dtype, timers) if steady > 0 else None
    for i in range(steady):
        y = step.forward(x)
        dy = p2p.send_forward_recv_backward(y, shape, dtype, timers)
        inputs.append(x)
        outputs.append(y)
        dx = step.backward(inputs.popleft(), outputs.popleft(), dy)
        if i == steady - 1:  # no more forwards to receive
            p2p.send_backward(dx, timers)
        else:
            x = p2p.send_backward_recv_forward(dx, shape, dtype, timers)

    for _ in range(warmup):
        dy = p2p.recv_backward(shape, dtype, timers)
        dx = step.backward(inputs.popleft(), outputs.popleft(), dy)
        p2p.send_backward(dx, timers)

    assert not inputs and not outputs
    return step.finish()


def get_forward_backward_func() -> Callable:
    """The schedule for this run's pipeline size."""
    if ps.get_pipeline_model_parallel_world_size() > 1:
        return forward_backward_pipelining_1f1b
    return forward_backward_no_pipelining
