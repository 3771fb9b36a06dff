"""Data-parallel gradient reduction on contiguous fp32 `main_grad` buckets, overlapped with backward.

Every data-parallel replica computes gradients on its own data; before the optimizer step they are
averaged over the DP group, which makes the update that of the mean loss over all replicas' data.

Gradients live in the buffers of `param_and_grad_buffer.py`: a hook after each parameter's gradient
accumulation adds `.grad` into `param.main_grad` (a view of the buffer, fp32 by default even for bf16
parameters) and drops `.grad`, so micro-batches accumulate in the buffer and the collective reduces the
buffer in place. Per bucket, after the step's last backward:

    plain data parallelism      all-reduce (sum of grads pre-divided by dp)      every rank: all of it
    distributed optimizer       reduce-scatter (same sum)                        each rank: its shard

`--overlap-grad-reduce`: a bucket's collective is launched from the hooks as soon as its last parameter's
gradient is in, while backward goes on with earlier layers. Buckets are launched strictly in bucket order
(a ready bucket waits for the ones before it), so every rank issues the same sequence of collectives even
when hooks fire in another order or not at all; `finish_grad_sync()` launches what is left (a parameter
that got no gradient counts as zero) and waits.

The distributed optimizer also needs the updated parameters back: `start_param_sync()` all-gathers each
bucket's shards in place; with `--overlap-param-gather` it is only started after the step and each
module waits for its bucket in a forward pre-hook, so the gather overlaps the next forward.

    glossary: dp = data-parallel size; bucket = a [n_b] slice of a buffer reduced by one collective
"""

from contextlib import contextmanager
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import parallel_state as ps
from megatron.core.collectives import all_gather_single, reduce_scatter_single
from megatron.core.distributed.param_and_grad_buffer import Bucket, ParamAndGradBuffer
from megatron.core.timers import NO_TIMERS, Timers


