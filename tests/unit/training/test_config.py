"""The run configuration: every numeric flag range-checked in one place, resolved once into frozen
sections, stored in checkpoints as plain data."""

import dataclasses
import io

import pytest
import torch

from megatron.core.errors import UserError
from megatron.training.arguments import RANGES, _int_or_float, build_parser, check_ranges, parse_args
from megatron.training.bert_arguments import add_bert_args
from megatron.training.config import resolve_config
from megatron.training.run_length import RunLength
from tests.functional.gpt_cli import TINY

ARGV = TINY + ["--train-iters", "8"]
# checked with their cross-field rules by RandomLTDConfig.validate (r_0 against s and q)
LTD_SCHEDULE = {"random_ltd_start_seq_length", "random_ltd_seq_step", "random_ltd_ramp_iters",
                "random_ltd_ramp_fraction"}


def numeric_flags(parser):
    return {a.dest for a in parser._actions if a.type in (int, float, _int_or_float)}


def test_every_numeric_flag_has_a_range():
    parser = add_bert_args(build_parser())
    assert numeric_flags(parser) - LTD_SCHEDULE <= set(RANGES), numeric_flags(parser) - LTD_SCHEDULE - set(RANGES)


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "-1", "--lr must be >= 0, got -1"),
    ("--min-lr", "-0.5", "--min-lr must be >= 0, got -0.5"),
    ("--adam-beta1", "1", "--adam-beta1 must be in [0, 1), got 1"),
    ("--adam-eps", "0", "--adam-eps must be positive, got 0"),
    ("--weight-decay", "-0.1", "--weight-decay must be >= 0, got -0.1"),
    ("--clip-grad", "-1", "--clip-grad must be >= 0, got -1"),
    ("--hidden-dropout", "1.0", "--hidden-dropout must be in [0, 1), got 1"),
    ("--init-method-std", "0", "--init-method-std must be positive, got 0"),
    ("--seed", "-3", "--seed must be >= 0, got -3"),
    ("--micro-batch-size", "0", "--micro-batch-size must be positive, got 0"),
    ("--eval-iters", "-1", "--eval-iters must be >= 0, got -1"),
    ("--lr-warmup-fraction", "1.5", "--lr-warmup-fraction must be in [0, 1], got 1.5"),
    ("--make-vocab-size-divisible-by", "0", "--make-vocab-size-divisible-by must be >= 1, got 0"),
])
def test_out_of_range_values_are_one_user_error(flag, value, message):
    with pytest.raises(UserError) as e:
        parse_args(ARGV + [flag, value])
    assert str(e.value) == message


def test_lr_minus_one_is_one_line_and_exit_2(capsys):
    """It used to end in a torch traceback from inside the optimizer."""
    from tests.functional.gpt_cli import run_inprocess

    assert run_inprocess(ARGV + ["--lr", "-1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: --lr must be >= 0, got -1\n"


def test_parsing_does_not_mutate_and_the_config_is_frozen():
    flags = parse_args(ARGV)
    before = dict(vars(flags))
    config = resolve_config(flags, 97, world_size=1)
    assert vars(flags) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.training.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.hidden_size = 64
    with pytest.raises(TypeError):
        config.args["lr"] = 1.0  # a read-only mapping


def test_derived_values_are_resolved_once():
    config = resolve_config(parse_args(ARGV), 97, world_size=2)
    assert config.parallel.data_parallel_size == 2
    assert config.training.global_batch_size == 4 and config.training.num_micro_batches == 1
    assert config.model.vocab_size == config.args["padded_vocab_size"] == 128
    assert config.args["true_vocab_size"] == 97 and config.args["max_position_embeddings"] == 32
    assert config.args["split"] == "969,30,1" and config.data.split == "969,30,1"
    assert isinstance(config.run, RunLength) and config.run.train_iters == 8
    default_gbs = resolve_config(parse_args([a for a in ARGV] + ["--global-batch-size", "2"]), 97, world_size=1)
    assert default_gbs.training.num_micro_batches == 1


def test_world_size_must_divide_by_the_model_parallel_size():
    with pytest.raises(UserError, match="world size 4 is not divisible by tensor x pipeline parallel size 3 x 1"):
        resolve_config(parse_args(ARGV + ["--tensor-model-parallel-size", "3"]), 97, world_size=4)


def test_as_dict_is_plain_data_that_loads_with_weights_only():
    config = resolve_config(parse_args(ARGV + ["--random-ltd", "--random-ltd-start-seq-length", "8",
                                               "--random-ltd-seq-step", "4", "--random-ltd-ramp-iters", "4"]),
                            97, world_size=1)
    buffer = io.BytesIO()
    torch.save({"config": config.as_dict(), "args": dict(config.args)}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["config"]["model"]["hidden_size"] == 32
    assert loaded["config"]["run"]["ltd_layers"] == [1, 2]
    assert loaded["config"]["run"]["ltd"]["ramp_iters"] == 4
    assert loaded["args"]["random_ltd_start_seq_length"] == 8


def test_check_ranges_skips_flags_not_given():
    flags = build_parser().parse_args(ARGV)
    assert flags.global_batch_size == 4 and flags.lr_decay_iters is None
    check_ranges(flags)  # None (not given) is never out of range
