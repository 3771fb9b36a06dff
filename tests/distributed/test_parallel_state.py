"""Process groups in Megatron's rank order, checked against the worked example in the reference."""

import pytest
import torch
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


# --- which backend and device init_distributed picks ---------------------------------------------------

@pytest.fixture
def cuda_visible(monkeypatch):
    """Pretend a GPU is visible; record instead of calling torch.cuda.set_device. Fresh parallel state."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(ps, "_state", ps._State())
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return calls


def test_existing_gloo_group_wins_over_visible_cuda(cuda_visible):
    """A launcher's gloo group on a CUDA machine: the CPU, not cuda:LOCAL_RANK (a real 1-rank gloo group)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert ps.init_distributed(None) == torch.device("cpu") == ps.get_device()
        assert ps.init_distributed("gloo") == torch.device("cpu")
        with pytest.raises(UserError, match="already joined a gloo process group"):
            ps.init_distributed("nccl")
        assert cuda_visible == []
    finally:
        dist.destroy_process_group()


def test_without_a_group_cuda_means_nccl(cuda_visible):
    assert ps.init_distributed(None) == torch.device("cuda", 1) == ps.get_device()
    assert cuda_visible == [torch.device("cuda", 1)] and not dist.is_initialized()
    assert ps.init_distributed("gloo") == torch.device("cpu")


def test_existing_mixed_group_counts_as_nccl(cuda_visible, monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert ps.init_distributed(None) == torch.device("cuda", 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "mpi")
    with pytest.raises(UserError, match="'mpi' backend"):
        ps.init_distributed(None)
