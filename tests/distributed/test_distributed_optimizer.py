"""The distributed optimizer (ZeRO-1) trains the model one process trains.

A tiny GPT for 10 iterations, fp32, dropout off, random-LTD on (mid-ramp: r grows from 8 over 8
iterations): with `--use-distributed-optimizer` at DP=2, DP=4 (with both overlap flags and small buckets,
so reduce-scatters launch from the backward hooks and all-gathers are waited for by the next forward) and
TP=2 x PP=2 x DP=2 (tied embeddings across stages), every iteration's loss is the single-process run's
within 1e-5 relative. The DP ranks hold disjoint shards, so these runs check the reduce-scatter, the
sharded Adam step, the all-gather, and that the norm and clipping over shards equal the one-process ones.

Then resume: stopped at iteration 5 and resumed in the same layout (dropout on), the run repeats the
straight one bit for bit; a DP=2 checkpoint resumed at DP=4 (distrib_optim.pt is per parameter, in model
space, so it does not depend on the DP size) repeats it within the same 1e-5.
"""

import shutil

import pytest

from tests.distributed.test_gpt_equivalence import BASE, LTD, close, data, run_layout  # noqa: F401 (fixture)
from tests.functional.gpt_cli import train_records

DIST = ["--use-distributed-optimizer"]
OVERLAP = ["--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "3000"]


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("single") / "single.jsonl"
    run_layout(BASE + ["--data-path", data, "--log-json", str(log)] + LTD, 1, 1, 1)
    return train_records(log)


def assert_matches(ref, recs, what, rel=1e-5):
    assert [r["iteration"] for r in recs] == list(range(1, 11)), what
    for a, b in zip(ref, recs):
        assert a["kept_length"] == b["kept_length"], what
        assert close(a["lm_loss"], b["lm_loss"], rel), (what, a["iteration"], a["lm_loss"], b["lm_loss"])
        assert close(a["grad_norm"], b["grad_norm"], 1e-4), (what, a["iteration"], a["grad_norm"], b["grad_norm"])


@pytest.mark.parametrize("tp, pp, dp, extra", [
    (1, 1, 2, []),
    (1, 1, 4, OVERLAP),
    (2, 2, 2, OVERLAP),
], ids=["dp2", "dp4-overlap", "tp2-pp2-dp2-overlap"])
def test_distributed_optimizer_matches_single_process(tmp_path, data, single, tp, pp, dp, extra):  # noqa: F811
    log = tmp_path / "run.jsonl"
    run_layout(BASE + ["--data-path", data, "--log-json", str(log)] + LTD + DIST + extra, tp, pp, dp)
    recs = train_records(log)
    assert_matches(single, recs, (tp, pp, dp))
    assert single[4]["kept_length"] < 32, "the comparison should cover the LTD ramp"


def test_distributed_optimizer_resume_is_exact_and_dp_independent(tmp_path, data):  # noqa: F811
    argv = BASE + ["--data-path", data, "--save-interval", "5", "--ckpt-format", "torch"] + LTD + DIST
    drop = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    straight, resumed = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run_layout(argv + drop + ["--save", str(tmp_path / "a"), "--log-json", str(straight)], 1, 1, 2)
    run_layout(argv + drop + ["--save", str(tmp_path / "b"), "--log-json", str(resumed), "--exit-interval", "5"],
               1, 1, 2)
    assert (tmp_path / "b" / "iter_0000005" / "mp_rank_00" / "distrib_optim.pt").is_file()
    run_layout(argv + drop + ["--save", str(tmp_path / "b"), "--load", str(tmp_path / "b"), "--log-json",
                              str(resumed)], 1, 1, 2)
    a, b = train_records(straight), train_records(resumed)
    assert [r["iteration"] for r in b] == list(range(1, 11))
    assert [r["lm_loss"] for r in a] == [r["lm_loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]

    # dropout off: a DP=2 checkpoint at iteration 5 resumed at DP=4 continues the DP=2 run
    two, four = tmp_path / "c.jsonl", tmp_path / "d.jsonl"
    run_layout(argv + ["--save", str(tmp_path / "c"), "--log-json", str(two)], 1, 1, 2)
    shutil.copytree(tmp_path / "c" / "iter_0000005", tmp_path / "d" / "iter_0000005")
    (tmp_path / "d" / "latest_checkpointed_iteration.txt").write_text("5")
    run_layout(argv + ["--load", str(tmp_path / "d"), "--save", str(tmp_path / "d"), "--log-json", str(four)], 1, 1, 4)
    ref = train_records(two)
    recs = train_records(four)
    assert [r["iteration"] for r in recs] == list(range(6, 11))
    for x, y in zip(ref[5:], recs):
        assert close(x["lm_loss"], y["lm_loss"], 1e-5), (x["iteration"], x["lm_loss"], y["lm_loss"])
