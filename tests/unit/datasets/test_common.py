"""The plumbing GPT and BERT data share: --split and --data-path parsing, the config base, and the
rank-0-first cache build on GPT (BERT's is in test_bert_dataset.py)."""

import json
import os

import numpy as np
import pytest

import megatron.core.datasets.gpt_dataset as gpt_module
from megatron.core.datasets.common import parse_blend, parse_split, split_matrix, split_range
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, build_gpt_datasets
from megatron.core.errors import UserError
from tests.unit.datasets.test_gpt_dataset import EOD, VOCAB, config, write_corpus


def test_split_parsing_and_ranges():
    m = split_matrix(parse_split("949,50,1"))
    assert [split_range(b, 1000) for b in m] == [(0, 949), (949, 999), (999, 1000)]
    m = split_matrix(parse_split("99,1,0"))
    assert m[2] is None and split_range(m[1], 10) == (10, 10)
    assert split_matrix(parse_split("1"))[1:] == [None, None]
    for bad in ["", "a,b", "1,2,3,4", "-1,2", "0,0,0"]:
        with pytest.raises(UserError, match="--split"):
            parse_split(bad)


def test_blend_forms():
    assert parse_blend(["a"]) == (["a"], None)
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    for bad in (["0.3", "a", "b"], ["0", "a"], ["1", "a", "x", "b"], []):
        with pytest.raises(UserError):
            parse_blend(bad)


def test_config_base_parses_data_path_and_split_and_names_the_cache(tmp_path):
    cfg = GPTDatasetConfig(seq_length=8, vocab_size=VOCAB, eod_token=EOD, split="80,20",
                           data_path=["0.3", str(tmp_path / "a"), "0.7", str(tmp_path / "b")])
    assert cfg.blend == ([str(tmp_path / "a"), str(tmp_path / "b")], [0.3, 0.7])
    assert cfg.split_matrix[2] is None and cfg.cache_dir == str(tmp_path / "cache" / "GPTDataset_indices")
    mock = GPTDatasetConfig(seq_length=8, vocab_size=VOCAB, eod_token=EOD, mock=True, data_cache_path="x")
    assert mock.blend is None and mock.cache_dir is None and mock.split == "1,1,1"


# -- several ranks: rank 0 builds the GPT indices, the others memory-map its cache ------------------------
def _ranks_build(rank, world_size, prefix, out_dir):
    if rank != 0:  # only rank 0 may build; the others must find its files
        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {rank} built a GPT index")

        gpt_module.build_indices = refuse
    train, _, _ = build_gpt_datasets(config([prefix], data_cache_path=os.path.join(out_dir, "cache")), [50, 0, 0])
    result = {"memmap": isinstance(train.shuffle_index, np.memmap),
              "tokens": [train[k]["tokens"].tolist() for k in range(len(train))]}
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)


def test_rank_0_builds_the_gpt_indices_and_the_others_map_them(tmp_path):
    from tests.distributed.launcher import run_distributed

    prefix = write_corpus(tmp_path / "c", 50, seed=4)
    run_distributed(_ranks_build, world_size=3, args=(prefix, str(tmp_path)), hang_after_s=120)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(3)]
    alone, _, _ = build_gpt_datasets(config([prefix], data_cache_path=str(tmp_path / "alone")), [50, 0, 0])
    for rank, g in enumerate(got):
        assert g["tokens"] == [alone[k]["tokens"].tolist() for k in range(len(alone))], rank  # as one process
        assert g["memmap"] == (rank != 0), rank  # rank 0 keeps what it built, the others map its file