class DataParallelGradSync:
    """The gradient buffers of `params` and their reduction over the data-parallel group.

    params:               the model's parameters (those without requires_grad are skipped)
    group:                the group to reduce over; None = this rank's DP group from parallel_state
    grad_dtype:           dtype of `main_grad`; None = each parameter's own dtype
    bucket_numel:         elements per bucket (None: one bucket per buffer)
    overlap_grad_reduce:  launch each bucket's collective from backward hooks
    distributed_optimizer: reduce-scatter instead of all-reduce, shard-padded layout, parameters in
                          `param_data` (gathered by `start_param_sync`)
    own_bucket:           parameters that get a bucket of their own (the tied word embedding of a
                          pipeline stage, so first and last stage shard it alike)
    timers:               `megatron/core/timers.py` (default: none on): times `finish_grad_sync` as
                          "grads-all-reduce" or "grads-reduce-scatter" (with overlap, the part of the
                          reduction backward did not hide) and `start_param_sync` as "params-all-gather"

    Use per step: `zero_grad_buffer()`, backwards (all but the last inside `no_sync()`),
    `finish_grad_sync()`; the optimizer then reads `main_grad` or, distributed, its shards.
    """

    def __init__(self, params: Iterable[nn.Parameter], group=None, *, grad_dtype: Optional[torch.dtype] = None,
                 bucket_numel: Optional[int] = None, overlap_grad_reduce: bool = False,
                 distributed_optimizer: bool = False, overlap_param_gather: bool = False,
                 own_bucket: Iterable[nn.Parameter] = (), timers: Timers = NO_TIMERS):
        unique = {}
        for p in params:
            if p.requires_grad:
                unique.setdefault(id(p), p)
        self.params = list(unique.values())
        self.group = group if group is not None else ps.get_data_parallel_group()
        self.dp = dist.get_world_size(self.group) if self.group is not None and dist.is_initialized() else 1
        self.rank = dist.get_rank(self.group) if self.dp > 1 else 0
        self.overlap_grad_reduce, self.distributed = overlap_grad_reduce, distributed_optimizer
        self.overlap_param_gather = overlap_param_gather
        self.timers = timers
        alone = {id(p) for p in own_bucket}
        by_kind = {}  # one buffer per (param dtype, device), in registration order
        for p in self.params:
            by_kind.setdefault((p.dtype, p.device), []).append(p)
        self.buffers: List[ParamAndGradBuffer] = [
            ParamAndGradBuffer(same, grad_dtype or same[0].dtype, bucket_numel, self.dp, distributed_optimizer,
                               own_bucket=lambda p: id(p) in alone)
            for same in by_kind.values()]
        self.buckets: List[Bucket] = [b for buf in self.buffers for b in buf.buckets]
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._buffer_of = {id(p): buf for buf in self.buffers for b in buf.buckets for p in b.params}
        self._sync_enabled = True
        self._next_to_launch = 0  # buckets [0, _next_to_launch) are in flight
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self.params]
        self._gather_hooks = []

    # ---- gradients ---------------------------------------------------------------------------------
    def _on_grad_ready(self, p: nn.Parameter) -> None:
        """After p.grad was accumulated: move it into main_grad; launch every full bucket next in line."""
        p.main_grad.add_(p.grad)  # fp32 += bf16 upcasts exactly; fp32 + fp32 is autograd's own accumulation
        p.grad = None
        if not self._sync_enabled or not self.overlap_grad_reduce or self.dp == 1:
            return
        bucket = self._bucket_of[id(p)]
        if id(p) in bucket.ready or bucket.work is not None:
            raise RuntimeError(
                "a parameter received a gradient twice in one synchronised backward; run every backward "
                "but the step's last inside grad_sync.no_sync(), and call finish_grad_sync() once per step")
        bucket.ready.add(id(p))
        while (self._next_to_launch < len(self.buckets)
               and len(self.buckets[self._next_to_launch].ready) == len(self.buckets[self._next_to_launch].params)):
            self._launch(self.buckets[self._next_to_launch])
            self._next_to_launch += 1

    def _launch(self, bucket: Bucket) -> None:
        """Pre-divide by dp (keeps large half-precision sums in range), then sum over the group."""
        bucket.grad_data.div_(self.dp)
        if self.distributed:
            lo, hi = self.shard(bucket)
            bucket.work = reduce_scatter_single(bucket.grad_data[lo:hi], bucket.grad_data, op=dist.ReduceOp.SUM,
                                          group=self.group, async_op=True)
        else:
            bucket.work = dist.all_reduce(bucket.grad_data, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def shard(self, bucket: Bucket) -> tuple:
        """[lo, hi) of this rank's shard, in bucket coordinates (the whole bucket without sharding)."""
        if not self.distributed:
            return 0, bucket.numel
        lo, hi = bucket.shard_range(self.rank, self.dp)
        return lo - bucket.start, hi - bucket.start

    def shard_in_buffer(self, bucket: Bucket) -> tuple:
        lo, hi = self.shard(bucket)
        return bucket.start + lo, bucket.start + hi

    def buffer_of(self, p: nn.Parameter) -> ParamAndGradBuffer:
        return self._buffer_of[id(p)]

    @contextmanager
    def no_sync(self):
        """Backwards inside only accumulate into main_grad; nothing is communicated."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def finish_grad_sync(self) -> None:
        """Launch the buckets the hooks did not, and wait for all."""
        if self.dp == 1:
            return
        with self.timers("grads-reduce-scatter" if self.distributed else "grads-all-reduce"):
            for bucket in self.buckets[self._next_to_launch:]:
                self._launch(bucket)
            for bucket in self.buckets:
                if bucket.work is not None:  # None: already finished (a second call in the same step)
                    bucket.work.wait()
                    bucket.work = None
                bucket.ready.clear()
        self._next_to_launch = len(self.buckets)

    def zero_grad_buffer(self) -> None:
        for buf in self.buffers:
            buf.reset()
        for p in self.params:
            p.grad = None
        self._next_to_launch = 0

    def allreduce_in_group(self, p: nn.Parameter, group) -> None:
        """Sum p's reduced gradient over `group` (the tied word embedding over the embedding group): the
        whole main_grad, or with the distributed optimizer only this rank's shard (p has its own bucket)."""
        if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return
        if self.distributed:
            bucket = self._bucket_of[id(p)]
            assert bucket.params == [p], "a tied weight needs a bucket of its own under the distributed optimizer"
            lo, hi = self.shard(bucket)
            dist.all_reduce(bucket.grad_data[lo:hi], op=dist.ReduceOp.SUM, group=group)
        else:
            dist.all_reduce(p.main_grad, op=dist.ReduceOp.SUM, group=group)

    def allreduce_sequence_parallel_grads(self, group) -> None:
        """Sum over `group` (the TP group) the gradients of parameters tagged `sequence_parallel` (norms,
        row-parallel biases): under sequence parallelism each TP rank saw only its chunk of the tokens.
        One flat all-reduce; with the distributed optimizer only the owned parts matter afterwards."""
        params = [p for p in self.params if getattr(p, "sequence_parallel", False)]
        if not params or group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return
        flat = torch.cat([p.main_grad.view(-1) for p in params])  # [n]
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for p in params:
            p.main_grad.view(-1).copy_(flat[offset:offset + p.numel()])
            offset += p.numel()

    # ---- parameters (distributed optimizer) --------------------------------------------------------
    def start_param_sync(self) -> None:
        """All-gather every bucket's updated shards into param_data (asynchronously)."""
        if not self.distributed or self.dp == 1:
            return
        with self.timers("params-all-gather"):
            for bucket in self.buckets:
                lo, hi = self.shard(bucket)
                bucket.gather_work = all_gather_single(bucket.param_data, bucket.param_data[lo:hi],
                                                       group=self.group, async_op=True)
            if not self.overlap_param_gather:
                self.finish_param_sync()

    def finish_param_sync(self, buckets: Optional[Iterable[Bucket]] = None) -> None:
        """Wait for the parameter all-gathers (of `buckets`, default all): before evaluation and saving."""
        for bucket in self.buckets if buckets is None else buckets:
            if bucket.gather_work is not None:
                bucket.gather_work.wait()
                bucket.gather_work = None

    def register_gather_hooks(self, model: nn.Module) -> None:
        """--overlap-param-gather: each module waits for its parameters' buckets just before its forward."""
        if not (self.distributed and self.overlap_param_gather and self.dp > 1):
            return
        for module in model.modules():
            buckets = {id(self._bucket_of[id(p)]): self._bucket_of[id(p)]
                       for p in module.parameters(recurse=False) if id(p) in self._bucket_of}
            if buckets:
                mine = list(buckets.values())
                self._gather_hooks.append(module.register_forward_pre_hook(
                    lambda _m, _a, mine=mine: self.finish_param_sync(mine)))

