"""Full parameter <-> tensor-parallel shards: the layout each rank holds, and the exact inverse."""

import pytest
import torch

from megatron.core.errors import UserError
from megatron.core.tensor_parallel import divide, full_shape, merge_shards, set_tensor_model_parallel_attributes, shard_tensor


def test_stride_one_is_contiguous_slices():
    full = torch.arange(8.0).view(8, 1)
    assert shard_tensor(full, 0, 1, 0, 2).flatten().tolist() == [0, 1, 2, 3]
    assert shard_tensor(full, 0, 1, 1, 2).flatten().tolist() == [4, 5, 6, 7]


def test_stride_two_holds_a_slice_of_gate_and_of_up():
    full = torch.arange(8.0).view(8, 1)  # [gate = 0..3; up = 4..7]
    assert shard_tensor(full, 0, 2, 0, 2).flatten().tolist() == [0, 1, 4, 5]  # [gate_0; up_0]
    assert shard_tensor(full, 0, 2, 1, 2).flatten().tolist() == [2, 3, 6, 7]  # [gate_1; up_1]


def test_shard_is_a_copy_not_a_view():
    full = torch.zeros(4, 2)
    shard_tensor(full, 0, 1, 0, 2).fill_(1.0)
    assert full.sum() == 0


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_merge_inverts_shard(world, stride, dim):
    full = torch.randn(24, 12 * stride)
    shards = [shard_tensor(full, dim, stride, r, world) for r in range(world)]
    assert all(s.shape[dim] == full.shape[dim] // world for s in shards)
    assert torch.equal(merge_shards(shards, dim, stride), full)


def test_full_shape():
    w = torch.nn.Parameter(torch.empty(3, 5))
    set_tensor_model_parallel_attributes(w, True, partition_dim=1)
    assert full_shape(w, 4) == torch.Size([3, 20])
    b = torch.nn.Parameter(torch.empty(5))
    set_tensor_model_parallel_attributes(b, False)
    assert full_shape(b, 4) == torch.Size([5])
    assert full_shape(torch.nn.Parameter(torch.empty(2, 2)), 4) == torch.Size([2, 2])  # untagged: replicated


def test_divide_names_the_flag():
    assert divide(12, 4, "--num-attention-heads") == 3
    with pytest.raises(UserError, match="--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"):
        divide(6, 4, "--num-attention-heads")
