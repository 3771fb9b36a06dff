"""Full activation recomputation through the trainer: the logged losses and gradient norms of
`pretrain_gpt_ltd.py` are bit-identical with and without it, with hidden and attention dropout and
random-LTD mid-ramp on, in one process, at TP=2 (attention dropout from the per-rank tracker stream) and
at PP=2 (1F1B: several micro-batches in flight, each recomputed in its own backward), and under bf16
autocast (the rerun in backward re-enters it).
"""

import pytest

from tests.distributed.test_gpt_equivalence import LTD, run_layout
from tests.functional.gpt_cli import TINY, train_records

ARGV = TINY + ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--train-iters", "4", "--eval-iters", "0",
               "--make-vocab-size-divisible-by", "64"] + LTD
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]


@pytest.mark.parametrize("tp, pp, extra", [(1, 1, []), (2, 1, []), (1, 2, []), (1, 1, ["--bf16"])],
                         ids=["single", "tp2", "pp2", "bf16"])
def test_full_recompute_logs_identical_loss_and_grad_norm(tmp_path, tp, pp, extra):
    plain, recomputed = tmp_path / "plain.jsonl", tmp_path / "recompute.jsonl"
    run_layout(ARGV + extra + ["--log-json", str(plain)], tp, pp, 1)
    run_layout(ARGV + extra + RECOMPUTE + ["--log-json", str(recomputed)], tp, pp, 1)
    a, b = train_records(plain), train_records(recomputed)
    assert len(a) == len(b) == 4
    assert a[0]["kept_length"] < 32  # random-LTD drops tokens in these iterations
    for x, y in zip(a, b):
        assert x["lm_loss"] == y["lm_loss"] and x["grad_norm"] == y["grad_norm"], (x, y)
