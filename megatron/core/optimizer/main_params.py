"""The fp32 tensors the optimizer steps ("main parameters") and the gradient each one reads.

    precision / optimizer        main parameter                              its gradient
    fp32, plain                  the model parameter itself                  main_grad (a buffer view)
    bf16/fp16, plain             an fp32 copy of the parameter               main_grad, or an fp32 copy of it
    fp32, distributed            the owned slice of the flat parameter       the owned slice of the grad buffer
    bf16/fp16, distributed       an fp32 copy of the owned slice             the same slice (fp32 copy if 16-bit)

A parameter may straddle two data-parallel shards: each rank steps its part, which Adam (elementwise)
allows. After the step the fp32 values are written back, cast, into the model parameter (or its slice of
the flat buffer, which the all-gather then spreads). Main parameters carry the attributes the gradient
norm reads (`tensor_model_parallel`, `shared_embedding`).

In the bf16/fp16 modes the main parameters start as the model's half-precision values widened (as in
Megatron), so a fresh run and a resumed one differ only by what the checkpoint stores: the fp32 values.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from megatron.core.distributed import Bucket, DataParallelGradSync

_NORM_ATTRS = ("tensor_model_parallel", "partition_dim", "shared_embedding")


@dataclass
class MainParam:
    model: nn.Parameter  # the model's parameter
    lo: int  # this main parameter is model.view(-1)[lo:hi]
    hi: int
    main: torch.Tensor  # fp32
    grad: torch.Tensor  # the reduced gradient of [lo, hi), in the gradient buffer's dtype
    bucket: Optional[Bucket] = None  # distributed: the bucket and the slice's start in the buffer
    buffer_start: int = 0

    @property
    def aliased(self) -> bool:
        """The main parameter is the model's own memory (fp32): nothing to copy back."""
        return self.model.dtype == torch.float32

    def model_slice(self) -> torch.Tensor:
        return self.model.detach().view(-1)[self.lo:self.hi]  # [hi - lo]


def _tag(main: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
    for name in _NORM_ATTRS:
        if hasattr(p, name) and main is not p:
            setattr(main, name, getattr(p, name))
    return main


def build_main_params(sync: DataParallelGradSync) -> List[MainParam]:
    """Whole parameters in registration order, or (distributed) this rank's slices in bucket order."""
    out = []
    if not sync.distributed:
        for p in sync.params:
            main = p if p.dtype == torch.float32 else _tag(p.detach().float(), p)  # [same shape]
            out.append(MainParam(p, 0, p.numel(), main, p.main_grad))
        return out
    for buf in sync.buffers:
        for bucket in buf.buckets:
            lo, hi = sync.shard_in_buffer(bucket)
            for p, off in zip(bucket.params, bucket.offsets):
                a, b = max(off, lo), min(off + p.numel(), hi)
                if a >= b:
                    continue
                flat = p.detach().view(-1)[a - off:b - off]  # [b - a], a view of param_data
                main = _tag(flat if p.dtype == torch.float32 else flat.float(), p)
                out.append(MainParam(p, a - off, b - off, main, buf.grad_data[a:b], bucket, a))
    return out
