"""Data-parallel gradient averaging in flat buckets, overlapped with the step's last backward.

Every data-parallel replica computes gradients on its own data; before the optimizer step they are
averaged over the DP group, which makes the update that of the mean loss over all replicas' data.
Instead of one all-reduce per parameter (latency-bound) gradients are copied into a few flat buckets of
about `bucket_size_mb` each and all-reduced per bucket.

Overlap: a hook after each parameter's gradient accumulation marks it ready; once a bucket's parameters
are all ready its all-reduce is launched asynchronously while backward goes on computing earlier
layers' gradients. Parameters are bucketed in *reverse* registration order because backward produces
gradients roughly last layer first, so the first bucket fills first.

Gradient accumulation over micro-batches: backwards inside `no_sync()` only accumulate into .grad;
the schedule runs the last micro-batch's backward outside it, and `finish_grad_sync()` waits for the
launched all-reduces, reduces whatever was not launched (no overlap, or a parameter that received no
gradient on this rank: its gradient counts as zero), and writes the averages back into .grad.

Buckets are launched strictly in bucket order (a ready bucket waits for the ones before it), so every
rank issues the same sequence of collectives even when hooks fire in a different order or not at all.

    glossary: dp = data-parallel size; a bucket = a flat buffer [n] holding the grads of a few params
"""

from contextlib import contextmanager
from typing import Iterable, List

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import parallel_state as ps


class _Bucket:
    """A group of parameters whose gradients are reduced together through one flat buffer."""

    def __init__(self, params: List[nn.Parameter]):
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.buffer = torch.zeros(self.numel, dtype=params[0].dtype, device=params[0].device)  # [n]
        self.ready: set = set()  # ids of params whose grad for the synced backward is complete
        self.work = None  # the in-flight async all_reduce, once launched

    def views(self):
        """(param, its slice of the buffer shaped like the param)."""
        offset = 0
        for p in self.params:
            yield p, self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def launch(self, group, dp: int) -> None:
        """Flatten the grads (None counts as zero), pre-divide by dp, start the all-reduce (sum)."""
        for p, view in self.views():
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad)
        self.buffer.div_(dp)  # dividing before the sum keeps large fp16/bf16 sums in range
        self.work = dist.all_reduce(self.buffer, op=dist.ReduceOp.SUM, group=group, async_op=True)

    def finish(self) -> None:
        self.work.wait()
        for p, view in self.views():
            if p.grad is None:
                p.grad = view.clone()
            else:
                p.grad.copy_(view)
        self.work = None
        self.ready.clear()


class DataParallelGradSync:
    """Averages the gradients of `params` over the data-parallel group after backward.

    params:         the model's parameters (those without requires_grad are skipped)
    group:          the group to average over; None = this rank's DP group from parallel_state
    bucket_size_mb: target bucket size in MiB (a larger parameter gets a bucket of its own)
    overlap:        launch each bucket's all-reduce from backward hooks as soon as it is full

    Use: run all but the last micro-batch's backward inside `no_sync()`, then `finish_grad_sync()`
    before the optimizer step (the pipeline schedules do both when given `grad_sync=`).
    With a DP size of 1 every method is a no-op.
    """

    def __init__(self, params: Iterable[nn.Parameter], group=None, bucket_size_mb: float = 25,
                 overlap: bool = True):
        unique = {}
        for p in params:
            if p.requires_grad:
                unique.setdefault(id(p), p)
        self.params = list(unique.values())
        self.group = group if group is not None else ps.get_data_parallel_group()
        self.dp = dist.get_world_size(self.group) if self.group is not None and dist.is_initialized() else 1
        self.overlap = overlap
        self._sync_enabled = True
        self._hooks = []
        self.buckets: List[_Bucket] = []
        if self.dp == 1:
            return
        self.buckets = self._make_buckets(bucket_size_mb)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._next_to_launch = 0  # buckets [0, _next_to_launch) are in flight
        if overlap:
            self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self.params]

    def _make_buckets(self, bucket_size_mb: float) -> List[_Bucket]:
        """Fill buckets in reverse registration order; a new dtype or device also starts a new bucket."""
        limit = bucket_size_mb * 2 ** 20
        buckets, current, size = [], [], 0
        for p in reversed(self.params):
            if current and (size >= limit or p.dtype != current[0].dtype or p.device != current[0].device):
                buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            buckets.append(_Bucket(current))
        return buckets

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        """Hook after p.grad was accumulated: mark it ready; launch every full bucket that is next in line."""
        if not self._sync_enabled:
            return
        bucket = self._bucket_of[id(p)]
        if id(p) in bucket.ready or bucket.work is not None:
            raise RuntimeError(
                "a parameter received a gradient twice in one synchronised backward; run every backward "
                "but the step's last inside grad_sync.no_sync(), and call finish_grad_sync() once per step")
        bucket.ready.add(id(p))
        while (self._next_to_launch < len(self.buckets)
               and len(self.buckets[self._next_to_launch].ready) == len(self.buckets[self._next_to_launch].params)):
            self.buckets[self._next_to_launch].launch(self.group, self.dp)
            self._next_to_launch += 1

    @contextmanager
    def no_sync(self):
        """Backwards inside only accumulate into .grad; nothing is communicated."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def finish_grad_sync(self) -> None:
        """Launch the buckets the hooks did not, wait for all, write the averaged grads into .grad."""
        if self.dp == 1:
            return
        for bucket in self.buckets[self._next_to_launch:]:
            bucket.launch(self.group, self.dp)
        for bucket in self.buckets:
            bucket.finish()
        self._next_to_launch = 0


def allreduce_grads_in_group(params: Iterable[nn.Parameter], group) -> None:
    """Sum the grads of `params` over `group` in place (tied word embeddings over the embedding group).

    A parameter without a grad contributes zeros and receives the sum. A None group or a group of one
    rank does nothing.
    """
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    params = [p for p in params if p.requires_grad]
    by_kind = {}
    for p in params:  # one flat all-reduce per (dtype, device)
        by_kind.setdefault((p.dtype, p.device), []).append(p)
    for same in by_kind.values():
        bucket = _Bucket(same)
        for p, view in bucket.views():
            view.copy_(p.grad) if p.grad is not None else view.zero_()
        dist.all_reduce(bucket.buffer, op=dist.ReduceOp.SUM, group=group)
        for p, view in bucket.views():
            if p.grad is None:
                p.grad = view.clone()
            else:
                p.grad.copy_(view)
