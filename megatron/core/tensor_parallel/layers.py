"""Linear and embedding layers whose weights are split across tensor-parallel ranks.

Glossary: `tp` tensor-parallel size, `in`/`out` full feature sizes, `V` padded vocabulary, `b, s` batch
and sequence. Activations are `[b, s, h]`; the split is always on the last dim.

    ColumnParallelLinear   weight [out/tp, in]   x [b, s, in] -> copy_to -> GEMM -> [b, s, out/tp] (-> gather)
    RowParallelLinear      weight [out, in/tp]   x [b, s, in/tp] -> GEMM -> reduce_from -> + bias -> [b, s, out]
    VocabParallelEmbedding weight [V/tp, h]      ids [b, s] -> local rows, foreign ids zeroed -> reduce_from

Column then row (fc1 -> fc2, qkv -> proj) needs one all-reduce forward and one backward.

With sequence parallelism (`sequence_parallel=True`) the input of a column-parallel GEMM is this rank's
chunk of the sequence `[b, s/tp, in]`: it is all-gathered inside the GEMM (and gathered again in backward
for the weight gradient instead of being kept, as Megatron does), and the input gradient is
reduce-scattered. The row-parallel GEMM reduce-scatters its output to `[b, s/tp, out]` instead of
all-reducing it; its bias, added to local tokens only, gets a partial gradient and is tagged
`sequence_parallel` (the trainer sums such gradients over the TP group).

Constructors only allocate (`torch.empty`): the model draws each parameter at full size and keeps its
shard (see `sharding.py`), so weights do not depend on the layout. Every parameter is tagged with
`tensor_model_parallel` (and, if split, `partition_dim` / `partition_stride`), also when tp == 1.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    _gather_seq, _reduce_scatter_seq, copy_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region, reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.sharding import divide, set_tensor_model_parallel_attributes


def _param(*shape, device=None, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))


class _SequenceGatherLinear(torch.autograd.Function):
    """Forward: all-gather the sequence chunks of x, then x W^T + b; only the chunk is saved.
    Backward: the input gradient reduce-scattered over the sequence; x gathered again for dW."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # x: [b, s/tp, in], weight: [out/tp, in], bias: [out/tp] or None
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(_gather_seq(x), weight, bias)  # [b, s, out/tp]

    @staticmethod
    def backward(ctx, grad):  # grad: [b, s, out/tp]
        x, weight = ctx.saved_tensors
        grad_x = _reduce_scatter_seq(grad.matmul(weight))  # [b, s/tp, in], summed over the ranks' partials
        total = _gather_seq(x)  # [b, s, in]
        grad_w = grad.reshape(-1, grad.shape[-1]).t().matmul(total.reshape(-1, total.shape[-1]))  # [out/tp, in]
        grad_b = grad.sum(dim=(0, 1)) if ctx.has_bias else None  # [out/tp]
        return grad_x, grad_w, grad_b


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                           gather_output: bool = False, sequence_parallel: bool = False) -> torch.Tensor:
    """The column-parallel GEMM on a replicated input; also the tied LM head (weight = embedding shard).

    x [b, s, in] (sequence parallel: [b, s/tp, in]), weight [out/tp, in], bias [out/tp] -> [b, s, out/tp],
    or [b, s, out] with gather_output.
    """
    if sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1:
        y = _SequenceGatherLinear.apply(x, weight, bias)  # [b, s, out/tp]
    else:
        x = copy_to_tensor_model_parallel_region(x)  # [b, s, in]; backward sums the ranks' input grads
        y = F.linear(x, weight, bias)  # [b, s, out/tp]
    return gather_from_tensor_model_parallel_region(y) if gather_output else y


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows: each rank computes its slice of the output features.

    `stride` > 1 says the full output is `stride` equal blocks (SwiGLU fc1: [gate; up]) and each rank holds
    its slice of every block, so its output is [gate_r, up_r]. `name` is the flag reported when `out` does
    not divide by tp (for stride 2, `out / 2` must).
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = False,
                 stride: int = 1, *, name: str = "ColumnParallelLinear output size", sequence_parallel: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        tp = parallel_state.get_tensor_model_parallel_world_size()
        assert output_size % stride == 0, f"output size {output_size} is not {stride} equal blocks"
        self.input_size, self.output_size, self.gather_output = input_size, output_size, gather_output
        self.output_size_per_partition = stride * divide(output_size // stride, tp, name)
        self.weight = _param(self.output_size_per_partition, input_size, device=device, dtype=dtype)
        set_tensor_model_parallel_attributes(self.weight, True, partition_dim=0, stride=stride)
        if bias:
            self.bias = _param(self.output_size_per_partition, device=device, dtype=dtype)
            set_tensor_model_parallel_attributes(self.bias, True, partition_dim=0, stride=stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, s, in], or [b, s/tp, in] sequence parallel
        return column_parallel_linear(x, self.weight, self.bias, self.gather_output,
                                      self.sequence_parallel)  # [b, s, out/tp] or [b, s, out]

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, local_out={self.output_size_per_partition}"


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns: each rank multiplies its slice of the input features,
    the partial products are summed over TP ranks, then the full (replicated) bias is added once.

    `input_is_parallel=False` takes a full input and splits it first. `name` is the flag reported when
    `in` does not divide by tp.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = True,
                 *, name: str = "RowParallelLinear input size", sequence_parallel: bool = False, device=None,
                 dtype=None):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.input_size, self.output_size, self.input_is_parallel = input_size, output_size, input_is_parallel
        self.input_size_per_partition = divide(input_size, tp, name)
        self.weight = _param(output_size, self.input_size_per_partition, device=device, dtype=dtype)
        set_tensor_model_parallel_attributes(self.weight, True, partition_dim=1, stride=1)
        if bias:
            self.bias = _param(output_size, device=device, dtype=dtype)
            set_tensor_model_parallel_attributes(self.bias, False)
            self.bias.sequence_parallel = sequence_parallel  # added to local tokens: a partial gradient
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [b, s, in/tp], or [b, s, in] if not parallel
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)  # [b, s, in/tp]
        y = F.linear(x, self.weight)  # [b, s, out], this rank's partial sum
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y)  # [b, s/tp, out]
        else:
            y = reduce_from_tensor_model_parallel_region(y)  # [b, s, out]
        # The bias is added after the reduction, or it would be counted tp times.
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, local_in={self.input_size_per_partition}"


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split by rows: rank r owns ids [r*V/tp, (r+1)*V/tp).

    Each rank looks up the ids it owns and writes zeros for the others; the all-reduce then gives every
    rank the full embedding. `V` is the padded vocabulary (a multiple of --make-vocab-size-divisible-by
    times tp), so it divides evenly.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, device=None, dtype=None):
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_rank = divide(num_embeddings, tp, "padded vocabulary size (see --make-vocab-size-divisible-by)")
        self.vocab_start_index, self.vocab_end_index = rank * per_rank, (rank + 1) * per_rank
        self.weight = _param(per_rank, embedding_dim, device=device, dtype=dtype)  # [V/tp, h]
        set_tensor_model_parallel_attributes(self.weight, True, partition_dim=0, stride=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [b, s]
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return F.embedding(ids, self.weight)  # [b, s, h]
        foreign = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)  # [b, s]
        local_ids = (ids - self.vocab_start_index).masked_fill(foreign, 0)  # [b, s], a valid row everywhere
        out = F.embedding(local_ids, self.weight)  # [b, s, h]
        out = out.masked_fill(foreign.unsqueeze(-1), 0.0)  # [b, s, h], zero where another rank owns the id
        return reduce_from_tensor_model_parallel_region(out)  # [b, s, h]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows=[{self.vocab_start_index}, {self.vocab_end_index})"
