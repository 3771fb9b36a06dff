"""--timing-log-level 2 on a pipeline with the distributed optimizer (PP=2 x DP=2 gloo ranks): the
schedule's p2p timers, the gradient reduce-scatter, the parameter all-gather and the tied-embedding
all-reduce are each reported as (min, max) over the ranks that ran them."""

from tests.distributed.test_gpt_equivalence import run_layout
from tests.functional.gpt_cli import TINY, train_records


def test_pipeline_and_distributed_optimizer_timers(tmp_path):
    log = tmp_path / "m.jsonl"
    run_layout(TINY + ["--train-iters", "3", "--eval-iters", "0", "--global-batch-size", "8",
                       "--make-vocab-size-divisible-by", "64", "--use-distributed-optimizer",
                       "--timing-log-level", "2", "--log-json", str(log)], tp=1, pp=2, dp=2)
    timers = train_records(log)[-1]["timers_ms"]
    for name in ("forward-backward", "optimizer", "grads-reduce-scatter", "params-all-gather",
                 "embedding-grads-all-reduce", "batch-generator", "random-ltd-draw", "forward-compute",
                 "backward-compute", "forward-recv", "forward-send", "backward-recv", "backward-send",
                 "forward-send-backward-recv", "backward-send-forward-recv"):
        lo, hi = timers[name]
        assert 0 < lo <= hi, name
    assert "grads-all-reduce" not in timers  # the distributed optimizer reduce-scatters
