"""The torch_dist format from the command line, in one process: resume, bad input, conversion, readers.

Multi-rank resharding is tests/distributed/test_dist_checkpoint.py; kills during asynchronous saves are
tests/reliability/test_crash_safe_saves.py.
"""

import json
import os
import shutil

import pytest
import torch

from megatron.checkpoint.reader import load_unsharded_checkpoint
from tests.functional.gpt_cli import TINY, run_inprocess, train_records

ARGV = TINY + ["--train-iters", "4", "--eval-iters", "0", "--bf16",
               "--use-distributed-optimizer"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A straight 4-iteration run that saved iterations 2 and 4 (torch_dist, the default)."""
    root = tmp_path_factory.mktemp("dist")
    assert run_inprocess(ARGV + ["--save", str(root / "ckpt"), "--save-interval", "2",
                                 "--log-json", str(root / "log.jsonl")]) == 0
    return root


def _copy(run, tmp_path):
    shutil.copytree(run / "ckpt", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_resume_is_exact_and_records_the_format(run, tmp_path):
    folder = run / "ckpt" / "iter_0000002"
    assert (folder / ".metadata").is_file() and (folder / "rng" / "mp_rank_00_000.json").is_file()
    assert json.loads((folder / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    common = json.loads((folder / "common.json").read_text())
    assert common["iteration"] == 2 and common["optimizer"]["step"] == 2 and common["optimizer"]["distributed"]
    root = tmp_path / "r"
    shutil.copytree(folder, root / "iter_0000002")
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    assert run_inprocess(ARGV + ["--load", str(root), "--save", str(root), "--log-json", str(tmp_path / "b.jsonl")]) == 0
    a, b = train_records(run / "log.jsonl"), train_records(tmp_path / "b.jsonl")
    assert [r["lm_loss"] for r in a[2:]] == [r["lm_loss"] for r in b]  # bf16, distributed optimizer: bit-exact


def test_async_save_needs_torch_dist(tmp_path, capsys):
    assert run_inprocess(ARGV + ["--save", str(tmp_path), "--ckpt-format", "torch", "--async-save"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --async-save needs --ckpt-format torch_dist (the torch format is written synchronously); "
                   "drop one of them"]
    assert not os.listdir(tmp_path)


def test_truncated_shard_is_one_line_and_fallback_passes_it(run, tmp_path, capsys):
    root = _copy(run, tmp_path)
    shard = root / "iter_0000004" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(100)
    argv = ARGV + ["--load", str(root), "--train-iters", "5"]
    assert run_inprocess(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint shard {shard} is truncated" in err[0] and "--load-fallback" in err[0], err
    assert run_inprocess(argv + ["--load-fallback"]) == 0
    out = capsys.readouterr().out
    assert "trying iteration 2" in out and "successfully loaded checkpoint" in out and "at iteration 2" in out


def test_legacy_only_reader_names_the_format_and_the_conversion(run):
    from megatron.checkpoint.protocol import load_checkpoint
    from megatron.core.errors import UserError

    with pytest.raises(UserError, match="it is a megatron-ltd torch_dist checkpoint: --load, evaluation and export "
                                        "read it as it is, and tools/checkpoint_util.py --merge"):
        load_checkpoint(str(run / "ckpt"))


def test_checkpoint_of_another_model_is_one_line(run, capsys):
    argv = ARGV + ["--load", str(run / "ckpt"), "--train-iters", "5"]
    argv[argv.index("--hidden-size") + 1] = "64"
    assert run_inprocess(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has another model" in err[0] and "--hidden-size 32 in the checkpoint, 64 here" in err[0], err


def test_conversion_both_ways_keeps_weights_and_optimizer(run, tmp_path, capsys):
    from tools.checkpoint_util import main as checkpoint_util

    src = str(run / "ckpt")
    assert checkpoint_util(["--load", src, "--save", str(tmp_path / "legacy"), "--merge"]) == 0
    assert (tmp_path / "legacy" / "iter_0000004" / "mp_rank_00" / "distrib_optim.pt").is_file()
    assert checkpoint_util(["--load", str(tmp_path / "legacy"), "--save", str(tmp_path / "back"),
                            "--target-ckpt-format", "torch_dist"]) == 0
    out = capsys.readouterr().out
    assert "-> torch_dist (any layout resumes it)" in out and "kept the optimizer's state" in out
    models = [load_unsharded_checkpoint(str(tmp_path / d)).model for d in (run / "ckpt", "legacy", "back")]
    for other in models[1:]:
        assert other.keys() == models[0].keys()
        assert all(torch.equal(models[0][k], other[k]) for k in other)
    # the converted torch_dist checkpoint resumes, optimizer included, and continues the straight run
    argv = ARGV + ["--train-iters", "6", "--load", str(tmp_path / "back"), "--save", str(tmp_path / "back"),
                   "--log-json", str(tmp_path / "c.jsonl")]
    assert run_inprocess(argv) == 0
    assert "RNG states are not restored" in capsys.readouterr().out
    assert [r["iteration"] for r in train_records(tmp_path / "c.jsonl")] == [5, 6]


def test_pickled_payload_in_metadata_is_refused_and_never_runs(run, tmp_path, capsys):
    import pickle

    from megatron.checkpoint.dcp_io import read_metadata
    from tests.unit.checkpoint.test_dcp_io import _Payload

    root = _copy(run, tmp_path)
    marker = tmp_path / "ran"
    md = read_metadata(str(root / "iter_0000004"))
    md.planner_data = _Payload(str(marker))
    with open(root / "iter_0000004" / ".metadata", "wb") as f:
        pickle.dump(md, f)
    assert run_inprocess(ARGV + ["--load", str(root), "--train-iters", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused checkpoint" in err[0] and "which is never run" in err[0], err
    assert not marker.exists()
