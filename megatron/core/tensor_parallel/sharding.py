"""How a full parameter maps to its tensor-parallel shards, and back: pure tensor functions.

The model draws every parameter at full size and keeps its shard (`shard_tensor`), so any layout starts
from the single-process weights; checkpoint tools rebuild full tensors (`merge_shards`) to change layout.

A split parameter carries three attributes (set by `set_tensor_model_parallel_attributes`):
  - `tensor_model_parallel`: True if split across TP ranks (False on replicated params)
  - `partition_dim`: the dim it is split along (0 for column-parallel rows, 1 for row-parallel columns)
  - `partition_stride`: how many equal blocks the full tensor holds along that dim.

Stride: a SwiGLU fc1 computes `[gate; up]` with one GEMM, so its full weight along dim 0 is two blocks.
Splitting it as one block would hand rank 0 all of `gate` and none of `up`. With stride 2 each rank's
shard is its slice of every block, concatenated: `[gate_r; up_r]`, so the rank can apply silu(gate) * up
locally. Example, 8 rows = [g0..g3; u0..u3], world 2, stride 2: rank 0 holds [g0 g1 u0 u1], rank 1
[g2 g3 u2 u3].
"""

from typing import List, Sequence

import torch

from megatron.core.errors import UserError


def divide(size: int, world_size: int, what: str) -> int:
    """`size // world_size`, or a UserError naming the flag (`what`) that does not split evenly."""
    if size % world_size:
        raise UserError(f"{what} {size} is not divisible by --tensor-model-parallel-size {world_size}")
    return size // world_size


def set_tensor_model_parallel_attributes(param: torch.Tensor, is_parallel: bool, partition_dim: int = 0,
                                         stride: int = 1) -> None:
    """Tag a parameter as split (with its dim and stride) or replicated across TP ranks."""
    param.tensor_model_parallel = is_parallel
    if is_parallel:
        param.partition_dim = partition_dim
        param.partition_stride = stride


def shard_tensor(full: torch.Tensor, partition_dim: int, stride: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's shard of `full` (a new tensor): its slice of each of the `stride` blocks, concatenated."""
    dim = partition_dim % full.dim()
    assert full.shape[dim] % (stride * world_size) == 0, \
        f"dim {dim} of size {full.shape[dim]} does not split into {stride} blocks x {world_size} ranks"
    blocks = full.chunk(stride, dim=dim)  # stride x [.., n/stride, ..]
    return torch.cat([b.chunk(world_size, dim=dim)[rank] for b in blocks], dim=dim)  # [.., n/tp, ..]


def merge_shards(shards: Sequence[torch.Tensor], partition_dim: int, stride: int) -> torch.Tensor:
    """The full tensor from every rank's shard, in rank order: the exact inverse of `shard_tensor`."""
    dim = partition_dim % shards[0].dim()
    per_rank = [s.chunk(stride, dim=dim) for s in shards]  # world x stride x [.., n/(tp*stride), ..]
    blocks: List[torch.Tensor] = [torch.cat([p[j] for p in per_rank], dim=dim) for j in range(stride)]
    return torch.cat(blocks, dim=dim)


def full_shape(param: torch.Tensor, world_size: int) -> torch.Size:
    """The shape of the unsplit parameter; a replicated parameter's own shape."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= world_size
    return torch.Size(shape)
