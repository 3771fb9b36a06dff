"""Process groups in Megatron's rank order, checked against the worked example in the reference."""

import pytest
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.errors import UserError
from tests.distributed.launcher import run_distributed

# 8 ranks, tp=2, pp=2 -> dp=2 (megatron-conventions.md 9.1 layout)
TP_GROUPS = [[0, 1], [2, 3], [4, 5], [6, 7]]
DP_GROUPS = [[0, 2], [1, 3], [4, 6], [5, 7]]
PP_GROUPS = [[0, 4], [1, 5], [2, 6], [3, 7]]


def _check(rank, world):
    def members(group):
        return sorted(dist.get_process_group_ranks(group))

    assert members(ps.get_tensor_model_parallel_group()) == next(g for g in TP_GROUPS if rank in g)
    assert members(ps.get_data_parallel_group()) == next(g for g in DP_GROUPS if rank in g)
    assert members(ps.get_pipeline_model_parallel_group()) == next(g for g in PP_GROUPS if rank in g)
    assert ps.get_tensor_model_parallel_rank() == rank % 2
    assert ps.get_data_parallel_rank() == (rank // 2) % 2
    assert ps.get_pipeline_model_parallel_rank() == rank // 4
    assert ps.is_pipeline_first_stage() == (rank < 4) and ps.is_pipeline_last_stage() == (rank >= 4)
    pp_group = next(g for g in PP_GROUPS if rank in g)
    assert ps.get_pipeline_model_parallel_next_rank() == pp_group[(pp_group.index(rank) + 1) % 2]
    assert members(ps.get_embedding_group()) == pp_group
    mp_group = [r for r in range(8) if (r // 2) % 2 == (rank // 2) % 2]
    assert members(ps.get_model_parallel_group()) == mp_group


def test_groups_match_megatron_layout():
    run_distributed(_check, world_size=8, tp=2, pp=2)


def test_single_process_defaults():
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1)
    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_data_parallel_world_size() == 1
    assert ps.get_tensor_model_parallel_group() is None and ps.is_pipeline_first_stage() and ps.is_pipeline_last_stage()
    ps.destroy_model_parallel()


def test_indivisible_world_size_is_a_user_error():
    with pytest.raises(UserError, match="not divisible"):
        ps.check_parallel_sizes(6, 4, 1)
