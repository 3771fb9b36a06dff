"""Rebuilding a model from a checkpoint folder: what loads, and the one-line errors for what does not."""

import os
import shutil

import pytest
import torch

from megatron.checkpoint.naming import checkpoint_file
from megatron.core.errors import UserError
from megatron.evaluation.checkpoint_model import load_gpt_checkpoint
from tests.unit.evaluation import fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return fixtures.tiny_setup(tmp_path_factory)


def test_loads_model_tokenizer_and_config_from_args(setup):
    gpt = load_gpt_checkpoint(setup["llama"])
    assert not gpt.model.training and gpt.iteration == 3
    assert gpt.config.position_embedding_type == "rope" and gpt.config.swiglu
    assert gpt.config.vocab_size == gpt.args["padded_vocab_size"] == 384
    assert gpt.tokenizer.vocab_size == 300
    ckpt = torch.load(checkpoint_file(setup["llama"], 3), weights_only=True)
    for k, v in gpt.model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    same = load_gpt_checkpoint(os.path.join(setup["llama"], "iter_0000003"))  # one iteration folder
    assert same.path == gpt.path and same.iteration == 3


def test_pipeline_and_tensor_parallel_checkpoints_load_merged(setup, tmp_path):
    from megatron.checkpoint.convert import convert_checkpoint

    original = load_gpt_checkpoint(setup["llama"])
    convert_checkpoint(setup["llama"], str(tmp_path / "pp2"), 1, 2)  # same padded vocabulary at TP=1
    sharded = load_gpt_checkpoint(str(tmp_path / "pp2"))
    assert sorted(os.listdir(tmp_path / "pp2" / "iter_0000003")) == ["mp_rank_00_000", "mp_rank_00_001"]
    for k, v in original.model.state_dict().items():
        assert torch.equal(v, sharded.model.state_dict()[k]), k
    root = tmp_path / "broken"
    shutil.copytree(setup["gpt2"], root)
    shutil.copytree(root / "iter_0000003" / "mp_rank_00", root / "iter_0000003" / "mp_rank_01_001")
    with pytest.raises(UserError):
        load_gpt_checkpoint(str(root))  # an incomplete layout is a one-line error


@pytest.mark.parametrize("arch", sorted(fixtures.ARCHS))
def test_tensor_parallel_checkpoint_gives_the_original_logits(setup, tmp_path, arch):
    """tools/checkpoint_util.py splits the fixture into TP=2 shards (vocab re-padded for TP=2, as a TP=2
    run pads it); load_gpt_checkpoint merges them back into the model that computes the original's logits."""
    from tests.scripts import load_script

    assert load_script("tools/checkpoint_util.py").main(
        ["--load", setup[arch], "--save", str(tmp_path / "tp2"), "--target-tensor-parallel-size", "2",
         "--target-pipeline-parallel-size", "1"]) == 0
    assert sorted(os.listdir(tmp_path / "tp2" / "iter_0000003")) == ["mp_rank_00", "mp_rank_01"]
    original, sharded = load_gpt_checkpoint(setup[arch]), load_gpt_checkpoint(str(tmp_path / "tp2"))
    assert sharded.config.vocab_size == 512  # 300 ids padded to a multiple of 128 * TP
    n = original.tokenizer.vocab_size
    tokens = torch.randint(0, n, (2, fixtures.SEQ), generator=torch.Generator().manual_seed(0))  # [b, s]
    with torch.no_grad():
        want, got = original.model(tokens)[..., :n], sharded.model(tokens)[..., :n]  # [b, s, n] real ids only
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_moved_tokenizer_file_names_the_flag_and_can_be_overridden(setup, tmp_path):
    root = tmp_path / "moved"
    shutil.copytree(setup["gpt2"], root)
    path = checkpoint_file(str(root), 3)
    ckpt = torch.load(path, weights_only=True)
    ckpt["args"]["vocab_file"] = "/nowhere/vocab.json"
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="--vocab-file"):
        load_gpt_checkpoint(str(root))
    gpt = load_gpt_checkpoint(str(root), tokenizer_overrides={"vocab_file": setup["vocab"]})
    assert gpt.tokenizer.vocab_size == 300


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        load_gpt_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_gpt_checkpoint(str(tmp_path))


def test_a_bert_checkpoint_is_refused_with_one_clear_line():
    from megatron.evaluation.checkpoint_model import require_gpt

    require_gpt({"model_type": "gpt"})
    args = {"model_type": "bert", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
            "padded_vocab_size": 128}
    with pytest.raises(UserError, match="BERT checkpoint.*tasks/finetune_pair.py"):
        require_gpt(args)
