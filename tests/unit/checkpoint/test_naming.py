"""Folder names: built and parsed in one place, inverse of each other."""

from megatron.checkpoint import naming


def test_names_and_their_parsers_are_inverse():
    assert naming.iteration_dir_name(100) == "iter_0000100"
    assert naming.parse_iteration_dir("iter_0000100") == (100, "")
    assert naming.parse_iteration_dir("iter_0000100.tmp") == (100, "tmp")
    assert naming.parse_iteration_dir("iter_0000100.old") == (100, "old")
    for bad in ("iter_100", "iter_0000100.bak", "latest_checkpointed_iteration.txt", "iter_0000100/"):
        assert naming.parse_iteration_dir(bad) is None
    assert naming.rank_dir_name(1) == "mp_rank_01" and naming.rank_dir_name(1, 2) == "mp_rank_01_002"
    assert naming.parse_rank_dir("mp_rank_01") == (1, None) and naming.parse_rank_dir("mp_rank_01_002") == (1, 2)
    for bad in ("mp_rank_1", "mp_rank_01_2", "mp_rank_01.tmp", "iter_0000100"):
        assert naming.parse_rank_dir(bad) is None


def test_parallel_sizes_from_rank_folders():
    assert naming.parallel_sizes(["mp_rank_00"]) == (1, 1)
    assert naming.parallel_sizes(["mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"]) == (2, 2)
    assert naming.parallel_sizes(["mp_rank_00", "mp_rank_03", "notes.txt"]) == (4, 1)
    assert naming.parallel_sizes(["notes.txt"]) is None


def test_paths():
    assert naming.checkpoint_file("/r", 7, 1, 2) == "/r/iter_0000007/mp_rank_01_002/model_optim_rng.pt"
    assert naming.checkpoint_file("/r", 7) == "/r/iter_0000007/mp_rank_00/model_optim_rng.pt"
