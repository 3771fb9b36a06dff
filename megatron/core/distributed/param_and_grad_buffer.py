"""Contiguous gradient buffers (and, for the distributed optimizer, parameter buffers), cut into buckets.

Megatron's layout: the parameters of one dtype share one flat fp32 (or bf16/fp16) `grad_data` tensor and
each parameter's `main_grad` is a view into it. Backward hooks add every micro-batch's gradient into
`main_grad` (fp32 accumulation even when the parameters are bf16), and the data-parallel collective
works on the buffer itself: there is no `.grad` kept between micro-batches and no second copy for the
reduction.

Parameters are laid out in *reverse* registration order (roughly the order backward produces their
gradients) and cut into buckets of about `bucket_numel` elements; a bucket is the unit of one collective.
With the distributed optimizer (`distributed=True`) the layout is also padded so that every data-parallel
rank owns an equal contiguous shard of every bucket:

    param start   aligned to 64 elements (so no shard boundary splits a small vector's first elements)
    bucket end    padded to a multiple of lcm(dp, 128) elements; padding is never model state

and the parameters themselves are moved into a flat `param_data` buffer of their own dtype, so the
updated shards can be all-gathered in place.

    glossary: dp = data-parallel size; n_b = a bucket's padded length; shard = the [n_b/dp] slice of a
    bucket one DP rank owns (reduce-scatter output, the optimizer's state, all-gather input)
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

PARAM_ALIGN = 64  # elements; Megatron aligns parameter starts the same way under the distributed optimizer
BUCKET_ALIGN = 128  # bucket ends pad to a multiple of lcm(dp, 128)


@dataclass
class Bucket:
    """params[i] occupies buffer elements [offsets[i], offsets[i] + numel); the bucket is [start, end)."""
    params: List[nn.Parameter]
    offsets: List[int]
    start: int
    end: int
    grad_data: torch.Tensor  # [n_b] view of the buffer's grad_data
    param_data: Optional[torch.Tensor]  # [n_b] view of the buffer's param_data (distributed optimizer)
    ready: set = field(default_factory=set)  # ids of params whose grad for the synced backward is in
    work: object = None  # the in-flight gradient collective
    gather_work: object = None  # the in-flight parameter all-gather

    @property
    def numel(self) -> int:
        return self.end - self.start

    def shard_range(self, rank: int, dp: int) -> Tuple[int, int]:
        """[lo, hi) of the shard DP rank `rank` owns, in buffer coordinates."""
        n = self.numel // dp
        return self.start + rank * n, self.start + (rank + 1) * n


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class ParamAndGradBuffer:
    """The buffers of parameters of one dtype, with gradients in `grad_dtype`.

    params:        same dtype and device, in registration order
    grad_dtype:    dtype of main_grad (fp32 unless gradients are reduced in the parameter dtype)
    bucket_numel:  close a bucket once it holds this many elements (None: one bucket)
    dp:            data-parallel size (only the padding of the distributed optimizer depends on it)
    distributed:   pad for dp equal shards and move the parameters into `param_data`
    own_bucket:    params that get a bucket of their own (tied embeddings: both stages shard them alike)
    """

    def __init__(self, params: List[nn.Parameter], grad_dtype: torch.dtype, bucket_numel: Optional[int],
                 dp: int, distributed: bool, own_bucket=lambda p: False):
        self.param_dtype, self.grad_dtype = params[0].dtype, grad_dtype
        self.dp, self.distributed = dp, distributed
        device = params[0].device
        bucket_multiple = math.lcm(dp, BUCKET_ALIGN) if distributed else 1
        spans, offset = [], 0  # (params, offsets, start, end) per bucket
        current, offsets, start = [], [], 0

        def close():
            nonlocal offset, current, offsets, start
            if current:
                end = _pad(offset, bucket_multiple)
                spans.append((current, offsets, start, end))
                offset = start = end
                current, offsets = [], []

        for p in reversed(params):
            alone = own_bucket(p)
            if alone:
                close()
            if distributed:
                offset = _pad(offset, PARAM_ALIGN)
            current.append(p)
            offsets.append(offset)
            offset += p.numel()
            if alone or (bucket_numel is not None and offset - start >= bucket_numel):
                close()
        close()
        self.numel = offset
        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)  # [N]
        self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=device) if distributed else None
        self.buckets: List[Bucket] = []
        self.offset_of: Dict[int, int] = {}
        for ps_, offs, s, e in spans:
            self.buckets.append(Bucket(ps_, offs, s, e, self.grad_data[s:e],
                                       None if self.param_data is None else self.param_data[s:e]))
            for p, o in zip(ps_, offs):
                self.offset_of[id(p)] = o
                n = p.numel()
                if distributed:  # the parameter now lives in the flat buffer (values kept)
                    view = self.param_data[o:o + n].view_as(p)
                    view.copy_(p.data)
                    p.data = view
                p.main_grad = self.grad_data[o:o + n].view_as(p)

    def reset(self) -> None:
        """Zero the gradients for the next iteration (padding stays zero)."""
        self.grad_data.zero_()
        for b in self.buckets:
            b.ready.clear()
            b.work = None
