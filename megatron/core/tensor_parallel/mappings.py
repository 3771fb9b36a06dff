"""The four collectives that move activations in and out of a tensor-parallel region, as autograd functions.

Glossary: `tp` the tensor-parallel world size, `h` a full last dim, `h/tp` this rank's slice of it.
Activations are `[b, s, h]`; tensor parallelism always splits the last dim.

| function                                    | forward             | backward            |
|---------------------------------------------|---------------------|---------------------|
| `copy_to_tensor_model_parallel_region`      | identity            | all-reduce          |
| `reduce_from_tensor_model_parallel_region`  | all-reduce          | identity            |
| `scatter_to_tensor_model_parallel_region`   | split last dim      | all-gather last dim |
| `gather_from_tensor_model_parallel_region`  | all-gather last dim | split last dim      |

Why the pairs: a replicated input feeding rank-local weights (column-parallel GEMM) gets a partial
gradient on every rank, so its backward must sum them (`copy_to`); partial outputs of a row-parallel GEMM
are summed forward, and the sum's gradient is the same on every rank (`reduce_from`).

With tp == 1 each wrapper returns its input unchanged and calls no collective, so a single process
needs no process group. All collectives run over `parallel_state.get_tensor_model_parallel_group()`.
"""

import torch
import torch.distributed as dist

from megatron.core import parallel_state


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
