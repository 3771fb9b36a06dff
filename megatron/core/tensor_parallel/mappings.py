"""The collectives that move activations in and out of a tensor-parallel region, as autograd functions.

Glossary: `tp` the tensor-parallel world size, `h` a full last dim, `h/tp` this rank's slice of it, `s/tp`
this rank's chunk of the sequence (sequence parallelism). Activations are `[b, s, h]`; tensor parallelism
splits the last dim, sequence parallelism dim 1 (rank c holds positions [c·s/tp, (c+1)·s/tp)).

| function                                    | forward             | backward            |
|---------------------------------------------|---------------------|---------------------|
| `copy_to_tensor_model_parallel_region`      | identity            | all-reduce          |
| `reduce_from_tensor_model_parallel_region`  | all-reduce          | identity            |
| `scatter_to_tensor_model_parallel_region`   | split last dim      | all-gather last dim |
| `gather_from_tensor_model_parallel_region`  | all-gather last dim | split last dim      |

Sequence parallelism (`--sequence-parallel`, Megatron's names):

| function                                    | forward             | backward            |
|---------------------------------------------|---------------------|---------------------|
| `scatter_to_sequence_parallel_region`       | split dim 1         | all-gather dim 1    |
| `gather_from_sequence_parallel_region`      | all-gather dim 1    | reduce-scatter dim 1 (the consumer is TP-split: partial grads), or split dim 1 (a replicated consumer) |
| `reduce_scatter_to_sequence_parallel_region`| reduce-scatter dim 1| all-gather dim 1    |

Why the pairs: a replicated input feeding rank-local weights (column-parallel GEMM) gets a partial
gradient on every rank, so its backward must sum them (`copy_to`); partial outputs of a row-parallel GEMM
are summed forward, and the sum's gradient is the same on every rank (`reduce_from`).

With tp == 1 each wrapper returns its input unchanged and calls no collective, so a single process
needs no process group. All collectives run over `parallel_state.get_tensor_model_parallel_group()`.
"""

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.collectives import reduce_scatter_single


def _tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the TP group into a fresh tensor (never in place: the input may be saved by autograd)."""
    out = x.contiguous().clone()
    dist.all_reduce(out, group=parallel_state.get_tensor_model_parallel_group())
    return out


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the last dim: [..., h] -> [..., h/tp]."""
    tp = _tp_size()
    assert x.shape[-1] % tp == 0, f"last dim {x.shape[-1]} not divisible by tp={tp}"
    rank = parallel_state.get_tensor_model_parallel_rank()
    return x.chunk(tp, dim=-1)[rank].contiguous()


def _gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's slice in rank order: [..., h/tp] -> [..., h]."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_tp_size())]
    dist.all_gather(parts, x, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _split_seq(x: torch.Tensor) -> torch.Tensor:
    """This rank's chunk of the sequence: [b, s, ...] -> [b, s/tp, ...]."""
    tp = _tp_size()
    assert x.shape[1] % tp == 0, f"sequence {x.shape[1]} not divisible by tp={tp}"
    return x.chunk(tp, dim=1)[parallel_state.get_tensor_model_parallel_rank()].contiguous()


def _gather_seq(x: torch.Tensor) -> torch.Tensor:
    """Every rank's chunk in rank order: [b, s/tp, ...] -> [b, s, ...]."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_tp_size())]
    dist.all_gather(parts, x, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=1)


def _reduce_scatter_seq(x: torch.Tensor) -> torch.Tensor:
    """Sum over the TP group and keep this rank's chunk: [b, s, ...] partial -> [b, s/tp, ...] total."""
    tp = _tp_size()
    assert x.shape[1] % tp == 0, f"sequence {x.shape[1]} not divisible by tp={tp}"
    stacked = torch.stack(x.chunk(tp, dim=1))  # [tp, b, s/tp, ...], chunk c for rank c
    out = torch.empty_like(stacked[0])
    reduce_scatter_single(out.view(-1), stacked.view(-1), group=parallel_state.get_tensor_model_parallel_group())
    return out


class _CopyToRegion(torch.autograd.Function):
    """Forward: identity (the input is replicated on every TP rank).
    Backward: all-reduce the gradient, summing each rank's partial contribution."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromRegion(torch.autograd.Function):
    """Forward: all-reduce (sum the partial results of every TP rank).
    Backward: identity (the gradient of a sum is the same on every rank)."""

    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToRegion(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dim.
    Backward: all-gather the slices' gradients along the last dim."""

    @staticmethod
    def forward(ctx, x):
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad)


class _GatherFromRegion(torch.autograd.Function):
    """Forward: all-gather every rank's slice along the last dim.
    Backward: keep this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x):
        return _gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad)


class _ScatterToSequence(torch.autograd.Function):
    """Forward: keep this rank's chunk of the sequence (the input is replicated on every TP rank).
    Backward: all-gather the chunks' gradients, the gradient of the replicated input."""

    @staticmethod
    def forward(ctx, x):
        return _split_seq(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad)


class _GatherFromSequence(torch.autograd.Function):
    """Forward: all-gather the sequence chunks.
    Backward: reduce-scatter when each rank's consumer produced a partial gradient (a TP-split GEMM), else
    keep this rank's chunk of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x, tensor_parallel_output_grad):
        ctx.partial = tensor_parallel_output_grad
        return _gather_seq(x)

    @staticmethod
    def backward(ctx, grad):
        return (_reduce_scatter_seq(grad) if ctx.partial else _split_seq(grad)), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Forward: sum the partial results of every TP rank and keep this rank's sequence chunk.
    Backward: all-gather the chunks' gradients."""

    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter_seq(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad)


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[b, s, h] (replicated) -> [b, s/tp, h]; backward all-gathers the gradient."""
    return x if _tp_size() == 1 else _ScatterToSequence.apply(x)


def gather_from_sequence_parallel_region(x: torch.Tensor, tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """[b, s/tp, h] -> [b, s, h]; backward reduce-scatters (or, for a replicated consumer, splits) the gradient."""
    return x if _tp_size() == 1 else _GatherFromSequence.apply(x, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[b, s, h] partial sums -> [b, s/tp, h] totals; backward all-gathers the gradient."""
    return x if _tp_size() == 1 else _ReduceScatterToSequence.apply(x)


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[..., h] -> [..., h], same values; backward all-reduces the gradient."""
    return x if _tp_size() == 1 else _CopyToRegion.apply(x)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[..., h] partial sums -> [..., h] total; backward passes the gradient through."""
    return x if _tp_size() == 1 else _ReduceFromRegion.apply(x)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[..., h] -> [..., h/tp]; backward all-gathers the gradient."""
    return x if _tp_size() == 1 else _ScatterToRegion.apply(x)


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[..., h/tp] -> [..., h]; backward keeps this rank's slice of the gradient."""
    return x if _tp_size() == 1 else _GatherFromRegion.apply(x)
