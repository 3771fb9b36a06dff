"""Bad activation-recomputation flags to pretrain_gpt_ltd.py: one `error:` line, exit 2, no traceback."""

import pytest

from tests.functional.gpt_cli import TINY, assert_one_error_line, run_subprocess

FULL = ["--recompute-granularity", "full"]


@pytest.mark.parametrize("flags, needle", [
    (["--recompute-method", "uniform"], "--recompute-method needs --recompute-granularity full"),
    (["--recompute-granularity", "selective", "--recompute-method", "block"],
     "--recompute-method needs --recompute-granularity full"),
    (FULL, "--recompute-granularity full needs --recompute-method"),
    (["--recompute-num-layers", "1"], "--recompute-num-layers needs --recompute-granularity full"),
    (FULL + ["--recompute-method", "block", "--recompute-num-layers", "6"],
     "--recompute-num-layers 6 is more than the 4 layers of a pipeline stage"),
    (FULL + ["--recompute-method", "uniform", "--recompute-num-layers", "5"],
     "--recompute-num-layers 5 is more than the 4 layers of a pipeline stage"),
    (FULL + ["--recompute-method", "uniform", "--recompute-num-layers", "0"], "--recompute-num-layers must be >= 1"),
    (FULL + ["--recompute-activations"], "--recompute-activations means --recompute-granularity selective"),
    (["--recompute-granularity", "partial"], "invalid choice"),
], ids=["method-alone", "method-with-selective", "full-without-method", "num-layers-alone", "block-over-stage",
        "uniform-over-stage", "zero-layers", "activations-and-full", "bad-granularity"])
def test_bad_recompute_flags_one_line_no_traceback(tmp_path, flags, needle):
    proc = run_subprocess(TINY + ["--train-iters", "3", "--save", str(tmp_path / "ck")] + flags)
    assert_one_error_line(proc, needle)
    assert not (tmp_path / "ck").exists()


def test_good_recompute_flags_resolve_into_the_model_config():
    from megatron.training.arguments import parse_args
    from megatron.training.config import resolve_config

    def model(*flags):
        return resolve_config(parse_args(TINY + ["--train-iters", "3", *flags]), 97, world_size=1).model

    m = model(*FULL, "--recompute-method", "block")
    assert (m.recompute_granularity, m.recompute_method, m.recompute_num_layers) == ("full", "block", 1)
    m = model(*FULL, "--recompute-method", "uniform", "--recompute-num-layers", "2")
    assert (m.recompute_method, m.recompute_num_layers) == ("uniform", 2)
    assert model("--recompute-activations").recompute_granularity == "selective"
    m = model()
    assert (m.recompute_granularity, m.recompute_method, m.recompute_num_layers) == (None, None, None)


def test_num_layers_is_checked_against_a_pipeline_stage():
    """At PP=2 a stage of the 4-layer model holds 2 layers: block 3 cannot be (world size 2, no launch)."""
    from megatron.core.errors import UserError
    from megatron.training.arguments import parse_args
    from megatron.training.config import resolve_config

    flags = TINY + ["--train-iters", "3", "--pipeline-model-parallel-size", "2", *FULL, "--recompute-method", "block"]
    with pytest.raises(UserError, match="--recompute-num-layers 3 is more than the 2 layers of a pipeline stage"):
        resolve_config(parse_args(flags + ["--recompute-num-layers", "3"]), 97, world_size=2)
    config = resolve_config(parse_args(flags + ["--recompute-num-layers", "2"]), 97, world_size=2)
    assert config.model.recompute_num_layers == 2
