"""The core check of parallelism: every layout trains the same model as one process.

A tiny GPT, 10 iterations from the same seed, dropout off: per-iteration losses, grad norms and the
final validation loss in TP=2, PP=2, DP=2 and TP=2 x PP=2 equal the single-process run (up to
floating-point reduction order), with random-LTD on and off. Then resume is exact in TP=2 x PP=2 and in
TP=2 x DP=2, with hidden and attention dropout on (so the RNG tracker's states must be restored).
"""

import pytest

from tests.distributed.launcher import GLOO, run_distributed
from tests.functional.gpt_cli import TINY, make_pattern_data, read_json_lines, run_inprocess, train_records

LTD = ["--random-ltd", "--random-ltd-start-seq-length", "8", "--random-ltd-seq-step", "4",
       "--random-ltd-ramp-iters", "8"]
BASE = [a for a in TINY if a != "--mock-data"] + [
    "--hidden-dropout", "0", "--attention-dropout", "0", "--train-iters", "10", "--eval-interval", "5",
    "--eval-iters", "1", "--split", "90,10,0", "--make-vocab-size-divisible-by", "64", "--global-batch-size", "8"]


def _train(rank, world, argv):
    assert run_inprocess(argv) == 0


def run_layout(argv, tp, pp, dp):
    world = tp * pp * dp
    argv = argv + GLOO + ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    if world == 1:
        assert run_inprocess(argv) == 0
    else:
        run_distributed(_train, world_size=world, args=(argv,))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_pattern_data(tmp_path_factory.mktemp("data"))


def close(a, b, rel=2e-5):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-8)


@pytest.mark.parametrize("ltd", [False, True], ids=["dense", "ltd"])
def test_layouts_match_single_process(tmp_path, data, ltd):
    argv = BASE + ["--data-path", data] + (LTD if ltd else [])
    logs = {}
    for tp, pp, dp in [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)]:
        log = tmp_path / f"tp{tp}pp{pp}dp{dp}.jsonl"
        run_layout(argv + ["--log-json", str(log)], tp, pp, dp)
        logs[(tp, pp, dp)] = read_json_lines(log)
    ref = logs[(1, 1, 1)]
    ref_train = [r for r in ref if "lm_loss" in r]
    assert len(ref_train) == 10
    for layout, recs in logs.items():
        train = [r for r in recs if "lm_loss" in r]
        assert [r["iteration"] for r in train] == list(range(1, 11)), layout
        for a, b in zip(ref_train, train):
            assert a["kept_length"] == b["kept_length"] and a["consumed_layer_tokens"] == b["consumed_layer_tokens"]
            assert close(a["lm_loss"], b["lm_loss"]), (layout, a["iteration"], a["lm_loss"], b["lm_loss"])
            assert close(a["grad_norm"], b["grad_norm"], 1e-4), (layout, a["iteration"], a["grad_norm"], b["grad_norm"])
        vals_a = [r["val_loss"] for r in ref if "val_loss" in r]
        vals_b = [r["val_loss"] for r in recs if "val_loss" in r]
        assert len(vals_a) == len(vals_b) == 2 and all(close(x, y) for x, y in zip(vals_a, vals_b)), layout
    if ltd:
        assert ref_train[0]["kept_length"] == 8


@pytest.mark.parametrize("tp, pp, dp, fmt, folders", [
    (2, 2, 1, "torch", ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]),
    (2, 1, 2, "torch", ["mp_rank_00", "mp_rank_01"]),  # DP ranks share their (TP, PP) file
    (2, 2, 1, "torch_dist", ["mp_rank_00_000.json", "mp_rank_00_001.json", "mp_rank_01_000.json",
                             "mp_rank_01_001.json"]),  # the RNG files, one per (TP, PP) rank
], ids=["tp2pp2", "tp2dp2", "tp2pp2-torch_dist"])
def test_resume_in_sharded_layout_is_exact(tmp_path, data, tp, pp, dp, fmt, folders):
    """Stopped at iteration 5 and resumed, the run logs the straight run's losses bit for bit. Attention
    dropout runs under the RNG tracker's per-TP-rank stream, so this needs its checkpointed state."""
    argv = BASE + ["--data-path", data, "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
                   "--save-interval", "5", "--ckpt-format", fmt] + LTD
    straight, resumed = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run_layout(argv + ["--save", str(tmp_path / "a"), "--log-json", str(straight)], tp, pp, dp)
    run_layout(argv + ["--save", str(tmp_path / "b"), "--log-json", str(resumed), "--exit-interval", "5"], tp, pp, dp)
    run_layout(argv + ["--save", str(tmp_path / "b"), "--load", str(tmp_path / "b"), "--log-json", str(resumed)],
               tp, pp, dp)
    a, b = train_records(straight), train_records(resumed)
    assert [r["iteration"] for r in b] == list(range(1, 11))
    assert [r["lm_loss"] for r in a] == [r["lm_loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    folder = tmp_path / "a" / "iter_0000010"
    assert sorted(p.name for p in (folder / "rng" if fmt == "torch_dist" else folder).iterdir()) == folders


def test_merged_tp2_pp2_checkpoint_equals_single_process(tmp_path, data):
    """Train TP=2 x PP=2 and one process side by side, merge the sharded checkpoint: same weights."""
    import torch

    from megatron.checkpoint.convert import convert_checkpoint
    from megatron.checkpoint.protocol import load_checkpoint

    argv = BASE + ["--data-path", data, "--untie-embeddings-and-output-weights", "--swiglu", "--ckpt-format",
                   "torch"] + LTD
    run_layout(argv + ["--save", str(tmp_path / "single")], 1, 1, 1)
    run_layout(argv + ["--save", str(tmp_path / "sharded")], 2, 2, 1)
    convert_checkpoint(str(tmp_path / "sharded"), str(tmp_path / "merged"), 1, 1)
    single = load_checkpoint(str(tmp_path / "single"))["model"]
    merged = load_checkpoint(str(tmp_path / "merged"))["model"]
    assert sorted(single) == sorted(merged)
    for key in single:
        torch.testing.assert_close(merged[key], single[key], atol=2e-5, rtol=1e-4, msg=key)
