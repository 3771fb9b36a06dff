"""tools/checkpoint_util.py on a BERT checkpoint the trainer wrote in TP=2 x PP=2.

A tiny BERT (SwiGLU: stride-2 fc1 shards; tied embeddings: the last stage's copy) trains 3 iterations in
one process and on 4 gloo ranks from the same seed. Merging the sharded checkpoint with the tool gives
the single-process weights (the layouts train the same model, tests/distributed/test_bert_equivalence.py),
and splitting the single-process checkpoint gives the trainer's own rank files: same names, same local
layer numbers, same shards.
"""

import torch

from megatron.checkpoint import convert as cl
from megatron.checkpoint.protocol import load_checkpoint
from tests.distributed.launcher import GLOO, run_distributed
from tests.functional import bert_cli
from tests.scripts import load_script

tool = load_script("tools/checkpoint_util.py")
ARGV = bert_cli.TINY + GLOO + ["--swiglu", "--train-iters", "3", "--lr-warmup-iters", "1", "--eval-iters", "0",
                               "--data-path", "synthetic", "--ckpt-format", "torch"]  # Megatron's legacy rank files


def _train(rank, world, argv):
    from megatron.training.cli import run_cli

    assert run_cli(bert_cli.load_entry().main, argv) == 0


def close(a, b, key):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=key)


def test_trainer_bert_checkpoint_merges_and_splits_like_one_process(tmp_path, monkeypatch):
    bert_cli.use_synthetic_data(monkeypatch)
    argv = ARGV + ["--vocab-file", bert_cli.write_vocab(tmp_path)]
    assert bert_cli.run_inprocess(argv + ["--save", str(tmp_path / "single")]) == 0
    run_distributed(_train, world_size=4, args=(argv + ["--save", str(tmp_path / "sharded"),
                                                        "--tensor-model-parallel-size", "2",
                                                        "--pipeline-model-parallel-size", "2"],))
    assert tool.main(["--load", str(tmp_path / "sharded"), "--save", str(tmp_path / "merged"), "--merge"]) == 0
    single = load_checkpoint(str(tmp_path / "single"))["model"]
    merged = load_checkpoint(str(tmp_path / "merged"))["model"]
    assert list(merged) == list(single)
    assert {"output_layer.bias", "lm_head.dense.weight", "binary_head.weight", "embedding.tokentype_embeddings.weight",
            "encoder.layers.3.mlp.linear_fc1.weight"} <= set(merged)
    for key in single:
        close(merged[key], single[key], key)

    assert tool.main(["--load", str(tmp_path / "single"), "--save", str(tmp_path / "split"),
                      "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]) == 0
    trained = cl.read_checkpoint(str(tmp_path / "sharded"))
    split = cl.read_checkpoint(str(tmp_path / "split"))
    assert sorted(split.files) == sorted(trained.files) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for rank, ckpt in trained.files.items():
        mine = split.files[rank]["model"]
        assert sorted(mine) == sorted(ckpt["model"]), rank
        for key, value in ckpt["model"].items():
            close(mine[key], value, f"{rank} {key}")
