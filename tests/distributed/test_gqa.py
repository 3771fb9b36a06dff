"""Grouped-query attention split by query group across tensor-parallel ranks: a TP=2 run trains the same
model as one process (random-LTD on), its merged checkpoint holds the same weights, and a group count
that does not split over the ranks is one `error:` line on every rank."""

import json
import os

import torch

from megatron.checkpoint.convert import convert_checkpoint
from megatron.checkpoint.protocol import load_checkpoint
from megatron.evaluation.checkpoint_model import load_gpt_checkpoint
from tests.distributed.launcher import GLOO, run_distributed
from tests.distributed.test_gpt_equivalence import BASE, LTD, close, data, run_layout  # noqa: F401 (fixture)
from tests.distributed.test_torchrun import _train_and_record
from tests.functional.gpt_cli import TINY, train_records

GQA = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
       "--group-query-attention", "--num-query-groups", "2", "--rotary-percent", "0.5"]


def test_gqa_tp2_matches_single_process_and_merges(tmp_path, data):  # noqa: F811
    argv = BASE + ["--data-path", data] + GQA + LTD + ["--ckpt-format", "torch"]  # the tool merges legacy files
    logs = {}
    for tp in (1, 2):
        logs[tp] = tmp_path / f"tp{tp}.jsonl"
        run_layout(argv + ["--log-json", str(logs[tp]), "--save", str(tmp_path / f"tp{tp}")], tp, 1, 1)
    a, b = train_records(logs[1]), train_records(logs[2])
    assert len(a) == len(b) == 10
    for x, y in zip(a, b):
        assert x["kept_length"] == y["kept_length"]
        assert close(x["lm_loss"], y["lm_loss"]), (x["iteration"], x["lm_loss"], y["lm_loss"])
        assert close(x["grad_norm"], y["grad_norm"], 1e-4), (x["iteration"], x["grad_norm"], y["grad_norm"])
    assert a[0]["kept_length"] == 8

    # the TP=2 checkpoint, merged to one file by the partition tags, holds the single process's weights
    convert_checkpoint(str(tmp_path / "tp2"), str(tmp_path / "merged"), 1, 1)
    single = load_checkpoint(str(tmp_path / "tp1"))["model"]
    merged = load_checkpoint(str(tmp_path / "merged"))["model"]
    assert sorted(single) == sorted(merged)
    assert single["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 8, 32)
    for key in single:
        torch.testing.assert_close(merged[key], single[key], atol=2e-5, rtol=1e-4, msg=key)
    loaded = load_gpt_checkpoint(str(tmp_path / "merged"))  # rebuilds the GQA model from the saved args
    assert loaded.config.num_query_groups == 2 and loaded.config.rotary_percent == 0.5


def test_groups_not_divisible_by_tp_fail_on_every_rank(tmp_path):
    argv = TINY + GLOO + ["--train-iters", "3", "--save", str(tmp_path / "ck"), "--tensor-model-parallel-size", "2",
                          "--group-query-attention", "--num-query-groups", "1"]
    run_distributed(_train_and_record, world_size=2, args=(argv, str(tmp_path)), hang_after_s=120)
    for rank in range(2):
        rec = json.loads((tmp_path / f"rank{rank}.json").read_text())
        errors = [line for line in rec["stderr"].splitlines() if line.startswith("error: ")]
        assert rec["code"] == 2 and len(errors) == 1, (rank, rec)
        assert "--num-query-groups 1 is not divisible by --tensor-model-parallel-size 2" in errors[0], errors
        assert "Traceback" not in rec["stderr"], rec["stderr"][-2000:]
    assert not os.path.exists(tmp_path / "ck")
