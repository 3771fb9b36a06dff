"""Point-to-point exchange between adjacent pipeline stages: activations forward, their gradients back.

Shapes are static: the receiver allocates `shape`/`dtype` itself (every micro-batch of a step has the
same `[b, s, h]`), so no shape message precedes the data. All sends and receives of one call go into a
single `torch.distributed.batch_isend_irecv`, which is what lets two neighbours exchange in both
directions at once (`send_forward_recv_backward` on stage k pairs with `send_backward_recv_forward` on
stage k+1) without either blocking the other.

Peers are named by their *global* rank plus `group=` the PP group (torch's rule for p2p in a
sub-group). The first stage has no previous stage and the last none after it: a function whose peer does
not exist sends nothing and returns None, so the schedule needs no special cases at the ends.

    direction   from stage k to   what
    forward     k + 1             output activation of k          (send_forward / recv_forward)
    backward    k - 1             d loss / d input activation of k (send_backward / recv_backward)

Each function takes `timers` (`megatron/core/timers.py`, default none on) and times its exchange under
Megatron's name (forward-recv, forward-send, backward-recv, backward-send, forward-send-backward-recv,
backward-send-forward-recv); a stage without that peer sends nothing and times nothing.
"""

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.timers import NO_TIMERS, Timers

Shape = Sequence[int]


def _exchange(send_next: Optional[torch.Tensor], send_prev: Optional[torch.Tensor],
              recv_prev: Optional[Tuple[Shape, torch.dtype]], recv_next: Optional[Tuple[Shape, torch.dtype]],
              ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Post every requested send/receive as one batch, wait for all. Returns (from_prev, from_next)."""
    group = ps.get_pipeline_model_parallel_group()
    device = ps.get_device()
    ops = []
    from_prev = from_next = None
    # Receives are posted first so that a peer's matching send finds its buffer; the order inside one
    # batch does not matter for correctness, only that both sides post the same pairs.
    if recv_prev is not None:
        shape, dtype = recv_prev
        from_prev = torch.empty(tuple(shape), dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, from_prev, ps.get_pipeline_model_parallel_prev_rank(), group))
    if recv_next is not None:
        shape, dtype = recv_next
        from_next = torch.empty(tuple(shape), dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, from_next, ps.get_pipeline_model_parallel_next_rank(), group))
    # The tensors to send are kept alive (and contiguous) in this frame until every request completes.
    if send_prev is not None:
        send_prev = send_prev.detach().contiguous()
        ops.append(dist.P2POp(dist.isend, send_prev, ps.get_pipeline_model_parallel_prev_rank(), group))
    if send_next is not None:
        send_next = send_next.detach().contiguous()
        ops.append(dist.P2POp(dist.isend, send_next, ps.get_pipeline_model_parallel_next_rank(), group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        if device.type == "cuda":
            # wait() orders the NCCL stream before the current stream; this also guards against the
            # known race of back-to-back batch_isend_irecv calls reusing buffers.
            torch.cuda.synchronize(device)
    return from_prev, from_next


def recv_forward(shape: Shape, dtype: torch.dtype, timers: Timers = NO_TIMERS) -> Optional[torch.Tensor]:
    """This stage's input activation from the previous stage; None on the first stage.

    The tensor is a leaf that requires grad, so after backward its .grad is what `send_backward` returns.
    """
    if ps.is_pipeline_first_stage():
        return None
    with timers("forward-recv"):
        x, _ = _exchange(None, None, (shape, dtype), None)
    return x.requires_grad_()


def send_forward(output: torch.Tensor, timers: Timers = NO_TIMERS) -> None:
    """Output activation to the next stage; nothing on the last stage."""
    if ps.is_pipeline_last_stage():
        return
    with timers("forward-send"):
        _exchange(output, None, None, None)


def recv_backward(shape: Shape, dtype: torch.dtype, timers: Timers = NO_TIMERS) -> Optional[torch.Tensor]:
    """Gradient of the loss w.r.t. this stage's output, from the next stage; None on the last stage."""
    if ps.is_pipeline_last_stage():
        return None
    with timers("backward-recv"):
        _, grad = _exchange(None, None, None, (shape, dtype))
    return grad


def send_backward(input_grad: Optional[torch.Tensor], timers: Timers = NO_TIMERS) -> None:
    """Gradient w.r.t. this stage's input to the previous stage; nothing on the first stage."""
    if ps.is_pipeline_first_stage():
        return
    assert input_grad is not None, "a non-first stage must send its input's gradient back"
    with timers("backward-send"):
        _exchange(None, input_grad, None, None)


def send_forward_recv_backward(output: torch.Tensor, shape: Shape, dtype: torch.dtype,
                               timers: Timers = NO_TIMERS) -> Optional[torch.Tensor]:
    """Send this micro-batch's output on and, in the same batch, receive an output gradient back.

    On the last stage neither happens and None is returned.
    """
    if ps.is_pipeline_last_stage():
        return None
    with timers("forward-send-backward-recv"):
        _, grad = _exchange(output, None, None, (shape, dtype))
    return grad


def send_backward_recv_forward(input_grad: Optional[torch.Tensor], shape: Shape, dtype: torch.dtype,
                               timers: Timers = NO_TIMERS) -> Optional[torch.Tensor]:
    """Send an input gradient back and, in the same batch, receive the next input activation.

    On the first stage neither happens and None is returned.
    """
    if ps.is_pipeline_first_stage():
        return None
    assert input_grad is not None, "a non-first stage must send its input's gradient back"
    with timers("backward-send-forward-recv"):
        x, _ = _exchange(None, input_grad, (shape, dtype), None)
    return x.requires_grad_()
