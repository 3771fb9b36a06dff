"""Data-parallel evaluation on two gloo ranks: lm-eval shards the documents by rank through the adapter's
hooks, and rank 0 alone reports the same metrics as one process."""

import pytest

from megatron.evaluation.checkpoint_model import load_gpt_checkpoint
from megatron.evaluation.lm_eval_adapter import MegatronGPTLM
from tests.distributed.launcher import run_distributed
from tests.unit.evaluation import fixtures


def _evaluate_on_rank(rank, world_size, ckpt, tasks_dir, expected, expected_counts):
    gpt = load_gpt_checkpoint(ckpt)
    lm = MegatronGPTLM(gpt.model, gpt.tokenizer, batch_size=2)
    assert (lm.rank, lm.world_size) == (rank, world_size)
    results = fixtures.evaluate(lm, tasks_dir)
    if rank == 0:
        # Each rank batches its own shard of the documents, so the fp32 forward passes see other batch
        # compositions than the single process: equal up to fp32 rounding (a perplexity of ~3e7 is exp of a
        # mean log-likelihood, which amplifies it), not bit for bit.
        assert fixtures.metrics(results) == pytest.approx(expected, rel=1e-6)
        assert results["n-samples"] == expected_counts
        assert sum(len(s) for s in results["samples"].values()) == sum(c["effective"] for c in expected_counts.values())
    else:
        assert results is None


def test_two_ranks_report_the_single_process_metrics_once(tmp_path_factory):
    setup = fixtures.tiny_setup(tmp_path_factory)
    gpt = load_gpt_checkpoint(setup["gpt2"])
    single = fixtures.evaluate(MegatronGPTLM(gpt.model, gpt.tokenizer, batch_size=2), setup["tasks"])
    run_distributed(_evaluate_on_rank, world_size=2,
                    args=(setup["gpt2"], setup["tasks"], fixtures.metrics(single), single["n-samples"]))
